"""The feed-forward block's first linear layer with its GELU in the GEMM epilogue (Triton).

DebertaV2's intermediate layer is gelu(h . W1ᵀ + b1) with the exact (erf) GELU. cuBLAS adds the bias in its
epilogue but the activation is a second kernel that reads and writes the whole [tokens, intermediate] tensor once
more: at 32 x 512 tokens of the demo config 100 MB per layer, about 36 µs on an H100, ~9% of a forward
(results/fused-attention-h100/NOTES.md). Here the activation is applied to the float32 accumulator before the one
store. The bias and GELU run in float32 (Hugging Face rounds the linear output to the model's dtype first: within
the dtype's rounding of it).

Only the exact GELU (`transformers.activations.GELUActivation` over `torch.nn.functional.gelu`, what
hidden_act="gelu" builds) is fused: `fusable(act)` says so, and other activations keep cuBLAS + their own module.
Runs compiled on NVIDIA GPUs and under TRITON_INTERPRET=1 on the CPU (tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def fusable(act: nn.Module) -> bool:
    """Whether `act` is the exact GELU this kernel applies (hidden_act="gelu")."""
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu


@triton.jit
def _linear_gelu_kernel(
    X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Y = gelu(X . Wᵀ + B): X [M, K], W [N, K] (nn.Linear's layout), both with unit stride along K."""
    pid = tl.program_id(0)
    # Programs in groups of GROUP_M row blocks that walk the column blocks together: the rows of X they share
    # stay in L2.
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptr = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptr = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # no mask along the contiguous axis: vector loads
            x = tl.load(x_ptr, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptr, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    tl.store(Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class GemmTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_tiles(rows: int, dtype: torch.dtype) -> GemmTiles:
    """Tiles by the number of rows (tokens): small launches want more programs, large ones bigger tiles."""
    if INTERPRET:
        return GemmTiles(16, 16, 16, 1, 1)
    if dtype == torch.float32:
        return GemmTiles(64, 64, 32, 4, 2)
    if rows >= 4096:
        return GemmTiles(128, 128, 64, 8, 4)
    return GemmTiles(64, 128, 64, 4, 4)


def linear_gelu(x: torch.Tensor, linear: nn.Linear, tiles: GemmTiles | None = None) -> torch.Tensor:
    """gelu(linear(x)) (exact GELU) in one kernel; x [..., in_features]."""
    weight, bias = linear.weight, linear.bias
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the linear layer takes {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    t = tiles or default_tiles(m, x.dtype)
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n),)
    _linear_gelu_kernel[grid](
        x2, weight, y if bias is None else bias, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=8, HAS_BIAS=bias is not None,
        EVEN_K=k % t.block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=t.num_warps, num_stages=t.num_stages)
    return y.view(*x.shape[:-1], n)
