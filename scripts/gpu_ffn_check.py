#!/usr/bin/env python3
"""On a CUDA GPU: the layer's work outside attention, whole and in chunks of tokens that stay in L2.

After attention a fused layer runs out-projection, add + LayerNorm, the feed-forward up-projection, GELU, the
down-projection and add + LayerNorm again, each a kernel over every token. At 32 x 512 tokens of the demo config
the [tokens, intermediate] tensor is 50 MB, the size of an H100's L2, so the GELU pass and the down-projection read
it from memory. Run in chunks of tokens into reused scratch buffers, each chunk's intermediate stays in L2. This
prints the time of each variant (CUDA graph of 10 calls, median) and the relative L2 of its output against the
unchunked one.

    python scripts/gpu_ffn_check.py [--hidden 384] [--tokens 512 2048 8192 16384]
"""

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import fused_model, report  # noqa: E402
from deberta_tools.timing import graph_us as _graph_us  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.out_dense = torch.nn.Linear(hidden, hidden)
        self.out_norm = torch.nn.LayerNorm(hidden)
        self.inter_dense = torch.nn.Linear(hidden, inter)
        self.ffn_dense = torch.nn.Linear(inter, hidden)
        self.ffn_norm = torch.nn.LayerNorm(hidden)


def whole(blk, ctx, x):
    h = fused_model.add_layer_norm(blk.out_dense(ctx), x, blk.out_norm)
    return fused_model.add_layer_norm(blk.ffn_dense(torch.nn.functional.gelu(blk.inter_dense(h))), h, blk.ffn_norm)


def chunked(blk, ctx, x, chunk, scratch, layer=True):
    """The same per chunk of `chunk` tokens, into scratch buffers reused by every chunk (they stay in L2); with
    layer=False only the feed-forward block goes in chunks (out-projection and its LayerNorm over all tokens)."""
    out = torch.empty_like(x)
    proj, h, inter, down = scratch
    h_all = None if layer else fused_model.add_layer_norm(blk.out_dense(ctx), x, blk.out_norm)
    for s in range(0, x.shape[0], chunk):
        e = min(s + chunk, x.shape[0])
        n = e - s
        if layer:
            torch.addmm(blk.out_dense.bias, ctx[s:e], blk.out_dense.weight.t(), out=proj[:n])
            h_c = fused_model.add_layer_norm(proj[:n], x[s:e], blk.out_norm, out=h[:n])
        else:
            h_c = h_all[s:e]
        torch.addmm(blk.inter_dense.bias, h_c, blk.inter_dense.weight.t(), out=inter[:n])
        torch.ops.aten.gelu_(inter[:n])
        torch.addmm(blk.ffn_dense.bias, inter[:n], blk.ffn_dense.weight.t(), out=down[:n])
        fused_model.add_layer_norm(down[:n], h_c, blk.ffn_norm, out=out[s:e])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    args = parser.parse_args()
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    hidden, inter = args.hidden, 4 * args.hidden
    blk = Block(hidden, inter).cuda().half()
    rows = []
    with torch.no_grad():
        for tokens in args.tokens:
            ctx = torch.randn(tokens, hidden, device="cuda", dtype=torch.float16)
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.float16)
            ref = whole(blk, ctx, x).float()
            h = fused_model.add_layer_norm(blk.out_dense(ctx), x, blk.out_norm)
            a = blk.inter_dense(h)
            g = torch.nn.functional.gelu(a)
            parts = {
                "out-proj": lambda: blk.out_dense(ctx),
                "add+LN": lambda: fused_model.add_layer_norm(ctx, x, blk.out_norm),
                "up-proj": lambda: blk.inter_dense(h),
                "GELU": lambda: torch.nn.functional.gelu(a),
                "down-proj": lambda: blk.ffn_dense(g),
            }
            for name, fn in parts.items():
                rows.append([str(tokens), name, f"{_graph_us(fn):.1f}", ""])
            base = _graph_us(lambda: whole(blk, ctx, x))
            rows.append([str(tokens), "whole (as fused_model)", f"{base:.1f}", "0"])
            for chunk in (1024, 2048, 4096, 8192):
                if chunk >= tokens:
                    continue
                scratch = (torch.empty(chunk, hidden, device="cuda", dtype=torch.float16),
                           torch.empty(chunk, hidden, device="cuda", dtype=torch.float16),
                           torch.empty(chunk, inter, device="cuda", dtype=torch.float16),
                           torch.empty(chunk, hidden, device="cuda", dtype=torch.float16))
                for label, layer in (("layer", True), ("FFN only", False)):
                    err = ((chunked(blk, ctx, x, chunk, scratch, layer).float() - ref).norm() / ref.norm()).item()
                    t = _graph_us(lambda: chunked(blk, ctx, x, chunk, scratch, layer))
                    rows.append([str(tokens), f"{label} in chunks of {chunk}", f"{t:.1f}", f"{err:.1e}"])
    print(f"hidden {hidden}, intermediate {inter}, fp16, us per call (10 calls per CUDA graph replay, median)")
    print(report.table(["tokens", "variant", "us", "rel L2 vs whole"], rows))


if __name__ == "__main__":
    main()
