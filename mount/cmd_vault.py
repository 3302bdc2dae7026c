"""`tdefs init` and `tdefs fsck`, offline commands on a vault's backing directory (the
vault must not be mounted meanwhile), and `tdefs keys list|rotate` and `tdefs
master-key rotate`, which take either a backing directory, opened offline with the
master key options, or the mountpoint of a running mount, whose daemon does the work
through its control socket (it holds the key, so no key options are needed there)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from encfs.cipher import DEFAULT_METHOD, METHODS
from encfs.errors import TdefsError
from encfs.fsck import FsckReport, check
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.vault import FILES_DICT, Vault
from mount.key_options import (
    add_key_options,
    add_new_key_options,
    key_option_given,
    new_source_from_args,
    source_from_args,
)


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

    p = sub.add_parser("keys", help="list or rotate the data keys of a vault or a running mount")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("list", help="the data keys, and how many files and bytes use each")
    _add_path(a)
    a.add_argument("--json", action="store_true", help="print the keys as a JSON list")
    a.set_defaults(func=_keys_list)
    a = actions.add_parser("rotate", help="make a new active data key (a mount's background"
                                          " re-encryption rewrites the files under older keys)")
    _add_path(a)
    a.add_argument("--method", choices=[m for m in METHODS if m != "plaintext"],
                   help="cipher of the new key (default: that of the active key)")
    a.set_defaults(func=_keys_rotate)

    p = sub.add_parser("master-key", help="change the master key that seals a vault's data keys")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("rotate", help="re-seal the data keys under a new master key (one"
                                          " atomic replace of keys.dict; the old key then opens"
                                          " nothing)")
    _add_path(a)
    add_new_key_options(a)
    a.add_argument("--generate-key", action="store_true",
                   help="with --new-key-file: write a new random key file (mode 0600) if it does"
                        " not exist")
    a.set_defaults(func=_master_key_rotate)


def _add_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="PATH",
                   help="the mountpoint of a running mount, or a vault's backing directory")
    add_key_options(p, required=False)


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
        existing = len(vault.tree.walk_files(skip=vault.metadata_names()))
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


def _running_mount(path: Path) -> bool:
    """Is `path` the mountpoint of a tdefs mount? (Anything else is a backing directory.)"""
    from mount.mount_table import is_tdefs_mount

    return is_tdefs_mount(path)


def _ask_daemon(args: argparse.Namespace, cmd: str, **fields: Any) -> dict[str, Any]:
    from mount import control

    if key_option_given(args):
        print(f"tdefs: warning: {args.path} is a running mount, whose daemon holds the master"
              " key: the master key options were not used", file=sys.stderr)
    return control.ask(args.path, cmd, **fields)


def _offline_source(args: argparse.Namespace, command: str) -> MasterKeySource:
    if not key_option_given(args):
        raise TdefsError(f"{args.path} is not a running tdefs mount, so `tdefs {command}` opens it"
                         " as a backing directory and needs its master key: --key-file,"
                         " --passphrase-file, --passphrase-env, --passphrase or --key-command")
    return source_from_args(args)


def utc(seconds: float) -> str:
    """A unix time as the commands print it: `2025-01-31 12:00:00` (UTC)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_keys(rows: list[dict[str, Any]], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'ID':>4}  {'METHOD':<12} {'CREATED (UTC)':<20} {'ACTIVE':<6} {'FILES':>7}"
          f" {'BYTES':>15}")
    for k in rows:
        print(f"{k['id']:>4}  {k['method']:<12} {utc(k['created']):<20}"
              f" {'yes' if k['active'] else '':<6} {k['files']:>7} {k['bytes']:>15}")


def _keys_list(args: argparse.Namespace) -> int:
    if _running_mount(args.path):
        rows = _ask_daemon(args, "keys.list")["keys"]
    else:
        with Vault.open(args.path, _offline_source(args, "keys list")) as vault:
            rows = vault.key_usage()
    print_keys(rows, as_json=args.json)
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    if _running_mount(args.path):
        reply = _ask_daemon(args, "keys.rotate", method=args.method)
        key_id, method = reply["key_id"], reply["method"]
    else:
        with Vault.open(args.path, _offline_source(args, "keys rotate")) as vault:
            key_id = vault.keys.rotate(args.method)
            method = vault.keys.active.method
    later = (f"re-encryption rewrites them now (tdefs reencrypt status {args.path})"
             if _running_mount(args.path) else "the next mount's re-encryption rewrites them")
    print(f"new active data key {key_id} ({method}); files under older keys: {later}")
    return 0


def _master_key_rotate(args: argparse.Namespace) -> int:
    online = _running_mount(args.path)
    # the current key first: passphrases read from stdin come in the order old, new
    source = None if online else _offline_source(args, "master-key rotate")
    if args.generate_key:
        if not args.new_key_file:
            raise TdefsError("--generate-key needs --new-key-file")
        if not os.path.lexists(args.new_key_file):
            generate_key_file(args.new_key_file)
            print(f"wrote a new master key to {args.new_key_file} (mode 0600); keep a copy"
                  " somewhere safe")
    new_source = new_source_from_args(args)
    new_source.check()
    if online:
        reply = _ask_daemon(args, "master_key.rotate", carries_secret=True,
                            **new_source.to_message())
        vault, old_opens = reply["backing"], reply["old_opens"]
    else:
        assert source is not None
        with Vault.open(args.path, source) as opened:
            opened.keys.reseal(new_source)
            vault, old_opens = str(opened.root), opened.keys.opens_with(source)
    old = ("the same passphrase still opens it (re-sealed with a new salt)" if old_opens
           else "the old one no longer opens it")
    print(f"vault {vault} is now sealed with the new master key ({new_source.kind}); {old}")
    return 0
