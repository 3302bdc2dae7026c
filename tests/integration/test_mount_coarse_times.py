"""--coarse-times (the time-gran patch to pyfuse3, patches/README.md): the kernel
keeps the mount's file times in whole seconds, so a write and an fsync in the same
second send no SETATTR of the times; without it every fsync after a write sends one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from fuse_harness import make_vault, mounted_at, run_tdefs

pytestmark = pytest.mark.fuse

APPENDS = 200


def _setattrs(mountpoint: Path) -> float:
    text = run_tdefs("metrics", mountpoint).stdout.decode()
    found = re.search(r'^tdefs_requests_total\{op="setattr"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _append_and_sync(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for _ in range(APPENDS):
            os.write(fd, b"x" * 100)
            os.fdatasync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("coarse", [False, True])
def test_an_fsync_sends_the_times_only_when_they_changed(tmp_path: Path, coarse: bool) -> None:
    v = make_vault(tmp_path)
    with mounted_at(v, extra=("--coarse-times",) if coarse else ()):
        status = json.loads(run_tdefs("status", v.mountpoint, "--json").stdout)
        assert status["coarse_times"] is coarse
        before = _setattrs(v.mountpoint)
        _append_and_sync(v.mountpoint / "log")
        sent = _setattrs(v.mountpoint) - before
        st = os.stat(v.mountpoint / "log")
        assert st.st_size == APPENDS * 100
        if coarse:
            # one per second the appends spanned at most (they take well under a minute)
            assert sent <= 60 and sent < APPENDS / 2, sent
            assert st.st_mtime_ns % 1_000_000_000 == 0
        else:
            assert sent >= APPENDS * 0.9, sent
    # the times written back reach the backing file, whole seconds included
    assert os.stat(v.backing / "log").st_mtime_ns == st.st_mtime_ns
