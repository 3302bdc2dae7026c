"""The master key options of the `tdefs` commands, and the master key's dealings with
the user: the passphrase asked on the terminal (or read from stdin), the warning
about the plaintext test key. encfs/masterkey.py owns the sources themselves.

Invariant: a source returned here already holds whatever cannot be had later: a
passphrase typed or piped in, a key command's output. The command runs here, in the
foreground process, before `tdefs mount` detaches its daemon (which has no terminal
and must not run it again), and once per process.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from encfs.errors import TdefsError
from encfs.masterkey import MasterKeySource, strip_newline

# the destinations of the master key options, as add_key_options names them
KEY_OPTIONS = ("key_file", "passphrase_file", "passphrase_env", "passphrase", "key_command",
               "plaintext_key")


def add_key_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The mutually exclusive master key options every vault command takes (optional
    for commands that may instead reach a running mount, whose daemon holds the key)."""
    group = parser.add_argument_group("master key (exactly one)" if required else
                                      "master key (one; not needed on a running mount)")
    ex = group.add_mutually_exclusive_group(required=required)
    ex.add_argument("--key-file", metavar="F", help="file holding the 32-byte key as hex (mode 0600)")
    ex.add_argument("--passphrase-file", metavar="F", help="read the passphrase from file F")
    ex.add_argument("--passphrase-env", metavar="VAR", help="read the passphrase from variable VAR")
    ex.add_argument("--passphrase", action="store_true", help="ask for the passphrase on the terminal")
    ex.add_argument("--key-command", metavar="CMD",
                    help="run CMD with /bin/sh; its output is the key (64 hex digits) or the"
                         " passphrase, as the vault was sealed (a new vault: 64 hex digits are"
                         " a key, anything else a passphrase)")
    ex.add_argument("--plaintext-key", action="store_true",
                    help="a fixed, public master key: for tests only")


def add_new_key_options(parser: argparse.ArgumentParser) -> None:
    """Options naming a new master key (master key rotation); exactly one is required."""
    group = parser.add_argument_group("new master key (exactly one)")
    ex = group.add_mutually_exclusive_group(required=True)
    ex.add_argument("--new-key-file", metavar="F", help="the new key file (see --generate-key)")
    ex.add_argument("--new-passphrase-file", metavar="F", help="read the new passphrase from F")
    ex.add_argument("--new-passphrase-env", metavar="VAR", help="read the new passphrase from VAR")
    ex.add_argument("--new-passphrase", action="store_true", help="ask for the new passphrase")
    ex.add_argument("--new-key-command", metavar="CMD",
                    help="run CMD with /bin/sh: 64 hex digits out are the new key, anything"
                         " else the new passphrase")


def key_option_given(args: argparse.Namespace) -> bool:
    """Whether any master key option was given."""
    return any(getattr(args, name, None) for name in KEY_OPTIONS)


def new_source_from_args(args: argparse.Namespace) -> MasterKeySource:
    """The source named by the --new-* options (a terminal passphrase is asked twice)."""
    renamed = argparse.Namespace(
        key_file=getattr(args, "new_key_file", None),
        passphrase_file=getattr(args, "new_passphrase_file", None),
        passphrase_env=getattr(args, "new_passphrase_env", None),
        passphrase=getattr(args, "new_passphrase", False),
        key_command=getattr(args, "new_key_command", None),
    )
    if not key_option_given(renamed):
        raise TdefsError("master-key rotate needs the new master key: --new-key-file,"
                         " --new-passphrase-file, --new-passphrase-env, --new-passphrase"
                         " or --new-key-command")
    return source_from_args(renamed, confirm=True)


def _stdin_is_a_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _ask_passphrase(confirm: bool) -> bytes:
    """The passphrase typed on the terminal (twice with ``confirm``); when stdin is not
    a terminal, its first line, read once and silently (getpass would fall back to
    echoing stdin with a warning, or ask a terminal the caller did not mean)."""
    if not _stdin_is_a_terminal():
        line = sys.stdin.buffer.readline() if sys.stdin is not None else b""
        if not line:
            raise TdefsError("no passphrase given: stdin is not a terminal and is empty"
                             " (pipe the passphrase in, or use --passphrase-file)")
        secret = strip_newline(line)
    else:
        try:
            first = getpass.getpass("Passphrase: ")
            if confirm and getpass.getpass("Repeat passphrase: ") != first:
                raise TdefsError("the passphrases do not match")
        except EOFError:
            raise TdefsError("no passphrase given") from None
        secret = first.encode()
    if not secret:
        raise TdefsError("the passphrase is empty")
    return secret


def source_from_args(args: argparse.Namespace, confirm: bool = False) -> MasterKeySource:
    """Build the source the options name; ``confirm`` asks a terminal passphrase twice.
    A key command runs now (see the module's invariant)."""
    if getattr(args, "key_file", None):
        return MasterKeySource.key_file(args.key_file)
    if getattr(args, "passphrase_file", None):
        try:
            secret = strip_newline(Path(args.passphrase_file).read_bytes())
        except OSError as exc:
            raise TdefsError(f"cannot read passphrase file {args.passphrase_file}: {exc.strerror}") from None
        if not secret:
            raise TdefsError(f"passphrase file {args.passphrase_file} is empty")
        return MasterKeySource.passphrase(secret)
    if getattr(args, "passphrase_env", None):
        value = os.environb.get(os.fsencode(args.passphrase_env))
        if not value:
            raise TdefsError(f"environment variable {args.passphrase_env} is unset or empty")
        return MasterKeySource.passphrase(value)
    if getattr(args, "passphrase", False):
        return MasterKeySource.passphrase(_ask_passphrase(confirm))
    if getattr(args, "key_command", None) is not None:
        # a token asking for a PIN gets the terminal, but only when stdin is one: a
        # piped-in passphrase is not the command's to read
        source = MasterKeySource.key_command(args.key_command, terminal=_stdin_is_a_terminal())
        source.check()
        return source
    if getattr(args, "plaintext_key", False):
        print("tdefs: warning: plaintext master key: the vault is not protected (tests only)",
              file=sys.stderr)
        return MasterKeySource.plaintext()
    raise TdefsError("no master key given (use --key-file, --passphrase-file, --passphrase-env,"
                     " --passphrase, --key-command or --plaintext-key)")
