"""The near band of `fused_attention` on Hopper tensor cores, from the relative embeddings directly (Gluon).

`fused_attention.near_band` gathers each near tile's position terms from the [S, 2*span] tables C2P = Q.Krᵀ and
P2C = K.Qrᵀ: one scattered load per element and term, the largest cost of a forward at 2048 tokens and at
32 x 512 on an H100 (results/fused-attention-h100/NOTES.md). Here each tile's terms come from two small products
instead, and the skew is done in shared memory, which Triton's own language cannot address:

    c2p[i, j] = A[r, 64 - r + c]   A = Q_tile . Wcᵀ   Wc[w] = Kr[idx(i0 - j0 + 64 - w)]   (r = i - i0, c = j - j0)
    p2c[i, j] = B[c, 64 + r - c]   B = K_tile . Wpᵀ   Wp[w] = Qr[idx(i0 - j0 - 64 + w)]

A and B are [64, 128]: every distance a 64 x 64 tile spans, in window order. Stored with a row pitch of 129
elements (a padded shared layout), A[r, 64 - r + c] lies at 128 r + 64 + c: the same memory read as an unpadded
[64, 128] buffer from column 64 on is c2p itself, and B read the same way and transposed is p2c. No position tables
are written; the attention kernel reads the band as before. The window rows come from a copy of Kr and Qr laid out
per distance (`by_distance`, made once per layer with Hugging Face's own index function), so the band equals the
Triton one up to the order of the products' sums. The diagonal tile's program also writes the far tiles' vectors.

Gluon kernels do not run under TRITON_INTERPRET, so CI checks this file by compiling it for sm_90
(test_fused.py) and the GPU tests compare its band with the Triton one; `fused_attention.attention` uses it on
GPUs with compute capability 9.x (wgmma) for 64 x 64 tiles, fp16 or bf16 and a head dimension of 64 or 128, and
the Triton path everywhere else.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton

from . import fused_attention as fa

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
except ImportError:  # a Triton without Gluon: the Triton path is used
    gluon = None

BLOCK = 64
HEAD_DIMS = (64, 128)

# The near kernel's skews (`_skew_mma` with SCORE_ORDER) as bit tables: bit b of a buffer index holds the tile's
# row, key or query of value TABLE[b]. SPREAD_BITS: the window products' rows in the buffer (`_spread`) and the
# score tile's keys; SPREAD_QUERY_BITS: the score tile's queries (`_spread_queries`). scripts/skew_banks.py counts
# the bank conflicts they give (none; ncu agrees, NOTES.md v43 / v44).
SPREAD_BITS = (8, 16, 1, 2, 4, 32)
SPREAD_QUERY_BITS = (8, 1, 2, 16, 32, 4)


def supported(qkv: torch.Tensor, head_dim: int, block_m: int, block_n: int) -> bool:
    """Whether this kernel can make the band for these inputs (else the Triton path does). Asked once per layer
    call: the GPU's generation is looked up once per device."""
    if gluon is None or qkv.device.type != "cuda" or qkv.dtype not in (torch.float16, torch.bfloat16):
        return False
    if (block_m, block_n) != (BLOCK, BLOCK) or head_dim not in HEAD_DIMS:
        return False
    return _hopper(qkv.device)


@lru_cache(maxsize=None)
def _hopper(device: torch.device) -> bool:
    """Compute capability 9.x: wgmma (Blackwell's 10.x has none)."""
    return torch.cuda.get_device_capability(device)[0] == 9


if gluon is not None:

    @gluon.constexpr_function
    def _load_layout(head_dim, num_warps):
        """16-byte vectors along the head dimension, rows across the remaining threads and the warps."""
        across = head_dim // 8
        return gl.BlockedLayout([1, 8], [32 // across, across], [num_warps, 1], [1, 0])

    @gluon.jit
    def _skewed_product(x, w, TRANSPOSE: gl.constexpr, BLOCK: gl.constexpr, num_warps: gl.constexpr):
        """x [BLOCK, D] (rows in _spread order) times the window w [2 * BLOCK, D], skewed: with P = x . wᵀ in the
        tile's row order, out[r, c] = P[r, BLOCK - r + c], or with TRANSPOSE out[r, c] = P[c, BLOCK + r - c];
        float32 [BLOCK, BLOCK] in the band's store layout."""
        dtype: gl.constexpr = x.dtype
        x_s = gl.allocate_shared_memory(dtype, x.shape, gl.NVMMASharedLayout.get_default_for(x.shape, dtype), x)
        w_s = gl.allocate_shared_memory(dtype, w.shape, gl.NVMMASharedLayout.get_default_for(w.shape, dtype), w)
        fence_async_shared()
        out_l: gl.constexpr = _band_layout(num_warps)
        return _skew_mma(_window_product(x_s, w_s, BLOCK, num_warps), dtype, TRANSPOSE, BLOCK, out_l)

    @gluon.jit
    def _window_product(x_s, w_s, BLOCK: gl.constexpr, num_warps: gl.constexpr, IS_ASYNC: gl.constexpr = False):
        """x . wᵀ [BLOCK, 2 * BLOCK] float32 on the tensor cores, from shared memory (with IS_ASYNC the wgmma's
        token, for warpgroup_mma_wait)."""
        WIN: gl.constexpr = 2 * BLOCK
        mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, WIN, 16])
        return warpgroup_mma(x_s, w_s.permute((1, 0)), gl.zeros([BLOCK, WIN], gl.float32, mma_l), use_acc=False,
                             is_async=IS_ASYNC)

    @gluon.jit
    def _spread(r):
        """The row order of the products that _skew_mma skews ([64, 128], BLOCK 64): product row r is the tile's row
        _spread(r) (the operand's rows are loaded in this order). One store instruction of the MMA layout covers 8
        consecutive product rows; spread 4 tile rows apart, with the buffer's row pitch of 65 words they fall on
        32 different banks (consecutive rows put 32 lanes on 11 banks: 4-way conflicts, ncu v17)."""
        return ((r & 7) << 2) | ((r >> 3) & 3) | (r & 32)

    @gluon.jit
    def _spread_queries(n):
        """The query order of the near kernel's score tiles (BLOCK 64), whose keys are in _spread order: row n holds
        query _spread_queries(n) of the block (Q is loaded and the rows written in this order). A load instruction of
        the skewed reads (`_read_skewed` with SCORE_ORDER, both terms straight in the MMA layout) takes 8
        consecutive rows and 4 columns 2c + 8k + e, keys 8 and 16 apart: 4 and 8 words apart in C2P's read (row
        pitch 129 two-byte elements), and their rows 4 and 8 banks apart in P2C's, so in both the 8 rows must fall
        on banks {0, 1, 2, 3, 16, ..., 19}: queries 2 apart, in two runs 32 apart. Neighbouring queries, 64.5 words
        apart in C2P's read, shared a bank every other time (v43). Bits 0 ... 5 of n go to bits 1, 2, 5, 0, 3, 4;
        scripts/skew_banks.py counts the conflicts of any order."""
        return ((n & 3) << 1) | (((n >> 2) & 1) << 5) | ((n >> 3) & 1) | (((n >> 4) & 3) << 3)

    @gluon.constexpr_function
    def _skewed_read_layout(block, win, score_order, transpose):
        """The padded view (row pitch win + 1) that _read_skewed reads; with score_order its keys (the rows for
        transpose, else the columns of the second half) in _spread order and its queries (the columns of the second
        half for transpose, else the rows) in _spread_queries: buffer bits 0 ... 5 of the key hold the tile's keys
        8, 16, 1, 2, 4, 32, those of the query its queries 8, 1, 2, 16, 32, 4."""
        if not score_order:
            return gl.PaddedSharedLayout.with_identity_for([[win, 1]], [block, win], [1, 0])
        assert block == 64, "the score tile orders are written for 64-row blocks"
        keys = list(SPREAD_BITS)
        queries = list(SPREAD_QUERY_BITS)
        if transpose:
            cols = [[0, q] for q in queries] + [[0, block]]
            rows = [[k, 0] for k in keys]
        else:
            cols = [[0, k] for k in keys] + [[0, block]]
            rows = [[q, 0] for q in queries]
        return gl.PaddedSharedLayout([[win, 1]], cols + rows, [], [block, win])

    @gluon.constexpr_function
    def _spread_store_layout(block, win):
        """[block, win] with a row pitch of win + 2, logical row r at buffer row _spread(r). The bases map offset
        bits to [row, column]: buffer row bits 0 ... 5 hold logical rows 8, 16, 1, 2, 4, 32."""
        assert block == 64, "_spread is written for 64-row blocks"
        cols = [[0, 1 << n] for n in range(win.bit_length() - 1)]
        rows = [[r, 0] for r in SPREAD_BITS]
        return gl.PaddedSharedLayout([[win, 2]], cols + rows, [], [block, win])

    @gluon.jit
    def _skew_mma(prod, dtype: gl.constexpr, TRANSPOSE: gl.constexpr, BLOCK: gl.constexpr, out_l: gl.constexpr,
                  SCORE_ORDER: gl.constexpr = False, FREE: gl.constexpr = False):
        """out[r, c] = P[r, BLOCK - r + c], or with TRANSPOSE P[c, BLOCK + r - c], in out_l, through shared memory,
        where P is the tile's product and prod holds its rows in _spread order (prod[n] = P[_spread(n)]). prod is
        stored straight from its MMA layout, row n at buffer row _spread(n) (so buffer row t is P's row t) with a
        row pitch of 2 * BLOCK + 2 (pairs of two-byte elements, every row 4-byte aligned), and read with a pitch of
        2 * BLOCK + 1: view row t, column BLOCK + c is P[t, BLOCK - t + c] (with TRANSPOSE view row c, column
        BLOCK + r is P[c, BLOCK + r - c]). The reads take one element at a time, so the odd pitch is no
        misaligned access: TRANSPOSE down columns, straight in out_l; else along rows, lanes on consecutive columns
        (read in out_l the compiler pairs elements, misaligned in odd rows), then converted to out_l. SCORE_ORDER (the
        near kernel): out's column c is key _spread(c) and its row r query _spread_queries(r), both reads are
        straight in out_l and neither has bank conflicts (ncu, v44). FREE: see _product_buffer."""
        p_s = _product_buffer(dtype, BLOCK, FREE)
        p_s.store(prod.to(dtype))
        return _read_skewed(p_s, dtype, TRANSPOSE, BLOCK, out_l, SCORE_ORDER)

    @gluon.jit
    def _skew_halves(lo, hi, dtype: gl.constexpr, BLOCK: gl.constexpr, out_l: gl.constexpr,
                     SCORE_ORDER: gl.constexpr = False, FREE: gl.constexpr = False):
        """_skew_mma of the product [lo | hi] (two [BLOCK, BLOCK] halves in _spread row order, already in dtype),
        not TRANSPOSE: each half stored straight from its MMA layout into its columns of the padded buffer."""
        p_s = _product_buffer(dtype, BLOCK, FREE)
        p_s.slice(0, BLOCK, dim=1).store(lo)
        p_s.slice(BLOCK, BLOCK, dim=1).store(hi)
        return _read_skewed(p_s, dtype, False, BLOCK, out_l, SCORE_ORDER)

    @gluon.jit
    def _product_buffer(dtype: gl.constexpr, BLOCK: gl.constexpr, FREE: gl.constexpr = False):
        """A [BLOCK, 2 * BLOCK] shared buffer in _spread_store_layout, once every warp is done with what the
        compiler may give its place; FREE: the caller knows a barrier has passed since every warp's last read of
        that place (the near kernel's loop), so none is added here."""
        st_l: gl.constexpr = _spread_store_layout(BLOCK, 2 * BLOCK)
        if not FREE:
            gl.thread_barrier()
        return gl.allocate_shared_memory(dtype, [BLOCK, 2 * BLOCK], st_l)

    @gluon.jit
    def _read_skewed(p_s, dtype: gl.constexpr, TRANSPOSE: gl.constexpr, BLOCK: gl.constexpr, out_l: gl.constexpr,
                     SCORE_ORDER: gl.constexpr):
        """The skewed read of _skew_mma from the stored buffer p_s (buffer rows in the tile's order)."""
        WIN: gl.constexpr = 2 * BLOCK
        rd_l: gl.constexpr = _skewed_read_layout(BLOCK, WIN, SCORE_ORDER, TRANSPOSE)
        gl.thread_barrier()
        view = p_s._reinterpret(dtype, [BLOCK, WIN], rd_l).slice(BLOCK, BLOCK, dim=1)
        if TRANSPOSE:
            return view.permute((1, 0)).load(out_l).to(gl.float32)
        elif SCORE_ORDER:  # read straight in out_l (the near kernel's score tile orders)
            return view.load(out_l).to(gl.float32)
        else:
            row_l: gl.constexpr = gl.BlockedLayout([16, 1], [1, 32], [BLOCK // 16, 1], [1, 0])
            return gl.convert_layout(view.load(row_l), out_l).to(gl.float32)

    @gluon.jit
    def _load_tile(base, r, stride_r, col, dd, S):
        """base[r[n], col:col + D] for r[n] < S, else zeros (the synchronous twin of near_attention._copy_tile)."""
        return gl.load(base + r[:, None] * stride_r + col + dd[None, :], mask=(r < S)[:, None], other=0.0)

    @gluon.jit
    def _edges(OUT, OFFSET, x, TOP_ROW, ZERO_ROW, dd):
        """OUT[r] = x[r] . TOP_ROW and OUT[OFFSET + r] = x[r] . ZERO_ROW, in float32."""
        xf = x.to(gl.float32)
        gl.store(OUT, gl.sum(xf * gl.load(TOP_ROW + dd).to(gl.float32)[None, :], axis=1))
        gl.store(OUT + OFFSET, gl.sum(xf * gl.load(ZERO_ROW + dd).to(gl.float32)[None, :], axis=1))

    @gluon.jit
    def _c2p_window(d0, DIST_LO, DIST_N, BLOCK: gl.constexpr):
        """First row of C2P's window (rows by distance, reversed) for the tile at distance d0 = i0 - j0."""
        return gl.minimum(gl.maximum(DIST_LO + DIST_N - 1 - d0 - BLOCK, 0), DIST_N - 2 * BLOCK)

    @gluon.jit
    def _p2c_window(d0, DIST_LO, DIST_N, BLOCK: gl.constexpr):
        """First row of P2C's window (rows by distance) for the tile at distance d0 = i0 - j0."""
        return gl.minimum(gl.maximum(d0 - BLOCK - DIST_LO, 0), DIST_N - 2 * BLOCK)

    @gluon.constexpr_function
    def _band_layout(num_warps):
        return gl.BlockedLayout([1, 2], [1, 32], [num_warps, 1], [1, 0])

    @gluon.jit
    def _window_band_kernel(
        QKV, stride_qkv_b, stride_qkv_s, POS, stride_pos_t, stride_pos_h, stride_pos_p, C2P_TERM, P2C_TERM,
        DIST_LO, DIST_N, MASK, stride_mask_b, RANGES, BAND, stride_band_bg, NB,
        EDGES, stride_edge_b, stride_edge_h, ROWS, S, H, H0, G, SAT_HI, SAT_LO,
        HAS_C2P: gl.constexpr, HAS_P2C: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """BAND[b, g, i, slot * BLOCK + c] = c2p + p2c (+ -inf for padded keys) of near tile (row block, slot), as
        `fused_attention._near_band_kernel` writes it. POS holds the projections by distance (`by_distance`). The
        diagonal tile's program also writes the saturated tiles' C2P vectors of its rows (C2P at the top index and at
        0), as `fused_attention.position_tables` writes EDGES."""
        WIN: gl.constexpr = 2 * BLOCK
        pid = gl.program_id(0)
        pid_bg = gl.program_id(1)
        b = (pid_bg // G).to(gl.int64)
        h = H0 + pid_bg % G
        m = pid // NB
        slot = pid % NB
        i0 = m * BLOCK
        # The near key blocks of this row block: the Triton kernels' own arithmetic (identical code, checked in PTX).
        blk = fa._near_first(i0, SAT_HI, BLOCK) + slot
        near_end = fa._near_end(i0, SAT_LO, gl.cdiv(S, BLOCK), BLOCK, BLOCK)
        j0 = blk * BLOCK
        first = gl.load(RANGES + fa.RANGE_WIDTH * b)
        last = gl.load(RANGES + fa.RANGE_WIDTH * b + 1)
        used = (i0 <= last) & (i0 + BLOCK > first) & (j0 <= last) & (j0 + BLOCK > first)
        if used & (blk < near_end):
            ld: gl.constexpr = _load_layout(HEAD_DIM, num_warps)
            rows = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ld))
            wins = gl.arange(0, WIN, layout=gl.SliceLayout(1, ld))
            dd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
            qkv_b = QKV + b * stride_qkv_b
            pos_h = POS + h * stride_pos_h
            out_l: gl.constexpr = _band_layout(num_warps)
            d0 = i0 - j0
            r = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, out_l))
            c = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, out_l))
            key_ok = gl.load(MASK + b * stride_mask_b + j0 + c, mask=j0 + c < S, other=0) != 0
            val = gl.where(key_ok, 0.0, float("-inf"))[None, :] + gl.zeros([BLOCK, BLOCK], gl.float32, out_l)
            edge = EDGES + b * stride_edge_b + (h - H0) * stride_edge_h
            spread = _spread(rows)  # the products' row order (_skew_mma); the edges follow it
            if HAS_C2P:
                i = i0 + spread
                q = _load_tile(qkv_b, i, stride_qkv_s, h * HEAD_DIM, dd, S)
                # Rows by distance, C2P's in reverse (top index first): the window is a run of rows.
                c2p_rows = pos_h + C2P_TERM * stride_pos_t
                idx = _c2p_window(d0, DIST_LO, DIST_N, BLOCK) + wins
                w = gl.load(c2p_rows + idx[:, None] * stride_pos_p + dd[None, :])
                if blk == m:  # C2P at the top index and at index 0, per query
                    _edges(edge + i, ROWS, q, c2p_rows, c2p_rows + (DIST_N - 1) * stride_pos_p, dd)
                val += _skewed_product(q, w, False, BLOCK, num_warps)
            if HAS_P2C:
                j = j0 + spread
                k = _load_tile(qkv_b, j, stride_qkv_s, (H + h) * HEAD_DIM, dd, S)
                p2c_rows = pos_h + P2C_TERM * stride_pos_t  # index 0 first
                idx = _p2c_window(d0, DIST_LO, DIST_N, BLOCK) + wins
                w = gl.load(p2c_rows + idx[:, None] * stride_pos_p + dd[None, :])
                val += _skewed_product(k, w, True, BLOCK, num_warps)
            out = BAND + pid_bg.to(gl.int64) * stride_band_bg + (i0 + r)[:, None] * (NB * BLOCK) + slot * BLOCK
            gl.store(out + c[None, :], val.to(BAND.dtype.element_ty))


def by_distance(positions, device) -> tuple[torch.Tensor, int]:
    """(rows, lo): positions.pos re-laid per distance, rows[t, h, n] = pos[t, h, idx(lo + n)] (C2P's term in reverse
    order, idx(hi - n)) for every distance from 2 blocks below the saturation bound at index 0 to 2 blocks above the
    top one; made once per Positions and device (the projections are weights)."""
    cache = positions.__dict__.setdefault("_by_distance", {})
    if device not in cache:
        hi, lo = positions.rule.saturation
        dist = torch.arange(lo - 2 * BLOCK, hi + 2 * BLOCK + 1)
        idx = positions.rule.index(dist).to(positions.pos.device)
        rows = positions.pos[:, :, idx].clone()
        if positions.c2p_term is not None:
            rows[positions.c2p_term] = rows[positions.c2p_term].flip(1)
        cache[device] = (rows.contiguous(), int(dist[0]))
    return cache[device]


def near_band(qkv: torch.Tensor, mask: torch.Tensor, ranges: torch.Tensor, positions, heads: int, head_dim: int,
              h0: int, group: int, rows: int, slots: int,
              saturation: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(band, edges) of heads h0 .. h0+group-1 without position tables: the near band [B * group, rows, slots * 64]
    as `fused_attention.near_band` returns it, and the saturated tiles' C2P vectors [B, group, 2, rows] float32 as
    `fused_attention.position_tables` returns them. `supported(...)` must hold."""
    batch, seq, _ = qkv.shape
    band = torch.empty((batch * group, rows, slots * BLOCK), device=qkv.device, dtype=qkv.dtype)
    edges = torch.empty((batch, group, 2, rows), device=qkv.device, dtype=torch.float32)
    pos, dist_lo = by_distance(positions, qkv.device)
    grid = (triton.cdiv(seq, BLOCK) * slots, batch * group)
    _window_band_kernel[grid](
        qkv, qkv.stride(0), qkv.stride(1), pos, pos.stride(0), pos.stride(1), pos.stride(2),
        positions.c2p_term or 0, positions.p2c_term or 0,
        dist_lo, pos.shape[2], mask, mask.stride(0), ranges, band, band.stride(0), slots,
        edges, edges.stride(0), edges.stride(1), rows, seq, heads, h0, group, saturation[0], saturation[1],
        HAS_C2P=positions.c2p_term is not None, HAS_P2C=positions.p2c_term is not None,
        HEAD_DIM=head_dim, BLOCK=BLOCK, num_warps=4)
    return band, edges
