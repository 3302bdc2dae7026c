"""Test-only sync points: named places where a test makes one thread wait for another.

``sync_point(name)`` does nothing unless a test has hooked ``name`` (``hook``), in
which case it calls the hook in the thread that reached it: the hook may block on an
event the test sets once it has done its part meanwhile (appends racing a rewrite).
This makes races deterministic, the way RocksDB's SyncPoint does. Production code
pays one dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_hooks: dict[str, Callable[[], None]] = {}


def sync_point(name: str) -> None:
    hook = _hooks.get(name)
    if hook is not None:
        hook()


@contextmanager
def hooked(name: str, hook: Callable[[], None]) -> Iterator[None]:
    """Run ``hook`` whenever ``name`` is reached, for the duration of the block."""
    _hooks[name] = hook
    try:
        yield
    finally:
        _hooks.pop(name, None)
