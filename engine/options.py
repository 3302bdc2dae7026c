"""Options of a database and the OPTIONS file that records them.

The OPTIONS file is ``name=value`` lines, written at every open that may write (tmp +
rename; a read-only open writes nothing); it documents how the database was last
opened and is not read back.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .errors import InvalidArgument
from .table_format import COMPRESSIONS


@dataclass
class Options:
    # Create a database where there is none (no CURRENT file), but only in a missing
    # or empty directory: one holding other files is refused and left untouched.
    # A read-only open (DB.open(..., read_only=True)) never creates.
    create_if_missing: bool = True
    # Refuse to open a database that already exists (CURRENT is present).
    error_if_exists: bool = False
    # The write buffer and level-1 budget follow RocksDB's defaults.
    write_buffer_size: int = 64 << 20
    max_write_buffer_number: int = 2
    level0_file_num_compaction_trigger: int = 4
    level0_slowdown_writes_trigger: int = 20
    level0_stop_writes_trigger: int = 36
    max_bytes_for_level_base: int = 256 << 20
    max_bytes_for_level_multiplier: float = 10
    target_file_size_base: int = 8 << 20
    num_levels: int = 7
    block_size: int = 4096
    block_cache_size: int = 32 << 20
    bloom_bits_per_key: int = 10
    # Data blocks are compressed with LZ4 unless that saves less than an eighth
    # ("none" or "zlib" also accepted); RocksDB compresses by default too.
    compression: str = "lz4"
    # Check the level invariants (ordering, overlaps, epochs) when opening.
    paranoid_checks: bool = True
    max_background_compactions: int = 1
    # Build tables in forked child processes so the foreground keeps the interpreter.
    background_processes: bool = True

    def validate(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise InvalidArgument("compression must be one of " + ", ".join(COMPRESSIONS)
                                  + f", not {self.compression!r}")
        if self.num_levels < 2:
            raise InvalidArgument("num_levels must be at least 2")
        for name in ("write_buffer_size", "block_size", "target_file_size_base",
                     "max_bytes_for_level_base", "level0_file_num_compaction_trigger",
                     "max_background_compactions"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be positive")
        if self.max_write_buffer_number < 2:
            raise InvalidArgument("max_write_buffer_number must be at least 2")
        if self.max_bytes_for_level_multiplier <= 1:
            raise InvalidArgument("max_bytes_for_level_multiplier must be above 1")
        if not 0 <= self.bloom_bits_per_key <= 64:
            raise InvalidArgument("bloom_bits_per_key must be in 0..64")

    def to_text(self) -> str:
        lines = ["# lsmdb options, written at open"]
        for f in dataclasses.fields(self):
            lines.append(f"{f.name}={getattr(self, f.name)}")
        return "\n".join(lines) + "\n"

    def write_file(self, dbpath: str) -> None:
        tmp = os.path.join(dbpath, "OPTIONS.dbtmp")
        with open(tmp, "w") as f:
            f.write(self.to_text())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(dbpath, "OPTIONS"))
