"""`tdefs mount`, `tdefs umount` and `tdefs status`: the commands that act on a mount
(the vault commands, `keys` and `master-key` among them, live in mount/cmd_vault.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from encfs.masterkey import add_key_options, source_from_args
from mount import control
from mount.cmd_reencrypt import reencrypt_rows
from mount.cmd_vault import print_keys, utc


def register(sub: Any) -> None:
    p = sub.add_parser("mount", help="mount a vault (daemonizes once the mount is live)")
    p.add_argument("backing", type=Path, metavar="BACKING", help="the vault's backing directory")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    add_key_options(p)
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay attached; log to stderr unless --log is given")
    p.add_argument("--allow-other", action="store_true",
                   help="let users other than the mounting one use the mount")
    p.add_argument("--log", type=Path, metavar="FILE", help="append the daemon's log to FILE")
    p.add_argument("--no-writeback-cache", action="store_true",
                   help="send every write to the daemon at once instead of caching it in the kernel")
    xattrs = p.add_mutually_exclusive_group()
    xattrs.add_argument("--xattrs", dest="xattrs", action="store_true", default=False,
                        help="pass extended attributes through; costs the kernel's "
                             "security.capability request before every write(2)")
    xattrs.add_argument("--no-xattrs", dest="xattrs", action="store_false",
                        help="no extended attributes (ENOTSUP), the default")
    p.add_argument("--rotation-period", type=_days, metavar="DAYS",
                   help="make a new active data key whenever the active one is older than"
                        " DAYS (a fraction is fine; 0: never; default: the vault's"
                        " rotation_period_days, 7)")
    p.set_defaults(func=_mount)

    p = sub.add_parser("umount", help="flush and unmount (also cleans up after a dead daemon)")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if files are open; the daemon exits when they close")
    p.set_defaults(func=_umount)

    p = sub.add_parser("status", help="show the state of a running mount")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    p.set_defaults(func=_status)


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 0 <= days < float("inf"):
        raise argparse.ArgumentTypeError(f"the period must be 0 (off) or more days: {text!r}")
    return days


def _mount(args: argparse.Namespace) -> int:
    # imported here so `tdefs --help` and the offline commands never load pyfuse3
    from mount.launch import mount
    from mount.mount_request import MountRequest

    req = MountRequest(backing=args.backing, mountpoint=args.mountpoint,
                       source=source_from_args(args), foreground=args.foreground,
                       allow_other=args.allow_other, log_file=args.log,
                       writeback_cache=not args.no_writeback_cache,
                       xattrs=args.xattrs, rotation_period_days=args.rotation_period)
    return mount(req)


def _umount(args: argparse.Namespace) -> int:
    from mount.launch import unmount

    done, failures = unmount(args.mountpoint, lazy=args.lazy)
    if done != "unmounted":
        print(f"tdefs: {args.mountpoint}: {done}", file=sys.stderr)
    if not failures:
        return 0
    # with the writeback cache write(2) only fills the page cache; what the disk then
    # refused is lost, and a program learnt it only if it called fsync or close
    print(f"tdefs: error: {args.mountpoint} is unmounted, but cached writes to"
          f" {len(failures)} {'file' if len(failures) == 1 else 'files'} could not be"
          " written back and are lost (see the daemon's log):", file=sys.stderr)
    for f in failures:
        print(f"  {f['path']}: {f['errno']} ({f['count']} failed)", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    from mount.mount_request import MountError
    from mount.mount_table import mount_entry

    entry = mount_entry(args.mountpoint)
    if entry is None:
        raise MountError(f"{args.mountpoint} is not mounted")
    # "keys": the files and bytes per key, which costs a stat of every file
    reply = control.ask(args.mountpoint, "status", keys=True)
    if args.json:
        reply.pop("ok", None)
        print(json.dumps(reply, indent=2))
        return 0
    active = reply["active_key"]
    rows = [("mountpoint", reply["mountpoint"]), ("vault", reply["backing"]),
            ("pid", reply["pid"]), ("uptime", f"{reply['uptime_s']:.0f} s"),
            ("cipher", reply["method"]),
            ("active key", "none: new files are plaintext" if active is None else
             f"{active['id']} ({active['method']}, created {utc(active['created'])} UTC)"),
            *_rotation_rows(reply["rotation"]),
            *reencrypt_rows(reply["reencrypt"]),
            ("open files", reply["open_files"]),
            ("known inodes", reply["inodes"]),
            ("memory", f"{reply['rss_bytes'] / 2**20:.1f} MiB resident"),
            ("writeback cache", "on" if reply["writeback_cache"] else "off"),
            ("xattrs", "on" if reply["xattrs"] else "off"),
            ("entry copies", "on" if reply["entry_copies"] else
             "off (the backing filesystem keeps no user extended attributes)"),
            ("fallocate", "on" if reply["fallocate"] else "off (pyfuse3 lacks the patch)"),
            ("write failures", f"{reply['write_failures']} files (cached writes lost; see"
                               " the log)" if reply["write_failures"] else "none")]
    for name, value in rows:
        print(f"{name + ':':<16}{value}")
    print()
    print_keys(reply["keys"])
    return 0


def _rotation_rows(rotation: dict[str, Any]) -> list[tuple[str, str]]:
    period = rotation["period_days"]
    if not period:
        rows = [("key rotation", "off (mount with --rotation-period DAYS to turn it on)")]
    else:
        rows = [("key rotation", f"every {period:g} days"),
                ("next rotation", f"{utc(rotation['next_due'])} UTC")]
    last = rotation["last_automatic"]
    rows.append(("last automatic", "none since the mount" if last is None else
                 f"{utc(last['time'])} UTC: key {last['old_key']} was"
                 f" {_age(last['old_age_days'])} old, new active key {last['new_key']}"))
    return rows


def _age(days: float) -> str:
    if days >= 1:
        return f"{days:.1f} days"
    return f"{days * 24:.1f} hours" if days >= 1 / 24 else f"{days * 86400:.0f} s"
