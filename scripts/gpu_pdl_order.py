#!/usr/bin/env python3
"""On a CUDA GPU (9.0 and up): does the stream still order a kernel after a programmatic dependent that finished
before its primary? (the question before NOTES.md item 0e's last-arriver merge)

Three kernels per round, one program each: A lets its dependents launch at once (`griddepcontrol.launch_dependents`),
spins SPIN_US on the global timer, then writes round number k + 1 to a flag; B, launched as A's programmatic
dependent (`launch_pdl`), reads the flag without `griddepcontrol.wait` and ends; C, launched plainly after B, reads
the flag. B reading k (A's write not yet there) shows that B ran and ended while A was still spinning; C reading
k + 1 in every round, with B ended first, shows that C waited for A, not only for B. Rounds are launched from the
host and, separately, captured in one CUDA graph.

    python scripts/gpu_pdl_order.py [--rounds 50] [--spin-us 100]
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools.program_times import timer  # noqa: E402


@triton.jit
def _primary(FLAG, value, spin_ns):
    gdc_launch_dependents()
    t0 = timer()
    t = t0
    while t - t0 < spin_ns:
        t = timer()
    tl.store(FLAG, value)


@triton.jit
def _read(FLAG, SEEN, k):
    tl.store(SEEN + k, tl.load(FLAG, volatile=True))


def rounds(flag, seen_b, seen_c, count, spin_ns):
    for k in range(count):
        _primary[(1,)](flag, k + 1, spin_ns)
        _read[(1,)](flag, seen_b, k, launch_pdl=True)
        _read[(1,)](flag, seen_c, k)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--spin-us", type=float, default=100.0)
    args = parser.parse_args()
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    spin_ns = int(args.spin_us * 1000)
    for how in ("from the host", "in a CUDA graph"):
        flag = torch.zeros(1, dtype=torch.int64, device="cuda")
        seen_b = torch.full((args.rounds,), -1, dtype=torch.int64, device="cuda")
        seen_c = torch.full_like(seen_b, -1)
        rounds(flag, seen_b, seen_c, 1, spin_ns)  # compile
        torch.cuda.synchronize()
        flag.zero_()
        if how == "from the host":
            rounds(flag, seen_b, seen_c, args.rounds, spin_ns)
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                rounds(flag, seen_b, seen_c, args.rounds, spin_ns)
            flag.zero_()
            graph.replay()
        torch.cuda.synchronize()
        k = torch.arange(args.rounds, device="cuda")
        b_early = int((seen_b == k).sum())
        c_after = int((seen_c == k + 1).sum())
        print(f"{how}: B (dependent, no wait) read A's flag before A wrote it in {b_early} of {args.rounds} rounds; "
              f"C (plain launch after B) read it after A wrote it in {c_after} of {args.rounds}")


if __name__ == "__main__":
    main()
