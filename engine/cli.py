"""The ``lsmdb`` command: use and inspect an engine database from a shell.

    lsmdb PATH put KEY VALUE | get KEY | delete KEY
    lsmdb PATH delete-range BEGIN END | single-delete KEY
    lsmdb PATH ingest FILE... [--move]
    lsmdb PATH scan [--from KEY] [--to KEY] [--limit N] [--reverse]
    lsmdb PATH compact | stats | check
    lsmdb PATH hash [--from KEY] [--to KEY]
    lsmdb dump-manifest FILE | dump-sst FILE | dump-wal FILE

Keys and values are taken as UTF-8 text, or as hex with ``--hex``; output escapes
bytes that are not printable ASCII (or prints hex with ``--hex``). Every error is
one line ``lsmdb: error: ...`` with a non-zero exit status.

get, scan, hash, stats and check open the database read-only: they never create or change
a file, and fail on a PATH that is not a database. put, delete and ingest create a
database in a missing or empty directory, never in one holding other files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .content_hash import content_hash
from .db import DB
from .errors import EngineError
from .options import Options
from .sst_file_writer import EXTERNAL_PROPERTY
from .table_reader import TableReader
from .tags import KIND_PUT, KIND_SINGLE_DELETE
from .version import VersionEdit
from .wal import read_records
from .write_batch import SINGLE_DELETE, RangeEnd, decode_batch

DUMP_COMMANDS = ("dump-manifest", "dump-sst", "dump-wal")
# Only reads, so a mistyped PATH is reported rather than turned into a database.
READ_ONLY_COMMANDS = ("get", "scan", "hash", "stats", "check")
# May create the database; compact needs one to exist, as there is nothing to compact.
CREATING_COMMANDS = ("put", "delete", "delete-range", "single-delete", "ingest")


class UsageError(Exception):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def escape(data: bytes) -> str:
    out = []
    for b in data:
        if 0x20 <= b < 0x7F and b != 0x5C:
            out.append(chr(b))
        elif b == 0x5C:
            out.append("\\\\")
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def _parser() -> _Parser:
    p = _Parser(prog="lsmdb", add_help=True,
                description="Use and inspect an LSM engine database.",
                epilog="Files can be inspected without opening a database: "
                       "lsmdb dump-manifest FILE | dump-sst FILE | dump-wal FILE")
    p.add_argument("--hex", action="store_true", help="keys and values are hex on input and output")
    p.add_argument("path", help="database directory (or dump-manifest|dump-sst|dump-wal)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("put", help="store KEY = VALUE")
    s.add_argument("key")
    s.add_argument("value")
    s.add_argument("--sync", action="store_true")
    s = sub.add_parser("get", help="print the value of KEY")
    s.add_argument("key")
    s = sub.add_parser("delete", help="delete KEY")
    s.add_argument("key")
    s.add_argument("--sync", action="store_true")
    s = sub.add_parser("delete-range",
                       help="delete every key in [BEGIN, END) with one range tombstone")
    s.add_argument("begin")
    s.add_argument("end")
    s.add_argument("--sync", action="store_true")
    s = sub.add_parser("single-delete",
                       help="delete KEY, put exactly once since its last deletion")
    s.add_argument("key")
    s.add_argument("--sync", action="store_true")
    s = sub.add_parser("ingest", help="add external tables (written by SstFileWriter) "
                                      "as the newest data")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--move", action="store_true",
                   help="hard-link the files into the database instead of copying them")
    s = sub.add_parser("scan", help="print key/value pairs in order")
    s.add_argument("--from", dest="lower", help="first key (inclusive)")
    s.add_argument("--to", dest="upper", help="end key (exclusive)")
    s.add_argument("--limit", type=int, help="at most N pairs")
    s.add_argument("--reverse", action="store_true", help="descending order")
    s = sub.add_parser("hash", help="print a hash of the keys and values, the same for two"
                                    " databases with the same contents however they are laid out")
    s.add_argument("--from", dest="lower", help="first key (inclusive)")
    s.add_argument("--to", dest="upper", help="end key (exclusive)")
    sub.add_parser("compact", help="compact the whole key range")
    sub.add_parser("stats", help="print levels and counters")
    sub.add_parser("check", help="verify level invariants and every checksum")
    return p


def _dump_parser() -> _Parser:
    p = _Parser(prog="lsmdb")
    p.add_argument("--hex", action="store_true")
    p.add_argument("command", choices=DUMP_COMMANDS)
    p.add_argument("file")
    return p


class _Codec:
    def __init__(self, hex_mode: bool) -> None:
        self.hex = hex_mode

    def arg(self, text: str, what: str) -> bytes:
        if self.hex:
            try:
                return bytes.fromhex(text)
            except ValueError:
                raise UsageError(f"{what} is not valid hex: {text!r}") from None
        return text.encode("utf-8", "surrogateescape")

    def show(self, data: bytes) -> str:
        return data.hex() if self.hex else escape(data)


def _bounds(args: argparse.Namespace, codec: _Codec) -> tuple[bytes | None, bytes | None]:
    lower = codec.arg(args.lower, "--from") if args.lower is not None else None
    upper = codec.arg(args.upper, "--to") if args.upper is not None else None
    return lower, upper


def _run_db(args: argparse.Namespace, codec: _Codec) -> int:
    cmd = args.command
    if cmd == "scan" and args.limit is not None and args.limit < 0:
        raise UsageError("--limit must not be negative")
    if cmd == "delete-range":
        begin = codec.arg(args.begin, "BEGIN")
        end = codec.arg(args.end, "END")
        if begin > end:
            raise UsageError(f"BEGIN {codec.show(begin)} sorts after END {codec.show(end)}")
    options = Options(create_if_missing=cmd in CREATING_COMMANDS, background_processes=False)
    with DB.open(args.path, options, read_only=cmd in READ_ONLY_COMMANDS) as db:
        if cmd == "put":
            db.put(codec.arg(args.key, "key"), codec.arg(args.value, "value"), sync=args.sync)
        elif cmd == "get":
            key = codec.arg(args.key, "key")
            value = db.get(key)
            if value is None:
                print(f"lsmdb: error: not found: {codec.show(key)}", file=sys.stderr)
                return 1
            print(codec.show(value))
        elif cmd == "delete":
            db.delete(codec.arg(args.key, "key"), sync=args.sync)
        elif cmd == "delete-range":
            db.delete_range(begin, end, sync=args.sync)
        elif cmd == "single-delete":
            db.single_delete(codec.arg(args.key, "key"), sync=args.sync)
        elif cmd == "ingest":
            db.ingest(args.files, move=args.move)
            print(f"ingested {len(args.files)} file{'s' if len(args.files) != 1 else ''}")
        elif cmd == "scan":
            lower, upper = _bounds(args, codec)
            n = 0
            for key, value in db.iterator(lower, upper, reverse=args.reverse):
                if args.limit is not None and n >= args.limit:
                    break
                print(f"{codec.show(key)}\t{codec.show(value)}")
                n += 1
        elif cmd == "hash":
            digest, count = content_hash(db.iterator(*_bounds(args, codec)))
            print(f"{digest}  {count} keys")
        elif cmd == "compact":
            db.compact_range()
            db.wait_for_compactions()
            print("compacted")
        elif cmd == "stats":
            for level, info in enumerate(db.property("levels")):  # type: ignore[arg-type]
                if info["files"]:
                    print(f"level {level}: {info['files']} files, {info['bytes']} bytes")
            for name, value in sorted(db.property("stats").items()):  # type: ignore[union-attr]
                print(f"{name}: {value}")
        elif cmd == "check":
            db.check()
            levels = db.property("levels")
            files = sum(info["files"] for info in levels)  # type: ignore[union-attr]
            print(f"ok: {files} tables checked")
    return 0


def _dump(args: argparse.Namespace, codec: _Codec) -> int:
    path = args.file
    if args.command == "dump-wal":
        for offset, payload in read_records(path):
            seq, ops = decode_batch(path, offset, payload)
            print(f"record at {offset}: seq {seq}, {len(ops)} ops")
            for i, (key, value) in enumerate(ops):
                if value is None:
                    print(f"  {seq + i} delete {codec.show(key)}")
                elif value is SINGLE_DELETE:
                    print(f"  {seq + i} single-delete {codec.show(key)}")
                elif isinstance(value, RangeEnd):
                    print(f"  {seq + i} delete-range {codec.show(key)} .. {codec.show(value.end)}")
                else:
                    print(f"  {seq + i} put {codec.show(key)} = {codec.show(value)}")
    elif args.command == "dump-manifest":
        for offset, payload in read_records(path):
            edit = VersionEdit.decode(payload, path, offset)
            fields = {k: v for k, v in (("log_number", edit.log_number),
                                        ("next_file_number", edit.next_file_number),
                                        ("last_sequence", edit.last_sequence),
                                        ("next_epoch", edit.next_epoch)) if v is not None}
            print(f"edit at {offset}: {json.dumps(fields)}")
            for level, f in edit.new_files:
                print(f"  add level {level} table {f.number}: {f.size} bytes, "
                      f"keys {codec.show(f.smallest)} .. {codec.show(f.largest)}, "
                      f"seqs {f.smallest_seq}..{f.largest_seq}, epoch {f.epoch}"
                      + (f", ingested at global seq {f.global_seq}"
                         if f.global_seq is not None else ""))
            for level, number in edit.deleted_files:
                print(f"  delete level {level} table {number}")
    else:
        reader = TableReader(path, 0)
        external = " (external: every entry takes the global sequence number given at " \
            "ingestion)" if reader.properties.get(EXTERNAL_PROPERTY) is True else ""
        print(f"table {path}: {reader.size} bytes, {reader.num_blocks} data blocks{external}")
        print(f"properties: {json.dumps(reader.properties, sort_keys=True)}")
        for start, end, seq in reader.range_tombstones:
            print(f"range tombstone {codec.show(start)} .. {codec.show(end)} @ {seq}")
        for key, tag, value in reader.entries():
            kind = {KIND_PUT: "put", KIND_SINGLE_DELETE: "single-delete"}.get(tag & 0xFF, "delete")
            shown = f" = {codec.show(value)}" if value is not None else ""
            print(f"{codec.show(key)} @ {tag >> 8} {kind}{shown}")
        reader.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        positional = [a for a in argv if not a.startswith("-")]
        if positional and positional[0] in DUMP_COMMANDS:
            args = _dump_parser().parse_args(argv)
            return _dump(args, _Codec(args.hex))
        args = _parser().parse_args(argv)
        if args.path in DUMP_COMMANDS:
            raise UsageError(f"{args.path} takes a FILE")
        return _run_db(args, _Codec(args.hex))
    except UsageError as exc:
        print(f"lsmdb: error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"lsmdb: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"lsmdb: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lsmdb: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
