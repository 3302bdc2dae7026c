"""Shared helpers for engine tests: small options so every path runs quickly."""

from __future__ import annotations

from engine import Options


def small_options(**kw) -> Options:
    """Tiny budgets; blocks stored uncompressed, so table sizes and byte offsets are
    what the tests compute (the tests of compression ask for it)."""
    base = dict(write_buffer_size=16 << 10, target_file_size_base=16 << 10,
                max_bytes_for_level_base=48 << 10, block_size=512,
                level0_file_num_compaction_trigger=2, background_processes=False,
                compression="none")
    base.update(kw)
    return Options(**base)


def run_lsmdb(capsys, *args) -> tuple[int, str, str]:
    """Run `lsmdb ARGS` in this process: (exit status, stdout, stderr)."""
    from engine.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def child_facts() -> tuple[int, bool]:
    """A job for engine/forked_job.py's children: the child's parent pid, and whether
    the child carries this test run's modules (a fork does, a fresh interpreter not)."""
    import os
    import sys
    return os.getppid(), "pytest" in sys.modules


def report_pid_then_wait(path: str) -> None:
    """A job that writes its pid to ``path`` and then waits to be killed."""
    import os
    import time
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(600)
