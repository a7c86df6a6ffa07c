"""The fused attention kernel and the fused model path against Hugging Face in float64.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py before Triton loads); on a
GPU they run compiled. fp32 inputs, IEEE dot products: relative L2 under 1e-5 against float64 Hugging Face."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from conftest import make_model
from deberta_tools import fused_attention as fa
from deberta_tools import fused_model, gemm, near_attention, program_times
from deberta_tools.errors import UserError

DEVICE = "cuda" if torch.cuda.is_available() and not fa.INTERPRET else "cpu"
# Spans small enough that 70-token sequences reach the saturated far tiles (the row/column-vector path).
SMALL_SPAN = dict(position_buckets=8, max_relative_positions=16)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _mask(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, int(torch.randint(seq // 2, seq, (1,), generator=g)):] = 0
    return mask


@pytest.mark.parametrize("rule", [
    fa.PositionRule(256, 256, 512), fa.PositionRule(256, 256, 256), fa.PositionRule(128, 128, 512),
    fa.PositionRule(8, 8, 16), fa.PositionRule(32, 32, 64), fa.PositionRule(64, -1, 64)])
def test_kernel_index_is_hugging_face_bucket(rule):
    """The kernel's in-kernel log bucket equals make_log_bucket_position for every distance up to 5000."""
    rel = torch.arange(-5000, 5001, device=DEVICE)
    got = fa.kernel_index(rule, rel).cpu().long()
    want = rule.index(rel.cpu())
    bad = torch.nonzero(got != want).flatten()
    assert bad.numel() == 0, f"distances {rel[bad[:5]].tolist()}: kernel {got[bad[:5]].tolist()} vs {want[bad[:5]].tolist()}"


def test_saturation_bounds_match_the_rule():
    for rule in (fa.PositionRule(256, 256, 512), fa.PositionRule(8, 8, 16), fa.PositionRule(64, -1, 64)):
        hi, lo = rule.saturation
        top = 2 * rule.span - 1
        assert rule.index(torch.tensor([hi - 1]))[0] != top and torch.all(rule.index(torch.arange(hi, hi + 3000)) == top)
        assert rule.index(torch.tensor([lo + 1]))[0] != 0 and torch.all(rule.index(torch.arange(lo - 3000, lo + 1)) == 0)


def _attention_case(name, batch, seq, seed=0, table_budget=None, lengths=None, dtype=torch.float32, band_kernel=None,
                    hole=None, spans=None, **extra):
    """float64 Hugging Face attention of layer 0 vs the fused kernels on fp32 (or `dtype`) inputs of the same
    layer."""
    torch.manual_seed(seed)
    ref_model = make_model(name, **extra).double()
    enc = ref_model.encoder
    x = torch.randn(batch, seq, ref_model.config.hidden_size, dtype=torch.float64)
    mask = _mask(batch, seq, seed)
    for b, length in enumerate(lengths or []):
        mask[b] = torch.arange(seq) < length
    for b, (start, stop) in enumerate(spans or []):  # tokens start .. stop - 1, padding on both sides
        mask[b] = (torch.arange(seq) >= start) & (torch.arange(seq) < stop)
    if hole is not None:  # (row, start, stop): masked tokens in the middle of a sequence
        mask[hole[0], hole[1]:hole[2]] = 0
    with torch.no_grad():
        att = enc.layer[0].attention.self
        want = att(x, enc.get_attention_mask(mask), relative_pos=enc.get_rel_pos(x),
                   rel_embeddings=enc.get_rel_embedding())[0]
        fused = fused_model.fuse(copy.deepcopy(ref_model).to(dtype).to(DEVICE))
        encoder = fused.encoder
        encoder._prepare(torch.device(DEVICE), dtype)
        layer = encoder._layers[0]
        qkv = torch.nn.functional.linear(x.to(dtype).to(DEVICE), layer.w_qkv, layer.b_qkv)
        out = torch.full((batch, seq, layer.heads * layer.head_dim), float("nan"), device=DEVICE, dtype=dtype)
        fa.attention(qkv, mask.to(torch.int32).to(DEVICE), layer.heads, layer.head_dim, layer.positions,
                     layer.factor, out=out, table_budget=table_budget, band_kernel=band_kernel)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    return _rel(out, want), encoder.rule


@pytest.mark.parametrize("name,extra,seq", [
    ("v3", SMALL_SPAN, 70),                # log buckets, near and saturated far tiles, seq not a multiple of 16
    ("v3", {}, 45),
    ("v3_separate_keys", SMALL_SPAN, 75),  # pos_key_proj / pos_query_proj, 3 heads of 32
    ("c2p_only", SMALL_SPAN, 75),
    ("p2c_only", SMALL_SPAN, 73),
    ("linear", dict(max_relative_positions=12), 75),  # no buckets: linear positions, saturated at +-12
    ("no_relative", {}, 33),
])
def test_attention_layer_matches_float64(name, extra, seq):
    err, rule = _attention_case(name, batch=3, seq=seq, **extra)
    assert err < 1e-5, f"{name}: relative L2 {err:.2e}"
    if rule is not None and extra:
        hi, lo = rule.saturation
        t = fa.default_tiles(32, torch.float32)
        last = (seq - 1) // t.block_m * t.block_m
        far_below = last - t.block_n + 1 - hi >= 0      # the last query block has a saturated key block (index top)
        far_above = -(-(t.block_m - 1 - lo) // t.block_n) < -(-seq // t.block_n)  # the first has one at index 0
        assert far_below and far_above, "test too short to reach the far tiles"


def test_heads_in_groups_match_float64():
    """Long sequences take their heads in groups (tables under a memory budget): one head per launch here."""
    layer = make_model("v3_separate_keys", **SMALL_SPAN).encoder.layer[0].attention.self
    positions = fa.Positions(fa.PositionRule(8, 8, 16), torch.zeros(2, layer.num_attention_heads, 16, 32), 0, 1)
    tiles = fa.default_tiles(32, torch.float32)
    assert fa.heads_per_launch(positions, 3, 75, layer.num_attention_heads, 4, tiles, budget=1) == 1
    err, _ = _attention_case("v3_separate_keys", batch=3, seq=75, table_budget=1, **SMALL_SPAN)
    assert err < 1e-5


def test_head_groups_are_balanced():
    """Whatever the budget, the heads split into launches of equal size (no near-empty last launch), more heads
    per launch as the budget grows, all of them at once when it is large enough."""
    rule = fa.PositionRule(256, 256, 512)
    positions = fa.Positions(rule, torch.zeros(2, 6, 512, 64), 0, 1)
    tiles = fa.default_tiles(64, torch.float16)
    sizes = [fa.heads_per_launch(positions, 16, 512, 6, 2, tiles, budget=mib << 20) for mib in range(1, 400, 3)]
    for g in sizes:
        launches = -(-6 // g)
        assert g == -(-6 // launches), f"{g} heads per launch leaves an uneven last launch"
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 6 and 3 in sizes and 5 not in sizes


def _padding_kinds(seq=150):
    """Padding at the end, at the start, on both sides, a hole, a single token, none (one row each)."""
    mask = torch.zeros(7, seq, dtype=torch.int32)
    mask[0, :] = 1
    mask[1, :97] = 1
    mask[2, 40:] = 1
    mask[3, 5:140] = 1
    mask[4, 3:149] = 1
    mask[4, 70] = 0
    mask[5, 77] = 1
    return mask


def test_valid_ranges_mark_holes():
    """Each sequence's first and last token, and whether a padded token lies between them (the near kernel then
    masks keys in every block; without one only in the blocks at either end), over several scan chunks (SCAN is 64
    under the interpreter)."""
    mask = _padding_kinds()
    seq = mask.shape[1]
    got = fa.valid_ranges(mask.to(DEVICE)).cpu()
    want = [(0, 149, 0), (0, 96, 0), (40, 149, 0), (5, 139, 0), (3, 148, 1), (77, 77, 0), (seq, -1, 0)]
    assert got.shape == (7, fa.RANGE_WIDTH)
    assert [tuple(r[:3]) for r in got.tolist()] == want


@triton.jit
def _unmasked_blocks_kernel(RANGES, OUT, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    row = RANGES + fa.RANGE_WIDTH * b
    full_first, full_end = fa._unmasked_blocks(tl.load(row), tl.load(row + 1), tl.load(row + 2) != 0, BLOCK_N)
    tl.store(OUT + 2 * b, full_first)
    tl.store(OUT + 2 * b + 1, full_end)


@pytest.mark.parametrize("block", [16, 64])
def test_unmasked_blocks_hold_only_valid_keys(block):
    """The rule both attention kernels use to leave the key mask out of a block (`fa._unmasked_blocks`): a block
    without it holds valid tokens only, and where no padded token lies between the first and last valid ones every
    block of valid tokens goes without it."""
    mask = _padding_kinds()
    seq = mask.shape[1]
    ranges = fa.valid_ranges(mask.to(DEVICE))
    out = torch.empty(mask.shape[0], 2, dtype=torch.int32, device=DEVICE)
    _unmasked_blocks_kernel[(mask.shape[0],)](ranges, out, BLOCK_N=block)
    holes = ranges[:, 2].cpu() != 0
    checked = 0
    for b, (full_first, full_end) in enumerate(out.cpu().tolist()):
        for n in range(-(-seq // block)):
            keys = mask[b, n * block:(n + 1) * block]
            all_valid = (n + 1) * block <= seq and bool(keys.all())
            unmasked = full_first <= n < full_end
            assert all_valid or not unmasked, f"sequence {b}: block {n} holds a padded key but goes unmasked"
            if not holes[b]:
                assert unmasked == all_valid, f"sequence {b}: block {n} of valid keys takes the key mask"
            checked += unmasked
    assert checked > 0


def test_mostly_padded_sequences_match_float64():
    """Sequences far shorter than the batch's length: the kernels skip table rows, band tiles and key blocks past the
    last token (and one sequence with no token at all keeps Hugging Face's uniform rows)."""
    err, _ = _attention_case("v3", batch=4, seq=150, lengths=[150, 20, 131, 0], **SMALL_SPAN)
    assert err < 1e-5


@pytest.mark.parametrize("name", ["v3", "p2c_only", "no_relative"])
def test_padding_on_both_sides_and_holes_match_float64(name):
    """Saturated key blocks need the key mask only where a block holds the first or last token, or anywhere when a
    padded token lies between them: tokens starting and ending inside a block, a hole in the middle, a full row."""
    err, _ = _attention_case(name, batch=4, seq=75, spans=[(21, 75), (5, 67), (0, 75), (0, 75)], hole=(2, 30, 37),
                             **({} if name == "no_relative" else SMALL_SPAN))
    assert err < 1e-5


@pytest.mark.parametrize("name", ["v3", "c2p_only", "p2c_only"])
def test_saturated_blocks_through_tensor_descriptors_match_float64(monkeypatch, name):
    """fa.SATURATED_TMA: the unmasked saturated key blocks read K and V through a tensor descriptor over all of the
    batch's rows (a block must not reach into the next sequence's rows): padded and unpadded sequences, a hole."""
    monkeypatch.setattr(fa, "SATURATED_TMA", True)
    made = []
    monkeypatch.setattr(fa, "_kv_descriptor", lambda *a, real=fa._kv_descriptor: made.append(real(*a)) or made[-1])
    err, _ = _attention_case(name, batch=4, seq=75, spans=[(21, 75), (5, 67), (0, 75), (0, 75)], hole=(2, 30, 37),
                             **SMALL_SPAN)
    assert made and all(d is not None for d in made), "the descriptor path was not taken"
    assert err < 1e-5, f"{name}: relative L2 {err:.2e}"


HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the window band (Gluon, wgmma) runs on compute capability 9.x GPUs")
@pytest.mark.parametrize("name,extra", [
    ("v3", dict(hidden_size=128)),                          # 2 heads of 64, log buckets 32 / 64: far tiles too
    ("v3_span256", dict(hidden_size=256)),                  # v3's own span: every tile near at 300 tokens
    ("c2p_only", dict(hidden_size=128)),
    ("p2c_only", dict(hidden_size=128)),
    ("v3", dict(hidden_size=256, position_buckets=64, max_relative_positions=128)),  # 2 heads of 128
    ("linear", dict(hidden_size=128)),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["window", "near"])
def test_gluon_kernels_match_triton_band(name, extra, dtype, kernel):
    """fp16 / bf16 attention with the Gluon window band, or with the Gluon near attention (near tiles' softmax in
    the same kernel as their position terms), against the same with the Triton band (position tables and gathers),
    all against float64 Hugging Face on a padded batch: no worse than the Triton band to within 2% (they round the
    same products to the same dtype; the window band's sums come in another order, and the near attention adds the
    two terms to Q.Kᵀ without rounding their sum to the band's dtype: ~10% closer to float64), and fp16 within 1e-2.
    (bf16 is ~1.5e-2 here with any kernel: these test weights make attention sharp.)"""
    kw = dict(batch=3, seq=300, dtype=dtype, **extra)
    gluon, _ = _attention_case(name, band_kernel=kernel, **kw)
    triton_band, _ = _attention_case(name, band_kernel="triton", **kw)
    assert gluon < 1.02 * triton_band, f"{name}: {gluon:.3e} vs Triton band {triton_band:.3e}"
    assert kernel != "window" or abs(gluon - triton_band) < 0.02 * triton_band
    assert dtype != torch.float16 or gluon < 1e-2


@pytest.mark.skipif(not HOPPER, reason="the near attention (Gluon, wgmma) runs on compute capability 9.x GPUs")
@pytest.mark.parametrize("name", ["v3", "c2p_only", "p2c_only"])
def test_near_tail_overlap_matches_triton_band(monkeypatch, name):
    """fa.OVERLAP_NEAR_TAIL: the attention kernel as a programmatic dependent of the near kernel (saturated runs
    first, with C2P vectors of its own, then the near states once the near kernel is done), fp16 on a padded batch
    with far tiles, against the Triton band as in test_gluon_kernels_match_triton_band."""
    monkeypatch.setattr(fa, "OVERLAP_NEAR_TAIL", True)
    taken = []
    monkeypatch.setattr(fa, "_overlaps", lambda *a, real=fa._overlaps: taken.append(real(*a)) or taken[-1])
    kw = dict(batch=3, seq=300, dtype=torch.float16, hidden_size=128)
    overlapped, _ = _attention_case(name, band_kernel="near", **kw)
    assert any(taken), "the dependent launch was not taken"
    triton_band, _ = _attention_case(name, band_kernel="triton", **kw)
    assert overlapped < 1.02 * triton_band and overlapped < 1e-2, f"{name}: {overlapped:.3e} vs {triton_band:.3e}"


@pytest.mark.skipif(not HOPPER, reason="the near attention (Gluon, wgmma) runs on compute capability 9.x GPUs")
@pytest.mark.parametrize("share", [60, 100])
def test_near_tail_overlap_uneven_parts(monkeypatch, share):
    """near_attention.FIRST_SHARE under the overlap: two near parts a query block, the first taking `share` % of its
    near blocks (100: the second part has none and leaves an empty state), against the Triton band as above."""
    monkeypatch.setattr(fa, "OVERLAP_NEAR_TAIL", True)
    monkeypatch.setattr(near_attention, "FIRST_SHARE", share)
    monkeypatch.setattr(near_attention, "splits_for", lambda *a, **k: 2)
    taken = []
    monkeypatch.setattr(fa, "_overlaps", lambda *a, real=fa._overlaps: taken.append(real(*a)) or taken[-1])
    kernel = near_attention._near_attention_kernel
    shares = []

    class Spy:  # the share each near launch was given
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                shares.append(args[kernel.arg_names.index("FIRST_SHARE")])
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(near_attention, "_near_attention_kernel", Spy())
    kw = dict(batch=3, seq=300, dtype=torch.float16, hidden_size=128)
    overlapped, _ = _attention_case("v3", band_kernel="near", **kw)
    assert any(taken), "the dependent launch was not taken"
    assert shares and all(x == share for x in shares), shares
    triton_band, _ = _attention_case("v3", band_kernel="triton", **kw)
    assert overlapped < 1.02 * triton_band and overlapped < 1e-2, f"{overlapped:.3e} vs {triton_band:.3e}"


@pytest.mark.parametrize("seq", [1, 64, 300, 512, 513, 700, 2048])
@pytest.mark.parametrize("rule", [fa.PositionRule(256, 256, 512), fa.PositionRule(8, 8, 16),
                                  fa.PositionRule(64, -1, 64)])
def test_all_near_means_no_saturated_tile(seq, rule):
    """`all_near` (the near kernel then writes the context itself) holds exactly when no 64 x 64 tile has every
    distance i - j saturated, at the top index or at 0, counted from the rule's own index function."""
    block = 64
    top = 2 * rule.span - 1
    saturated = False
    for i0 in range(0, seq, block):
        for j0 in range(0, seq, block):
            idx = rule.index(torch.arange(i0 - j0 - block + 1, i0 - j0 + block))
            saturated |= bool((idx == top).all() or (idx == 0).all())
    assert fa.all_near(rule.saturation, seq, block, block) == (not saturated)


def test_near_kernel_parts(monkeypatch):
    """splits_for on an H100's 132 multiprocessors: PROGRAMS_PER_SM programs a multiprocessor alone,
    OVERLAP_PROGRAMS_PER_SM with the overlap, never more parts than near blocks, at least one."""
    monkeypatch.setattr(near_attention, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(near_attention, "PROGRAMS_PER_SM", 4)
    monkeypatch.setattr(near_attention, "OVERLAP_PROGRAMS_PER_SM", 2)
    parts = lambda *a: near_attention.splits_for(None, *a)  # noqa: E731
    assert parts(32, 6, 17) == 3 and parts(16, 6, 16) == 6 and parts(16, 6, 4) == 4 and parts(64, 32, 17) == 1
    assert parts(32, 6, 17, True) == 2 and parts(16, 6, 16, True) == 3 and parts(24, 6, 17, True) == 2


@pytest.mark.skipif(not HOPPER, reason="the near attention (Gluon, wgmma) runs on compute capability 9.x GPUs")
@pytest.mark.parametrize("writes,dtype", [("state", torch.float16), ("context", torch.float16),
                                          ("context", torch.bfloat16)])
def test_near_attention_on_mostly_padded_sequences(monkeypatch, writes, dtype):
    """Sequences that end early, one with no token and one with a hole of masked tokens longer than a tile, against
    the Triton band. "state": near and saturated tiles (a small span at 400 tokens), the near kernel's softmax state
    handed to the Triton kernel. "context": no saturated tile (v3's own span at 300 tokens), the near kernel writes
    the context itself, one program per query block, with no Triton kernel after it; padded query rows get the
    mean of V."""
    if writes == "state":
        name, kw = "v3", dict(seq=400, lengths=[400, 20, 331, 0, 400], hidden_size=128, **SMALL_SPAN)
    else:
        name, kw = "v3_span256", dict(seq=300, lengths=[300, 20, 231, 0, 300], hidden_size=256)
    kw.update(batch=5, dtype=dtype, hole=(4, 100, 250))
    triton_band, _ = _attention_case(name, band_kernel="triton", **kw)
    if writes == "context":
        class NotLaunched:
            def __getitem__(self, grid):
                raise AssertionError("the Triton attention kernel ran after the near kernel")
        monkeypatch.setattr(near_attention, "FINISH_PROGRAMS_PER_SM", 0)  # whatever the number of query blocks
        monkeypatch.setattr(fa, "_attention_kernel", NotLaunched())
    near, _ = _attention_case(name, band_kernel="near", **kw)
    assert near < 1.02 * triton_band, f"{near:.3e} vs Triton band {triton_band:.3e}"
    assert dtype != torch.float16 or near < 1e-2


@pytest.mark.parametrize("many_rows", [1 << 30, 0])
def test_add_layer_norm_matches_torch(monkeypatch, many_rows):
    """LayerNorm(x + residual) in one kernel, one row per program or 4 (from LAYER_NORM_MANY_ROWS rows on; 15 rows
    here, so the last program's rows run past the end), against PyTorch's LayerNorm in float64."""
    monkeypatch.setattr(fused_model, "LAYER_NORM_MANY_ROWS", many_rows)
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(48, eps=1e-7)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, residual = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    want = norm.double()(x.double() + residual.double())
    got = fused_model.add_layer_norm(x.to(DEVICE), residual.to(DEVICE), norm.float().to(DEVICE))
    assert _rel(got, want) < 1e-6


GEMM_DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 64, 128), (80, 96, 200), (200, 128, 64)])
@pytest.mark.parametrize("gelu", [True, False])
def test_gemm_linear_matches_float64(dtype, m, k, n, gelu):
    """gemm.linear (TMA descriptors; the FFN's up projection with the exact GELU as its epilogue) against float64:
    a partial last row block, K and N that are not multiples of the 64-wide tile (read as zeros, not stored)."""
    g = torch.Generator().manual_seed(m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    want = torch.nn.functional.gelu(want) if gelu else want
    x, w, b = (t.to(DEVICE, dtype) for t in (x, w, b))
    tma = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert gemm.usable(x, w) == (fa.INTERPRET or (tma and dtype != torch.float32))
    if tma and dtype != torch.float32:  # wider inputs stay on cuBLAS, where it measured faster (gemm.MAX_K)
        wide = gemm.MAX_K + 64
        assert not gemm.usable(torch.empty(8, wide, device=DEVICE, dtype=dtype), torch.empty(64, wide, device=DEVICE,
                                                                                              dtype=dtype))
    got = gemm.linear(x, w, b, gelu=gelu)
    assert got.dtype == dtype and got.shape == (m, n)
    # fp32: IEEE products; fp16 / bf16: one rounding of the float32 result (2^-11, 2^-8).
    limit = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    assert _rel(got, want) < limit


@pytest.mark.parametrize("act,fused", [("gelu", True), ("gelu_python", True), ("gelu_new", False), ("relu", False)])
def test_gelu_epilogue_only_for_the_exact_gelu(monkeypatch, act, fused):
    """The fused layer takes gemm.linear's GELU epilogue for the exact (erf) GELU only, once per layer, and the whole
    model matches Hugging Face in float64 either way (gelu_new is the tanh form: the epilogue would be off)."""
    calls = []
    linear = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    torch.manual_seed(2)
    ref_model = make_model("v3", hidden_act=act, **SMALL_SPAN).double()
    model = fused_model.fuse(copy.deepcopy(ref_model).to(DEVICE, torch.float32))
    ids = torch.randint(1, ref_model.config.vocab_size, (2, 50))
    mask = _mask(2, 50, seed=4)
    with torch.no_grad():
        want = fused_model.first_output(ref_model(input_ids=ids, attention_mask=mask))
        got = fused_model.first_output(model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)))
    assert _rel(got, want) < 1e-5
    # fp32 takes the epilogue under the interpreter only (on a GPU it stays on cuBLAS, see gemm.usable).
    assert len(calls) == (ref_model.config.num_hidden_layers if fused and fa.INTERPRET else 0)


@pytest.mark.skipif(not HOPPER, reason="the GELU epilogue runs in fp16 / bf16 on compute capability 9.x GPUs")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_model_with_gelu_epilogue_matches_float32(monkeypatch, dtype):
    """fp16 / bf16 whole model with the GELU epilogue against Hugging Face in float32, padded batch: within 1e-2 in
    fp16, and in either dtype no further off than Hugging Face's own model in that dtype (the error with the epilogue
    off is run beside it and shown when the check fails)."""
    torch.manual_seed(3)
    ref = make_model("v3", "DebertaV2ForSequenceClassification", **SMALL_SPAN).to(DEVICE)
    ids = torch.randint(1, ref.config.vocab_size, (4, 96), device=DEVICE)
    mask = _mask(4, 96, seed=5).to(DEVICE)
    ids[mask == 0] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        hf_half = copy.deepcopy(ref).to(dtype)(input_ids=ids, attention_mask=mask).logits
        errs = {}
        for on in (True, False):
            monkeypatch.setattr(fused_model, "GELU_EPILOGUE", on)
            fused = fused_model.fuse(copy.deepcopy(ref).to(dtype))
            got = fused(input_ids=ids, attention_mask=mask).logits
            assert not got.isnan().any()
            errs[on] = _rel(got, want)
    hf_err = _rel(hf_half, want)
    assert errs[True] < max(1.5 * hf_err, 2e-3), (errs, hf_err)
    assert dtype != torch.float16 or errs[True] < 1e-2


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _compiled_for_hopper(*args: str) -> dict:
    """scripts/inspect_kernels.py run without TRITON_INTERPRET (compiling for sm_90 with the triton wheel's compiler
    and ptxas) with `args`: its table's rows by kernel name, each split at "|"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPTS / "inspect_kernels.py"), *args], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split("|")[1].strip(): line.split("|") for line in out.stdout.splitlines() if line.startswith("| _")}


def _script(name: str):
    """scripts/<name>.py imported as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gluon_kernels_compile_for_hopper():
    """The Gluon kernels (and the Triton kernels beside them) compile for sm_90 on any machine: Triton's compiler
    and ptxas ship in its wheel (scripts/inspect_kernels.py, run without TRITON_INTERPRET). The GPU tests above check
    the numbers."""
    # 700 tokens: near and saturated tiles; 64 x 512 tokens: every tile near, the near kernel writes the context.
    for band, kernel, seq, batch in (("window", "_window_band_kernel", "700", "2"),
                                     ("near", "_near_attention_kernel", "700", "2"),
                                     ("near", "_near_attention_kernel", "512", "64")):
        for dtype, dim in (("fp16", "64"), ("bf16", "128")):
            rows = _compiled_for_hopper("--band", band, "--seq-len", seq, "--batch-size", batch, "--heads", "2",
                                        "--head-dim", dim, "--dtype", dtype)
            assert kernel in rows and "_near_band_kernel" not in rows and "_position_tables_kernel" not in rows
            assert ("_attention_kernel" in rows) == (seq == "700"), "the Triton kernel after the near one, or not"
            assert rows[kernel][-3].strip() == "True", f"no wgmma in {kernel}'s PTX"
            # ptxas serialises no tensor-core product of the Gluon kernels, nor of the Triton kernel after the near
            # kernel (its C7515 advisory; NOTES.md, v32), nor, with the default MASKED_LOOP_STAGES, of the one without
            # near states (window band).
            for name, row in rows.items():
                assert row[-2].strip() != "True", f"ptxas serialises {name}'s wgmma ({band}, {seq} x {batch})"


def test_pipelined_masked_loops_stop_wgmma_serialisation():
    """fused_attention.MASKED_LOOP_STAGES (v32; 2, the default, timed faster on an H100): the Triton kernel without
    near states (window band) compiled for sm_90 has its wgmma serialised by ptxas with the masked loops unpipelined,
    and not with them in two stages."""
    serialised = {}
    for stages in ("1", "2"):
        rows = _compiled_for_hopper("--band", "window", "--seq-len", "512", "--heads", "6", "--masked-loop-stages",
                                    stages)
        serialised[stages] = rows["_attention_kernel"][-2].strip()
    assert serialised == {"1": "True", "2": "False"}, serialised


@pytest.mark.parametrize("seq,overlap", [("2048", True), ("4096", False)])
def test_near_tail_overlap_compiles_unserialised(tmp_path, seq, overlap):
    """fused_attention.OVERLAP_NEAR_TAIL (the default) compiled for sm_90 on an H100's 132 SMs: at 1 x 2048 (192
    programs after the near kernel) both kernels take their griddepcontrol instruction (launch_dependents in the near
    kernel, wait in the one after it) and the products stay pipelined; at 4096 (384 programs) neither, and the
    kernel after the near kernel is the one without overlap."""
    rows = _compiled_for_hopper("--band", "near", "--seq-len", seq, "--dump", str(tmp_path))
    assert all(row[-2].strip() != "True" for row in rows.values())
    assert ("griddepcontrol.launch_dependents" in (tmp_path / "_near_attention_kernel.ptx").read_text()) == overlap
    assert ("griddepcontrol.wait" in (tmp_path / "_attention_kernel.ptx").read_text()) == overlap
    off = _compiled_for_hopper("--band", "near", "--seq-len", seq, "--no-overlap-near-tail")
    assert off["_attention_kernel"][4].strip() == "148"
    assert (rows["_attention_kernel"][4].strip() != "148") == overlap


def test_recording_kernels_compile_for_hopper(tmp_path):
    """The near kernel and the attention kernel after it, with each program recording its times
    (program_times.RECORDING, scripts/gpu_program_times.py), compile for sm_90 with their products still pipelined,
    read the timers, and store 8 numbers a program from one thread (the kernel after the near kernel, its
    programmatic dependent, reads the global timer once more, before its wait); without RECORDING they read no
    timer."""
    rows = _compiled_for_hopper("--band", "near", "--seq-len", "2048", "--record-times", "--dump", str(tmp_path / "on"))
    assert {"_near_attention_kernel", "_attention_kernel"} <= set(rows)
    assert all(row[-2].strip() != "True" for row in rows.values())
    _compiled_for_hopper("--band", "near", "--seq-len", "2048", "--dump", str(tmp_path / "off"))
    for kernel in ("_near_attention_kernel", "_attention_kernel"):
        on = (tmp_path / "on" / f"{kernel}.ptx").read_text()
        timers = 3 if kernel == "_attention_kernel" else 2
        assert on.count("%globaltimer") == timers and on.count("%clock64") == 2 and on.count("%smid") == 1, kernel
        assert on.count("st.global.b64") == 8, kernel
        off = (tmp_path / "off" / f"{kernel}.ptx").read_text()
        assert "%globaltimer" not in off and "%clock64" not in off, kernel


def test_program_times_summary():
    """program_times.summary on a made-up launch: three programs on two SMs (two side by side on SM 0), clocks
    running at 2 a ns."""
    us = 1000
    rows = np.array([[0, 0, 10 * us, 0, 20 * us, 5, 0, 0],
                     [0, 2 * us, 6 * us, 4 * us, 12 * us, 6, 0, 0],
                     [1, 1 * us, 4 * us, 2 * us, 8 * us, 7, 0, 0]])
    s = program_times.summary(rows, multiprocessors=2)
    assert (s["span us"], s["programs"], s["most on one SM"], s["SMs used"]) == (10, 3, 2, 2)
    assert s["program us mean"] == pytest.approx(17 / 3) and s["program us max"] == pytest.approx(10)
    assert s["SM busy %"] == pytest.approx(65) and s["first SM idle at us"] == pytest.approx(4)
    assert s["slowest query blocks"] == "5: 10.0, 6: 4.0, 7: 3.0"
    assert s["running at each tenth"] == "1 2 3 3 2 2 1 1 1 1"  # at 0.5, 1.5, ... 9.5 us
    assert program_times.summary(rows, multiprocessors=3)["first SM idle at us"] == 0  # one SM never had work


def test_gemm_check_kernels_match_float32():
    """The Triton GEMMs (bias and GELU epilogues, pointer loads and TMA descriptors, a partial last row block) and the
    in-place GELU that scripts/gpu_gemm_check.py times against cuBLAS give the float32 product's numbers."""
    _script("gpu_gemm_check").check_kernels(DEVICE)  # raises SystemExit when a kernel is off


def test_flash_ceiling_kernels_match_float64():
    """The bare flash-attention loops scripts/gpu_flash_ceiling.py times against SDPA (TMA descriptors and pointer
    loads, one and several key blocks a query block) compute attention."""
    _script("gpu_flash_ceiling").check_kernels(DEVICE)  # raises SystemExit when a kernel is off


def test_wrong_span_is_caught(monkeypatch):
    """The tolerance is tight enough that a position table one bucket off fails."""
    err, _ = _attention_case("v3", batch=2, seq=40, **SMALL_SPAN)
    assert err < 1e-5
    orig = fa.PositionRule.from_config

    def shifted(config):
        rule = orig(config)
        return fa.PositionRule(rule.span, rule.buckets, rule.max_position + 7)
    monkeypatch.setattr(fa.PositionRule, "from_config", staticmethod(shifted))
    err, _ = _attention_case("v3", batch=2, seq=40, **SMALL_SPAN)
    assert err > 1e-3


@pytest.mark.parametrize("name,head,extra", [
    ("v3", "DebertaV2ForSequenceClassification", SMALL_SPAN),
    ("v3_separate_keys", "DebertaV2Model", dict(conv_kernel_size=3, conv_act="gelu")),  # v2-style conv layer
    ("linear", "DebertaV2ForTokenClassification", {}),
])
def test_whole_model_matches_float64(name, head, extra):
    torch.manual_seed(1)
    ref_model = make_model(name, head, **extra).double()
    fused = fused_model.fuse(copy.deepcopy(ref_model).float().to(DEVICE))
    seq = 66
    ids = torch.randint(1, ref_model.config.vocab_size, (2, seq))
    mask = _mask(2, seq, seed=3)
    ids[mask == 0] = 0
    with torch.no_grad():
        want = fused_model.first_output(ref_model(input_ids=ids, attention_mask=mask))
        got = fused_model.first_output(fused(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)))
    assert _rel(got, want) < 1e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_graph_runner_matches_eager_and_releases_memory():
    """Replays equal eager calls at several shapes, and a dropped runner gives all its memory back (a new warm-up
    stream per capture used to leave cuBLAS's per-stream workspace behind, 32 MiB per shape on an H100)."""
    import gc
    model = fused_model.fuse(make_model("v3", **SMALL_SPAN).to(DEVICE).half())

    def shapes(runner, lengths):
        for seq in lengths:
            ids = torch.randint(1, 100, (2, seq), device=DEVICE)
            mask = _mask(2, seq, seed=seq).to(DEVICE)
            with torch.no_grad():
                want = fused_model.first_output(model(input_ids=ids, attention_mask=mask)).clone()
            assert _rel(runner(ids, mask), want) < 1e-3

    shapes(fused_model.GraphRunner(model), [40, 48])  # first captures: one-time allocations
    gc.collect()
    base = torch.cuda.memory_allocated()
    shapes(fused_model.GraphRunner(model), [56, 64, 72])
    gc.collect()
    assert torch.cuda.memory_allocated() - base < 1 << 20


def test_fused_refuses_what_it_cannot_do():
    model = fused_model.fuse(make_model("v3", **SMALL_SPAN).to(DEVICE))
    ids = torch.randint(1, 100, (1, 20), device=DEVICE)
    with pytest.raises(UserError, match="output_attentions"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    with pytest.raises(UserError, match="not a Hugging Face DebertaV2"):
        fused_model.fuse(torch.nn.Linear(2, 2))
    train = make_model("v3").train()
    with pytest.raises(UserError, match="eval"):
        fused_model.fuse(train)


def test_fused_script_on_tiny_config():
    """The top-level script: PASS against Hugging Face FP32 (fp32 under the interpreter here, compiled on a GPU)."""
    from conftest import run_script
    proc = run_script("deberta_fused_inference.py", "--shape", "tiny", "--seq-len", "40", "--batch-size", "2",
                      "--dtype", "fp32", "--iterations", "2", "--warmup", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS: fused vs Hugging Face FP32" in proc.stdout and "median ms" in proc.stdout
    bad = run_script("deberta_fused_inference.py", "--shape", "tiny", "--seq-len", "1")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")


def test_skew_bank_model():
    """scripts/skew_banks.py's bank model: the committed orders of the near kernel's skews (window_band.SPREAD_BITS,
    SPREAD_QUERY_BITS) give every store and read of a warp one wavefront, and the model does see a conflict: the
    order of v17 ... v42 (queries in their own order) reads C2P in two, as ncu counted (NOTES.md, v43). The same orders
    keep NOTES.md item 1's shared [64, 192] P2C product conflict-free at the pitch its notes name (258 / 257), and not
    at a pitch of 256."""
    banks = _script("skew_banks")
    orders = (banks.wb.SPREAD_BITS, banks.wb.SPREAD_BITS, banks.wb.SPREAD_QUERY_BITS)
    committed = banks.accesses(*orders)
    assert committed == {"product stores": 1.0, "C2P read": 1.0, "P2C read": 1.0}
    assert set(banks.shared_p2c(*orders, pitch=258).values()) == {1.0}
    assert banks.shared_p2c(*orders, pitch=256)["product stores"] == 8.0
    old = banks.accesses(banks.wb.SPREAD_BITS, banks.KEY_ORDER_V17, banks.NATURAL)
    assert old["C2P read"] == 2.0 and old["P2C read"] == 1.0
    # The bit tables are the kernel's own orders (its Gluon functions, evaluated on integers) and permute the 64
    # rows: a table that dropped a row could look conflict-free.
    wb = banks.wb
    for order, bits in ((wb._spread, wb.SPREAD_BITS), (wb._spread_queries, wb.SPREAD_QUERY_BITS)):
        rows = [banks.buffer_index(n, bits) for n in range(64)]
        assert rows == [order.fn(n) for n in range(64)] and sorted(rows) == list(range(64))
