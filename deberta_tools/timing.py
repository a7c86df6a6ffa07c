"""Latency measurement: warm-up, many timed runs, median/mean/p90."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Latency:
    median_ms: float
    mean_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms) -> "Latency":
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.median(a)), float(a.mean()), float(np.percentile(a, 90)), float(a.min()), len(a))


def measure(run: Callable[[], object], warmup: int = 10, iterations: int = 100,
            sync: Callable[[], None] | None = None, progress: Callable[[int], None] | None = None) -> Latency:
    """Time `run` with a host clock; `sync` (if given) waits for the device before each clock read, so the
    interval covers the device work. Callers whose `run` already returns after the device finished pass None."""
    for _ in range(warmup):
        run()
    if sync:
        sync()
    samples = []
    for i in range(iterations):
        start = time.perf_counter()
        run()
        if sync:
            sync()
        samples.append((time.perf_counter() - start) * 1e3)
        if progress:
            progress(i + 1)
    return Latency.from_samples(samples)
