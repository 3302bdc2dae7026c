"""The `tdefs` command: parses arguments and dispatches to one module per subcommand
group. Every error a user can cause is printed as one line with a non-zero exit."""

from __future__ import annotations

import argparse
import sys

from encfs.errors import TdefsError
from mount import cmd_mount, cmd_reencrypt, cmd_vault, fstab


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdefs", description="Transparent data encryption as a filesystem."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in (cmd_vault, cmd_mount, cmd_reencrypt):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mount"]:
        try:
            argv = fstab.expand(argv)  # -o OPTIONS, as in /etc/fstab
        except fstab.OptionError as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TdefsError as exc:
        print(f"tdefs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tdefs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"tdefs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
