"""Telling a service manager how the daemon is doing: systemd's notify protocol.

When the daemon runs as a `Type=notify` service, systemd puts the path of a datagram
socket in `$NOTIFY_SOCKET` (a leading "@" means the abstract namespace). The daemon
sends "READY=1" once the mount is live, so units ordered after it (a database) start
only then, "STOPPING=1" when it begins to unmount, and "STATUS=..." lines a person
reads in `systemctl status`. Without the variable every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("tdefs.daemon")


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1", "STATUS=serving") as one message; False when
    there is no service manager to tell (or it cannot be reached: logged)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s",
                    os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True
