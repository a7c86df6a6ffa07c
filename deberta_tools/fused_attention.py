"""Flash-style fused DeBERTa disentangled attention in Triton.

One layer's attention output

    out[b, i, h] = softmax_j(factor * (Q_i.K_j + Q_i.Kr[idx(i-j)] + K_j.Qr[idx(i-j)]) + mask) . V

is computed per group of heads in two steps and never materialises an S x S tensor:

1. The position terms. On Hopper GPUs the Gluon kernels make them from Kr and Qr (the relative embeddings through
   the layer's key/query projections; weights only, computed once per model by the caller): by default
   `near_attention` does the near tiles' whole softmax step with their terms made in place, and where no tile is
   saturated writes the context itself (no step 2); `window_band.near_band` writes the band instead where that is
   faster (`band_kernel_for`). Elsewhere, and in CI, two Triton launches:
   `position_tables`: C2P = Q.Krᵀ and P2C = K.Qrᵀ, [B, H, rows, 2*span] each (span = position_buckets, 256 for
   v3); P2C carries the key mask (-inf for padded keys); then
   `near_band`: for the key tiles near the diagonal only, c2p + p2c = C2P[i, idx(i-j)] + P2C[j, idx(i-j)] gathered
   into the attention kernel's own (query tile, key tile) layout. The relative index idx(i-j) is Hugging Face's
   make_log_bucket_position arithmetic (float32, IEEE division, libdevice log on the GPU) or the linear rule when
   position_buckets is off, written as a Triton function (`_relative_index`) and evaluated once per distance
   between the saturation bounds (`index_table`, ~1000 entries for v3).
   With `near_attention.near_state` (no band) the attention kernel starts from its softmax state (NEAR_STATE).
   Either way the band comes with `edges`: C2P at the two saturated indices as contiguous vectors per query, what
   far tiles read.
2. `attention`: tiles of Q.Kᵀ with an online softmax (FlashAttention-2 style, scale folded into the exponent).
   Near tiles add one aligned band tile (as the accumulator of Q.Kᵀ); log buckets saturate, and once every i-j of
   a tile is beyond the saturation distance every element reads the same C2P column t per row and the same P2C
   column t per key: Q_i.K_j + C2P[i, t] + K_j.Qr[t] = (Q_i + Qr[t]).K_j + C2P[i, t], so a run of such tiles
   takes Qr[t] into its queries once and C2P[i, t] as an offset of each row's exponent, and each tile is a plain
   flash tile (the key mask only in blocks that can hold a padded key, `valid_ranges`). Gathering inside the
   softmax loop made near tiles 4.5-5x the cost of plain flash tiles on an H100; distance-expanded tables (aligned
   vector reads) cost as much to write as they saved (results/fused-attention-h100/NOTES.md).

Masking follows Hugging Face: a 2-D padding mask m gives key j to query i when m[i] and m[j]; a padded query row
(all keys masked to the dtype's minimum) becomes a uniform average over all S keys, as in the original (the kernel
writes the mean of V there). Key blocks, band tiles and table rows past a sequence's last token are skipped.

The Triton kernels run compiled on NVIDIA GPUs and on the CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from . import near_attention, program_times, window_band

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PositionRule:
    """How query-key distance maps to a column of the 2*span relative-position axis, as Hugging Face computes it."""

    span: int          # att_span: position_buckets if > 0, else max_relative_positions
    buckets: int       # position_buckets (<= 0: linear positions)
    max_position: int  # max_relative_positions (after Hugging Face's fallback to max_position_embeddings)

    @classmethod
    def from_config(cls, config) -> "PositionRule":
        max_position = getattr(config, "max_relative_positions", -1)
        if max_position < 1:
            max_position = config.max_position_embeddings
        buckets = getattr(config, "position_buckets", -1)
        return cls(span=buckets if buckets > 0 else max_position, buckets=buckets, max_position=max_position)

    @property
    def log_buckets(self) -> bool:
        return self.buckets > 0 and self.max_position > 0

    @property
    def log_denominator(self) -> float:
        """Hugging Face's float32 log((max_position - 1) / mid), computed the way it does (on the CPU)."""
        if not self.log_buckets:
            return 1.0
        mid = self.buckets // 2
        return float(torch.log(torch.tensor((self.max_position - 1) / mid)))

    def index(self, rel: torch.Tensor) -> torch.Tensor:
        """Column of the 2*span axis for distances rel = i - j, with Hugging Face's own functions (the reference)."""
        from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
        rel = rel.to(torch.long)
        if self.log_buckets:
            rel = make_log_bucket_position(rel, self.buckets, self.max_position).to(torch.long)
        return torch.clamp(rel + self.span, 0, 2 * self.span - 1)

    @property
    def saturation(self) -> tuple[int, int]:
        """(hi, lo): idx(d) is 2*span-1 for every d >= hi and 0 for every d <= lo (monotone rule, checked)."""
        return _saturation(self)


@lru_cache(maxsize=None)
def _saturation(rule: PositionRule) -> tuple[int, int]:
    reach = 4 * max(rule.span, rule.max_position) + 64
    d = torch.arange(-reach, reach + 1)
    idx = rule.index(d)
    top = 2 * rule.span - 1
    if not (torch.all(idx[1:] >= idx[:-1]) and idx[-1] == top and idx[0] == 0):
        raise ValueError(f"relative index rule {rule} is not monotone and saturating; cannot fuse")
    hi = int(d[torch.nonzero(idx != top).max() + 1])
    lo = int(d[torch.nonzero(idx != 0).min() - 1])
    return hi, lo


@triton.jit
def _relative_index(d, SPAN, MID, LOG_DENOM, LOG_BUCKETS: tl.constexpr, PRECISE_LOG: tl.constexpr):
    """idx(d) = clamp(bucket(d) + SPAN, 0, 2*SPAN - 1) with Hugging Face's float32 make_log_bucket_position."""
    if LOG_BUCKETS:
        ad = tl.abs(d)
        ratio = tl.math.div_rn(tl.maximum(ad, MID).to(tl.float32), MID.to(tl.float32))
        if PRECISE_LOG:
            lg = libdevice.log(ratio)
        else:
            lg = tl.log(ratio)
        far = tl.ceil(tl.math.div_rn(lg, LOG_DENOM) * (MID - 1).to(tl.float32)).to(tl.int32) + MID
        bucket = tl.where(ad <= MID, d, tl.where(d > 0, far, -far))
    else:
        bucket = d
    return tl.minimum(tl.maximum(bucket + SPAN, 0), 2 * SPAN - 1)


@dataclass(eq=False)
class Positions:
    """One layer's relative-position inputs: the rule, the projections `pos` [terms, H, 2*span, D] of the relative
    embeddings (Kr for C2P, Qr for P2C; weights only, computed once per model) and which term is which."""

    rule: PositionRule
    pos: torch.Tensor
    c2p_term: int | None
    p2c_term: int | None


# valid_ranges' row: first, last, holes
RANGE_WIDTH: tl.constexpr = tl.constexpr(3)


@triton.jit
def _valid_ranges_kernel(MASK, stride_mask_b, RANGES, S, SCAN: tl.constexpr):
    """RANGES[b] = (first, last, holes): the first and last valid token of sequence b's mask (S and -1 when it has
    none) and whether a padded token lies between them (1) or not (0)."""
    b = tl.program_id(0)
    first = S + 0
    last = S * 0 - 1
    count = S * 0
    for s0 in range(0, S, SCAN):
        o = s0 + tl.arange(0, SCAN)
        ok = tl.load(MASK + b.to(tl.int64) * stride_mask_b + o, mask=o < S, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(ok, o, S), 0))
        last = tl.maximum(last, tl.max(tl.where(ok, o, -1), 0))
        count += tl.sum(ok.to(tl.int32), 0)
    tl.store(RANGES + RANGE_WIDTH * b, first)
    tl.store(RANGES + RANGE_WIDTH * b + 1, last)
    tl.store(RANGES + RANGE_WIDTH * b + 2, (count > 0) & (count != last - first + 1))


def valid_ranges(mask: torch.Tensor) -> torch.Tensor:
    """[B, RANGE_WIDTH] int32: each sequence's first and last valid token (S and -1 without one) and whether a
    padded token lies between them. One launch per forward: every kernel of every layer reads it to skip rows,
    keys and tiles past the last token, and the near kernel to skip the key mask of blocks with none."""
    batch, seq = mask.shape
    ranges = torch.empty((batch, RANGE_WIDTH), device=mask.device, dtype=torch.int32)
    _valid_ranges_kernel[(batch,)](mask, mask.stride(0), ranges, seq, SCAN=64 if INTERPRET else 1024,
                                   num_warps=1 if INTERPRET else 4)
    return ranges


@triton.jit
def _position_tables_kernel(
    QKV, stride_qkv_b, stride_qkv_s, COL0, COL1,
    POS, stride_pos_t, stride_pos_h, stride_pos_p,
    MASK, stride_mask_b, RANGES,
    TAB, stride_tab_t, EDGES, stride_edge_b, stride_edge_h,
    S, H0, G, ROWS, P, TOP, P2C_TERM,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_P: tl.constexpr, KEY_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Term t (0 or 1) of heads H0 .. H0+G-1 for one block of rows: TAB[t, b, g, r, p] = X_t[b, r, h] . POS[t, h, p]
    (X_t read at column COL_t of QKV: Q for C2P, K for P2C). The P2C term adds 0 for valid and -inf for padded keys
    and rows past S, so the attention kernel needs no key mask in near tiles. The C2P term also writes its columns TOP
    and 0 as contiguous float32 rows, what saturated tiles read: EDGES[b, g, 0 / 1, r] (per query; saturated tiles
    take P2C from the projections themselves). Rows past the last block of KEY_BLOCK keys (at least the
    attention kernel's key block) holding a valid token are never read: skipped."""
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    term = tl.program_id(2)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    h = H0 + g
    last = tl.load(RANGES + RANGE_WIDTH * b + 1)
    live = pid_m * BLOCK_M < (last // KEY_BLOCK + 1) * KEY_BLOCK
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    in_seq = rows < S
    col = tl.where(term == 0, COL0, COL1) + h * HEAD_DIM
    if HEAD_DIM == BLOCK_D:
        x_mask = in_seq[:, None]
        d_ok = dd < BLOCK_D
    else:
        x_mask = in_seq[:, None] & (dd[None, :] < HEAD_DIM)
        d_ok = dd < HEAD_DIM
    x = tl.load(QKV + b * stride_qkv_b + rows[:, None] * stride_qkv_s + col + dd[None, :], mask=x_mask, other=0.0)
    is_p2c = term == P2C_TERM
    padded = tl.load(MASK + b * stride_mask_b + rows, mask=in_seq, other=0) == 0
    bias = tl.where(is_p2c & padded, float("-inf"), 0.0)
    row_base = TAB + term.to(tl.int64) * stride_tab_t + (pid_bg.to(tl.int64) * ROWS + rows) * P
    pos_base = POS + term * stride_pos_t + h * stride_pos_h
    for p0 in range(0, tl.where(live, P, 0), BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        if EVEN_P:
            r = tl.load(pos_base + pp[:, None] * stride_pos_p + dd[None, :], mask=d_ok[None, :], other=0.0)
        else:
            r = tl.load(pos_base + pp[:, None] * stride_pos_p + dd[None, :], mask=(pp[:, None] < P) & d_ok[None, :],
                        other=0.0)
        acc = tl.dot(x, tl.trans(r), input_precision=DOT_PRECISION) + bias[:, None]
        if EVEN_P:
            tl.store(row_base[:, None] + pp[None, :], acc.to(TAB.dtype.element_ty))
        else:
            tl.store(row_base[:, None] + pp[None, :], acc.to(TAB.dtype.element_ty), mask=pp[None, :] < P)
    if live & (not is_p2c):
        xf = x.to(tl.float32)
        top = tl.load(pos_base + TOP * stride_pos_p + dd, mask=d_ok, other=0.0).to(tl.float32)
        zero = tl.load(pos_base + dd, mask=d_ok, other=0.0).to(tl.float32)
        edge = EDGES + b * stride_edge_b + g * stride_edge_h + rows
        tl.store(edge, tl.sum(xf * top[None, :], 1))
        tl.store(edge + ROWS, tl.sum(xf * zero[None, :], 1))


@triton.jit
def _count_to(x, n):
    """How many k >= 0 have k * n <= x."""
    return tl.where(x >= 0, x // n + 1, 0)


@triton.jit
def _first_from(x, n):
    """The first k >= 0 with k * n >= x."""
    return tl.where(x > 0, (x + n - 1) // n, 0)


@triton.jit
def _near_first(i0, SAT_HI, BLOCK_N: tl.constexpr):
    """First key block of row block i0 that is not saturated at the top index (every i - j >= SAT_HI)."""
    return _count_to(i0 - BLOCK_N + 1 - SAT_HI, BLOCK_N)


@triton.jit
def _near_end(i0, SAT_LO, N_BLOCKS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One past the last key block of row block i0 that is not saturated at index 0 (every i - j <= SAT_LO)."""
    return tl.minimum(_first_from(i0 + BLOCK_M - 1 - SAT_LO, BLOCK_N), N_BLOCKS)


@triton.jit
def _key_blocks(i0, any_query, first, last, S, SAT_HI, SAT_LO, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(blk_first, hi_end, lo_start, blk_end): the key blocks query block i0 visits, [blk_first, blk_end) (none when
    it has no valid query), in three runs: saturated at the top index [blk_first, hi_end), near the diagonal
    [hi_end, lo_start), saturated at index 0 [lo_start, blk_end). Shared with near_attention's Gluon kernel, which
    must visit exactly the near run."""
    blk_first = first // BLOCK_N
    blk_end = tl.where(any_query, last // BLOCK_N + 1, blk_first)
    hi_end = tl.minimum(tl.maximum(_near_first(i0, SAT_HI, BLOCK_N), blk_first), blk_end)
    lo_start = tl.minimum(tl.maximum(_near_end(i0, SAT_LO, tl.cdiv(S, BLOCK_N), BLOCK_M, BLOCK_N), hi_end), blk_end)
    return blk_first, hi_end, lo_start, blk_end


@triton.jit
def _unmasked_blocks(first, last, holes, BLOCK_N: tl.constexpr):
    """[full_first, full_end): the key blocks that need no key mask, every key in them a valid token (none where a
    padded token lies between the sequence's first and last valid ones). Shared with near_attention's Gluon kernel:
    both kernels mask exactly the blocks outside this range."""
    full_first = tl.where(holes, 1 << 30, (first + BLOCK_N - 1) // BLOCK_N)
    full_end = (last + 1) // BLOCK_N
    return full_first, full_end


@triton.jit
def _near_band_kernel(
    TAB, stride_tab_t, C2P_TERM, P2C_TERM, ROWS, P,
    LUT, LUT_LO, LUT_N,
    MASK, stride_mask_b, RANGES,
    BAND, stride_band_bg, NB,
    S, G, SAT_HI, SAT_LO,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The position terms of the tiles near the diagonal, in the attention kernel's own (query, key) tiles:
    BAND[b, g, i, slot * BLOCK_N + t] = C2P[i, idx(i - j)] + P2C[j, idx(i - j)] (P2C carries the key mask) for key
    j = (first near block of i's row block + slot) * BLOCK_N + t. The gathers through the index table happen here,
    in parallel and away from the softmax; the attention kernel then reads each near tile with aligned vector
    loads."""
    pid = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    m = pid // NB
    slot = pid % NB
    i0 = m * BLOCK_M
    blk = _near_first(i0, SAT_HI, BLOCK_N) + slot
    # Tiles the attention kernel never reads: past the near blocks, or (padding) rows or keys all outside the
    # sequence's valid tokens.
    first = tl.load(RANGES + RANGE_WIDTH * b)
    last = tl.load(RANGES + RANGE_WIDTH * b + 1)
    used = (i0 <= last) & (i0 + BLOCK_M > first) & (blk * BLOCK_N <= last) & ((blk + 1) * BLOCK_N > first)
    if used & (blk < _near_end(i0, SAT_LO, tl.cdiv(S, BLOCK_N), BLOCK_M, BLOCK_N)):
        i = i0 + tl.arange(0, BLOCK_M)
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        C2P_B = TAB + C2P_TERM * stride_tab_t + pid_bg.to(tl.int64) * ROWS * P
        P2C_B = TAB + P2C_TERM * stride_tab_t + pid_bg.to(tl.int64) * ROWS * P
        val = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_C2P:
            idx = tl.load(LUT + tl.minimum(tl.maximum(i[:, None] - j[None, :] - LUT_LO, 0), LUT_N - 1))
            val += tl.load(C2P_B + i[:, None] * P + idx).to(tl.float32)
        if HAS_P2C:
            # Key-major gather, then transposed: each key's reads lie in one table row (coalesced).
            idx_t = tl.load(LUT + tl.minimum(tl.maximum(i[None, :] - j[:, None] - LUT_LO, 0), LUT_N - 1))
            val += tl.trans(tl.load(P2C_B + j[:, None] * P + idx_t)).to(tl.float32)
        else:
            key_ok = tl.load(MASK + b * stride_mask_b + j, mask=j < S, other=0) != 0
            val += tl.where(key_ok, 0.0, float("-inf"))[None, :]
        out = BAND + pid_bg.to(tl.int64) * stride_band_bg + i[:, None] * (NB * BLOCK_N) + slot * BLOCK_N
        tl.store(out + tl.arange(0, BLOCK_N)[None, :], val.to(BAND.dtype.element_ty))


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, j0, row_vec, BAND_ROW,
    QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S, qk_scale,
    NEAR: tl.constexpr, MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax. NEAR: the tile of the near band whose rows start at BAND_ROW goes in as
    the accumulator of Q.Kᵀ (row_vec unused). Saturated (not NEAR): q carries the run's P2C row (see `_attend_run`)
    and row_vec, the run's C2P column times qk_scale, is a per-row offset of the exponent. MASKED adds the key mask
    (and keeps keys past S out); a block without it must lie inside the sequence's valid tokens."""
    j = j0 + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    col_ok = j < S
    # A mask along the contiguous head axis stops Triton from vectorising the loads: only mask it when needed.
    if HEAD_DIM == BLOCK_D:
        kv_mask = col_ok[:, None]
    else:
        kv_mask = col_ok[:, None] & (dd[None, :] < HEAD_DIM)
    if MASKED or NEAR or HEAD_DIM != BLOCK_D:
        k = tl.load(QKV_B + j[:, None] * stride_qkv_s + K_COL + dd[None, :], mask=kv_mask, other=0.0)
    else:
        k = tl.load(QKV_B + j[:, None] * stride_qkv_s + K_COL + dd[None, :])
    if NEAR:
        # The band tile goes in as the accumulator of Q.Kᵀ: added after it, Triton's layout pass ran the softmax
        # twice, once in the load layout and once in the MMA layout (seen in the TTGIR).
        bias = tl.load(BAND_ROW[:, None] + tl.arange(0, BLOCK_N)[None, :]).to(tl.float32)
        s = tl.dot(q, tl.trans(k), bias, input_precision=DOT_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            s += tl.where(tl.load(MASK_B + j, mask=col_ok, other=0) != 0, 0.0, float("-inf"))[None, :]
    # Online softmax in base 2 with the scale folded into the exponent's FMA (FlashAttention-2); a saturated run's
    # row vector goes in with the running maximum, not into every score.
    if NEAR:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale + row_vec)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - (m_safe - row_vec)[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED or NEAR or HEAD_DIM != BLOCK_D:
        v = tl.load(QKV_B + j[:, None] * stride_qkv_s + V_COL + dd[None, :], mask=kv_mask, other=0.0)
    else:
        v = tl.load(QKV_B + j[:, None] * stride_qkv_s + V_COL + dd[None, :])
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_tma(acc, m_i, l_i, q, KV_DESC, row, K_COL, V_COL, row_vec, qk_scale, DOT_PRECISION: tl.constexpr):
    """`_attend_block` for a saturated block of valid keys (no mask, every score finite) whose K and V come through
    a tensor descriptor: one [BLOCK_N, D] box each, no pointer tensors."""
    s = tl.dot(q, tl.trans(KV_DESC.load([row, K_COL])), input_precision=DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale + row_vec)
    p = tl.math.exp2(s * qk_scale - (m_new - row_vec)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = KV_DESC.load([row, V_COL])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_run(
    acc, m_i, l_i, Q_PTRS, SCRATCH, io_mask, start, end, full_first, full_end, row_vec, P2C_ROW, d_ok,
    QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S, qk_scale, KV_DESC, ROW0,
    HAS_P2C: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED_STAGES: tl.constexpr, TMA: tl.constexpr,
):
    """Saturated key blocks [start, end), all at one relative index t: every score of the run is
    Q_i.K_j + C2P[i, t] + P2C[j, t] = (Q_i + Qr[t]).K_j + C2P[i, t], so the query takes Qr[t] (P2C_ROW) once here and
    C2P[i, t] (row_vec) is a per-row offset: a plain flash tile. Only blocks outside [full_first, full_end) apply the
    key mask: those holding the first or last valid token, and all of them where a padded token lies between (then
    the run is as slow as before: one loop, not pipelined). Each kind has a loop of its own (a branch per block
    stopped Triton from pipelining the loads, v7)."""
    if start < end:  # an empty run must not pay for the query's round trip
        q = tl.load(Q_PTRS, mask=io_mask, other=0.0)
        if HAS_P2C:
            q = (q.to(tl.float32) + tl.load(P2C_ROW, mask=d_ok, other=0.0).to(tl.float32)[None, :]).to(q.dtype)
            # Through memory (the program's own output rows, written at the end): Triton keeps a dot operand computed
            # in registers as a register operand (+36 registers a thread compiled for sm_90); loaded, it is a
            # shared-memory operand as before.
            tl.debug_barrier()  # every thread is done with the previous run's query
            tl.store(SCRATCH, q, mask=io_mask)
            tl.debug_barrier()
            q = tl.load(SCRATCH, mask=io_mask, other=0.0)
        row_vec = row_vec * qk_scale
        a = tl.minimum(tl.maximum(full_first, start), end)
        e = tl.minimum(tl.maximum(full_end, a), end)
        # The masked loops in MASKED_STAGES stages (see MASKED_LOOP_STAGES): unpipelined where the kernel starts
        # from near states, since pipelined they took it to 189 registers a thread compiled for sm_90, 2 programs
        # a multiprocessor instead of 3 (a first version at 204 took 2.50 ms a forward at 4096 tokens on an H100,
        # against 2.32 before, NOTES.md v28); unpipelined 148.
        for blk in tl.range(start, a, num_stages=MASKED_STAGES):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, blk * BLOCK_N, row_vec, QKV_B, QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S,
                qk_scale, False, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION)
        if TMA:  # K and V through the tensor descriptor KV_DESC (rows of qkv as [B * S, 3 * H * D])
            for blk in range(a, e):
                acc, m_i, l_i = _attend_tma(acc, m_i, l_i, q, KV_DESC, ROW0 + blk * BLOCK_N, K_COL, V_COL, row_vec,
                                            qk_scale, DOT_PRECISION)
        else:
            for blk in range(a, e):
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, blk * BLOCK_N, row_vec, QKV_B, QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S,
                    qk_scale, False, False, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION)
        for blk in tl.range(e, end, num_stages=MASKED_STAGES):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, blk * BLOCK_N, row_vec, QKV_B, QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S,
                qk_scale, False, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _merge_near_states(acc, m_i, l_i, ACC, ML, pid_bg, SPLITS, ROWS, i, dd, BLOCK_D: tl.constexpr):
    """The near kernel's SPLITS softmax states of rows i merged into (acc, m_i, l_i) (in either order: merging is
    commutative)."""
    for part in range(SPLITS):
        state = (pid_bg.to(tl.int64) * SPLITS + part) * ROWS
        m_k = tl.load(ML + 2 * state + i)
        m_new = tl.maximum(m_i, m_k)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(m_k - m_safe)
        l_i = l_i * alpha + tl.load(ML + 2 * state + ROWS + i) * beta
        acc = acc * alpha[:, None] + tl.load(ACC + (state + i)[:, None] * BLOCK_D + dd[None, :]) * beta[:, None]
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_kernel(
    QKV, stride_qkv_b, stride_qkv_s,
    EDGES, stride_edge_b, stride_edge_h, ROWS, P2C_POS, stride_pos_h, stride_pos_p, TOP,
    BAND, stride_band_bg, NB, ACC, ML, SPLITS,
    MASK, stride_mask_b, RANGES,
    OUT, stride_out_b, stride_out_s,
    S, H, H0, G, SAT_HI, SAT_LO, qk_scale, TIMES, KV_DESC, C2P_POS, stride_c2p_h, stride_c2p_p,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, NEAR_STATE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASKED_STAGES: tl.constexpr, RECORD: tl.constexpr, TMA: tl.constexpr,
    OVERLAP: tl.constexpr,
):
    """Out rows of one query block: the saturated key blocks here (C2P from EDGES, P2C from P2C_POS's rows TOP and 0,
    `_attend_run`), the near ones from BAND's tiles, or (NEAR_STATE) starting from the softmax states over the near
    blocks in ACC / ML, SPLITS of them (`near_attention`). Grid (query blocks, B * G), with NEAR_STATE (B * G, query
    blocks). RECORD: each program's times into TIMES (`program_times`). OVERLAP (with NEAR_STATE, launched as a
    programmatic dependent of the near kernel): the saturated runs before the near kernel has finished, with their C2P
    vectors from C2P_POS here instead of EDGES, then `griddepcontrol.wait` and the near states (see
    OVERLAP_NEAR_TAIL)."""
    if RECORD:
        started = program_times.now()
        waited = tl.zeros([], tl.int64)
    if NEAR_STATE:
        # Grid (B * G, query blocks), heads fastest and the query blocks from both ends inwards: the blocks with the
        # most saturated tiles start first, the short ones fill in behind them (2048 tokens on an H100: 1.33 -> 1.30
        # ms a forward with the near kernel's order, results/fused-attention-h100/NOTES.md, v23).
        pid_bg = tl.program_id(0)
        p = tl.program_id(1)
        pid_m = tl.where(p % 2 == 0, p // 2, tl.num_programs(1) - 1 - p // 2)
    else:  # grid (query blocks, B * G)
        pid_m = tl.program_id(0)
        pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    h = H0 + g
    i0 = pid_m * BLOCK_M
    i = i0 + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = i < S
    QKV_B = QKV + b * stride_qkv_b
    if HEAD_DIM == BLOCK_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & (dd[None, :] < HEAD_DIM)
    Q_PTRS = QKV_B + i[:, None] * stride_qkv_s + h * HEAD_DIM + dd[None, :]
    if NEAR_STATE:  # no near block here; the saturated runs load their own queries
        q = tl.zeros([BLOCK_M, BLOCK_D], QKV.dtype.element_ty)
    else:  # first thing: loaded after the saturated runs, 512 tokens (window band) took ~8 us longer a forward
        q = tl.load(Q_PTRS, mask=io_mask, other=0.0)
    K_COL = H * HEAD_DIM + h * HEAD_DIM
    V_COL = 2 * H * HEAD_DIM + h * HEAD_DIM
    MASK_B = MASK + b * stride_mask_b
    qvalid = tl.load(MASK_B + i, mask=row_ok, other=0) != 0

    # Keys before the first and after the last valid one never get a weight: skip their blocks.
    first = tl.load(RANGES + RANGE_WIDTH * b)
    last = tl.load(RANGES + RANGE_WIDTH * b + 1)
    holes = tl.load(RANGES + RANGE_WIDTH * b + 2) != 0
    full_first, full_end = _unmasked_blocks(first, last, holes, BLOCK_N)
    # Key blocks in order: saturated at the top index (every i - j >= SAT_HI), near the diagonal, saturated at
    # index 0 (every i - j <= SAT_LO).
    blk_first, hi_end, lo_start, blk_end = _key_blocks(i0, tl.max(qvalid.to(tl.int32), 0) > 0, first, last, S,
                                                       SAT_HI, SAT_LO, BLOCK_M, BLOCK_N)
    near_first = _near_first(i0, SAT_HI, BLOCK_N)
    # This row block's slab of the near band: key block near_first + k at columns k * BLOCK_N.
    BAND_ROW = BAND + pid_bg.to(tl.int64) * stride_band_bg + i * (NB * BLOCK_N) - near_first * BLOCK_N

    # C2P at the top index and at index 0 (per query)
    EDGE_B = EDGES + b * stride_edge_b + g * stride_edge_h
    c2p_top = tl.zeros([BLOCK_M], tl.float32)
    c2p_zero = tl.zeros([BLOCK_M], tl.float32)
    d_ok = dd < HEAD_DIM
    if HAS_C2P:
        if OVERLAP:  # the near kernel writes no EDGES then: position_tables' arithmetic here
            qf = tl.load(Q_PTRS, mask=io_mask, other=0.0).to(tl.float32)
            C2P_H = C2P_POS + h * stride_c2p_h + dd
            c2p_top = tl.sum(qf * tl.load(C2P_H + TOP * stride_c2p_p, mask=d_ok, other=0.0).to(tl.float32)[None, :], 1)
            c2p_zero = tl.sum(qf * tl.load(C2P_H, mask=d_ok, other=0.0).to(tl.float32)[None, :], 1)
        else:
            c2p_top = tl.load(EDGE_B + i)
            c2p_zero = tl.load(EDGE_B + ROWS + i)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if NEAR_STATE and not OVERLAP:
        # The near states first: merged after the runs, ptxas serialises the runs' tensor-core products (its C7515
        # advisory, sm_90), as it did in the kernels without near states before v32
        acc, m_i, l_i = _merge_near_states(acc, m_i, l_i, ACC, ML, pid_bg, SPLITS, ROWS, i, dd, BLOCK_D)
    # The saturated runs, at the top index and at index 0
    P2C_H = P2C_POS + h * stride_pos_h + dd
    OUT_PTRS = OUT + b * stride_out_b + i[:, None] * stride_out_s + h * HEAD_DIM + dd[None, :]
    acc, m_i, l_i = _attend_run(
        acc, m_i, l_i, Q_PTRS, OUT_PTRS, io_mask, blk_first, hi_end, full_first, full_end, c2p_top,
        P2C_H + TOP * stride_pos_p, d_ok, QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S, qk_scale,
        KV_DESC, pid_bg // G * S,
        HAS_P2C, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION, MASKED_STAGES, TMA)
    acc, m_i, l_i = _attend_run(
        acc, m_i, l_i, Q_PTRS, OUT_PTRS, io_mask, lo_start, blk_end, full_first, full_end, c2p_zero,
        P2C_H, d_ok, QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S, qk_scale,
        KV_DESC, pid_bg // G * S,
        HAS_P2C, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION, MASKED_STAGES, TMA)
    if NEAR_STATE and OVERLAP:
        if RECORD:
            waited = program_times.timer()
        gdc_wait()  # the near kernel has finished and its states are visible
        acc, m_i, l_i = _merge_near_states(acc, m_i, l_i, ACC, ML, pid_bg, SPLITS, ROWS, i, dd, BLOCK_D)
    if not NEAR_STATE:  # the near key blocks from the band
        for blk in range(hi_end, lo_start):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, blk * BLOCK_N, m_i, BAND_ROW + blk * BLOCK_N,  # (row_vec: unused in near tiles)
                QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, S, qk_scale,
                True, False, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if tl.min(tl.where(row_ok, qvalid, True).to(tl.int32), 0) == 0:
        # Hugging Face gives a padded query row the same score for every key: the mean of all S value rows.
        v_sum = tl.zeros([BLOCK_D], tl.float32)
        for n in range(0, tl.cdiv(S, BLOCK_N)):
            jj = n * BLOCK_N + tl.arange(0, BLOCK_N)
            v = tl.load(QKV_B + jj[:, None] * stride_qkv_s + V_COL + dd[None, :], mask=(jj < S)[:, None], other=0.0)
            v_sum += tl.sum(v.to(tl.float32), 0)
        out = tl.where(qvalid[:, None], out, (v_sum / S)[None, :])
    tl.store(OUT + b * stride_out_b + i[:, None] * stride_out_s + h * HEAD_DIM + dd[None, :],
             out.to(OUT.dtype.element_ty), mask=io_mask)
    if RECORD:
        program_times.record(TIMES, started, pid_m, pid_bg, waited)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_tiles(head_dim: int, dtype: torch.dtype) -> Tiles:
    """Tile sizes from H100 sweeps (results/fused-attention-h100/NOTES.md): 64 x 64 with 3 stages was best or within
    noise of the best at 512, 2048 and 8192 tokens, batch 1 and 32."""
    if INTERPRET:
        return Tiles(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return Tiles(32, 32, 4, 1)
    return Tiles(64, 64, 4, 3)


# Pipeline stages of the attention kernel's masked key-block loops on Hopper where it does not start from the near
# kernel's states (window or Triton band, no position terms). Unpipelined (1), ptxas serialises every tensor-core
# product (wgmma) in those kernels, the hot unmasked loop's included (its C7515 advisory, "non wgmma instructions
# defining accumulator registers"; demo config, sm_90: 178 registers); with 2 it does not (185 registers, the same
# 2 programs a multiprocessor). On an H100 (`scripts/gpu_fused_check.py --masked-stages`, NOTES.md v32) 2 took one
# layer at 1 x 512 from 19.0 to 18.2 us (window band) and at 2048 with no position terms from 31.0 to 28.1 us, a
# forward at 1 x 512 from 0.563 to 0.556 ms. Kernels that start from near states always take 1: no advisory there,
# and 2 would take them from 148 to 190 registers (3 programs a multiprocessor to 2); so do GPUs without wgmma.
MASKED_LOOP_STAGES = 2


def _masked_stages(near_state_first: bool, device: torch.device) -> int:
    """MASKED_STAGES of a launch: MASKED_LOOP_STAGES on Hopper unless the kernel starts from near states (without
    them, or with them merged last: OVERLAP_NEAR_TAIL), and on the CPU (the interpreter ignores it and
    scripts/inspect_kernels.py compiles for sm_90); else 1."""
    if near_state_first or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] != 9):
        return 1
    return MASKED_LOOP_STAGES


# Whether the attention kernel's unmasked saturated key blocks read K and V through a tensor descriptor (TMA on
# Hopper) instead of pointer loads; off: no gain on an H100 (NOTES.md, v35).
SATURATED_TMA = False


def _kv_descriptor(qkv: torch.Tensor, head_dim: int, block_n: int) -> TensorDescriptor | None:
    """A descriptor of qkv as [B * S, 3 * H * D] with [block_n, head_dim] boxes for `_attend_tma`, or None: without
    SATURATED_TMA, off Hopper (the interpreter takes it), for a head size not a power of two, or for a qkv whose rows
    are not one contiguous run (a descriptor needs 16-byte aligned strides)."""
    batch, seq, width = qkv.shape
    if not SATURATED_TMA or head_dim != triton.next_power_of_2(head_dim):
        return None
    if not (INTERPRET or _sm90_or_newer(qkv.device)):
        return None
    if qkv.stride(0) != seq * width or (width * qkv.element_size()) % 16 or qkv.data_ptr() % 16:
        return None
    return TensorDescriptor.from_tensor(qkv.view(batch * seq, width), [block_n, head_dim])


# Whether the attention kernel after the near kernel starts while the near kernel's last programs still run
# (programmatic dependent launch: the near kernel lets it launch once all its programs have started; its programs
# run their saturated tiles, then wait for the near states). At 1 x 2048 on an H100 the near kernel's SMs start
# running out of programs at 26 of its 34 us (v34), and the kernel after it (21 us) needs none of its results until
# its last step: one layer 55.5-56.1 -> 50.4-50.6 us, a forward 1.168 -> 1.106 ms (NOTES.md, v36). Only for grids of
# at most 2 programs a multiprocessor: with the near states merged last, ptxas serialises the runs' tensor-core
# products unless the masked loops are pipelined (MASKED_LOOP_STAGES), and those take the kernel from 148 to 189
# registers (3 programs a multiprocessor to 2; compiled for sm_90, demo config).
OVERLAP_NEAR_TAIL = True


def _overlaps(device: torch.device, programs: int) -> bool:
    """OVERLAP_NEAR_TAIL where it can run and pays: compiled on a GPU with programmatic dependent launch (9.0 and
    up), for an attention kernel grid of `programs` that fits in 2 a multiprocessor."""
    return (OVERLAP_NEAR_TAIL and not INTERPRET and _sm90_or_newer(device)
            and programs <= 2 * near_attention._multiprocessors(device))


def _sm90_or_newer(device: torch.device) -> bool:
    """Compute capability 9.0 and up: the tensor memory accelerator (TMA descriptors) and programmatic dependent
    launch (griddepcontrol), both of which the attention kernel can use."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _table_rows(seq_len: int) -> int:
    unit = 16 if INTERPRET else 128
    return triton.cdiv(seq_len, unit) * unit


# Position tables and near band per launch stay under this many bytes: long sequences take their heads in groups.
# At 8192 tokens the demo config runs its 6 heads in two launches of 3: 8.7 ms a forward on an H100 at a 0.43 GiB
# peak, against 9.5 ms in three launches of 2 (96 MiB) and 8.4 ms / 0.48 GiB in one (results/fused-attention-h100).
TABLE_BUDGET = 128 << 20


def heads_per_launch(positions: Positions | None, batch: int, seq_len: int, heads: int, itemsize: int,
                     tiles: Tiles, budget: int | None = None, tables: bool = True, band: bool = True) -> int:
    """How many heads one launch takes so that what it keeps in memory per head, its tables (the Triton band) and
    its near band (not with the near attention, whose softmax state is [rows, D] float32), stays under the budget,
    in launches of equal size (6 heads under a budget of 5 run as 3 + 3, not 5 + 1 with a near-empty second
    launch)."""
    budget = budget or TABLE_BUDGET
    if positions is None or not (tables or band):
        return heads
    terms, _, width, _ = positions.pos.shape
    band_width = near_slots(positions.rule.saturation, seq_len, tiles.block_m, tiles.block_n) * tiles.block_n
    per_head = batch * _table_rows(seq_len) * (width * terms * tables + band_width * band) * itemsize
    most = max(1, min(heads, budget // per_head))
    return triton.cdiv(heads, triton.cdiv(heads, most))


@lru_cache(maxsize=None)
def near_slots(saturation: tuple[int, int], seq_len: int, block_m: int, block_n: int) -> int:
    """The most key blocks any row block has near the diagonal (neither saturated at the top index nor at 0): the
    near band's width in key blocks. The same arithmetic as the kernels' _near_first / _near_end."""
    most = 0
    for i0 in range(0, seq_len, block_m):
        first, end = _near_range(saturation, seq_len, i0, block_m, block_n)
        most = max(most, end - first)
    return max(most, 1)


def _near_range(saturation: tuple[int, int], seq_len: int, i0: int, block_m: int, block_n: int) -> tuple[int, int]:
    """[first, end): the near key blocks of row block i0, as the kernels' _near_first / _near_end compute them."""
    hi, lo = saturation
    x = i0 - block_n + 1 - hi
    first = x // block_n + 1 if x >= 0 else 0
    y = i0 + block_m - 1 - lo
    end = min((y + block_n - 1) // block_n if y > 0 else 0, triton.cdiv(seq_len, block_n))
    return first, end


@lru_cache(maxsize=None)
def all_near(saturation: tuple[int, int], seq_len: int, block_m: int, block_n: int) -> bool:
    """Whether every key block of every row block is near the diagonal (no saturated tile anywhere)."""
    return all(_near_range(saturation, seq_len, i0, block_m, block_n) == (0, triton.cdiv(seq_len, block_n))
               for i0 in range(0, seq_len, block_m))


def near_band(tables: torch.Tensor, mask: torch.Tensor, ranges: torch.Tensor, positions: Positions, tiles: Tiles,
              group: int, saturation: tuple[int, int] | None = None) -> torch.Tensor:
    """The near-diagonal position terms [B * group, rows, slots * block_n] in the attention kernel's tiles (see
    `_near_band_kernel`), from `position_tables`' tables; ranges from `valid_ranges(mask)`."""
    _, batch, _, rows, width = tables.shape
    seq = mask.shape[1]
    sat = saturation or positions.rule.saturation
    slots = near_slots(sat, seq, tiles.block_m, tiles.block_n)
    band = torch.empty((batch * group, rows, slots * tiles.block_n), device=tables.device, dtype=tables.dtype)
    lut, lut_lo = index_table(positions.rule, tables.device)
    grid = (triton.cdiv(seq, tiles.block_m) * slots, batch * group)
    _near_band_kernel[grid](
        tables, tables.stride(0), positions.c2p_term or 0, positions.p2c_term or 0, rows, width,
        lut, lut_lo, lut.numel(),
        mask, mask.stride(0), ranges,
        band, band.stride(0), slots,
        seq, group, sat[0], sat[1],
        HAS_C2P=positions.c2p_term is not None, HAS_P2C=positions.p2c_term is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=1 if INTERPRET else 4)
    return band


def position_tables(qkv: torch.Tensor, mask: torch.Tensor, ranges: torch.Tensor, heads: int, head_dim: int,
                    positions: Positions, h0: int = 0, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tables, edges) of heads h0 .. h0+group-1: tables [terms, B, group, rows, 2*span] (C2P = Q.Krᵀ,
    P2C = K.Qrᵀ + key mask, in the order of positions.pos; rows = S rounded up to whole tiles), edges
    [B, group, 2, rows] float32 (C2P at the top index and at index 0; not written without a C2P term); ranges from
    `valid_ranges(mask)`."""
    batch, seq, _ = qkv.shape
    group = group or heads
    pos = positions.pos
    terms, _, width, _ = pos.shape
    rows = _table_rows(seq)
    edges = torch.empty((batch, group, 2, rows), device=qkv.device, dtype=torch.float32)
    tab = torch.empty((terms, batch, group, rows, width), device=qkv.device, dtype=qkv.dtype)
    columns = [0] * terms
    if positions.p2c_term is not None:
        columns[positions.p2c_term] = heads * head_dim
    block = 16 if INTERPRET else 64
    grid = (rows // block, batch * group, terms)
    _position_tables_kernel[grid](
        qkv, qkv.stride(0), qkv.stride(1), columns[0], columns[-1],
        pos, pos.stride(0), pos.stride(1), pos.stride(2),
        mask, mask.stride(0), ranges,
        tab, tab.stride(0), edges, edges.stride(0), edges.stride(1),
        seq, h0, group, rows, width, width - 1,
        positions.p2c_term if positions.p2c_term is not None else -1,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block, BLOCK_P=block,
        EVEN_P=width % block == 0, KEY_BLOCK=128, DOT_PRECISION=_dot_precision(qkv.dtype),
        num_warps=1 if INTERPRET else 4)
    return tab, edges


@lru_cache(maxsize=None)
def index_table(rule: PositionRule, device: torch.device) -> tuple[torch.Tensor, int]:
    """(LUT, lo): LUT[d - lo] = idx(d) for every distance between the saturation bounds, computed once per rule and
    device by the Triton index function (`kernel_index`), so the attention kernel reads one small table instead
    of evaluating log, two IEEE divisions and a ceil for every (i, j)."""
    hi, lo = rule.saturation
    return kernel_index(rule, torch.arange(lo, hi + 1, device=device)), lo


# Which kernel does the near tiles' position terms when a call does not say: "auto", "window", "near" or "triton"
# (see band_kernel_for).
BAND_KERNEL = "auto"


def band_kernel_for(qkv: torch.Tensor, heads: int, head_dim: int, tiles: Tiles, saturation: tuple[int, int] | None,
                    choice: str | None = None) -> str:
    """How the tiles near the diagonal get their position terms. On Hopper GPUs (Gluon kernels): "near"
    (near_attention: the near tiles' whole softmax step with their terms made in place; it writes the context itself
    where every tile is near, else its softmax state for the Triton kernel's saturated tiles), except where every
    tile is near and the query blocks are too few for the near kernel to finish alone (`near_attention.finishes`):
    there "window" (window_band: the band from window products, then the Triton kernel over many more programs) is
    faster, 0.590 against 0.611 ms at 1 x 512 on an H100 (results/fused-attention-h100/NOTES.md, v12). Elsewhere
    "triton" (position tables, then `near_band`). `choice` (default BAND_KERNEL) forces one; a Gluon kernel where it
    cannot run is an error. `saturation` is the rule's (hi, lo) bounds, None without position terms."""
    choice = choice or BAND_KERNEL
    if choice not in ("auto", "window", "near", "triton"):
        raise ValueError(f"band kernel must be auto, window, near or triton, got {choice!r}")
    if choice == "triton":
        return choice
    can = window_band.supported(qkv, head_dim, tiles.block_m, tiles.block_n)
    if choice != "auto" and not can:
        raise ValueError(f"the {choice} kernel needs a compute capability 9.x GPU, fp16 or bf16, 64 x 64 tiles and "
                         f"a head dimension in {window_band.HEAD_DIMS}")
    if not can:
        return "triton"
    if choice != "auto":
        return choice
    batch, seq, _ = qkv.shape
    if (saturation is not None and all_near(saturation, seq, tiles.block_m, tiles.block_n)
            and not near_attention.finishes(qkv.device, batch, seq, heads, saturation)):
        return "window"
    return "near"


def attention(qkv: torch.Tensor, mask: torch.Tensor, heads: int, head_dim: int, positions: Positions | None,
              factor: float, out: torch.Tensor | None = None, tiles: Tiles | None = None,
              saturation: tuple[int, int] | None = None, table_budget: int | None = None,
              ranges: torch.Tensor | None = None, band_kernel: str | None = None) -> torch.Tensor:
    """Context [B, S, H*D] of one DeBERTa attention layer: position terms, then attention, per group of heads.

    qkv: [B, S, 3*H*D]; mask: [B, S] int32 (non-zero = token); positions: None without relative attention;
    factor: 1/sqrt(D * scale_factor); ranges: `valid_ranges(mask)`, computed here when not given (a model passes
    one per forward to every layer); band_kernel: see `band_kernel_for`. `saturation` overrides the rule's
    (hi, lo) bounds for the choice of tile kind: for timing experiments only, results are then wrong."""
    batch, seq, width = qkv.shape
    if width != 3 * heads * head_dim or qkv.stride(2) != 1:
        raise ValueError(f"qkv must be [B, S, 3*{heads}*{head_dim}] with unit column stride, got {tuple(qkv.shape)}")
    if mask.shape != (batch, seq) or mask.stride(1) != 1:
        raise ValueError(f"mask must be a contiguous [B, S] = {(batch, seq)}, got {tuple(mask.shape)}")
    if out is None:
        out = torch.empty((batch, seq, heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    if ranges is None:
        ranges = valid_ranges(mask)
    tiles = tiles or default_tiles(head_dim, qkv.dtype)
    sat = None if positions is None else saturation or positions.rule.saturation
    kind = band_kernel_for(qkv, heads, head_dim, tiles, sat, band_kernel)
    if kind == "near" and positions is not None and near_attention.finishes(qkv.device, batch, seq, heads, sat):
        # no saturated tiles: the near kernel writes the context itself
        return near_attention.near_output(qkv, mask, ranges, positions, heads, head_dim, sat, factor * _LOG2E, out)
    group = heads_per_launch(positions, batch, seq, heads, qkv.element_size(), tiles, table_budget,
                             tables=kind == "triton", band=kind != "near")
    for h0 in range(0, heads, group):
        g = min(group, heads - h0)
        band, slots, state = qkv, 1, (qkv, qkv, 1)  # placeholders for what this launch does not read
        near_state = positions is not None and kind == "near"
        # Recording (program_times): this kernel's zeroed buffer made before the near kernel, whose dependent it may
        # be: a zeroing launch between the two stops the overlap (one sat there in every recording before v41b).
        programs = triton.cdiv(seq, tiles.block_m) * batch * g
        times = program_times.buffer("attention", programs, qkv.device)
        overlap = near_state and _overlaps(qkv.device, programs)
        if positions is None:  # every key block "saturated": only the key mask is added
            # edges are never read without position terms: a placeholder, with no kernel to fill it
            edges = torch.empty((1, 1, 2, 1), device=qkv.device, dtype=torch.float32)
            c2p, p2c, rows, sat_hi, sat_lo = None, None, 0, -(1 << 30), 1 << 30
        else:
            rows = _table_rows(seq)
            if kind == "near":  # the near tiles' softmax state and the edge vectors in one launch
                acc, ml, edges = near_attention.near_state(qkv, mask, ranges, positions, heads, head_dim, h0, g, rows,
                                                           sat, factor * _LOG2E, dependents=overlap)
                state = (acc, ml, acc.shape[1])
            elif kind == "window":  # band and edge vectors in one launch, no tables
                slots = near_slots(sat, seq, tiles.block_m, tiles.block_n)
                band, edges = window_band.near_band(qkv, mask, ranges, positions, heads, head_dim, h0, g, rows,
                                                    slots, sat)
            else:
                tab, edges = position_tables(qkv, mask, ranges, heads, head_dim, positions, h0, g)
                band = near_band(tab, mask, ranges, positions, tiles, g, sat)
                slots = band.shape[2] // tiles.block_n
            c2p, p2c = positions.c2p_term, positions.p2c_term
            sat_hi, sat_lo = sat
        # the P2C rows of the saturated runs (top index and 0): the kernel adds them to the queries
        p2c_pos = qkv if p2c is None else positions.pos[p2c]  # qkv: a placeholder, never read
        c2p_pos = qkv if c2p is None else positions.pos[c2p]  # read with OVERLAP only
        grid = (triton.cdiv(seq, tiles.block_m), batch * g)
        kv_desc = _kv_descriptor(qkv, head_dim, tiles.block_n)
        _attention_kernel[grid[::-1] if near_state else grid](
            qkv, qkv.stride(0), qkv.stride(1),
            edges, edges.stride(0), edges.stride(1), rows,
            p2c_pos, p2c_pos.stride(0), p2c_pos.stride(1), 0 if positions is None else positions.pos.shape[2] - 1,
            band, band.stride(0), slots, *state,
            mask, mask.stride(0), ranges,
            out, out.stride(0), out.stride(1),
            seq, heads, h0, g, sat_hi, sat_lo, factor * _LOG2E, qkv if times is None else times,
            qkv if kv_desc is None else kv_desc, c2p_pos, c2p_pos.stride(0), c2p_pos.stride(1),
            HAS_C2P=c2p is not None, HAS_P2C=p2c is not None, NEAR_STATE=near_state,
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, DOT_PRECISION=_dot_precision(qkv.dtype),
            MASKED_STAGES=_masked_stages(near_state and not overlap, qkv.device), RECORD=times is not None,
            TMA=kv_desc is not None, OVERLAP=overlap, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            launch_pdl=overlap)
    return out


@triton.jit
def _index_probe_kernel(D, OUT, N, SPAN, MID, LOG_DENOM, LOG_BUCKETS: tl.constexpr, PRECISE_LOG: tl.constexpr,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(D + offs, mask=offs < N, other=0)
    tl.store(OUT + offs, _relative_index(d, SPAN, MID, LOG_DENOM, LOG_BUCKETS, PRECISE_LOG), mask=offs < N)


def kernel_index(rule: PositionRule, rel: torch.Tensor) -> torch.Tensor:
    """The attention kernel's own idx(d) for int32 distances `rel` (1-D), for checking it against `rule.index`."""
    rel = rel.to(torch.int32).contiguous()
    out = torch.empty_like(rel)
    block = 1024
    _index_probe_kernel[(triton.cdiv(rel.numel(), block),)](
        rel, out, rel.numel(), rule.span, max(rule.buckets // 2, 1), rule.log_denominator,
        LOG_BUCKETS=rule.log_buckets, PRECISE_LOG=not INTERPRET, BLOCK=block)
    return out


def softmax_factor(head_dim: int, pos_att_type) -> float:
    """Hugging Face's 1/sqrt(D * (1 + number of c2p/p2c terms named in pos_att_type)), whether or not
    relative_attention is on (it counts the names, as the original does)."""
    terms = 1 + sum(t in (pos_att_type or []) for t in ("c2p", "p2c"))
    return 1.0 / math.sqrt(head_dim * terms)
