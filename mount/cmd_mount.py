"""`tdefs mount`, `tdefs umount` and `tdefs status`: the commands that act on a mount
(the vault commands, `keys` and `master-key` among them, live in mount/cmd_vault.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from encfs.errors import TdefsError
from mount import control
from mount.cmd_reencrypt import reencrypt_rows
from mount.cmd_vault import print_keys, utc
from mount.key_options import add_key_options, source_from_args
from mount.mount_request import POLL_US_DEFAULT, POLL_US_MAX
from mount.service import UNIT_DIR, unit_name, unit_text


def register(sub: Any) -> None:
    p = sub.add_parser("mount", help="mount a vault (daemonizes once the mount is live)")
    p.add_argument("backing", type=Path, metavar="BACKING", help="the vault's backing directory")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    add_key_options(p)
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay attached; log to stderr unless --log is given")
    p.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                   help="mount options as in /etc/fstab: keyfile=F,allow_other,log=F,..."
                        " (see README, Running in production)")
    _add_mount_options(p)
    p.set_defaults(func=_mount)

    p = sub.add_parser("install-unit", help="write a systemd unit that mounts BACKING on"
                                            " MOUNTPOINT as a Type=notify service")
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    add_key_options(p)
    _add_mount_options(p)
    p.add_argument("--dir", type=Path, default=UNIT_DIR,
                   help=f"where to write the unit (default {UNIT_DIR})")
    p.set_defaults(func=_install_unit)

    p = sub.add_parser("umount", help="flush and unmount (also cleans up after a dead daemon)")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if files are open; the daemon exits when they close")
    p.set_defaults(func=_umount)

    p = sub.add_parser("status", help="show the state of a running mount")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("metrics", help="print a running mount's metrics (Prometheus format)")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=_metrics)


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    """The options of the daemon, shared by `mount` and `install-unit`."""
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
    p.add_argument("--coarse-times", action="store_true",
                   help="keep file times in whole seconds: an fsync then costs one"
                        " request less (the kernel's write-back of the times)")
    p.add_argument("--poll-us", type=_poll_us, metavar="US", default=None,
                   help="look for the next request for up to US microseconds before"
                        " sleeping, while the CPUs are not contended (0: never;"
                        f" default {POLL_US_DEFAULT})")
    p.add_argument("--metrics-listen", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics over HTTP there (HOST: 127.0.0.1)")
    p.add_argument("--metrics-file", type=Path, metavar="FILE",
                   help="rewrite FILE with the metrics every 10 s (node_exporter's"
                        " textfile collector)")


def _polling_row(p: dict[str, Any]) -> str:
    if not p["available"]:
        return "off (pyfuse3 lacks the patch)"
    if not p["budget_us"]:
        return "off (--poll-us 0)"
    return (f"up to {p['budget_us']} µs: {p['hits']} requests found by looking,"
            f" {p['misses']} looks found none, {p['contended']} waits on contended CPUs")


def _poll_us(text: str) -> int:
    try:
        us = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of microseconds: {text!r}") from None
    if not 0 <= us <= POLL_US_MAX:
        raise argparse.ArgumentTypeError(f"the budget must be 0 (off) to {POLL_US_MAX} µs: {text!r}")
    return us


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
                       xattrs=args.xattrs, rotation_period_days=args.rotation_period,
                       metrics_listen=args.metrics_listen,
                       metrics_file=args.metrics_file.absolute() if args.metrics_file else None,
                       poll_us=POLL_US_DEFAULT if args.poll_us is None else args.poll_us,
                       coarse_times=args.coarse_times)
    return mount(req)


def _install_unit(args: argparse.Namespace) -> int:
    """Write the unit; the key is not read now, and must be readable unattended."""
    if args.key_file:
        key = ["--key-file", str(Path(args.key_file).absolute())]
    elif args.passphrase_file:
        key = ["--passphrase-file", str(Path(args.passphrase_file).absolute())]
    elif getattr(args, "key_command", None):
        key = ["--key-command", args.key_command]
    else:
        raise TdefsError("a service needs a master key it can read unattended: --key-file,"
                         " --passphrase-file or --key-command")
    options = [*key]
    if args.allow_other:
        options.append("--allow-other")
    if args.log:
        options += ["--log", str(args.log.absolute())]
    if args.no_writeback_cache:
        options.append("--no-writeback-cache")
    if args.xattrs:
        options.append("--xattrs")
    if args.rotation_period is not None:
        options += ["--rotation-period", f"{args.rotation_period:g}"]
    if args.poll_us is not None:
        options += ["--poll-us", str(args.poll_us)]
    if args.coarse_times:
        options.append("--coarse-times")
    if args.metrics_listen:
        options += ["--metrics-listen", args.metrics_listen]
    if args.metrics_file:
        options += ["--metrics-file", str(args.metrics_file.absolute())]
    backing, mountpoint = args.backing.absolute(), args.mountpoint.absolute()
    tdefs = [str(Path(sys.argv[0]).absolute())] if Path(sys.argv[0]).name == "tdefs" \
        else [sys.executable, "-m", "mount.cli"]
    text = unit_text(tdefs, backing, mountpoint, options)
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / unit_name(mountpoint)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}; start it with: systemctl daemon-reload && systemctl enable --now"
          f" {path.name}")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    print(control.ask(args.mountpoint, "metrics")["text"], end="")
    return 0


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
            ("polling", _polling_row(reply["polling"])),
            ("file times", "whole seconds (--coarse-times)" if reply["coarse_times"]
             else "nanoseconds"),
            ("write failures", f"{reply['write_failures']} files (cached writes lost; see"
                               " the log)" if reply["write_failures"] else "none")]
    problems = reply.get("problems", [])
    rows.append(("problems", "none" if not problems else f"{len(problems)} lately:"))
    rows += [("", f"{utc(p['time'])} UTC: {p['what']}") for p in problems]
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
