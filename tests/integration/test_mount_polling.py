"""Looking for the next request before sleeping (the polling patch to pyfuse3,
patches/README.md): on by default, off with --poll-us 0 (or -o poll_us=0), and never
while other tasks could keep every CPU busy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuse_harness import make_vault, mounted_at, run_tdefs

from mount.mount_request import POLL_US_DEFAULT

pytestmark = pytest.mark.fuse

CALLS = 2000
COUNTERS = ("hits", "misses", "contended")


def _polling(mountpoint: Path) -> dict:
    return json.loads(run_tdefs("status", mountpoint, "--json").stdout)["polling"]


def _statfs(mountpoint: Path, calls: int = CALLS) -> None:
    for _ in range(calls):
        os.statvfs(mountpoint)


def _grown(before: dict, after: dict, *names: str) -> int:
    return sum(after[n] - before[n] for n in names)


def test_the_daemon_looks_for_the_next_request_by_default(tmp_path: Path) -> None:
    v = make_vault(tmp_path)
    with mounted_at(v):
        before = _polling(v.mountpoint)
        assert before["available"], "this pyfuse3 lacks the polling patch: run scripts/setup"
        assert before["budget_us"] == POLL_US_DEFAULT
        _statfs(v.mountpoint)
        after = _polling(v.mountpoint)
        # each request that was not there yet when the last answer went out was looked
        # for (found or not), or waited for without a look on contended CPUs
        assert _grown(before, after, *COUNTERS) > 0, (before, after)
        text = run_tdefs("status", v.mountpoint).stdout.decode()
        assert f"up to {POLL_US_DEFAULT} µs" in text
        metrics = run_tdefs("metrics", v.mountpoint).stdout.decode()
        assert f"tdefs_polling_hits_total {float(after['hits'])}" in metrics


@pytest.mark.parametrize("how", [("--poll-us", "0"), ("-o", "poll_us=0")])
def test_a_budget_of_zero_never_looks(tmp_path: Path, how: tuple[str, str]) -> None:
    v = make_vault(tmp_path)
    with mounted_at(v, extra=how):
        before = _polling(v.mountpoint)
        assert before["budget_us"] == 0
        _statfs(v.mountpoint)
        assert _grown(before, _polling(v.mountpoint), *COUNTERS) == 0
        assert "off (--poll-us 0)" in run_tdefs("status", v.mountpoint).stdout.decode()


def test_no_look_while_other_tasks_could_fill_every_cpu(tmp_path: Path) -> None:
    v = make_vault(tmp_path)
    spinners: list[subprocess.Popen] = []
    with mounted_at(v):
        try:
            for _ in range(len(os.sched_getaffinity(0))):
                spinners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
            # the daemon reads the load every few ms: these calls outlast one reading
            _statfs(v.mountpoint, 500)
            before = _polling(v.mountpoint)
            _statfs(v.mountpoint)
            after = _polling(v.mountpoint)
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait(10)
        # a request may already wait when the answer to the last one has gone out
        # (then nobody looks, contended or not); every other wait must skip the look
        assert _grown(before, after, "contended") > 0, (before, after)
        assert _grown(before, after, "hits", "misses") <= CALLS // 50, (before, after)


def test_a_bad_budget_is_refused_in_one_line(tmp_path: Path) -> None:
    v = make_vault(tmp_path)
    proc = run_tdefs("mount", v.backing, v.mountpoint, *v.key_args(), "--poll-us", "-5",
                     check=False)
    assert proc.returncode == 2
    assert b"the budget must be 0 (off) to" in proc.stderr
    assert b"Traceback" not in proc.stderr
