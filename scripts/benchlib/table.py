"""Figures formatted for people, and tables of them with aligned columns."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def fmt_value(value: float | None) -> str:
    """A figure with a precision that suits its size; '-' for none."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    """a / b to two decimals; '-' when either is missing or b is zero."""
    return f"{a / b:.2f}" if a is not None and b else "-"


def fmt_rate(x: float) -> str:
    """A rate in thousands or millions: 12.3k, 1.25M."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_bytes(x: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str,
                title: str | None = None) -> None:
    """Print `rows` under `header`, a dashed rule between; `align` has an 'l' or an 'r'
    per column. A blank line (and the title, if any) goes first."""
    if len(align) != len(header):
        raise ValueError(f"align {align!r} does not fit {len(header)} columns")
    lines = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    if title:
        print(title)
    for i, line in enumerate(lines):
        cells = [c.ljust(w) if a == "l" else c.rjust(w)
                 for c, w, a in zip(line, widths, align, strict=True)]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()
