"""A systemd unit for a mount: the daemon as a `Type=notify` service.

`tdefs install-unit` writes it. The service runs `tdefs mount --foreground`, so its
main process is the daemon, which tells systemd "READY=1" once the mount is live
(mount/sd_notify.py): a database unit with `Requires=` and `After=` on it starts only
then. `systemctl stop` runs `tdefs umount` (a clean flush and unmount); before each
start, a mount left by a daemon that died is removed, which is what makes
`Restart=on-failure` work.
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path

UNIT_DIR = Path("/etc/systemd/system")
_KEEP = set(string.ascii_letters + string.digits + ":_.")


def escape_path(path: Path) -> str:
    """A path as systemd names units after it (`systemd-escape --path`)."""
    text = str(path).strip("/") or "-"
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif ch in _KEEP and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unit_name(mountpoint: Path) -> str:
    return f"tdefs-{escape_path(mountpoint)}.service"


def unit_text(tdefs: list[str], backing: Path, mountpoint: Path, mount_args: list[str]) -> str:
    """The unit: ``tdefs`` is how to run the command, ``mount_args`` the options of
    `tdefs mount` after BACKING MOUNTPOINT (the key option among them)."""
    run = shlex.join(tdefs)
    mount = shlex.join([*tdefs, "mount", "--foreground", str(backing), str(mountpoint),
                        *mount_args])
    umount = f"{run} umount {shlex.quote(str(mountpoint))}"
    return f"""[Unit]
Description=tdefs: {backing} decrypted on {mountpoint}
After=local-fs.target
RequiresMountsFor={backing}

[Service]
Type=notify
NotifyAccess=main
# a mount left by a daemon that died is removed first ("-": none is fine)
ExecStartPre=-{umount}
ExecStart={mount}
ExecStop={umount}
Restart=on-failure
RestartSec=2
TimeoutStartSec=120
TimeoutStopSec=120

[Install]
WantedBy=multi-user.target
"""
