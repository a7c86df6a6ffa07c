"""The attention of the tiles near the diagonal, with their position terms made in place (Gluon, Hopper).

`window_band` writes every near tile's position terms to a band in memory that `fused_attention`'s attention kernel
reads back: at 32 x 512 tokens of the demo config that round trip, and the Q and K tiles both kernels load, are most
of a layer's attention time on an H100 (results/fused-attention-h100/NOTES.md). Here one program per query block
walks its near key blocks and does the whole online-softmax step for each:

    s   = Q.Kᵀ + skew(Q.Wcᵀ) + skew(K.Wpᵀ)ᵀ + key mask      three tensor-core products, the skews through shared
                                                         memory, both products stored straight from their MMA
                                                         layout (`window_band._skew_mma`, no bank conflicts:
                                                         rows spread, keys and queries in `_spread` and
                                                         `_spread_queries` order); Q.Wcᵀ's window moves
                                                         by one block from one key block to the next, so each
                                                         half of it is computed once and used twice
    acc = acc * alpha + softmax-numerator(s) . V          FlashAttention-2's step, P from registers

K, V and the position windows are copied to shared memory a block ahead (cp.async). Where every tile is near the
diagonal (sequences shorter than the span where the position terms saturate, 512 tokens for v3) and query blocks
are enough to fill the GPU, each program writes its rows of the context and the layer's attention is this one
launch (`near_output`, `finishes`). Elsewhere (`near_state`) each program writes its softmax state (acc, running
max, running sum): the Triton attention kernel starts from that state and adds the saturated tiles
(`fused_attention._attention_kernel`, NEAR_STATE); when query blocks are too few to fill the GPU, several programs
share one query block's near blocks (`splits_for`; two of them unevenly under the overlap, `FIRST_SHARE`) and the
Triton kernel merges their states. The state is [rows, D] float32 per head and split: 12 MiB at 8192 tokens for the
demo config, where the window band's band was 107 MiB.
The first program of each query block also writes the saturated tiles' C2P vectors of its rows, as window_band
does. The default on Hopper (`fused_attention.band_kernel_for`) except where every tile is near and query blocks
are few (batch 1 x 512 tokens for the demo config), where the window band is 3% faster; at 32 x 512 tokens a forward
of the demo config takes 4.38 ms against 4.84 with the window band on an H100 (results/fused-attention-h100/NOTES.md,
v12).

Gluon does not run under TRITON_INTERPRET: CI compiles this kernel for sm_90 (test_fused.py) and the GPU tests
compare the result with the Triton path.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton

from . import fused_attention as fa
from . import program_times
from . import window_band as wb

if wb.gluon is not None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.language.extra.cuda import gdc_launch_dependents
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    @gluon.jit
    def _copy_tile(dst, base, r, stride_r, col, dd, S):
        """dst[n, :] = base[r[n], col:col + D] for r[n] < S, else zeros (asynchronous)."""
        async_copy.async_copy_global_to_shared(dst, base + r[:, None] * stride_r + col + dd[None, :],
                                               mask=(r < S)[:, None])

    @gluon.jit
    def _copy_rows(dst, base, first, idx, stride, dd):
        """dst[n, :] = base[first + idx[n], :] (asynchronous)."""
        async_copy.async_copy_global_to_shared(dst, base + (first + idx)[:, None] * stride + dd[None, :])

    @gluon.jit
    def _copy_keys(k_s, wc_s, wp_s, qkv_b, c2p_rows, p2c_rows, n, j0, c2p_first, keys, rows, wins, dd, i0,
                   stride_qkv_s, k_col, stride_pos_p, S, DIST_LO, DIST_N, HAS_C2P: gl.constexpr, HAS_P2C: gl.constexpr,
                   FIRST: gl.constexpr, BLOCK: gl.constexpr):
        """The copies of the program's near block n (first key j0) that its products read, not committed: K in the
        score tile's key order (_spread, which P2C's product takes too); for P2C its window; for C2P its window's
        upper half into slot (n + 1) % 2 (the lower half is the previous block's, kept in registers), and with FIRST
        (n = 0) the lower half too."""
        _copy_tile(k_s, qkv_b, j0 + keys, stride_qkv_s, k_col, dd, S)
        if HAS_C2P:
            if FIRST:
                _copy_rows(wc_s.index(0), c2p_rows, c2p_first, rows, stride_pos_p, dd)
            _copy_rows(wc_s.index((n + 1) % 2), c2p_rows, c2p_first + (n + 1) * BLOCK, rows, stride_pos_p, dd)
        if HAS_P2C:
            _copy_rows(wp_s, p2c_rows, wb._p2c_window(i0 - j0, DIST_LO, DIST_N, BLOCK), wins, stride_pos_p, dd)

    @gluon.jit
    def _near_attention_kernel(
        QKV, stride_qkv_b, stride_qkv_s, POS, stride_pos_t, stride_pos_h, stride_pos_p, C2P_TERM, P2C_TERM,
        DIST_LO, DIST_N, MASK, stride_mask_b, RANGES, ACC, ML, EDGES, stride_edge_b, stride_edge_h, ROWS,
        OUT, stride_out_b, stride_out_s, S, H, H0, G, SAT_HI, SAT_LO, qk_scale, SPLITS, TIMES, FIRST_SHARE,
        HAS_C2P: gl.constexpr, HAS_P2C: gl.constexpr, FINAL: gl.constexpr, HEAD_DIM: gl.constexpr,
        BLOCK: gl.constexpr, RECORD: gl.constexpr, DEPENDENTS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """ACC[bg, part, i, :], ML[bg, part, 0, i], ML[bg, part, 1, i]: the unnormalised output, running maximum (log2
        units, scale included) and running sum of query i over part `part` of its near key blocks (those
        `_attention_kernel` would visit, in SPLITS runs of consecutive blocks, or with FIRST_SHARE > 0 (SPLITS 2) the
        first FIRST_SHARE % of them and the rest); EDGES as window_band writes them
        (not with DEPENDENTS). FINAL (every key block near, one part): OUT[b, i, h * D:(h + 1) * D], the layer's
        context, instead.
        RECORD: each program's times into TIMES (`program_times`; its Triton functions hold only scalars, which Gluon
        takes as they are)."""
        if RECORD:
            started = program_times.now()
        if DEPENDENTS:
            gdc_launch_dependents()
        WIN: gl.constexpr = 2 * BLOCK
        if FINAL:  # grid (query blocks, B * G)
            m = gl.program_id(0) // SPLITS
            part = gl.program_id(0) % SPLITS
            pid_bg = gl.program_id(1)
        else:
            # Grid (B * G, query blocks x SPLITS), heads fastest and the query blocks from the middle outwards: the
            # blocks with the most near blocks start first (fused_attention._attention_kernel's order, the other way
            # round; NOTES.md, v23).
            pid_bg = gl.program_id(0)
            mq = gl.program_id(1) // SPLITS
            part = gl.program_id(1) % SPLITS
            c = (gl.cdiv(S, BLOCK) - 1) // 2
            m = gl.where(mq % 2 == 0, c - mq // 2, c + 1 + mq // 2)
        b = (pid_bg // G).to(gl.int64)
        h = H0 + pid_bg % G
        i0 = m * BLOCK
        dtype: gl.constexpr = QKV.dtype.element_ty
        ld: gl.constexpr = wb._load_layout(HEAD_DIM, num_warps)
        rows = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ld))
        wins = gl.arange(0, WIN, layout=gl.SliceLayout(1, ld))
        dd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
        qkv_b = QKV + b * stride_qkv_b
        mask_b = MASK + b * stride_mask_b
        pos_h = POS + h * stride_pos_h
        c2p_rows = pos_h + C2P_TERM * stride_pos_t  # by distance, top index first
        p2c_rows = pos_h + P2C_TERM * stride_pos_t  # by distance, index 0 first
        # The score tile's rows hold the block's queries in window_band._spread_queries order (conflict-free skewed
        # reads, v43 / v44).
        i = i0 + wb._spread_queries(rows)
        q = wb._load_tile(qkv_b, i, stride_qkv_s, h * HEAD_DIM, dd, S)

        # The near key blocks the attention kernel visits: its own function.
        first = gl.load(RANGES + fa.RANGE_WIDTH * b)
        last = gl.load(RANGES + fa.RANGE_WIDTH * b + 1)
        holes = gl.load(RANGES + fa.RANGE_WIDTH * b + 2) != 0
        full_first, full_end = fa._unmasked_blocks(first, last, holes, BLOCK)
        qvalid = gl.load(mask_b + i, mask=i < S, other=0) != 0
        _, hi_end, lo_start, _ = fa._key_blocks(i0, gl.max(qvalid.to(gl.int32), 0) > 0, first, last, S, SAT_HI, SAT_LO,
                                                BLOCK, BLOCK)
        # This program's share of them: SPLITS programs per query block when there are too few query blocks to fill
        # the GPU.
        per = (lo_start - hi_end + SPLITS - 1) // SPLITS
        start = gl.minimum(hi_end + part * per, lo_start)
        stop = gl.minimum(start + per, lo_start)
        if FIRST_SHARE > 0:  # two parts, the first taking FIRST_SHARE % of the near blocks (rounded up)
            k = ((lo_start - hi_end) * FIRST_SHARE + 99) // 100
            start = gl.where(part == 0, hi_end, hi_end + k)
            stop = gl.where(part == 0, hi_end + k, lo_start)

        # The saturated tiles' C2P vectors of this block's queries, whenever the block holds a token between the
        # first and last valid ones (the Triton kernel reads them for every query block with a valid query; its
        # P2C comes from the projections themselves). FINAL: there are no saturated tiles. DEPENDENTS: the kernel
        # after this one overlaps it and makes its own (fused_attention.OVERLAP_NEAR_TAIL), so none are written.
        if (not FINAL) and HAS_C2P and (not DEPENDENTS):
            if (part == 0) & (i0 <= last) & (i0 + BLOCK > first):
                edge = EDGES + b * stride_edge_b + (h - H0) * stride_edge_h
                wb._edges(edge + i, ROWS, q, c2p_rows, c2p_rows + (DIST_N - 1) * stride_pos_p, dd)

        op_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, HEAD_DIM], dtype)
        win_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WIN, HEAD_DIM], dtype)
        q_s = gl.allocate_shared_memory(dtype, [BLOCK, HEAD_DIM], op_l, q)
        k_s = gl.allocate_shared_memory(dtype, [BLOCK, HEAD_DIM], op_l)
        # The window products take their rows in window_band._spread order (conflict-free stores of the skew): a
        # second copy of Q (once); the score tile's columns hold the block's keys in the same order, so one copy of
        # each K block serves Q.Kᵀ and P2C's product (v44; K, V and the key mask are loaded in that order).
        spread = wb._spread(rows)
        if HAS_C2P:
            qs_s = gl.allocate_shared_memory(dtype, [BLOCK, HEAD_DIM], op_l,
                                             wb._load_tile(qkv_b, i0 + spread, stride_qkv_s, h * HEAD_DIM, dd, S))
        # Block n's V in slot n % 2: the next block's V goes to the other slot, with no barrier after P.V (v25).
        v_s = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], op_l)
        wc_s = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], op_l)  # C2P's window rows, a half at a time
        wp_s = gl.allocate_shared_memory(dtype, [WIN, HEAD_DIM], win_l)
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
        cols = wb._spread(gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_l)))
        m_i = gl.full([BLOCK], float("-inf"), gl.float32, gl.SliceLayout(1, s_l))
        l_i = gl.zeros([BLOCK], gl.float32, gl.SliceLayout(1, s_l))
        acc = gl.zeros([BLOCK, HEAD_DIM], gl.float32, o_l)
        k_col = (H + h) * HEAD_DIM
        v_col = (2 * H + h) * HEAD_DIM
        # C2P's window moves by BLOCK rows from one key block to the next (Q stays), so half of each block's product
        # is the previous block's: the product with window rows c2p_first + n * BLOCK ... + BLOCK - 1 is computed
        # once (block start + n - 1 takes it as its upper half, start + n as its lower half) and kept in registers,
        # rounded to dtype as the skew stores it anyway. The near run never reaches a window clamp (by_distance keeps
        # two blocks beyond both saturation bounds), so the windows are consecutive.
        c2p_first = wb._c2p_window(i0 - start * BLOCK, DIST_LO, DIST_N, BLOCK)
        c2p_half = gl.zeros([BLOCK, BLOCK], dtype, s_l)
        # Copies straight to shared memory (cp.async), a block ahead, in two groups per block: the next block's V
        # (into the other of V's two slots) right after this block's first barrier, its K and windows as soon as this
        # block's products have read them; both land while the rest of this block runs, and one wait and barrier at
        # the top of each block covers all of them.
        if start < stop:
            _copy_keys(k_s, wc_s, wp_s, qkv_b, c2p_rows, p2c_rows, 0, start * BLOCK, c2p_first, spread, rows, wins, dd,
                       i0, stride_qkv_s, k_col, stride_pos_p, S, DIST_LO, DIST_N, HAS_C2P, HAS_P2C, True, BLOCK)
            async_copy.commit_group()
            _copy_tile(v_s.index(0), qkv_b, start * BLOCK + spread, stride_qkv_s, v_col, dd, S)
            async_copy.commit_group()
            if HAS_C2P:
                async_copy.wait_group(1)
                fence_async_shared()
                gl.thread_barrier()
                c2p_half = warpgroup_mma(qs_s, wc_s.index(0).permute((1, 0)),
                                         gl.zeros([BLOCK, BLOCK], gl.float32, s_l), use_acc=False).to(dtype)
        for blk in range(start, stop):
            j0 = blk * BLOCK
            n = blk - start
            more = blk + 1 < stop
            async_copy.wait_group(0)  # this block's K, windows and V
            fence_async_shared()
            gl.thread_barrier()
            if more:
                # The next block's V into the other slot, read last by the previous block's P.V (done: every warp
                # waited for it before the barrier above). Issued here, it lands while this whole block runs, and
                # this block's P.V needs no wait and no barrier of its own (v27).
                _copy_tile(v_s.index((n + 1) % 2), qkv_b, j0 + BLOCK + spread, stride_qkv_s, v_col, dd, S)
                async_copy.commit_group()
            # The three products issued back to back (asynchronous wgmma): C2P's half first, skewed while Q.Kᵀ and
            # P2C's product are still on the tensor cores (v25).
            if HAS_C2P:
                up_t = warpgroup_mma(qs_s, wc_s.index((n + 1) % 2).permute((1, 0)),
                                     gl.zeros([BLOCK, BLOCK], gl.float32, s_l), use_acc=False, is_async=True)
            s_t = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([BLOCK, BLOCK], gl.float32, s_l), use_acc=False,
                                is_async=True)
            if HAS_P2C:
                p2c_t = wb._window_product(k_s, wp_s, BLOCK, num_warps, True)
            if HAS_C2P:
                upper = warpgroup_mma_wait(1 + HAS_P2C, deps=[up_t]).to(dtype)
                # FREE (no barrier before the store): the barrier at the top of this block follows every warp's
                # read of the product buffer in the block before.
                c2p = wb._skew_halves(c2p_half, upper, dtype, BLOCK, s_l, True, True)
                c2p_half = upper
                s = warpgroup_mma_wait(HAS_P2C, deps=[s_t]) + c2p
            else:
                s = warpgroup_mma_wait(HAS_P2C, deps=[s_t])
            if HAS_P2C:
                p2c = warpgroup_mma_wait(0, deps=[p2c_t])
            gl.thread_barrier()  # every warp is done with k_s and the windows
            if more:  # the next block's; its upper half goes where this block's lower half was
                _copy_keys(k_s, wc_s, wp_s, qkv_b, c2p_rows, p2c_rows, n + 1, j0 + BLOCK, c2p_first, spread, rows,
                           wins, dd, i0, stride_qkv_s, k_col, stride_pos_p, S, DIST_LO, DIST_N, HAS_C2P, HAS_P2C, False,
                           BLOCK)
                async_copy.commit_group()
            if HAS_P2C:  # FREE: the barrier after the products follows every warp's read of C2P's skew
                s += wb._skew_mma(p2c, dtype, True, BLOCK, s_l, True, True)
            if (blk < full_first) | (blk >= full_end):
                # The key mask, only where a key of this block may be padded or outside the sequence (the Triton
                # kernel's rule, `fa._unmasked_blocks`): a block between the first and last token of a sequence
                # without holes needs none (v27: its load and adds were ~15% of the loop's instructions).
                key_ok = gl.load(mask_b + j0 + cols, mask=j0 + cols < S, other=0) != 0
                s += gl.where(key_ok, 0.0, float("-inf"))[None, :]
            # Online softmax in base 2, the scale folded into the exponent (as the Triton kernel).
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s * qk_scale - m_safe[:, None])
            alpha = gl.exp2(m_i - m_safe)
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_s.index(n % 2), acc)

        r_o = i0 + wb._spread_queries(gl.arange(0, BLOCK, layout=gl.SliceLayout(1, o_l)))
        d_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
        if FINAL:  # as the Triton kernel ends
            out = acc / gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), gl.SliceLayout(1, o_l))[:, None]
            valid = gl.convert_layout(qvalid, gl.SliceLayout(1, o_l))
            if gl.min(gl.where(r_o < S, valid, True).to(gl.int32), 0) == 0:
                # Hugging Face gives a padded query row the same score for every key: the mean of all S value rows.
                v_sum = gl.zeros([HEAD_DIM], gl.float32, gl.SliceLayout(0, ld))
                for n in range(0, gl.cdiv(S, BLOCK)):
                    jj = n * BLOCK + rows
                    v = wb._load_tile(qkv_b, jj, stride_qkv_s, v_col, dd, S)
                    v_sum += gl.sum(v.to(gl.float32), 0)
                v_mean = gl.convert_layout(v_sum / S, gl.SliceLayout(0, o_l))
                out = gl.where(valid[:, None], out, v_mean[None, :])
            gl.store(OUT + b * stride_out_b + r_o[:, None] * stride_out_s + h * HEAD_DIM + d_o[None, :],
                     out.to(dtype), mask=(r_o < S)[:, None])
        else:
            base = (pid_bg.to(gl.int64) * SPLITS + part) * ROWS
            gl.store(ACC + (base + r_o)[:, None] * HEAD_DIM + d_o[None, :], acc)
            r_s = i0 + wb._spread_queries(gl.arange(0, BLOCK, layout=gl.SliceLayout(1, s_l)))
            gl.store(ML + 2 * base + r_s, m_i)
            gl.store(ML + 2 * base + ROWS + r_s, l_i)
        if RECORD:
            program_times.record(TIMES, started, m, pid_bg, 0)


@lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Programs per multiprocessor the near kernel aims for when a launch has few query blocks (see splits_for), and
# when the kernel after it overlaps its tail (fused_attention.OVERLAP_NEAR_TAIL): there fewer, longer near programs
# leave multiprocessors to the kernel after it sooner. On an H100, demo config, one layer with 2 against 4
# (results/fused-attention-h100/NOTES.md, v38): 1 x 768 23.3-24.0 -> 19.4-19.6 us, 1024 26.5-27.1 -> 22.6, 1536
# 37.8-37.9 -> 33.1-33.2, 2048 50.2-50.4 -> 50.0-50.1, 2 x 1024 35.5-35.6 -> 35.2-35.3; a forward at 1024 0.706 ->
# 0.656 ms, 1536 0.900 -> 0.839. (1 is faster at 1 x 2048, 48.5 us, slower at 1536 and 2 x 1024, and taken only
# at 2048 it left the forward where it was: v39.)
PROGRAMS_PER_SM = 4
OVERLAP_PROGRAMS_PER_SM = 2

# With two near parts a query block and the kernel after this one overlapping it, the share (percent, rounded up) of a
# query block's near blocks its first part takes; 0: even halves. The kernel after the near kernel is let in once the
# last near program has started: with the first wave's second parts short, the rest of the near programs start sooner
# and so does it, while the long first parts run beside its first programs. On an H100, demo config, one layer at
# 1 x 2048 48.0-48.5 -> 44.6-45.4 us with 60 (SDPA's pick 22.5-23.3), 1536 32.5-32.8 -> 32.0-32.3, 2 x 1024
# 32.8-33.2 -> 32.1-32.3; a forward at 2048 1.079-1.086 -> 1.035-1.039 ms; 55 and 65 (the 10 / 7 and 12 / 5 splits
# of a 17-block query block) and 70 were slower than 60 (NOTES.md, v58). Not taken where the overlap is off: at 4096
# (no overlap, two parts) 60 took 121 us against 116.
FIRST_SHARE = 60


def splits_for(device: torch.device, query_blocks: int, programs: int, slots: int, overlapped: bool = False) -> int:
    """How many programs share one query block's near key blocks: enough for PROGRAMS_PER_SM programs per
    multiprocessor (OVERLAP_PROGRAMS_PER_SM when the kernel after this one overlaps it) when `query_blocks` x
    `programs` (batch x heads) alone are fewer, at most one per near block."""
    want = (OVERLAP_PROGRAMS_PER_SM if overlapped else PROGRAMS_PER_SM) * _multiprocessors(device)
    return max(1, min(slots, -(-want // (query_blocks * programs))))


def near_state(qkv: torch.Tensor, mask: torch.Tensor, ranges: torch.Tensor, positions, heads: int, head_dim: int,
               h0: int, group: int, rows: int, saturation: tuple[int, int], qk_scale: float,
               splits: int | None = None, dependents: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(acc, ml, edges) of heads h0 .. h0+group-1: the softmax state over the near key blocks in `splits` parts
    (default `splits_for`), acc [B * group, splits, rows, D] and ml [B * group, splits, 2, rows] float32 (running max
    in log2 units with qk_scale = factor * log2(e), running sum), and the saturated tiles' C2P vectors
    [B, group, 2, rows] as `fused_attention.position_tables` returns them. `window_band.supported(...)` must hold.
    dependents: each program first lets a kernel launched after it as a programmatic dependent start
    (`griddepcontrol.launch_dependents`; fused_attention.OVERLAP_NEAR_TAIL), and the edge vectors are not written
    (that kernel computes its own: edges is then left uninitialised)."""
    batch, seq, _ = qkv.shape
    if splits is None:
        splits = splits_for(qkv.device, triton.cdiv(seq, wb.BLOCK), batch * group,
                            fa.near_slots(saturation, seq, wb.BLOCK, wb.BLOCK), dependents)
    acc = torch.empty((batch * group, splits, rows, head_dim), device=qkv.device, dtype=torch.float32)
    ml = torch.empty((batch * group, splits, 2, rows), device=qkv.device, dtype=torch.float32)
    edges = torch.empty((batch, group, 2, rows), device=qkv.device, dtype=torch.float32)
    _launch(qkv, mask, ranges, positions, heads, head_dim, h0, group, rows, saturation, qk_scale, splits,
            acc, ml, edges, None, dependents)
    return acc, ml, edges


# Where every tile is near the diagonal, the near kernel writes the context itself (one program per query block: no
# state, no Triton kernel after it) once a launch has at least this many query-block programs per multiprocessor.
# On an H100 at 512 tokens: 1.325 ms against 1.397 with split blocks and a merge at batch 8 (384 programs), 4.38 ms
# at batch 32; at batch 1 (48 programs) 0.659 ms, where the window band takes 0.590 (NOTES.md, v12).
FINISH_PROGRAMS_PER_SM = 0.5


def finishes(device: torch.device, batch: int, seq: int, heads: int, saturation: tuple[int, int]) -> bool:
    """Whether `near_output` does the whole layer: every key block of every query block is near the diagonal (the
    sequence is shorter than the span where the position terms saturate) and the launch has enough query blocks
    (FINISH_PROGRAMS_PER_SM)."""
    programs = triton.cdiv(seq, wb.BLOCK) * batch * heads
    return (fa.all_near(saturation, seq, wb.BLOCK, wb.BLOCK)
            and programs >= FINISH_PROGRAMS_PER_SM * _multiprocessors(device))


def near_output(qkv: torch.Tensor, mask: torch.Tensor, ranges: torch.Tensor, positions, heads: int, head_dim: int,
                saturation: tuple[int, int], qk_scale: float, out: torch.Tensor) -> torch.Tensor:
    """The context of all heads into out [B, S, H * D] in one launch, where `finishes(...)` holds: no saturated
    tiles, so no state and no Triton kernel after this one."""
    _launch(qkv, mask, ranges, positions, heads, head_dim, 0, heads, 0, saturation, qk_scale, 1, qkv, qkv, qkv, out)
    return out


# Register cap per thread for the near kernel (ptxas .maxnreg), None for the compiler's choice (231-250 for head
# dimension 64: two programs per multiprocessor). Caps of 168 and 128 spilled and were slower (NOTES.md, v12).
MAX_REGISTERS = None


def _launch(qkv, mask, ranges, positions, heads, head_dim, h0, group, rows, saturation, qk_scale, splits,
            acc, ml, edges, out, dependents=False):
    batch, seq, _ = qkv.shape
    pos, dist_lo = wb.by_distance(positions, qkv.device)
    final = out is not None
    out = out if final else qkv  # a placeholder when the state is written
    edge_strides = (0, 0) if final else (edges.stride(0), edges.stride(1))
    grid = (triton.cdiv(seq, wb.BLOCK) * splits, batch * group)
    times = program_times.buffer("near", grid[0] * grid[1], qkv.device)
    _near_attention_kernel[grid if final else grid[::-1]](
        qkv, qkv.stride(0), qkv.stride(1), pos, pos.stride(0), pos.stride(1), pos.stride(2),
        positions.c2p_term or 0, positions.p2c_term or 0,
        dist_lo, pos.shape[2], mask, mask.stride(0), ranges, acc, ml,
        edges, *edge_strides, rows, out, out.stride(0), out.stride(1),
        seq, heads, h0, group, saturation[0], saturation[1], qk_scale, splits, qkv if times is None else times,
        FIRST_SHARE if dependents and splits == 2 else 0,
        HAS_C2P=positions.c2p_term is not None, HAS_P2C=positions.p2c_term is not None, FINAL=final,
        HEAD_DIM=head_dim, BLOCK=wb.BLOCK, RECORD=times is not None, DEPENDENTS=dependents, num_warps=4,
        **({} if MAX_REGISTERS is None else {"maxnreg": MAX_REGISTERS}))
