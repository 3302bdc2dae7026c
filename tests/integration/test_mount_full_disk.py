"""A full backing disk and a dead daemon: what a program sees, and what is kept.

With the writeback cache write(2) fills the page cache and succeeds; the daemon
writes the data back later. When the disk is full then, the data is lost: fsync and
close report it, the daemon logs it with the path, `tdefs umount` names the files
and exits non-zero, and nothing an earlier fsync made durable is lost with it."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest
from fuse_harness import (
    daemons_for,
    force_cleanup,
    make_vault,
    mount,
    mounted_at,
    require_fuse,
    run_tdefs,
    small_filesystem,
)

from encfs.fsops import fallocate

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def test_a_full_disk_loses_only_unsynced_data_and_says_which(tmp_path) -> None:
    require_fuse()
    with small_filesystem(tmp_path / "small", "24m") as small:
        v = make_vault(tmp_path, backing_root=small)
        durable = os.urandom(4 * MiB)
        try:
            mount(v)
            a, b = v.mountpoint / "a", v.mountpoint / "b"
            fd = os.open(a, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.write(fd, durable)
                os.fsync(fd)
                # a growing operation the disk cannot hold fails and leaves the file
                with pytest.raises(OSError) as exc:
                    fallocate(fd, 0, 0, 64 * MiB)
                assert exc.value.errno == errno.ENOSPC
                assert os.fstat(fd).st_size == 4 * MiB
                for _ in range(32):  # more than the disk holds, into the page cache
                    os.write(fd, os.urandom(MiB))
                with pytest.raises(OSError) as exc:
                    os.fsync(fd)
                assert exc.value.errno == errno.ENOSPC
            finally:
                os.close(fd)
            with pytest.raises(OSError) as exc:
                with open(b, "wb") as h:
                    h.write(os.urandom(8 * MiB))
                    h.flush()
                    os.fsync(h.fileno())
            assert exc.value.errno == errno.ENOSPC
            proc = run_tdefs("umount", v.mountpoint, check=False)
            err = proc.stderr.decode()
            assert proc.returncode == 1, err
            assert "could not be written back and are lost" in err
            assert "  a: ENOSPC" in err and "  b: ENOSPC" in err
            log = v.log.read_text()
            assert "write of a failed (ENOSPC" in log and "write of b failed (ENOSPC" in log
            # nothing an earlier fsync made durable is lost
            assert os.stat(v.backing / "a").st_size >= 4 * MiB
            with mounted_at(v):
                with open(a, "rb") as h:
                    assert h.read(4 * MiB) == durable
        finally:
            force_cleanup(v.mountpoint)


def test_a_program_writing_learns_within_seconds_that_the_daemon_died(tmp_path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    try:
        mount(v)
        fd = os.open(v.mountpoint / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"first")
            (daemon,) = daemons_for(v.mountpoint)
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
            died = time.monotonic()
            failure = None
            while time.monotonic() - died < 30:
                try:
                    os.write(fd, b"more")  # into the page cache while attributes last
                except OSError as exc:
                    failure = exc
                    break
            assert failure is not None and failure.errno == errno.ENOTCONN
            # the attribute timeout (1 s) bounds the window, not the old 60 s
            assert time.monotonic() - died < 5
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                assert exc.errno == errno.ENOTCONN  # close reports the lost write too
        proc = run_tdefs("umount", v.mountpoint, check=False)
        assert proc.returncode == 0 and b"gone" in proc.stderr
    finally:
        force_cleanup(v.mountpoint)
