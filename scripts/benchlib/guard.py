"""How a benchmark run ends: a BenchError or an interruption (Ctrl-C or SIGTERM) ends
it with a one-line message, after every `finally` on the way out has unmounted what it
mounted and stopped what it started."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class BenchError(Exception):
    """A problem that ends the run with a one-line message."""


def _interrupt(signum: int, frame: object) -> None:
    # a second SIGTERM must not cut short the clean-up the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_guarded(prog: str, run: Callable[[], int]) -> int:
    """Run a benchmark: SIGTERM stops it like Ctrl-C, and a BenchError or an
    interruption ends it with a one-line message (its targets clean up on the way out)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run()
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; all it mounted or started is stopped", file=sys.stderr)
        return 130
