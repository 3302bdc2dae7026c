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
