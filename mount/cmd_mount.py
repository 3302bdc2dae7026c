"""`tdefs mount`, `tdefs umount`, `tdefs status` and `tdefs mount-keys`: the commands
that act on a mount (the offline vault commands live in mount/cmd_vault.py)."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from encfs.masterkey import add_key_options, source_from_args
from mount import control


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
    p.set_defaults(func=_mount)

    p = sub.add_parser("umount", help="flush and unmount (also cleans up after a dead daemon)")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if files are open; the daemon exits when they close")
    p.set_defaults(func=_umount)

    p = sub.add_parser("status", help="show the state of a running mount")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=_status)

    p = sub.add_parser("mount-keys", help="list or rotate the data keys of a running mount")
    p.add_argument("action", choices=("list", "rotate"))
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=_mount_keys)


def _mount(args: argparse.Namespace) -> int:
    # imported here so `tdefs --help` and the offline commands never load pyfuse3
    from mount.daemon import MountRequest, mount

    req = MountRequest(backing=args.backing, mountpoint=args.mountpoint,
                       source=source_from_args(args), foreground=args.foreground,
                       allow_other=args.allow_other, log_file=args.log,
                       writeback_cache=not args.no_writeback_cache,
                       xattrs=args.xattrs)
    return mount(req)


def _umount(args: argparse.Namespace) -> int:
    from mount.daemon import unmount

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
    from mount.daemon import MountError, mount_entry

    entry = mount_entry(args.mountpoint)
    if entry is None:
        raise MountError(f"{args.mountpoint} is not mounted")
    try:
        reply = control.request(args.mountpoint, "status")
    except control.NoDaemon:
        raise MountError(f"{args.mountpoint} is mounted but its daemon is gone "
                         f"(run: tdefs umount {args.mountpoint})") from None
    rows = [("mountpoint", reply["mountpoint"]), ("vault", reply["backing"]),
            ("pid", reply["pid"]), ("uptime", f"{reply['uptime_s']:.0f} s"),
            ("cipher", reply["method"]), ("open files", reply["open_files"]),
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
    return 0


def _mount_keys(args: argparse.Namespace) -> int:
    if args.action == "rotate":
        reply = control.request(args.mountpoint, "keys.rotate")
        print(f"new active key: {reply['key_id']}")
        return 0
    reply = control.request(args.mountpoint, "keys.list")
    print(f"{'id':>4}  {'method':<12} {'created (UTC)':<20} {'files':>7}  active")
    for k in reply["keys"]:
        created = datetime.datetime.fromtimestamp(k["created"], datetime.UTC)
        print(f"{k['id']:>4}  {k['method']:<12} {created:%Y-%m-%d %H:%M:%S}  {k['files']:>7}"
              f"  {'*' if k['active'] else ''}")
    return 0
