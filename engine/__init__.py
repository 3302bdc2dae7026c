"""An LSM key-value engine: ``from engine import DB, Options, WriteBatch``.

Files in a database directory: LOCK, CURRENT, MANIFEST-n, n.log (write-ahead log),
n.sst (sorted tables), OPTIONS. docs/engine-format.md describes their bytes.
"""

from .db import DB, Snapshot, WriteBatch
from .errors import (
    BackgroundError,
    Corruption,
    DBClosed,
    EngineError,
    InvalidArgument,
    LockError,
)
from .options import Options

__all__ = [
    "DB",
    "BackgroundError",
    "Corruption",
    "DBClosed",
    "EngineError",
    "InvalidArgument",
    "LockError",
    "Options",
    "Snapshot",
    "WriteBatch",
]
