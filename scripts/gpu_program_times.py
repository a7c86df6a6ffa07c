#!/usr/bin/env python3
"""On a CUDA GPU: how the programs of one fused attention layer were laid out on the GPU (deberta_tools.program_times).

For each length: one layer of the demo config's shape (6 heads of 64, v3 position rule, fp16, no padding), run with
every program of the near kernel and of the attention kernel after it recording its SM, start and end; per kernel its
span, the most programs side by side on one SM, the mean and longest program, how busy the SMs were over the span,
when the first SM ran out of work, how many programs ran at each tenth of the span, and the query blocks whose
programs took longest; the gap between the two kernels. Beside it the layer's time without the recording (CUDA
graph of 10 calls, median), since the recording adds a few instructions and registers to each program; for a
kernel launched as a programmatic dependent of the one before it, how long its programs waited for that kernel to
end (from reaching `griddepcontrol.wait` to the last end recorded in the kernel before).

    python scripts/gpu_program_times.py [--seq-len 1024 2048 4096] [--batch-size 1] [--csv DIR] [--eager]
                                        [--overlap-programs-per-sm N] [--no-overlap]

Recorded in a CUDA graph (since v40; v34 and v36 recorded from the host, where a kernel launched as a programmatic
dependent starts only when the host gets to it, so their "gap before" was host time and no overlap showed).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import fused_attention as fa, inputs, near_attention, program_times, report  # noqa: E402
from deberta_tools.timing import graph_us  # noqa: E402


def recorded_layer(seq, batch, heads=6, dim=64, eager=False):
    """([(kernel name, times as a numpy array)] of one layer's launches, recorded in the last of four replays of a
    CUDA graph of one layer (launched one by one from the host with `eager`: then a kernel launched as a
    programmatic dependent starts only when the host gets to it, so the overlap with the kernel before it is
    lost); the layer's time without recording, µs)."""
    torch.manual_seed(seq)
    qkv, positions, mask = inputs.attention_layer(seq, batch, heads, dim)
    ranges = fa.valid_ranges(mask)
    plain = graph_us(lambda: fa.attention(qkv, mask, heads, dim, positions, 0.07, ranges=ranges))
    program_times.RECORDING = []
    try:
        if eager:
            for _ in range(4):
                program_times.RECORDING.clear()
                fa.attention(qkv, mask, heads, dim, positions, 0.07, ranges=ranges)
        else:
            fa.attention(qkv, mask, heads, dim, positions, 0.07, ranges=ranges)  # compile the recording kernels
            torch.cuda.synchronize()
            program_times.RECORDING.clear()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fa.attention(qkv, mask, heads, dim, positions, 0.07, ranges=ranges)
            for _ in range(4):
                graph.replay()
        torch.cuda.synchronize()
        launches = [(name, times.cpu().numpy()) for name, times in program_times.RECORDING]
        launches.sort(key=lambda launch: launch[1][:, 1].min())  # in the order they ran (buffers are made earlier)
    finally:
        program_times.RECORDING = None
    return launches, plain


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--csv", type=Path, help="write each launch's rows (program_times.FIELDS) here")
    parser.add_argument("--eager", action="store_true",
                        help="launch the recorded layer from the host instead of a CUDA graph (no overlap)")
    parser.add_argument("--overlap-programs-per-sm", type=int,
                        help="near_attention.OVERLAP_PROGRAMS_PER_SM for the run (default: the module's)")
    parser.add_argument("--no-overlap", action="store_true", help="fused_attention.OVERLAP_NEAR_TAIL off")
    parser.add_argument("--first-share", type=int,
                        help="near_attention.FIRST_SHARE for the run (default: the module's)")
    args = parser.parse_args()
    if args.first_share is not None:
        near_attention.FIRST_SHARE = args.first_share
    if args.overlap_programs_per_sm is not None:
        near_attention.OVERLAP_PROGRAMS_PER_SM = args.overlap_programs_per_sm
    if args.no_overlap:
        fa.OVERLAP_NEAR_TAIL = False
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("device:", torch.cuda.get_device_name(), f"({sms} SMs) | torch", torch.__version__, "| triton",
          triton.__version__)
    print(f"recorded {'from the host' if args.eager else 'in a CUDA graph'}; OVERLAP_NEAR_TAIL "
          f"{fa.OVERLAP_NEAR_TAIL}, OVERLAP_PROGRAMS_PER_SM {near_attention.OVERLAP_PROGRAMS_PER_SM}, FIRST_SHARE "
          f"{near_attention.FIRST_SHARE}")
    rows = []
    for seq in args.seq_len:
        launches, plain = recorded_layer(seq, args.batch_size, eager=args.eager)
        first = min(times[:, 1].min() for _, times in launches)
        last = max(times[:, 2].max() for _, times in launches)
        for n, (name, times) in enumerate(launches):
            s = program_times.summary(times, sms)
            gap, waiting = "", ""
            if n:  # programs that ended within 1 us after the kernel before ended (waiting for it, or merely late)
                before_end = launches[n - 1][1][:, 2].max()
                ended = np.sum(times[:, 2] <= before_end + 1000)
                gap = f"{(times[:, 1].min() - before_end) / 1e3:.1f} ({ended} ended by its end + 1 us)"
                at_wait = times[:, 7] > 0
                if at_wait.any():  # from reaching griddepcontrol.wait to the end of the kernel before
                    held = np.maximum(before_end - times[at_wait, 7], 0) / 1e3
                    waiting = (f"{np.sum(held > 0)} of {at_wait.sum()}: mean {held.mean():.1f}, max {held.max():.1f}, "
                               f"{held.sum():.0f} program-us ({held.sum() / (2 * sms):.1f} us of 2 slots an SM)")
            rows.append([f"{args.batch_size} x {seq}", name, f"{s['span us']:.1f}", gap, str(s["programs"]),
                         str(s["most on one SM"]), str(s["SMs used"]), f"{s['program us mean']:.1f}",
                         f"{s['program us max']:.1f}", f"{s['SM busy %']:.0f}", f"{s['first SM idle at us']:.1f}",
                         s["running at each tenth"], s["slowest query blocks"], waiting])
            if args.csv:
                args.csv.mkdir(parents=True, exist_ok=True)
                np.savetxt(args.csv / f"{args.batch_size}x{seq}-{n}-{name}.csv", times, fmt="%d", delimiter=",",
                           header=",".join(program_times.FIELDS), comments="")
        rows.append([f"{args.batch_size} x {seq}", "layer", f"{(last - first) / 1e3:.1f}", "", "", "", "", "", "",
                     "", "", "", f"without recording, in a CUDA graph: {plain:.1f} us", ""])
    print(report.table(["batch x seq", "kernel", "span us", "gap before us", "programs", "most on one SM",
                        "SMs used", "program us mean", "program us max", "SM busy %", "first SM idle at us",
                        "programs running at each tenth of the span", "slowest query blocks (longest program us)",
                        "waiting for the kernel before (programs, us)"],
                       rows))


if __name__ == "__main__":
    main()
