"""The least a FUSE request costs: statfs round trips on tdefs, on an empty pyfuse3
filesystem and, optionally, on gocryptfs.

A statfs through a FUSE mount is one request whose answer needs almost no work, so
its rate is the floor under every small-file figure of bench_fs. The empty
filesystem runs pyfuse3 on trio exactly as the tdefs daemon does but answers with
constants: the ratio tdefs/empty shows how much of the floor is tdefs's own code, and
gocryptfs/empty how far the binding is from a compiled daemon. The targets are
measured in turns, several rounds, keeping each one's best round, and each round
runs idle and beside a busy neighbour (benchlib/neighbour.py): a table for each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib.guard import BenchError, run_guarded
from benchlib.neighbour import CONDITIONS, condition, conditions_for
from benchlib.processes import run_command
from benchlib.table import print_table
from benchlib.targets import (
    FuseTarget,
    GocryptfsTarget,
    TdefsTarget,
    default_base_dir,
    started_targets,
)

from mount.mount_table import is_mounted


class EmptyTarget(FuseTarget):
    """This script's own `--serve` mode: pyfuse3 on trio answering statfs."""

    name = "empty"

    def init(self) -> None:
        pass

    def mount(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.mountpoint)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                raise BenchError(f"the empty filesystem did not mount: {err or 'timed out'}")
            time.sleep(0.02)

    def unmount(self) -> None:
        run_command(["fusermount3", "-u", str(self.mountpoint)])
        self.proc.wait(10)


def serve(mountpoint: str) -> None:
    import pyfuse3
    import trio

    class Empty(pyfuse3.Operations):
        async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
            data = pyfuse3.StatvfsData()
            data.f_bsize = data.f_frsize = 4096
            data.f_namemax = 255
            return data

    pyfuse3.init(Empty(), mountpoint, {"fsname=tdefs-bench-empty"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def rate(path: Path, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        os.statvfs(path)
    return calls / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="statfs calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each target's best counts")
    parser.add_argument("--peers", default="", help="gocryptfs: measure it too")
    parser.add_argument("--dir", type=Path, help="where to make the work directory")
    parser.add_argument("--condition", choices=(*CONDITIONS, "both"), default="both",
                        help="idle, beside a busy neighbour, or both (default both)")
    parser.add_argument("--serve", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be at least 1")
    if args.peers not in ("", "gocryptfs"):
        parser.error(f"unknown peer {args.peers!r} (choose gocryptfs)")
    return run_guarded("bench_floor", lambda: floor(args))


def floor(args: argparse.Namespace) -> int:
    base = args.dir if args.dir is not None else default_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tdefs-floor-", dir=base))
    names = ["empty", "tdefs"] + (["gocryptfs"] if args.peers else [])
    classes = {"empty": EmptyTarget, "tdefs": TdefsTarget, "gocryptfs": GocryptfsTarget}
    conditions = conditions_for(args.condition)
    best: dict[str, dict[str, float]] = {c: {} for c in conditions}
    try:
        with started_targets(root, names, classes) as targets:
            for _ in range(args.rounds):
                for cond in conditions:
                    with condition(cond):
                        for name, target in targets.items():
                            calls = rate(target.workdir, args.calls)
                            best[cond][name] = max(best[cond].get(name, 0.0), calls)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for cond in conditions:
        rates = best[cond]
        print_table(("target", "calls/s", "us/call", "x empty"),
                    [(name, f"{rates[name]:,.0f}", f"{1e6 / rates[name]:.1f}",
                      f"{rates[name] / rates['empty']:.2f}") for name in names],
                    "lrrr", title=f"{cond}: statfs round trips, best of {args.rounds} rounds "
                                  f"of {args.calls:,} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
