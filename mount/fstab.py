"""Mount options in the `-o name[=value],...` syntax of mount(8) and /etc/fstab.

`mount -t fuse.tdefs BACKING MOUNTPOINT -o OPTIONS` (or a line of /etc/fstab) runs
the helper `mount.fuse.tdefs BACKING MOUNTPOINT -o OPTIONS`, which `scripts/setup`
installs; `tdefs mount -o OPTIONS` takes the same options, so one syntax serves
both. Each option becomes the `tdefs mount` argument it names; the options that
belong to mount(8), systemd or fstab itself (noauto, nofail, _netdev, x-systemd.*,
...) are accepted and left to them.
"""

from __future__ import annotations

import sys

# option -> the `tdefs mount` argument it becomes (value options take "=value")
VALUE_OPTIONS = {
    "keyfile": "--key-file",
    "key_file": "--key-file",
    "passphrase_file": "--passphrase-file",
    "passphrase_env": "--passphrase-env",
    "key_command": "--key-command",
    "log": "--log",
    "rotation_period": "--rotation-period",
    "poll_us": "--poll-us",
}
FLAG_OPTIONS = {
    "allow_other": "--allow-other",
    "xattrs": "--xattrs",
    "noxattrs": "--no-xattrs",
    "nowriteback": "--no-writeback-cache",
    "no_writeback_cache": "--no-writeback-cache",
    "coarse_times": "--coarse-times",
}
# mount(8), systemd and fstab options, and generic ones a FUSE mount has anyway
IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "owner",
           "group", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime",
           "noatime", "relatime", "strictatime", "nodiratime", "sync", "async",
           "writeback"}
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=")


class OptionError(ValueError):
    """An option tdefs does not know, or one it cannot honour."""


def split_options(text: str) -> list[str]:
    """Split at commas, except escaped ones (``\\,``, as fstab writes a comma in a value)."""
    out, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [o for o in out if o]


def to_arguments(text: str) -> list[str]:
    """The `tdefs mount` arguments that ``-o text`` stands for; OptionError if one
    option is not one tdefs knows or can honour."""
    args: list[str] = []
    for option in split_options(text):
        name, eq, value = option.partition("=")
        if name in VALUE_OPTIONS:
            if not eq or not value:
                raise OptionError(f"mount option {name} needs a value ({name}=...)")
            args += [VALUE_OPTIONS[name], value]
        elif name in FLAG_OPTIONS:
            if eq:
                raise OptionError(f"mount option {name} takes no value")
            args.append(FLAG_OPTIONS[name])
        elif option in IGNORED or option.startswith(IGNORED_PREFIXES):
            continue
        elif option == "ro":
            raise OptionError("tdefs mounts read-write only (mount option ro)")
        else:
            known = ", ".join(sorted({*VALUE_OPTIONS, *FLAG_OPTIONS}))
            raise OptionError(f"unknown mount option {option!r} (tdefs knows {known})")
    return args


def expand(argv: list[str]) -> list[str]:
    """`tdefs mount ... -o OPTIONS ...` with each -o replaced by the arguments its
    options stand for (OptionError if one is unknown)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o" and i + 1 < len(argv):
            out += to_arguments(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
            out += to_arguments(arg[2:])
        else:
            out.append(arg)
        i += 1
    return out


def helper(argv: list[str] | None = None) -> int:
    """`mount.fuse.tdefs BACKING MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v] [-t TYPE]`,
    as mount(8) calls it; exits 0 once the mount is live, 32 (mount failure) if not."""
    from mount.cli import main

    argv = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o" and i + 1 < len(argv):
            options.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg in ("-t", "-N") and i + 1 < len(argv):
            i += 1  # the type (fuse.tdefs) and a namespace: nothing for tdefs
        elif arg in ("-n", "-s", "-f", "-v", "-r", "-w"):
            pass  # no mtab, sloppy, fake, verbose: mount(8)'s business
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        print("mount.fuse.tdefs: error: usage: mount.fuse.tdefs BACKING MOUNTPOINT"
              " [-o OPTIONS]", file=sys.stderr)
        return 32
    try:
        extra = [a for text in options for a in to_arguments(text)]
    except OptionError as exc:
        print(f"mount.fuse.tdefs: error: {exc}", file=sys.stderr)
        return 32
    try:
        code = main(["mount", *positional, *extra])
    except SystemExit as exc:  # a usage error, already said by argparse
        code = exc.code if isinstance(exc.code, int) else 1
    return 0 if code == 0 else 32


def main() -> None:
    sys.exit(helper())
