"""What the benchmark scripts in scripts/ share, so that each exists once.

`guard` ends a run cleanly (one-line errors, SIGTERM as Ctrl-C); `processes` runs
commands and finds, waits for and stops processes; `targets` makes the directories a
benchmark runs in (the raw disk, a tdefs mount, a gocryptfs mount) and tears them
down; `neighbour` runs a workload idle or beside a busy neighbour; `memory` samples
the memory of processes; `latency` gives percentiles; `table` formats figures and
prints aligned tables.

The scripts import it as a sibling package: Python puts a script's own directory
first on sys.path, so `python scripts/bench_fs.py` finds `benchlib` next to it.
"""
