"""An LSM key-value engine: ``from engine import DB, Options, WriteBatch``.

Files in a database directory: LOCK, CURRENT, MANIFEST-n, n.log (write-ahead log),
n.sst (sorted tables), OPTIONS. docs/engine-format.md describes their bytes.
"""

from .db import DB
from .errors import (
    BackgroundError,
    Corruption,
    DBClosed,
    EngineError,
    IngestionError,
    InvalidArgument,
    LockError,
)
from .options import Options
from .snapshots import Snapshot
from .sst_file_writer import ExternalSstInfo, SstFileWriter
from .write_batch import WriteBatch

__all__ = [
    "DB",
    "BackgroundError",
    "Corruption",
    "DBClosed",
    "EngineError",
    "ExternalSstInfo",
    "IngestionError",
    "InvalidArgument",
    "LockError",
    "Options",
    "Snapshot",
    "SstFileWriter",
    "WriteBatch",
]
