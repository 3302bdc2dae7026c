"""What `tdefs mount` is asked to do, and the error of a mount that cannot be made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from encfs.errors import TdefsError
from encfs.masterkey import MasterKeySource

POLL_US_DEFAULT = 200
POLL_US_MAX = 10_000


class MountError(TdefsError):
    """The mount cannot be made, found or removed."""


@dataclass
class MountRequest:
    backing: Path
    mountpoint: Path
    source: MasterKeySource
    foreground: bool = False
    allow_other: bool = False
    log_file: Path | None = None
    writeback_cache: bool = True
    xattrs: bool = False
    # None: the vault's own option (vault.json rotation_period_days); 0: never
    rotation_period_days: float | None = None
    metrics_listen: str | None = None  # [HOST:]PORT of an HTTP endpoint for Prometheus
    metrics_file: Path | None = None  # a file rewritten with the metrics every few seconds
    # µs the daemon looks for the next request before it sleeps (0: never); needs the
    # polling patch to pyfuse3 (patches/README.md)
    poll_us: int = POLL_US_DEFAULT
    # file times in whole seconds, so an fsync sends no SETATTR of them (needs the
    # time-gran patch to pyfuse3)
    coarse_times: bool = False
