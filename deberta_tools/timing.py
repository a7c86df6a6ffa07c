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


def measure_cuda(run: Callable[[], object], stream, warmup: int = 10, iterations: int = 100,
                 cuda_graph: bool = False, progress: Callable[[int], None] | None = None) -> Latency:
    """Time an asynchronous `run` on `stream` (torch.cuda.Stream) with a pair of CUDA events per run.

    Runs are queued back to back (no host synchronisation inside the timed loop); the events are read after one
    final synchronize. With `cuda_graph`, one run is captured into a CUDA graph and its replays are timed."""
    import torch

    with torch.cuda.stream(stream):
        for _ in range(max(1, warmup)):
            run()
    stream.synchronize()
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        run = graph.replay
        with torch.cuda.stream(stream):
            for _ in range(3):
                run()
        stream.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iterations)]
    with torch.cuda.stream(stream):
        for i, (start, end) in enumerate(events):
            start.record(stream)
            run()
            end.record(stream)
            if progress:
                progress(i + 1)
    stream.synchronize()
    return Latency.from_samples([start.elapsed_time(end) for start, end in events])


def graph_us(fn: Callable[[], object], launches: int = 10) -> float:
    """Microseconds per call of `fn` on the current CUDA device, replayed from a CUDA graph of `launches` calls (no
    host launch cost in the time): Triton's do_bench median over the replays. For kernel experiments
    (scripts/gpu_*_check.py)."""
    import torch
    from triton.testing import do_bench
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return do_bench(graph.replay, return_mode="median") * 1e3 / launches
