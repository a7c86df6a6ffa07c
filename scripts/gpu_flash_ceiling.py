#!/usr/bin/env python3
"""How fast plain flash attention can be in Triton at the demo config's shapes (6 heads of 64, fp16, batch 1), against
PyTorch SDPA and the fused kernel's own plain-flash cases: the ceiling for the saturated tiles, which since v28 are
plain flash tiles (results/fused-attention-h100/NOTES.md, "What is left").

A minimal FlashAttention-2 forward (no mask, no position terms, S a multiple of the tile) in two forms: K and V
through TMA tensor descriptors, or through pointer loads as fused_attention._attend_block does; several tiles each.
Checked against SDPA before it is timed.

    python scripts/gpu_flash_ceiling.py [--seq 2048 8192]
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import compare, fused_attention as fa, inputs, near_attention, report  # noqa: E402
from deberta_tools.timing import graph_us  # noqa: E402


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, qk_scale):
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _flash_tma(q_d, kv_d, o_d, S, H, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               STAGES: tl.constexpr):
    row = tl.program_id(1) // H * S
    h = tl.program_id(1) % H
    q = q_d.load([row + tl.program_id(0) * BM, h * D])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for j in tl.range(0, S, BN, num_stages=STAGES):
        s = tl.dot(q, kv_d.load([row + j, (H + h) * D]).T)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, kv_d.load([row + j, (2 * H + h) * D]), qk_scale)
    o_d.store([row + tl.program_id(0) * BM, h * D], (acc / l_i[:, None]).to(o_d.dtype))


@triton.jit
def _flash_ptr(QKV, OUT, S, H, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr):
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    stride = 3 * H * D
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    dd = tl.arange(0, D)
    base = QKV + b * S * stride
    q = tl.load(base + i[:, None] * stride + h * D + dd[None, :])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for j0 in tl.range(0, S, BN, num_stages=STAGES):
        j = j0 + tl.arange(0, BN)
        s = tl.dot(q, tl.trans(tl.load(base + j[:, None] * stride + (H + h) * D + dd[None, :])))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, tl.load(base + j[:, None] * stride + (2 * H + h) * D
                                                                + dd[None, :]), qk_scale)
    tl.store(OUT + b * S * H * D + i[:, None] * (H * D) + h * D + dd[None, :],
             (acc / l_i[:, None]).to(OUT.dtype.element_ty))


def flash(qkv, heads, dim, tile, tma):
    batch, seq, _ = qkv.shape
    bm, bn, warps, stages = tile
    out = torch.empty(batch, seq, heads * dim, device=qkv.device, dtype=qkv.dtype)
    scale = dim ** -0.5 * fa._LOG2E
    grid = (seq // bm, batch * heads)
    if tma:
        flat = qkv.view(batch * seq, -1)
        _flash_tma[grid](TensorDescriptor.from_tensor(flat, [bm, dim]), TensorDescriptor.from_tensor(flat, [bn, dim]),
                         TensorDescriptor.from_tensor(out.view(batch * seq, -1), [bm, dim]), seq, heads, scale,
                         D=dim, BM=bm, BN=bn, STAGES=stages, num_warps=warps)
    else:
        _flash_ptr[grid](qkv, out, seq, heads, scale, D=dim, BM=bm, BN=bn, STAGES=stages, num_warps=warps)
    return out


TILES = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
         (128, 64, 8, 4), (128, 128, 4, 2)]


def _label(tile):
    """(block_m, block_n, warps, stages) as the tables print it: 64x128 w4 s3."""
    return "{}x{} w{} s{}".format(*tile)


def _rel_l2(value, ref):
    return compare.relative_l2(value.cpu().numpy(), ref.cpu().numpy())


def check_kernels(device):
    """Both forms against float64 attention on a batch of two sequences (rows of the two never mix), several key
    blocks a query block; raises SystemExit when one is off. On a CPU under TRITON_INTERPRET=1 (the tests) in float32
    with small tiles (relative L2 under 1e-5), on a GPU in fp16 with the timed tiles (under 1e-2)."""
    cpu = torch.device(device).type == "cpu"
    torch.manual_seed(0)
    batch, seq, heads, dim = 2, 64 if cpu else 256, 2, 16 if cpu else 64
    qkv = (torch.randn(batch, seq, 3 * heads * dim, device=device) * 2).to(torch.float32 if cpu else torch.float16)
    q, k, v = qkv.double().view(batch, seq, 3, heads, dim).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-1, -2) * dim ** -0.5, -1) @ v
    ref = ref.transpose(1, 2).reshape(batch, seq, -1)
    for tma in (True, False):
        for tile in ((16, 16, 1, 1), (32, 16, 1, 2)) if cpu else TILES[:2]:
            err = _rel_l2(flash(qkv, heads, dim, tile, tma).double(), ref)
            if not err < compare.TOLERANCE["fp32" if cpu else "fp16"]:
                raise SystemExit(f"flash ({'TMA' if tma else 'pointers'}, tile {tile}): relative L2 {err:.1e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    args = parser.parse_args()
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    heads, dim, batch = 6, 64, 1
    rows = []
    big = 1 << 20
    for seq in args.seq:
        torch.manual_seed(seq)
        qkv, positions, mask = inputs.attention_layer(seq, batch, heads, dim)
        q, k, v = qkv.view(batch, seq, 3, heads, dim).permute(2, 0, 3, 1, 4).contiguous()
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, seq, -1)
        sdpa = graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        rows.append([str(seq), "PyTorch SDPA", "", f"{sdpa:.1f}", "1.00", ""])
        ranges = fa.valid_ranges(mask)
        sat = positions.rule.saturation
        ours = {
            "fused layer (near + saturated)": lambda: fa.attention(qkv, mask, heads, dim, positions, 0.07,
                                                                   ranges=ranges),
            "near kernel state only": lambda: near_attention.near_state(
                qkv, mask, ranges, positions, heads, dim, 0, heads, fa._table_rows(seq), sat, 0.1),
            "fused kernel, all tiles far": lambda: fa.attention(qkv, mask, heads, dim, positions, 0.07,
                                                                ranges=ranges, saturation=(-big, big)),
            "fused kernel, no position terms": lambda: fa.attention(qkv, mask, heads, dim, None, 0.07, ranges=ranges),
        }
        tiles = fa.default_tiles(dim, qkv.dtype)
        for name, fn in ours.items():
            t = graph_us(fn)
            rows.append([str(seq), name, _label((tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages)),
                         f"{t:.1f}", f"{t / sdpa:.2f}", ""])
        for tma in (True, False):
            for tile in (TILES if tma else TILES[:4]):
                try:
                    err = _rel_l2(flash(qkv, heads, dim, tile, tma), ref)
                    t = graph_us(lambda: flash(qkv, heads, dim, tile, tma))
                except Exception as exc:  # shared memory or register limits of a tile
                    rows.append([str(seq), f"Triton flash, {'TMA' if tma else 'pointers'}", _label(tile),
                                 f"failed: {type(exc).__name__}", "", ""])
                    continue
                rows.append([str(seq), f"Triton flash, {'TMA' if tma else 'pointers'}",
                             _label(tile), f"{t:.1f}", f"{t / sdpa:.2f}", f"{err:.1e}"])
    print("batch 1, 6 heads of 64, fp16, no padding; 10 launches per CUDA graph replay, median:")
    print(report.table(["seq", "kernel", "tile", "us per call", "/ SDPA", "rel L2 vs SDPA"], rows))


if __name__ == "__main__":
    main()
