"""The saturated tiles after the near kernel, two warpgroups to a query block (Gluon, Hopper).

Where `fused_attention.OVERLAP_NEAR_TAIL` holds, the kernel after the near kernel starts while the near kernel's last
programs run, does each query block's saturated key blocks (plain flash tiles: the run's P2C row added to the
queries once, its C2P column a per-row offset of the exponent, `fused_attention._attend_run`), then waits for the
near kernel and merges its softmax states. At 1 x 2048 tokens of the demo config its last programs start ~31 µs
into the layer and run ~18 µs, ~1 µs a 64 x 64 tile for one warpgroup alone on its multiprocessor, which sets the
layer's end (results/fused-attention-h100/NOTES.md, v44, v51, v52). Here each program is two warpgroups (Gluon's
`warp_specialize`): each takes half of the two runs' key blocks with its own online softmax, K / V ring (cp.async,
STAGES slots) and query, and the halves are merged through shared memory before the near states. At 128
registers a thread the program holds as many registers as one warpgroup at 255, so it fits beside a near program
as the Triton kernel does.

Same grid, order, inputs and results as `fused_attention._attention_kernel` with NEAR_STATE and OVERLAP (the
interpreter cannot run Gluon: CI compiles it for sm_90 and the GPU tests compare it with the Triton kernel).
"""

from __future__ import annotations

import triton

from . import fused_attention as fa
from . import program_times
from . import window_band as wb

if wb.gluon is not None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
    from triton.language.extra.cuda import gdc_wait

    @gluon.constexpr_function
    def _mma_layout(width, num_warps):
        """wgmma's accumulator layout for [64, width] tiles on num_warps warps."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, width, 16])

    @gluon.jit
    def _copy_block(k_s, v_s, qkv_b, j, stride_qkv_s, k_col, v_col, dd, S):
        """K and V rows j (zeros past S) into one slot of the ring, asynchronously, as one group."""
        ok = (j < S)[:, None]
        rows = qkv_b + j[:, None] * stride_qkv_s + dd[None, :]
        async_copy.async_copy_global_to_shared(k_s, rows + k_col, mask=ok)
        async_copy.async_copy_global_to_shared(v_s, rows + v_col, mask=ok)
        async_copy.commit_group()

    @gluon.jit
    def _run(acc, m_i, l_i, q, q_s, k_s, v_s, p2c_row, row_vec, start, end, full_first, full_end, qkv_b,
             stride_qkv_s, k_col, v_col, mask_b, S, qk_scale, keys, dd,
             HAS_P2C: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, BLOCK: gl.constexpr):
        """Saturated key blocks [start, end) at one relative index: the query takes the run's P2C row once, row_vec
        (its C2P column) is a per-row offset of the exponent. K and V are copied STAGES - 1 blocks ahead."""
        dtype: gl.constexpr = q.dtype
        s_l: gl.constexpr = _mma_layout(BLOCK, gl.num_warps())
        o_l: gl.constexpr = _mma_layout(HEAD_DIM, gl.num_warps())
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
        cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_l))
        if start < end:
            n_blocks = end - start
            if HAS_P2C:
                q = (q.to(gl.float32) + gl.load(p2c_row + dd).to(gl.float32)[None, :]).to(dtype)
            gl.thread_barrier()  # every warp is done with the previous run's query and ring
            q_s.store(q)
            for t in gl.static_range(STAGES - 1):
                if t < n_blocks:
                    _copy_block(k_s.index(t), v_s.index(t), qkv_b, (start + t) * BLOCK + keys, stride_qkv_s,
                                k_col, v_col, dd, S)
                else:
                    async_copy.commit_group()
            row_vec = row_vec * qk_scale
            zeros = gl.zeros([BLOCK, BLOCK], gl.float32, s_l)
            for n in range(n_blocks):
                blk = start + n
                j0 = blk * BLOCK
                async_copy.wait_group(STAGES - 2)  # block n's K and V
                fence_async_shared()
                gl.thread_barrier()  # ... every warp's; every warp done with block n - 1's slot
                ahead = n + STAGES - 1
                if ahead < n_blocks:
                    _copy_block(k_s.index(ahead % STAGES), v_s.index(ahead % STAGES), qkv_b,
                                (start + ahead) * BLOCK + keys, stride_qkv_s, k_col, v_col, dd, S)
                else:
                    async_copy.commit_group()
                s = warpgroup_mma(q_s, k_s.index(n % STAGES).permute((1, 0)), zeros, use_acc=False)
                if (blk < full_first) | (blk >= full_end):  # a key of the block may be padded or past S
                    key_ok = gl.load(mask_b + j0 + cols, mask=j0 + cols < S, other=0) != 0
                    s += gl.where(key_ok, 0.0, float("-inf"))[None, :]
                m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale + row_vec)
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                p = gl.exp2(s * qk_scale - (m_safe - row_vec)[:, None])
                alpha = gl.exp2(m_i - m_safe)
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
                acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_s.index(n % STAGES), acc)
            async_copy.wait_group(0)  # the empty groups past the run's end
        return acc, m_i, l_i

    @gluon.jit
    def _query_block(m, q_s, k_s, v_s, QKV, stride_qkv_b, stride_qkv_s, b, pid_bg, h, P2C_POS, C2P_POS, stride_pos_h, stride_pos_p,
                     TOP, ACC, ML, SPLITS, ROWS, MASK, stride_mask_b, RANGES, OUT, stride_out_b, stride_out_s, S, H,
                     SAT_HI, SAT_LO, qk_scale, HAS_C2P: gl.constexpr, HAS_P2C: gl.constexpr, HEAD_DIM: gl.constexpr,
                     BLOCK: gl.constexpr, STAGES: gl.constexpr):
        """One warpgroup's query block m (none past S): its saturated runs (top index, then index 0), then, once the
        near kernel has finished (`griddepcontrol.wait`), its SPLITS near states from ACC / ML merged in, and its
        rows of OUT (`fused_attention._attention_kernel`'s OVERLAP path)."""
        i0 = m * BLOCK
        if i0 < S:
            num_warps: gl.constexpr = gl.num_warps()
            dtype: gl.constexpr = QKV.dtype.element_ty
            ld: gl.constexpr = wb._load_layout(HEAD_DIM, num_warps)
            s_l: gl.constexpr = _mma_layout(BLOCK, num_warps)
            o_l: gl.constexpr = _mma_layout(HEAD_DIM, num_warps)
            row_s: gl.constexpr = gl.SliceLayout(1, s_l)
            row_o: gl.constexpr = gl.SliceLayout(1, o_l)
            rows = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ld))
            dd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
            qkv_b = QKV + b * stride_qkv_b
            mask_b = MASK + b * stride_mask_b
            q = wb._load_tile(qkv_b, i0 + rows, stride_qkv_s, h * HEAD_DIM, dd, S)
            qvalid = gl.load(mask_b + i0 + rows, mask=i0 + rows < S, other=0) != 0
            first = gl.load(RANGES + fa.RANGE_WIDTH * b)
            last = gl.load(RANGES + fa.RANGE_WIDTH * b + 1)
            holes = gl.load(RANGES + fa.RANGE_WIDTH * b + 2) != 0
            full_first, full_end = fa._unmasked_blocks(first, last, holes, BLOCK)
            blk_first, hi_end, lo_start, blk_end = fa._key_blocks(i0, gl.max(qvalid.to(gl.int32), 0) > 0, first,
                                                                  last, S, SAT_HI, SAT_LO, BLOCK, BLOCK)
            pos_h = stride_pos_h * h
            c2p_top = gl.zeros([BLOCK], gl.float32, row_s)
            c2p_zero = gl.zeros([BLOCK], gl.float32, row_s)
            if HAS_C2P:
                # The runs' C2P columns (position_tables' arithmetic), on the query loaded again in the scores'
                # layout: their sums come out in the rows' layout with no conversion through shared memory.
                dm = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, s_l))
                qf = wb._load_tile(qkv_b, i0 + gl.arange(0, BLOCK, layout=row_s), stride_qkv_s, h * HEAD_DIM, dm,
                                   S).to(gl.float32)
                c2p_top = gl.sum(qf * gl.load(C2P_POS + pos_h + TOP * stride_pos_p + dm).to(gl.float32)[None, :], 1)
                c2p_zero = gl.sum(qf * gl.load(C2P_POS + pos_h + dm).to(gl.float32)[None, :], 1)
            m_i = gl.full([BLOCK], float("-inf"), gl.float32, row_s)
            l_i = gl.zeros([BLOCK], gl.float32, row_s)
            acc = gl.zeros([BLOCK, HEAD_DIM], gl.float32, o_l)
            k_col = (H + h) * HEAD_DIM
            v_col = (2 * H + h) * HEAD_DIM
            acc, m_i, l_i = _run(acc, m_i, l_i, q, q_s, k_s, v_s, P2C_POS + pos_h + TOP * stride_pos_p, c2p_top,
                                 blk_first, hi_end, full_first, full_end, qkv_b, stride_qkv_s, k_col, v_col, mask_b,
                                 S, qk_scale, rows, dd, HAS_P2C, HEAD_DIM, STAGES, BLOCK)
            acc, m_i, l_i = _run(acc, m_i, l_i, q, q_s, k_s, v_s, P2C_POS + pos_h, c2p_zero, lo_start, blk_end,
                                 full_first, full_end, qkv_b, stride_qkv_s, k_col, v_col, mask_b, S, qk_scale, rows,
                                 dd, HAS_P2C, HEAD_DIM, STAGES, BLOCK)

            gdc_wait()  # the near kernel has finished and its states are visible
            r_s = i0 + gl.arange(0, BLOCK, layout=row_s)
            r_o = i0 + gl.arange(0, BLOCK, layout=row_o)
            d_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
            for part in range(SPLITS):  # fused_attention._merge_near_states
                state = (pid_bg.to(gl.int64) * SPLITS + part) * ROWS
                m_k = gl.load(ML + 2 * state + r_s)
                m_new = gl.maximum(m_i, m_k)
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m_i - m_safe)
                beta = gl.exp2(m_k - m_safe)
                l_i = l_i * alpha + gl.load(ML + 2 * state + ROWS + r_s) * beta
                acc = (acc * gl.convert_layout(alpha, row_o)[:, None]
                       + gl.load(ACC + (state + r_o)[:, None] * HEAD_DIM + d_o[None, :])
                       * gl.convert_layout(beta, row_o)[:, None])
                m_i = m_new
            out = acc / gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), row_o)[:, None]
            valid = gl.convert_layout(qvalid, row_o)
            if gl.min(gl.where(r_o < S, valid, True).to(gl.int32), 0) == 0:
                # Hugging Face gives a padded query row the same score for every key: the mean of all S value rows.
                v_sum = gl.zeros([HEAD_DIM], gl.float32, gl.SliceLayout(0, ld))
                for n in range(0, gl.cdiv(S, BLOCK)):
                    v = wb._load_tile(qkv_b, n * BLOCK + rows, stride_qkv_s, v_col, dd, S)
                    v_sum += gl.sum(v.to(gl.float32), 0)
                v_mean = gl.convert_layout(v_sum / S, gl.SliceLayout(0, o_l))
                out = gl.where(valid[:, None], out, v_mean[None, :])
            gl.store(OUT + b * stride_out_b + r_o[:, None] * stride_out_s + h * HEAD_DIM + d_o[None, :],
                     out.to(dtype), mask=(r_o < S)[:, None])

    @gluon.jit
    def _saturated_kernel(
        QKV, stride_qkv_b, stride_qkv_s, P2C_POS, C2P_POS, stride_pos_h, stride_pos_p, TOP, ACC, ML, SPLITS, ROWS,
        MASK, stride_mask_b, RANGES, OUT, stride_out_b, stride_out_s, S, H, H0, G, SAT_HI, SAT_LO, qk_scale, TIMES,
        HAS_C2P: gl.constexpr, HAS_P2C: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
        STAGES: gl.constexpr, RECORD: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Two query blocks a program, one to each warpgroup (`_query_block`; the second, a `warp_specialize`
        worker, has nothing to do past S). Grid (B * G, cdiv(query blocks, 2)): program p takes the blocks at
        positions 2p and 2p + 1 of the both-ends-inwards order (0, n-1, 1, n-2, ...), so each program holds two
        query blocks with about as many saturated blocks, the most saturated first."""
        if RECORD:
            started = program_times.now()
        pid_bg = gl.program_id(0)
        p = gl.program_id(1)
        n_qb = gl.cdiv(S, BLOCK)
        m_a = p
        m_b = n_qb - 1 - p
        b = (pid_bg // G).to(gl.int64)
        h = H0 + pid_bg % G
        dtype: gl.constexpr = QKV.dtype.element_ty
        op_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, HEAD_DIM], dtype)
        q_s = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], op_l)
        k0_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], op_l)
        v0_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], op_l)
        k1_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], op_l)
        v1_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], op_l)
        # m_b is m_a where the query blocks are odd in number (the middle one): the worker then has none.
        m_b = gl.where(m_b == m_a, n_qb, m_b)
        gl.warp_specialize([
            (_query_block, (m_a, q_s.index(0), k0_s, v0_s, QKV, stride_qkv_b, stride_qkv_s, b, pid_bg, h, P2C_POS, C2P_POS,
                            stride_pos_h, stride_pos_p, TOP, ACC, ML, SPLITS, ROWS, MASK, stride_mask_b, RANGES, OUT,
                            stride_out_b, stride_out_s, S, H, SAT_HI, SAT_LO, qk_scale, HAS_C2P, HAS_P2C, HEAD_DIM,
                            BLOCK, STAGES)),
            (_query_block, (m_b, q_s.index(1), k1_s, v1_s, QKV, stride_qkv_b, stride_qkv_s, b, pid_bg, h, P2C_POS, C2P_POS,
                            stride_pos_h, stride_pos_p, TOP, ACC, ML, SPLITS, ROWS, MASK, stride_mask_b, RANGES, OUT,
                            stride_out_b, stride_out_s, S, H, SAT_HI, SAT_LO, qk_scale, HAS_C2P, HAS_P2C, HEAD_DIM,
                            BLOCK, STAGES))], [num_warps], [128])
        if RECORD:
            program_times.record(TIMES, started, m_a, pid_bg, 0)


# Whether the kernel after the near kernel is this one where it overlaps the near kernel (else the Triton kernel).
ENABLED = True  # on for its first GPU run (NOTES.md, v53)
# Ring slots for K and V a warpgroup (at least 2): STAGES - 1 blocks in flight ahead of the one computed. On an H100
# 2 was faster than 3 (NOTES.md, v53b / v53d); at 3 a program needs all but 1 KB of half a multiprocessor's shared
# memory.
STAGES = 2


def takes(head_dim: int) -> bool:
    """Whether this kernel replaces the Triton kernel after the near kernel: ENABLED, for head size 64 (at 128 a
    warpgroup's accumulator alone is 64 registers of its 128, and it spills; compiled for sm_90)."""
    return ENABLED and head_dim == 64


def programs(batch: int, seq: int, group: int) -> int:
    """The kernel's grid size: two query blocks a program."""
    return batch * group * triton.cdiv(triton.cdiv(seq, wb.BLOCK), 2)


def attend(qkv, positions, acc, ml, mask, ranges, out, heads: int, head_dim: int, h0: int, group: int,
           saturation: tuple[int, int], qk_scale: float, times=None):
    """Launch the kernel for heads h0 .. h0 + group - 1 as the programmatic dependent of the near kernel launched
    just before it (whose states acc / ml it merges); out [B, S, H * D] gets those heads' context. times: the
    launch's `program_times` buffer of `programs(...)` rows, made before the near kernel (a zeroing launch between
    the two would stop the overlap)."""
    batch, seq, _ = qkv.shape
    pos = positions.pos
    c2p = pos[positions.c2p_term if positions.c2p_term is not None else positions.p2c_term]
    p2c = pos[positions.p2c_term if positions.p2c_term is not None else positions.c2p_term]
    grid = (batch * group, triton.cdiv(triton.cdiv(seq, wb.BLOCK), 2))
    _saturated_kernel[grid](
        qkv, qkv.stride(0), qkv.stride(1), p2c, c2p, c2p.stride(0), c2p.stride(1), pos.shape[2] - 1,
        acc, ml, acc.shape[1], acc.shape[2], mask, mask.stride(0), ranges, out, out.stride(0), out.stride(1),
        seq, heads, h0, group, saturation[0], saturation[1], qk_scale, qkv if times is None else times,
        HAS_C2P=positions.c2p_term is not None, HAS_P2C=positions.p2c_term is not None, HEAD_DIM=head_dim,
        BLOCK=wb.BLOCK, STAGES=STAGES, RECORD=times is not None, num_warps=4, maxnreg=128,
        launch_pdl=True)
    return out
