"""Typed errors of the engine. Every message is one line that names what to fix."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine reports; str() is the one-line message."""


class Corruption(EngineError):
    """Bytes on disk fail their checksum or structure; carries the file and offset."""

    def __init__(self, path: str, offset: int | None, what: str) -> None:
        self.path = str(path)
        self.offset = offset
        self.what = what
        where = self.path if offset is None else f"{self.path} at offset {offset}"
        super().__init__(f"corruption in {where}: {what}")


class LockError(EngineError):
    """The database directory is locked by another process (or another open handle)."""


class InvalidArgument(EngineError):
    """A caller passed something the engine cannot accept (wrong type, bad option)."""


class DBClosed(EngineError):
    """An operation was attempted on a closed database."""


class BackgroundError(EngineError):
    """A background flush or compaction failed; writes are refused until reopen."""


class IngestionError(EngineError):
    """A file given to ``DB.ingest`` cannot be ingested; names the file and why.
    The database is left as it was."""
