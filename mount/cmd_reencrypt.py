"""`tdefs reencrypt status|suspend|resume|rate|wait MOUNTPOINT`: the background
re-encryption of a running mount, through its control socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from encfs.errors import TdefsError
from mount import control
from mount.cmd_vault import utc

WAIT_POLL_S = 0.5
_BAR = 30


def register(sub: Any) -> None:
    p = sub.add_parser("reencrypt", help="the background re-encryption of a running mount")
    p.add_argument("action", choices=("status", "suspend", "resume", "rate", "wait"),
                   help="status; suspend or resume it (kept across remounts); rate MB/s"
                        " (0: no limit); wait until every file is under the active key")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("rate", nargs="?", type=float, metavar="MB/s",
                   help="with rate: the new limit in MB/s (0: none); without: show it")
    p.add_argument("--json", action="store_true", help="print the state as JSON")
    p.set_defaults(func=_reencrypt)


def _reencrypt(args: argparse.Namespace) -> int:
    if args.rate is not None and args.action != "rate":
        raise TdefsError(f"a rate goes with `tdefs reencrypt rate`, not with {args.action}")
    if args.action == "wait":
        return _wait(args.mountpoint, args.json)
    if args.action == "rate" and args.rate is not None:
        if args.rate < 0:
            raise TdefsError("the rate must be >= 0 MB/s (0: no limit)")
        reply = control.ask(args.mountpoint, "reencrypt.rate", rate_mb=args.rate)
    elif args.action in ("suspend", "resume"):
        reply = control.ask(args.mountpoint, f"reencrypt.{args.action}")
    else:
        reply = control.ask(args.mountpoint, "reencrypt.status")
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    for name, value in reencrypt_rows(reply):
        print(f"{name + ':':<16}{value}")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def reencrypt_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The re-encryption part of `tdefs status`, and `tdefs reencrypt status`."""
    limit = r["rate_limit_mb"]
    rows = [("re-encryption", r["state"]),
            ("rate", f"{r['rate_mb']:.1f} MB/s (limit: "
                     f"{f'{limit:g} MB/s' if limit else 'none'})"),
            ("left", f"{r['files_left']} files, {_size(r['bytes_left'])}"
                     + (f", about {_duration(r['seconds_left'])}" if r["seconds_left"] else ""))]
    for key, left in sorted(r["left_by_key"].items()):
        name = "plaintext" if key == "plaintext" else f"key {key}"
        rows.append((f"  {name}", f"{left['files']} files, {_size(left['bytes'])}"))
    rows.append(("rewritten", f"{r['done_files']} files, {_size(r['done_bytes'])} in all"))
    if r["current"]:
        rows.append(("now", r["current"]))
    for key, when in sorted(r["last_rewrite"].items()):
        retired = r["retired"].get(key)
        what = "plaintext files" if key == "plaintext" else f"key {key}"
        rows.append((f"  {what}", f"last byte rewritten {utc(when)} UTC"
                     + (f", retired {utc(retired)} UTC" if retired else "")))
    return rows


def _wait(mountpoint: Path, as_json: bool) -> int:
    """Show progress until nothing is left under another key; 1 if it is suspended."""
    total: int | None = None  # bytes left when the first plan was seen
    while True:
        r = control.ask(mountpoint, "reencrypt.status")
        if total is None and r["state"] != "planning":
            total = r["bytes_left"]
        if r["state"] == "done":
            break
        if r["state"] == "suspended":
            if not as_json:
                sys.stderr.write("\n")
            print(f"tdefs: {mountpoint}: re-encryption is suspended with {r['files_left']}"
                  f" files left (tdefs reencrypt resume {mountpoint})", file=sys.stderr)
            return 1
        if not as_json and sys.stderr.isatty():
            done = max(0.0, min(1.0, 1 - r["bytes_left"] / (total or 1)))
            bar = "#" * int(done * _BAR) + "-" * (_BAR - int(done * _BAR))
            sys.stderr.write(f"\r[{bar}] {done * 100:5.1f}%  {r['files_left']} files,"
                             f" {_size(r['bytes_left'])} left, {r['rate_mb']:.1f} MB/s,"
                             f" {_duration(r['seconds_left'])} left   ")
            sys.stderr.flush()
        time.sleep(WAIT_POLL_S)
    if as_json:
        r.pop("ok", None)
        print(json.dumps(r, indent=2))
    else:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        print(f"re-encryption done: every file is under the active key"
              f" ({r['done_files']} files, {_size(r['done_bytes'])} rewritten in all)")
    return 0
