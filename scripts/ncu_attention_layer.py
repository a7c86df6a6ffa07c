#!/usr/bin/env python3
"""On a CUDA GPU, under Nsight Compute: one attention layer of the demo config's shape for `ncu` to profile.

Runs the fused layer (near kernel and the attention kernel after it), PyTorch SDPA and the flash ceiling kernels of
`gpu_flash_ceiling.py` (64 x 64 with pointer loads, 64 x 128 through TMA) three times each to compile and warm
up, then once more each between cudaProfilerStart and cudaProfilerStop, so that

    ncu --profile-from-start off --clock-control none --cache-control none --set full \\
        -k 'regex:attention_kernel|_flash_|flash_fwd' -o layer python3 scripts/ncu_attention_layer.py [--seq-len 2048]

profiles one launch of each. `--flag NAME` also runs the fused layer with fused_attention.NAME set (after it
unset; `near_attention.NAME` for one of that module), to compare a switch's kernels in one report.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_flash_ceiling as ceiling  # noqa: E402
from deberta_tools import fused_attention as fa, inputs, near_attention  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--flag", help="a boolean of fused_attention (or near_attention.NAME) to run the layer with "
                                       "as well")
    args = parser.parse_args()
    heads, dim, seq = 6, 64, args.seq_len
    torch.manual_seed(seq)
    qkv, positions, mask = inputs.attention_layer(seq, 1, heads, dim)
    ranges = fa.valid_ranges(mask)
    q, k, v = qkv.view(1, seq, 3, heads, dim).permute(2, 0, 3, 1, 4).contiguous()

    module, flag = fa, args.flag
    if flag and flag.startswith("near_attention."):
        module, flag = near_attention, flag.split(".", 1)[1]

    def fused(value=False):
        if flag:
            setattr(module, flag, value)
        return fa.attention(qkv, mask, heads, dim, positions, 0.07, ranges=ranges)

    runs = [fused] + ([lambda: fused(True)] if args.flag else []) + [
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        lambda: ceiling.flash(qkv, heads, dim, (64, 64, 4, 3), False),
        lambda: ceiling.flash(qkv, heads, dim, (64, 128, 4, 3), True)]
    for _ in range(3):
        for run in runs:
            run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
