"""Named failpoints between the steps of every crash-ordered operation.

Armed only by the environment variable ``TDEFS_FAILPOINTS`` read at import, e.g.
``TDEFS_FAILPOINTS="rename.after-intent=crash,create.after-new=error"``. Actions:
``crash`` ends the process at once with ``os._exit(CRASH_EXIT_CODE)`` (no cleanup, no
flush of Python buffers: what the kernel already has is what survives), ``error``
raises ``OSError(EIO)``. ``ACTION@N`` acts on the N-th time the point is reached
(``dict.append.mid-write=crash@2`` tears the second record written). When the variable is unset, ``failpoint`` is a function that
returns at once and ``ARMED`` is False, so call sites cost one call.

``FAILPOINTS`` lists every name used in the code; a test keeps it honest.
"""

from __future__ import annotations

import errno
import os

ENV_VAR = "TDEFS_FAILPOINTS"
CRASH_EXIT_CODE = 137

FAILPOINTS: tuple[str, ...] = (
    # Vault operations (encfs/vault.py), between their steps
    "create.after-new",  # entry durable, file not created yet
    "unlink.after-unlink",  # file removed, its delete deferred
    "deletes.after-fsync",  # deferred unlinks and renames made durable, their DELs and COMMITs not written
    "rename.after-intent",  # intent durable, rename not done
    "rename.after-rename",  # renamed, commit record not written
    "rename.after-commit",  # commit written, not yet synced (strict file renames: applied, commit left to the next flush)
    "link.after-new",  # entry for the new name durable, link not made
    "truncate.after-truncate",  # truncated to zero, fresh-IV entry not written
    "init.before-publish",  # vault metadata written, not yet renamed into place
    # re-encryption (encfs/reencrypt.py)
    "reencrypt.after-start",  # the copy's entry durable and the copy created, nothing copied
    "reencrypt.mid-copy",  # a chunk of the copy is about to be written (ACTION@N: the N-th)
    "reencrypt.after-copy",  # the copy complete and fsynced, not yet in place
    "reencrypt.after-first-name",  # the copy renamed over the first name, other names not moved
    "reencrypt.mid-links",  # one more name moved to the new inode (hard links)
    "reencrypt.after-switch",  # every name moved, keys not yet retired
    "reencrypt.state.mid-tmp",  # .tdefs/reencrypt.json: half the new state written
    "reencrypt.state.after-tmp",
    "reencrypt.state.after-rename",
    # files.dict (encfs/filedict.py)
    "dict.append.mid-write",  # half a record written
    "dict.append.after-write",  # record written, not synced
    "dict.rewrite.mid-tmp",  # half the snapshot written to the tmp file
    "dict.rewrite.after-snapshot",  # snapshot synced, records written since not yet spliced
    "dict.rewrite.after-tmp",  # snapshot complete and synced, not renamed
    "dict.rewrite.after-rename",  # renamed over the log, directory not synced
    # keys.dict (encfs/keystore.py)
    "keys.replace.mid-tmp",
    "keys.replace.after-tmp",
    "keys.replace.after-rename",
)

_ACTIONS = ("crash", "error")


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    armed: dict[str, tuple[str, int]] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, action = item.partition("=")
        action, _, nth = (action or "crash").partition("@")
        if name not in FAILPOINTS:
            raise ValueError(f"{ENV_VAR}: unknown failpoint {name!r}")
        if action not in _ACTIONS:
            raise ValueError(f"{ENV_VAR}: unknown action {action!r} for {name}")
        if nth and not (nth.isdigit() and int(nth) >= 1):
            raise ValueError(f"{ENV_VAR}: bad hit count {nth!r} for {name}")
        armed[name] = (action, int(nth or 1))
    return armed


_armed = _parse(os.environ.get(ENV_VAR, ""))
_hits: dict[str, int] = {}
ARMED = bool(_armed)


def _fire(name: str) -> None:
    armed = _armed.get(name)
    if armed is None:
        return
    action, nth = armed
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != nth:
        return
    if action == "crash":
        os._exit(CRASH_EXIT_CODE)
    raise OSError(errno.EIO, f"failpoint {name}")


def _disarmed(name: str) -> None:
    return None


failpoint = _fire if ARMED else _disarmed
