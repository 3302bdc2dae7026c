"""An LRU cache of checked SST block views with a byte budget.

Keys are ints (table number and block index packed together), values are block
views (engine/sst.py), each charged an estimate of its memory. Invariant: after every insert the
total charge is within the budget (a single block larger than the budget is not
kept). Lookups take no lock; the GIL makes each OrderedDict call atomic and a lost
recency update only affects which block is evicted next.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class BlockCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.usage = 0
        self.hits = 0
        self.misses = 0
        self._map: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> Any:
        e = self._map.get(key)
        if e is None:
            self.misses += 1
            return None
        self.hits += 1
        try:
            self._map.move_to_end(key)
        except KeyError:
            pass
        return e[0]

    def insert(self, key: int, value: Any, charge: int) -> None:
        if charge > self.capacity:
            return
        with self._lock:
            old = self._map.pop(key, None)
            if old is not None:
                self.usage -= old[1]
            self._map[key] = (value, charge)
            self.usage += charge
            while self.usage > self.capacity and self._map:
                _, (_, c) = self._map.popitem(last=False)
                self.usage -= c

    def erase_table(self, base: int, count: int) -> None:
        """Drop the blocks of one table (keys ``base .. base + count - 1``)."""
        with self._lock:
            for key in range(base, base + count):
                old = self._map.pop(key, None)
                if old is not None:
                    self.usage -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._map.clear()
            self.usage = 0
