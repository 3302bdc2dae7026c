"""The entry of a job's fresh interpreter (engine/forked_job.py, ``fresh=True``):
``python -m engine.fresh_child PARENT NICENESS`` reads the pickled ``(fn, args)``
from stdin, sends ``STARTED``, runs the job and sends the outcome on stdout as a
forked child does. A parent that gets no ``STARTED`` (the interpreter or the engine
would not start) forks instead."""

from __future__ import annotations

import os
import pickle
import sys

from engine.forked_job import STARTED, child_main

if __name__ == "__main__":
    parent, niceness = int(sys.argv[1]), int(sys.argv[2])
    fn, args = pickle.loads(sys.stdin.buffer.read())
    os.write(sys.stdout.fileno(), STARTED)
    child_main(fn, args, sys.stdout.fileno(), niceness, parent)
