"""The kernel's mount table, read in one place: what is mounted where; and the two
ways tdefs takes a mount out of it (flush and fusermount3).

`/proc/self/mounts` lists one mount a line, with space, tab, newline and backslash in
paths escaped as `\\ooo`; `/proc/self/mountinfo` adds the device numbers. The daemon,
the commands, the benchmarks and the tests all ask here, and none of them stats a
mountpoint to learn whether it is mounted (a stat of a mount whose daemon is stuck
would hang)."""

from __future__ import annotations

import os
import subprocess

from encfs.fsops import syncfs

FSTYPE = "fuse.tdefs"


def unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str | os.PathLike) -> tuple[str, str] | None:
    """(source, fstype) of what is mounted exactly at `mountpoint`, or None."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and unescape(fields[1]) == target:
                found = (unescape(fields[0]), fields[2])  # the last one is on top
    return found


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    """Is something mounted exactly at ``mountpoint``? Resolves only its parent, so a
    mountpoint whose daemon hangs is never touched."""
    path = os.fspath(mountpoint)
    parent = os.path.realpath(os.path.dirname(path) or ".")
    target = os.path.join(parent, os.path.basename(path))
    with open("/proc/self/mounts") as f:
        return any(len(fields) >= 2 and unescape(fields[1]) == target
                   for fields in (line.split() for line in f))


def mount_options(mountpoint: str | os.PathLike) -> set[str] | None:
    """The options of what is mounted exactly at ``mountpoint`` (the top mount)."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mounts") as f:
        for fields in (line.split() for line in f):
            if len(fields) >= 4 and unescape(fields[1]) == target:
                found = set(fields[3].split(","))
    return found


def filesystem_type(path: str | os.PathLike) -> str:
    """The type of the filesystem holding ``path`` (the longest mountpoint above it)."""
    real = os.path.realpath(path)
    best, best_type = "", "unknown"
    with open("/proc/self/mounts") as f:
        for fields in (line.split() for line in f):
            if len(fields) < 3:
                continue
            point = unescape(fields[1])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, best_type = point, fields[2]
    return best_type


def is_tdefs_mount(mountpoint: str | os.PathLike) -> bool:
    entry = mount_entry(mountpoint)
    return entry is not None and entry[1] == FSTYPE


def mounted_under(directory: str | os.PathLike) -> list[str]:
    """Every mountpoint at or below ``directory`` (a test's or a benchmark's work)."""
    top = os.path.realpath(directory).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        points = [unescape(line.split()[1]) for line in f if len(line.split()) >= 2]
    return [p for p in points if (p + "/").startswith(top)]


def device_of(mountpoint: str) -> str | None:
    """The "major:minor" of what is mounted at ``mountpoint`` (a real path), as the
    block-device settings under /sys/class/bdi/ name it."""
    with open("/proc/self/mountinfo") as f:
        devices = [fields[2] for fields in (line.split() for line in f)
                   if len(fields) > 4 and unescape(fields[4]) == mountpoint]
    return devices[-1] if devices else None


def sync_mount(mountpoint: str | os.PathLike) -> None:
    """Push the kernel's dirty pages of the mount down to the daemon (syncfs(2))."""
    syncfs(mountpoint)


def fusermount_unmount(mountpoint: str | os.PathLike, lazy: bool = False) -> subprocess.CompletedProcess:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    return subprocess.run(cmd, capture_output=True, text=True)
