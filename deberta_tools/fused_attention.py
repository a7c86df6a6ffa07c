"""Flash-style fused DeBERTa disentangled attention in Triton.

One layer's attention output

    out[b, i, h] = softmax_j(factor * (Q_i.K_j + Q_i.Kr[idx(i-j)] + K_j.Qr[idx(i-j)]) + mask) . V

is computed in two launches and never materialises an S x S tensor:

1. `position_scores`: the content-to-position and position-to-content products C2P = Q.Krᵀ and P2C = K.Qrᵀ,
   [B, H, S, 2*span] each (span = position_buckets, 256 for v3: small beside S x S once S > 512). Kr and Qr (the
   relative embeddings through the layer's key/query projections) depend on weights only and are computed once per
   model by the caller.
2. `attention`: tiles of Q.Kᵀ with an online softmax (FlashAttention-2 style). The relative index idx(i-j) is
   Hugging Face's make_log_bucket_position arithmetic (float32, IEEE division, libdevice log on the GPU) or the
   linear rule when position_buckets is off, written as a Triton function (`_relative_index`). It depends on the
   distance only, so it is evaluated once per distance between the saturation bounds (`index_table`, ~1000
   entries for v3) and the attention kernel reads that small table; evaluating it per (i, j) made
   near-diagonal tiles 1.6-2.5x slower on an H100 (results/fused-attention-h100/NOTES.md). Log buckets
   saturate: once every i-j of a tile is beyond the saturation distance, every element of the tile reads the
   same C2P column per row and the same P2C column per key, so those tiles add a row vector and a contiguous
   column vector instead of gathering (the key loop is split in three ranges: far below the diagonal, near it,
   far above it).

Masking follows Hugging Face: a 2-D padding mask m gives key j to query i when m[i] and m[j]; a padded query row
(all keys masked to the dtype's minimum) becomes a uniform average over all S keys, as in the original.

Runs compiled on NVIDIA GPUs and on the CPU under TRITON_INTERPRET=1 (tests).
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


@triton.jit
def _position_scores_kernel(
    QKV, stride_qkv_b, stride_qkv_s, COL0, COL1,
    POS, stride_pos_t, stride_pos_h, stride_pos_p,
    OUT, stride_out_t, stride_out_b, stride_out_h, stride_out_s,
    S, H, P,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """OUT[t, b, h, s, p] = X_t[b, s, h] . POS[t, h, p]: term 0 reads the columns at COL0, term 1 those at COL1."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    term = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    col = tl.where(term == 0, COL0, COL1) + h * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    if HEAD_DIM == BLOCK_D:
        x_mask = rows[:, None] < S
    else:
        x_mask = (rows[:, None] < S) & (dd[None, :] < HEAD_DIM)
    x = tl.load(QKV + b * stride_qkv_b + rows[:, None] * stride_qkv_s + col + dd[None, :], mask=x_mask, other=0.0)
    pos_base = POS + term * stride_pos_t + h * stride_pos_h
    out_base = OUT + term * stride_out_t + b * stride_out_b + h * stride_out_h
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        if HEAD_DIM == BLOCK_D:
            r_mask = pp[:, None] < P
        else:
            r_mask = (pp[:, None] < P) & (dd[None, :] < HEAD_DIM)
        r = tl.load(pos_base + pp[:, None] * stride_pos_p + dd[None, :], mask=r_mask, other=0.0)
        acc = tl.dot(x, tl.trans(r), input_precision=DOT_PRECISION)
        if EVEN_P:
            o_mask = rows[:, None] < S
        else:
            o_mask = (rows[:, None] < S) & (pp[None, :] < P)
        tl.store(out_base + rows[:, None] * stride_out_s + pp[None, :], acc.to(OUT.dtype.element_ty), mask=o_mask)


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, i, row_ok, qvalid, c2p_row, j0,
    QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, C2P_B, P2C_B, stride_tab_s, EDGE_B,
    LUT, LUT_LO, LUT_N, S, qk_scale,
    MODE: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax. MODE 0 (near the diagonal) gathers the position terms per element
    through the index table LUT[d - LUT_LO]; MODE 1 (every index saturated) adds the row vector c2p_row and the
    contiguous per-key vector EDGE_B[j]."""
    j = j0 + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    col_ok = j < S
    # A mask along the contiguous head axis stops Triton from vectorising the loads: only mask it when needed.
    if HEAD_DIM == BLOCK_D:
        kv_mask = col_ok[:, None]
    else:
        kv_mask = col_ok[:, None] & (dd[None, :] < HEAD_DIM)
    k = tl.load(QKV_B + j[:, None] * stride_qkv_s + K_COL + dd[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MODE == 0:
        if HAS_C2P or HAS_P2C:
            u = tl.minimum(tl.maximum(i[:, None] - j[None, :] - LUT_LO, 0), LUT_N - 1)
            idx = tl.load(LUT + u)
            both = row_ok[:, None] & col_ok[None, :]
            if HAS_C2P:
                s += tl.load(C2P_B + i[:, None] * stride_tab_s + idx, mask=both, other=0.0).to(tl.float32)
            if HAS_P2C:
                s += tl.load(P2C_B + j[None, :] * stride_tab_s + idx, mask=both, other=0.0).to(tl.float32)
    else:
        if HAS_C2P:
            s += c2p_row[:, None]
        if HAS_P2C:
            s += tl.load(EDGE_B + j, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    kvalid = tl.load(MASK_B + j, mask=col_ok, other=0) != 0
    # Hugging Face: valid query rows see valid keys; a padded query row sees every key with equal score.
    z = tl.where(qvalid[:, None], s * qk_scale, 0.0)
    keep = tl.where(qvalid[:, None], kvalid[None, :], col_ok[None, :])
    z = tl.where(keep, z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(z - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(QKV_B + j[:, None] * stride_qkv_s + V_COL + dd[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(
    QKV, stride_qkv_b, stride_qkv_s,
    TAB, C2P_OFF, P2C_OFF, stride_tab_b, stride_tab_h, stride_tab_s,
    EDGES, stride_edge_b, stride_edge_h,
    MASK, stride_mask_b,
    OUT, stride_out_b, stride_out_s,
    LUT, LUT_LO, LUT_N,
    S, H, TOP, SAT_HI, SAT_LO, qk_scale,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    i0 = pid_m * BLOCK_M
    i = i0 + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = i < S
    QKV_B = QKV + b * stride_qkv_b
    if HEAD_DIM == BLOCK_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & (dd[None, :] < HEAD_DIM)
    q = tl.load(QKV_B + i[:, None] * stride_qkv_s + h * HEAD_DIM + dd[None, :], mask=io_mask, other=0.0)
    K_COL = H * HEAD_DIM + h * HEAD_DIM
    V_COL = 2 * H * HEAD_DIM + h * HEAD_DIM
    MASK_B = MASK + b * stride_mask_b
    qvalid = tl.load(MASK_B + i, mask=row_ok, other=0) != 0
    C2P_B = TAB + C2P_OFF + b * stride_tab_b + h * stride_tab_h
    P2C_B = TAB + P2C_OFF + b * stride_tab_b + h * stride_tab_h
    EDGE_B = EDGES + b * stride_edge_b + h * stride_edge_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_blocks = tl.cdiv(S, BLOCK_N)
    # Key blocks [0, hi_end): every i - j >= SAT_HI (index TOP); [lo_start, n_blocks): every i - j <= SAT_LO (index 0).
    x = i0 - BLOCK_N + 1 - SAT_HI
    hi_end = tl.minimum(tl.where(x >= 0, x // BLOCK_N + 1, 0), n_blocks)
    y = i0 + BLOCK_M - 1 - SAT_LO
    lo_start = tl.maximum(tl.minimum((y + BLOCK_N - 1) // BLOCK_N, n_blocks), hi_end)

    c2p_row = tl.zeros([BLOCK_M], tl.float32)
    if HAS_C2P:
        c2p_row = tl.load(C2P_B + i * stride_tab_s + TOP, mask=row_ok, other=0.0).to(tl.float32)
    for n in range(0, hi_end):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, i, row_ok, qvalid, c2p_row, n * BLOCK_N,
            QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, C2P_B, P2C_B, stride_tab_s, EDGE_B + S,
            LUT, LUT_LO, LUT_N, S, qk_scale,
            1, HAS_C2P, HAS_P2C, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    for n in range(hi_end, lo_start):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, i, row_ok, qvalid, c2p_row, n * BLOCK_N,
            QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, C2P_B, P2C_B, stride_tab_s, EDGE_B,
            LUT, LUT_LO, LUT_N, S, qk_scale,
            0, HAS_C2P, HAS_P2C, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    if HAS_C2P:
        c2p_row = tl.load(C2P_B + i * stride_tab_s, mask=row_ok, other=0.0).to(tl.float32)
    for n in range(lo_start, n_blocks):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, i, row_ok, qvalid, c2p_row, n * BLOCK_N,
            QKV_B, stride_qkv_s, K_COL, V_COL, MASK_B, C2P_B, P2C_B, stride_tab_s, EDGE_B,
            LUT, LUT_LO, LUT_N, S, qk_scale,
            1, HAS_C2P, HAS_P2C, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(OUT + b * stride_out_b + i[:, None] * stride_out_s + h * HEAD_DIM + dd[None, :],
             out.to(OUT.dtype.element_ty), mask=io_mask)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_tiles(seq_len: int, head_dim: int, dtype: torch.dtype, programs: int = 1 << 30) -> Tiles:
    """Tile sizes (from H100 runs; see results/fused-attention-h100/NOTES.md). `programs`: batch * heads, so that
    short sequences get smaller query tiles and enough programs to fill the GPU."""
    if INTERPRET:
        return Tiles(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return Tiles(32, 32, 4, 1)
    if programs * triton.cdiv(seq_len, 64) < 264:
        return Tiles(32, 64, 4, 2)
    return Tiles(64, 64, 4, 2)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def position_scores(qkv: torch.Tensor, pos: torch.Tensor, columns: tuple[int, ...], heads: int,
                    head_dim: int) -> torch.Tensor:
    """Tables [terms, B, H, S, P] = qkv[..., column block of the term] . pos[term]ᵀ per head.

    qkv: [B, S, 3*H*D] (the fused Q|K|V projection); pos: [terms, H, P, D]; columns: start column per term
    (0 for Q -> C2P, H*D for K -> P2C)."""
    batch, seq, _ = qkv.shape
    terms, _, width, _ = pos.shape
    out = torch.empty((terms, batch, heads, seq, width), device=qkv.device, dtype=qkv.dtype)
    block_m = 16 if INTERPRET else 64
    block_p = 16 if INTERPRET else 64
    grid = (triton.cdiv(seq, block_m), batch * heads, terms)
    cols = tuple(columns) + (columns[0],) * (2 - len(columns))
    _position_scores_kernel[grid](
        qkv, qkv.stride(0), qkv.stride(1), cols[0], cols[1],
        pos, pos.stride(0), pos.stride(1), pos.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        seq, heads, width,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_P=block_p,
        EVEN_P=width % block_p == 0, DOT_PRECISION=_dot_precision(qkv.dtype), num_warps=1 if INTERPRET else 4)
    return out


@lru_cache(maxsize=None)
def index_table(rule: PositionRule, device: torch.device) -> tuple[torch.Tensor, int]:
    """(LUT, lo): LUT[d - lo] = idx(d) for every distance between the saturation bounds, computed once per rule and
    device by the Triton index function (`kernel_index`), so the attention kernel reads one small table instead
    of evaluating log, two IEEE divisions and a ceil for every (i, j)."""
    hi, lo = rule.saturation
    return kernel_index(rule, torch.arange(lo, hi + 1, device=device)), lo


def attention(qkv: torch.Tensor, mask: torch.Tensor, heads: int, head_dim: int, rule: PositionRule | None,
              tables: torch.Tensor | None, c2p_term: int | None, p2c_term: int | None, factor: float,
              out: torch.Tensor | None = None, tiles: Tiles | None = None,
              saturation: tuple[int, int] | None = None) -> torch.Tensor:
    """Context [B, S, H*D] of one DeBERTa attention layer.

    qkv: [B, S, 3*H*D]; mask: [B, S] (non-zero = token); tables from `position_scores` with C2P at index c2p_term
    and P2C at p2c_term (None: the config has no such term); factor: 1/sqrt(D * scale_factor). `saturation`
    overrides the rule's (hi, lo) bounds: for timing experiments only, results are then wrong."""
    batch, seq, width = qkv.shape
    if width != 3 * heads * head_dim or qkv.stride(2) != 1:
        raise ValueError(f"qkv must be [B, S, 3*{heads}*{head_dim}] with unit column stride, got {tuple(qkv.shape)}")
    if mask.shape != (batch, seq):
        raise ValueError(f"mask must be [B, S] = {(batch, seq)}, got {tuple(mask.shape)}")
    if out is None:
        out = torch.empty((batch, seq, heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    tiles = tiles or default_tiles(seq, head_dim, qkv.dtype, batch * heads)
    has_c2p, has_p2c = c2p_term is not None, p2c_term is not None
    if has_c2p or has_p2c:
        assert rule is not None and tables is not None
        lut, lut_lo = index_table(rule, qkv.device)
        sat_hi, sat_lo = saturation or rule.saturation
        top = 2 * rule.span - 1
        tab = tables
        term_stride = tables.stride(0)
        strides = (tables.stride(1), tables.stride(2), tables.stride(3))
        # P2C's first and last columns as contiguous [B, H, 2, S] rows: what saturated tiles read per key.
        p2c = tables[p2c_term or 0]
        edges = torch.stack((p2c[..., 0], p2c[..., top]), dim=2)
    else:
        lut, lut_lo, top, sat_hi, sat_lo = mask, 0, 0, 1 << 30, -(1 << 30)
        tab, term_stride, strides = qkv, 0, (0, 0, 0)
        edges = qkv.new_zeros((1, 1, 2, 1))
    grid = (triton.cdiv(seq, tiles.block_m), batch * heads)
    _attention_kernel[grid](
        qkv, qkv.stride(0), qkv.stride(1),
        tab, (c2p_term or 0) * term_stride, (p2c_term or 0) * term_stride, *strides,
        edges, edges.stride(0), edges.stride(1),
        mask, mask.stride(0),
        out, out.stride(0), out.stride(1),
        lut, lut_lo, lut.numel(),
        seq, heads, top, sat_hi, sat_lo, factor * _LOG2E,
        HAS_C2P=has_c2p, HAS_P2C=has_p2c,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        DOT_PRECISION=_dot_precision(qkv.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
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
