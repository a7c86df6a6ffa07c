"""The FFN's up projection with DebertaV2's exact (erf) GELU in the GEMM's epilogue: one Triton kernel instead of a
cuBLAS GEMM and a separate GELU pass over the [tokens, intermediate] activations.

    y = gelu(x . Wᵀ + b)      x [M, K], W [N, K] (nn.Linear's layout), accumulation, bias and GELU in float32,
                              one rounding to x's dtype at the end

Operands travel through TMA tensor descriptors (Hopper's bulk tensor copies; rows and columns past the ends are read
as zeros and not stored), so M, N and K need not be multiples of the tile; row strides must be 16-byte aligned.
`fused_model` uses it where it measured faster than cuBLAS + F.gelu (H200: 1.207 -> 1.177 ms a forward at 2048 tokens
of the demo config, results/fused-attention-h100/NOTES.md, v30) and falls back to cuBLAS + the model's activation
elsewhere: `usable` says which.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import fused_attention as fa


@triton.jit
def _tile_of_program(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """(row block, column block) of this program: GROUP row blocks take their column blocks in turn (L2 reuse)."""
    pid = tl.program_id(0)
    per = GROUP * tl.cdiv(N, BN)
    first = (pid // per) * GROUP
    size = tl.minimum(tl.cdiv(M, BM) - first, GROUP)
    return first + (pid % per) % size, (pid % per) // size


@triton.jit
def gelu(x):
    """DebertaV2's exact GELU, x * Φ(x), in x's (float32) arithmetic."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def bias_gelu(acc, BIAS, cols, N, GELU: tl.constexpr):
    """The epilogue: acc + bias[cols] (columns past N add zero), then the exact GELU when GELU."""
    acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = gelu(acc)
    return acc


@triton.jit
def _linear_kernel(x_d, w_d, BIAS, y_d, M, N, K, GELU: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr):
    pm, pn = _tile_of_program(M, N, BM, BN, GROUP)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        acc = tl.dot(x_d.load([pm * BM, k]), w_d.load([pn * BN, k]).T, acc, input_precision=PRECISION)
    acc = bias_gelu(acc, BIAS, pn * BN + tl.arange(0, BN), N, GELU)
    y_d.store([pm * BM, pn * BN], acc.to(y_d.dtype))


def default_tile(m: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, stages, warps) by token count: the fastest of 20 tiles for the demo config's up projection
    (K 384, N 1536) on an H200 at 512, 2048 and 16384 tokens (scripts/gpu_gemm_check.py)."""
    if m <= 1024:
        return 64, 64, 64, 4, 4
    if m <= 8192:
        return 128, 64, 64, 3, 4
    return 128, 128, 64, 3, 8


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool = True,
           tile: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x . wᵀ + b, with the exact GELU when `gelu`; x [..., K], w [N, K], b [N]; float32 inputs take IEEE products;
    `tile` (BM, BN, BK, stages, warps) defaults to `default_tile`."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.shape[0]
    bm, bn, bk, stages, warps = tile or default_tile(m)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), b,
                         TensorDescriptor.from_tensor(y, [bm, bn]), m, n, k, GELU=gelu,
                         PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BM=bm, BN=bn, BK=bk,
                         STAGES=stages, GROUP=8, num_warps=1 if fa.INTERPRET else warps)
    return y.view(*x.shape[:-1], n)


# Widest input (hidden size) that takes `linear` in the model. Up projection + GELU on an H200 (gemm.linear with
# default_tile / cuBLAS + F.gelu, 512 / 777 / 2048 / 16384 tokens): hidden 384 (demo, v3-xsmall) 0.87 / 0.92 / 0.85 /
# 0.93; hidden 768 (v3-base) 0.88 / 1.31 / 1.05 / 0.98; hidden 1024 (v3-large) 1.30 / 1.60 / 1.12 / 1.02.
MAX_K = 512


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` serves this call: fp16 or bf16 on a GPU with TMA (compute capability 9 or newer) and an input
    width up to MAX_K (where it measured faster than cuBLAS), any dtype and width under the interpreter (tests);
    contiguous operands with 16-byte aligned rows."""
    if not fa.INTERPRET and not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.shape[-1] <= MAX_K
                                 and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return False
    size = x.element_size()
    return (x.is_contiguous() and w.is_contiguous() and (x.shape[-1] * size) % 16 == 0
            and (w.shape[0] * size) % 16 == 0 and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)
