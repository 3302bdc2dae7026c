"""Latency percentiles: nearest rank over the sorted samples, so every figure printed
is a latency that was measured, never an interpolation between two."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The smallest sample that at least `fraction` (0 < fraction <= 1) of the samples
    do not exceed; `ordered` must be sorted and not empty."""
    if not ordered:
        raise ValueError("no samples")
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]
