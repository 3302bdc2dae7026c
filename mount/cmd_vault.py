"""`tdefs init`, `tdefs fsck` and `tdefs keys list|rotate`: offline commands that act on
a vault's backing directory directly (the vault must not be mounted meanwhile)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

from encfs.cipher import DEFAULT_METHOD, METHODS
from encfs.errors import TdefsError
from encfs.fsck import FsckReport, check, walk_files
from encfs.masterkey import (
    add_key_options,
    add_new_key_options,
    generate_key_file,
    new_source_from_args,
    source_from_args,
)
from encfs.vault import FILES_DICT, Vault


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="make a vault in a backing directory")
    p.add_argument("backing", type=Path, metavar="BACKING")
    add_key_options(p)
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"cipher of new files (default {DEFAULT_METHOD})")
    p.add_argument("--generate-key", action="store_true",
                   help="with --key-file: write a new random key file (mode 0600) if it does not exist")
    p.add_argument("--durability", choices=("strict", "ordered"), default="strict",
                   help="strict (default): fsync between the steps of every file operation, safe"
                        " after a power cut at any moment; ordered: no fsync between them, safe"
                        " after a killed daemon, but after a power cut only up to the last"
                        " fsync made through the mount")
    p.set_defaults(func=_init)

    p = sub.add_parser("fsck", help="check a vault's dictionary against its tree (offline)")
    p.add_argument("backing", type=Path, metavar="BACKING")
    add_key_options(p)
    p.add_argument("--repair", action="store_true",
                   help="remove stale entries, resolve crash leftovers, salvage a damaged files.dict")
    p.set_defaults(func=_fsck)

    p = sub.add_parser("keys", help="list or rotate a vault's data keys, or change its master key"
                                     " (offline)")
    p.add_argument("action", choices=("list", "rotate", "rekey"),
                   help="list data keys; rotate: new active data key; rekey: re-seal the data"
                        " keys under a new master key")
    p.add_argument("backing", type=Path, metavar="BACKING")
    add_key_options(p)
    add_new_key_options(p)
    p.add_argument("--generate-key", action="store_true",
                   help="rekey with --new-key-file: write a new random key file if it does not exist")
    p.add_argument("--method", choices=[m for m in METHODS if m != "plaintext"],
                   help="rotate: cipher of the new key (default: that of the active key)")
    p.set_defaults(func=_keys)


def _init(args: argparse.Namespace) -> int:
    if args.generate_key:
        if not args.key_file:
            raise TdefsError("--generate-key needs --key-file")
        if not os.path.lexists(args.key_file):
            generate_key_file(args.key_file)
            print(f"wrote a new master key to {args.key_file} (mode 0600); keep a copy somewhere safe")
    source = source_from_args(args, confirm=True)
    vault = Vault.create(args.backing, source, method=args.method, durability=args.durability)
    try:
        print(f"initialised vault {vault.root} (cipher {vault.method}, master key: {source.kind})")
        existing = len(walk_files(os.fsencode(vault.root)))
        if not vault.copies.enabled:
            print(f"tdefs: warning: the filesystem of {vault.root} keeps no user extended"
                  " attributes, so files carry no copy of their entry: a damaged files.dict"
                  " cannot be rebuilt from them", file=sys.stderr)
    finally:
        vault.close()
    if existing:
        print(f"tdefs: warning: the {existing} {'file' if existing == 1 else 'files'} already in"
              f" {vault.root} stay plaintext (readable through the mount, not encrypted) until"
              " rewritten through the mount", file=sys.stderr)
    return 0


def _show(path: bytes) -> str:
    return os.fsdecode(path)


def _print_paths(paths: list[bytes], limit: int = 50) -> None:
    for p in paths[:limit]:
        print(f"    {_show(p)}")
    if len(paths) > limit:
        print(f"    ... and {len(paths) - limit} more")


def _print_report(r: FsckReport) -> None:
    if r.corruption is not None:
        # the message says what to do about a damaged keys.dict (restore it); only
        # files.dict's damage can be salvaged record by record
        damaged = os.path.basename(r.corruption.path)
        print(f"{damaged}: {r.corruption}")
        if damaged == FILES_DICT and not r.repair:
            print("run `tdefs fsck --repair` to keep every record that still verifies"
                  " and rebuild the lost entries from the files' own copies")
        return
    if r.salvage is not None:
        s = r.salvage
        print(f"files.dict was damaged: skipped {s.lost_bytes} bytes in {len(s.regions)}"
              f" {'region' if len(s.regions) == 1 else 'regions'}, every other record kept")
        for region in s.regions:
            records = f"{region.records} record{'s' if region.records != 1 else ''}"
            print(f"  offset {region.offset}: {region.length} bytes,"
                  f" {records if region.counted else 'about ' + records} lost ({region.what})")
        if s.paths:
            print("  the lost records named (names may themselves be damaged):")
            _print_paths(s.paths)
    rec = r.recovery
    if rec.new_dictionary:
        print("files.dict was missing: started an empty one")
    info = "" if r.repair else " (fixed on the next open or mount)"
    if rec.dropped_tail:
        print(f"crash leftover: torn last record of {rec.dropped_tail} bytes in files.dict"
              f" {'cut off' if r.repair else '(dropped on the next open)'}")
    for p in rec.committed:
        print(f"crash leftover: rename of {_show(p)} had happened (committed){info}")
    for p in rec.aborted:
        print(f"crash leftover: rename of {_show(p)} had not happened (dropped){info}")
    if rec.stale:
        print(f"crash leftover: {len(rec.stale)} stale entries (files that no longer exist)"
              f" {'removed' if r.repair else 'found' + info}:")
        _print_paths(rec.stale)
    fixed = "rebuilt from their own copies" if r.repair else "(--repair rebuilds them from their own copies)"
    if r.restored:
        print(f"files whose entry was lost: {len(r.restored)} {fixed}")
        _print_paths(r.restored)
    if r.conflicts:
        what = "copies rewritten from the dictionary" if r.repair else "--repair trusts the dictionary"
        print(f"files whose copy disagrees with the dictionary: {len(r.conflicts)} ({what})")
        _print_paths(r.conflicts)
    if r.damaged_copies:
        print(f"damaged per-file copies (MAC mismatch): {len(r.damaged_copies)}")
        _print_paths(r.damaged_copies)
    for key_id, n in sorted(r.missing_keys.items()):
        print(f"error: {n} files use data key {key_id}, which keys.dict does not hold")
    print(f"encrypted files: {r.encrypted}")
    for key_id, n in sorted(r.per_key.items()):
        print(f"  key {key_id}: {n} files")
    if not r.copies_enabled:
        print("per-file copies of entries: off (the backing filesystem keeps no user extended"
              " attributes): a damaged files.dict cannot be rebuilt from the files")
    elif r.copies_missing:
        print(f"files whose per-file copy was missing or stale: {len(r.copies_missing)}"
              f" ({'written' if r.repair else '--repair writes them; the mount does at the next write'})")
    print(f"files without an entry (plaintext): {len(r.plaintext)}")
    _print_paths(r.plaintext)
    if r.suspect:
        print(f"error: {len(r.suspect)} files have no entry but look like ciphertext: they read"
              " as garbage (restore them, or their files.dict, from a backup)")
        _print_paths(r.suspect)
    if r.problems and not r.repair and not r.clean_after:
        print("problems found; `tdefs fsck --repair` fixes what can be fixed")


def _fsck(args: argparse.Namespace) -> int:
    report = check(args.backing, source_from_args(args), repair=args.repair)
    _print_report(report)
    return 0 if report.clean_after else 1


def _keys(args: argparse.Namespace) -> int:
    # the current key first: passphrases read from stdin come in the order old, new
    source = source_from_args(args)
    new_source = None
    if args.action == "rekey":
        if args.generate_key and args.new_key_file and not os.path.lexists(args.new_key_file):
            generate_key_file(args.new_key_file)
            print(f"wrote a new master key to {args.new_key_file} (mode 0600)")
        new_source = new_source_from_args(args)
        new_source.check()
    with Vault.open(args.backing, source) as vault:
        if new_source is not None:
            vault.keys.reseal(new_source)
            old = ("the same passphrase still opens it (re-sealed with a new salt)"
                   if vault.keys.opens_with(source) else "the old one no longer opens it")
            print(f"vault {vault.root} is now sealed with the new master key ({new_source.kind});"
                  f" {old}")
            return 0
        if args.action == "rotate":
            key_id = vault.keys.rotate(args.method)
            print(f"new active data key {key_id} ({vault.keys.active.method}); files using older keys"
                  " keep them until rewritten")
            return 0
        print(f"{'ID':>4}  {'METHOD':<12} {'CREATED (UTC)':<20} {'ACTIVE':<6} {'FILES':>7}")
        for k in vault.keys.list():
            created = datetime.datetime.fromtimestamp(k.created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{k.id:>4}  {k.method:<12} {created:<20} {'yes' if k.active else '':<6} {k.files:>7}")
    return 0
