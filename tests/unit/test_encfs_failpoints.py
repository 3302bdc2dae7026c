"""encfs.failpoints: arming by environment, actions, and that FAILPOINTS is complete."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from encfs import failpoints

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, spec: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TDEFS_FAILPOINTS=spec)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_unarmed_is_a_no_op():
    # in a child with the variable unset, whatever this process was started with
    code = ("from encfs import failpoints\n"
            "assert not failpoints.ARMED\n"
            "for name in failpoints.FAILPOINTS:\n    failpoints.failpoint(name)\n"
            "print('unarmed')\n")
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "unarmed"


def test_crash_and_error_actions():
    code = ("from encfs.failpoints import failpoint\n"
            "try:\n    failpoint('link.after-new')\nexcept OSError as e:\n    print('EIO', e.errno)\n"
            "print('before', flush=True)\nfailpoint('create.after-new')\nprint('after')\n")
    proc = _run(code, "create.after-new=crash,link.after-new=error")
    assert proc.returncode == failpoints.CRASH_EXIT_CODE
    assert proc.stdout.split() == ["EIO", "5", "before"]


def test_unknown_name_is_refused():
    proc = _run("import encfs.failpoints", "no.such.point=crash")
    assert proc.returncode != 0 and "unknown failpoint" in proc.stderr


def failpoint_names_in_source() -> set[str]:
    """Every failpoint name the encfs sources can fire: literal failpoint("...") calls
    plus the three names atomic_replace derives from each prefix it is given."""
    names: set[str] = set()
    for path in (ROOT / "encfs").glob("*.py"):
        text = path.read_text()
        names.update(re.findall(r'failpoint\(\s*"([^"]+)"\s*\)', text))
        for prefix in re.findall(r'atomic_replace\([^)]*?"([a-z.-]+)"', text, re.S):
            names.update(f"{prefix}.{step}" for step in ("mid-tmp", "after-tmp", "after-rename"))
        for prefix in re.findall(r'failpoint_prefix="([a-z.-]+)"', text):
            names.update(f"{prefix}.{step}" for step in ("mid-tmp", "after-tmp", "after-rename"))
    return names


def test_failpoints_lists_every_name_in_the_code():
    used = failpoint_names_in_source()
    assert used, "found no failpoint call sites"
    assert used == set(failpoints.FAILPOINTS), (
        f"missing from FAILPOINTS: {sorted(used - set(failpoints.FAILPOINTS))}; "
        f"listed but never fired: {sorted(set(failpoints.FAILPOINTS) - used)}"
    )
    assert len(failpoints.FAILPOINTS) == len(set(failpoints.FAILPOINTS))
