"""Write pacing and stalls: how fast writers may go while background work is behind.

Writers are slowed down (RocksDB's delayed writes) while

- level 0 holds ``level0_slowdown_writes_trigger`` tables or more: every 32nd write
  sleeps 1 ms, so compaction can catch up;
- every immutable memtable slot is still being flushed and the active memtable has
  run past ``write_buffer_size`` (it may grow to ``MEMTABLE_OVERRUN`` times that):
  writes are paced so the room left lasts until the flush is expected to end,
  judged by the last flush's speed. A flush that takes a little longer than filling
  a memtable then costs memory and short sleeps, not a write stall.

and stopped (a stall: the writer waits for background work) when the active
memtable reaches that hard limit with no slot free, or level 0 reaches
``level0_stop_writes_trigger``. The DB does the waiting and the switching; this
module decides. Invariant: ``slowdown`` is true whenever a writer must call
``delay``, and writers test only that flag, so an unhindered write costs one
attribute test.
"""

from __future__ import annotations

import enum
import time

from .options import Options

# How far past write_buffer_size the active memtable may grow while flushes run.
MEMTABLE_OVERRUN = 1.5
# A flush running late is expected to need at least this fraction of its estimate more.
FLUSH_LATE_FRACTION = 0.25
# The flush speed assumed before any flush has been timed (bytes of memtable per second).
DEFAULT_FLUSH_RATE = 16 << 20
# Timed flushes never count as slower than this, so one slow flush cannot stall pacing.
MIN_FLUSH_RATE = 1 << 20
# Pacing sleeps are taken once the owed delay reaches this, not per write.
MIN_DELAY_SLEEP = 0.001


class Room(enum.Enum):
    """What a writer whose memtable is full does next."""

    SWITCH = "switch"  # start a new memtable now
    PACE = "pace"  # keep writing into the overrunning memtable, paced
    STALL = "stall"  # wait for a flush or a compaction to finish


class WriteController:
    """The pacing state of one database; its callers hold the DB's lock, except
    ``delay``, which runs before a write takes it."""

    def __init__(self, options: Options) -> None:
        self._write_buffer_size = options.write_buffer_size
        self._max_immutables = options.max_write_buffer_number - 1
        self._slowdown_trigger = options.level0_slowdown_writes_trigger
        self._stop_trigger = options.level0_stop_writes_trigger
        # Writers call delay() while level 0 is behind (_l0_slow) or the active
        # memtable overruns while every immutable slot flushes (paced).
        self.slowdown = False
        self.paced = False
        self._l0_slow = False
        self._write_count = 0
        self._flush_rate = float(DEFAULT_FLUSH_RATE)
        # When the running flush is expected to end, and how long it should take.
        self.flush_deadline = 0.0
        self.flush_estimate = 0.0
        self._pace_until = 0.0

    def set_level0_files(self, count: int) -> None:
        """Track level 0's size (every time a version is published)."""
        self._l0_slow = count >= self._slowdown_trigger
        self.slowdown = self._l0_slow or self.paced

    def delay(self, nbytes: int, memtable_size: int) -> None:
        """Sleep as long as a write of ``nbytes`` should wait (see the module docstring).

        Pacing is a token bucket whose rate is the room left before the hard limit
        over the time the flush should still take: each write moves ``_pace_until``
        on by its bytes at that rate, and the writer sleeps only once it is at least
        ``MIN_DELAY_SLEEP`` ahead of the clock (so writers slower than the rate
        never sleep).
        """
        if self.paced:
            now = time.monotonic()
            room = self._write_buffer_size * MEMTABLE_OVERRUN - memtable_size
            if room <= 0:
                return  # the write stalls in make_room instead
            remaining = max(self.flush_deadline - now,
                            FLUSH_LATE_FRACTION * self.flush_estimate, MIN_DELAY_SLEEP)
            until = max(self._pace_until, now) + nbytes * remaining / room
            self._pace_until = until
            if until - now >= MIN_DELAY_SLEEP:
                time.sleep(until - now)
            return
        self._write_count += 1
        if self._write_count % 32 == 0:
            time.sleep(0.001)

    def make_room(self, memtable_size: int, immutables: int, level0_files: int, force: bool,
                  closing: bool) -> Room:
        """What to do about a full memtable (or a forced switch, for a flush)."""
        if immutables >= self._max_immutables:
            if not force and memtable_size < self._write_buffer_size * MEMTABLE_OVERRUN:
                if not self.paced:
                    self.paced = self.slowdown = True
                return Room.PACE
            return Room.STALL
        # A closing database flushes its last memtable whatever level 0 holds.
        if level0_files >= self._stop_trigger and not closing:
            return Room.STALL
        return Room.SWITCH

    def memtable_switched(self) -> None:
        """A new memtable is active: the overrun, if any, is over."""
        self.paced = False
        self.slowdown = self._l0_slow

    def flush_started(self, memtable_size: int) -> float:
        """Note a flush of ``memtable_size`` bytes starting now; return the start time."""
        started = time.monotonic()
        self.flush_estimate = memtable_size / self._flush_rate
        self.flush_deadline = started + self.flush_estimate
        return started

    def flush_finished(self, memtable_size: int, started: float) -> None:
        """Learn the flush speed from a flush that began at ``started``."""
        elapsed = time.monotonic() - started
        if elapsed > 0 and memtable_size:
            self._flush_rate = max(memtable_size / elapsed, float(MIN_FLUSH_RATE))
