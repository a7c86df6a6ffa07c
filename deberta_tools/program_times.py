"""When each program of the fused attention's kernels ran, and on which multiprocessor (a profiling aid).

`ncu` and `nsys` give a kernel's total time and counters, not how its programs were laid out on the GPU: which
multiprocessor took which query block, how many ran side by side, how long the last ones ran after the others had
finished. With `RECORDING` set to a list, every launch of `fused_attention`'s attention kernel and of
`near_attention`'s near kernel gets a buffer here (`buffer`) whose rows its programs fill as they end: SM id, the
GPU's global timer (ns) and the SM's clock at the program's start and end, query block, batch x head, and the
global timer where the program began to wait for the kernel before it (`griddepcontrol.wait`; 0 where it has no
such wait). Unset (the default) the kernels compile without it. `scripts/gpu_program_times.py` runs one layer this
way and prints `summary`'s table. The recording is inline PTX, so it runs on NVIDIA GPUs only (not under
TRITON_INTERPRET).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# None, or a list that collects (kernel name, times tensor) for each launch while set.
RECORDING = None
FIELDS = ("sm", "start_ns", "end_ns", "start_clock", "end_clock", "query_block", "bg", "wait_ns")
_ROW = tl.constexpr(len(FIELDS))


def buffer(name: str, programs: int, device: torch.device) -> torch.Tensor | None:
    """A zeroed [programs, len(FIELDS)] int64 buffer for one launch, kept in RECORDING; None when not recording."""
    if RECORDING is None:
        return None
    times = torch.zeros((programs, len(FIELDS)), device=device, dtype=torch.int64)
    RECORDING.append((name, times))
    return times


@triton.jit
def timer():
    """The GPU's global timer, ns."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def now():
    """(global timer in ns, this SM's clock)."""
    return (timer(),
            tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1))


@triton.jit
def record(TIMES, started, query_block, bg, wait_ns):
    """This program's row of TIMES (programs numbered along grid axis 0 first); `started` is `now()` at its start,
    `wait_ns` the global timer where it began to wait for the kernel before it (0: it has no such wait)."""
    end_ns, end_clock = now()
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    row = TIMES + (tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)).to(tl.int64) * _ROW
    tl.store(row, sm.to(tl.int64))
    tl.store(row + 1, started[0])
    tl.store(row + 2, end_ns)
    tl.store(row + 3, started[1])
    tl.store(row + 4, end_clock)
    tl.store(row + 5, query_block.to(tl.int64))
    tl.store(row + 6, bg.to(tl.int64))
    tl.store(row + 7, wait_ns)


def summary(times: np.ndarray, multiprocessors: int) -> dict:
    """What one launch's rows (FIELDS) say, times in µs from the first program's start: span; programs, and the
    most side by side on one SM; program time (mean, max; from the SM clock, scaled to µs by the launch's own ratio
    of clock to global timer, since the global timer may tick coarsely); SM busy time over span x SMs (an SM is
    busy while any program runs on it); when the first SM ran out of programs (the start of the tail); how many
    programs were running at the middle of each tenth of the span (waves and tails show there); and the longest
    program time of the query blocks whose programs took longest."""
    sm, t0, t1, c0, c1, block = (times[:, k].astype(np.float64) for k in range(6))
    first = t0.min()
    span = (t1.max() - first) / 1e3
    wall = np.maximum(t1 - t0, 1.0)
    long = wall >= np.percentile(wall, 50)
    per_ns = float(np.sum((c1 - c0)[long]) / np.sum(wall[long]))  # SM clocks per ns
    dur = (c1 - c0) / per_ns / 1e3
    busy, last_ends, most = 0.0, [], 0
    for s in np.unique(sm):
        on = np.flatnonzero(sm == s)
        events = sorted([(t0[k], 1) for k in on] + [(t1[k], -1) for k in on])
        running, since = 0, 0.0
        for t, step in events:
            if running == 0 and step > 0:
                since = t
            running += step
            most = max(most, running)
            if running == 0:
                busy += t - since
        last_ends.append(t1[on].max())
    idle_sms = multiprocessors - len(last_ends)
    tail_from = 0.0 if idle_sms > 0 else (min(last_ends) - first) / 1e3
    mids = first + (np.arange(10) + 0.5) / 10 * (t1.max() - first)
    running = [int(np.sum((t0 <= t) & (t1 > t))) for t in mids]
    by_block = {int(b): dur[block == b] for b in np.unique(block)}
    slowest = sorted(by_block, key=lambda b: -by_block[b].max())[:3]
    return {
        "span us": span, "programs": len(times), "most on one SM": most, "SMs used": len(last_ends),
        "program us mean": float(dur.mean()), "program us max": float(dur.max()),
        "SM busy %": 100.0 * busy / 1e3 / (span * multiprocessors),
        "first SM idle at us": tail_from,
        "running at each tenth": " ".join(map(str, running)),
        "slowest query blocks": ", ".join(f"{b}: {by_block[b].max():.1f}" for b in slowest),
    }
