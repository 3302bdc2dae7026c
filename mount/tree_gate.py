"""A shared/exclusive gate over changes to the backing tree's names.

Every request that changes names (create, mknod, mkdir, symlink, unlink, rmdir,
rename, link, truncation to zero) passes the gate shared: any number at once, as the
kernel sends them. Re-encryption passes it exclusive to put a new copy of a file in
place of all its names: no name may move while it checks them and renames over them.
An exclusive holder waits for the shared ones inside to leave and keeps new ones out
(they queue behind it, so a steady stream of requests cannot starve it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class TreeGate:
    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders queued: new shared ones wait behind them
        self._loosened = trio.Event()  # set (and replaced) whenever a holder leaves

    def _wake(self) -> None:
        self._loosened.set()
        self._loosened = trio.Event()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive or self._waiting:
            await self._loosened.wait()
        self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            if not self._shared:
                self._wake()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._waiting += 1
        try:
            while self._exclusive or self._shared:
                await self._loosened.wait()
        except BaseException:
            self._waiting -= 1
            self._wake()  # shared requests queued behind this one may go
            raise
        self._waiting -= 1
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._wake()
