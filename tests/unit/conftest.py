"""Unit-test session hooks: the power-loss cases' state counts in the summary."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001, ANN201
    try:
        from powerloss import STATE_COUNTS
    except ImportError:
        return
    if not STATE_COUNTS:
        return
    terminalreporter.section("power-loss crash states checked")
    total = 0
    for case, (states, combos, calls, sampled) in sorted(STATE_COUNTS.items()):
        terminalreporter.write_line(f"{case:52} {states:5} states ({combos} combinations"
                                    f"{', sampled' if sampled else ''}, {calls} calls)")
        total += states
    terminalreporter.write_line(f"{'total':52} {total:5} states")
