"""Latency measurement: interleaved A/B runs in one process (see the README's benchmark notes).

Interleaving (A, B, A, B, ...) makes a *ratio* hold on a noisy machine: both sides see the
same background load. onnxruntime sessions are created with ``allow_spinning = 0`` so an idle
session's worker threads do not steal cores from the one being timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LatencyStats:
    name: str
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(name: str, seconds: Sequence[float]) -> LatencyStats:
    values = sorted(s * 1000.0 for s in seconds)
    return LatencyStats(
        name=name,
        runs=len(values),
        p50_ms=_percentile(values, 0.50),
        p90_ms=_percentile(values, 0.90),
        p99_ms=_percentile(values, 0.99),
        mean_ms=statistics.fmean(values),
    )


def interleaved(
    candidates: dict[str, Callable[[], Any]],
    runs: int = 30,
    warmup: int = 5,
    progress: Callable[[], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time each callable ``runs`` times, alternating between them, after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return {name: summarize(name, values) for name, values in samples.items()}
