#!/usr/bin/env python3
"""On a CUDA GPU: the fused path's correctness on whole models and its kernel timings, in one run.

1. The kernel's log-bucket index against Hugging Face's make_log_bucket_position computed on this GPU and on the CPU.
2. Whole models, fp16 and bf16 fused vs the fp32 Hugging Face model (TF32 off), padded batch, for the demo config
   and v3-xsmall/base/large-shaped random configs: relative L2 on the real tokens, NaN check.
3. The attention kernel (real mix of tiles, all far, no position terms, tables alone) against PyTorch SDPA on the
   same Q/K/V shapes (the backend SDPA picks; `--attention-layers` also times each backend forced), for one or
   several tile choices.
4. The whole fused model in a CUDA graph (latency, sequences/s, peak memory), a per-kernel profile of one forward,
   and where the memory goes at 8192 tokens.

    python scripts/gpu_fused_check.py [--quick] [--skip-models] [--variants-only] [--tile-sweep] [--graph-memory]
                                      [--band auto|near|window|triton] [--compare-bands] [--near-sweep]
                                      [--near-ablation] [--near-registers] [--launch-gaps]
                                      [--attention-layers] [--models-only] [--end-to-end] [--masked-stages]
                                      [--model-shape seed|v3-xsmall|v3-small|v3-base|v3-large]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import compare, export, fused_attention as fa, fused_model, near_attention, report  # noqa: E402
from deberta_tools import window_band  # noqa: E402
from deberta_tools.timing import graph_us as _graph_us  # noqa: E402
from deberta_tools.benchmark import valid_rel_l2  # noqa: E402
from deberta_tools import inputs  # noqa: E402
from deberta_tools.inputs import random_inputs  # noqa: E402


def _cuda_inputs(model, batch, seq, seed):
    """Random token ids and a padded mask (rows after the first shorter) on the GPU, for `model`'s vocabulary."""
    feeds = random_inputs(batch, seq, model.config.vocab_size, seed=seed)
    return torch.from_numpy(feeds["input_ids"]).cuda(), torch.from_numpy(feeds["attention_mask"]).cuda()


def index_check():
    rows = []
    for rule in (fa.PositionRule(256, 256, 512), fa.PositionRule(256, 256, 256), fa.PositionRule(128, 128, 512)):
        from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
        rel = torch.arange(-20000, 20001, device="cuda")
        got = fa.kernel_index(rule, rel).long()
        gpu = torch.clamp(make_log_bucket_position(rel, rule.buckets, rule.max_position).long() + rule.span, 0,
                          2 * rule.span - 1)
        cpu = rule.index(rel.cpu()).cuda()
        rows.append([str(rule), str(int((got != gpu).sum())), str(int((got != cpu).sum())), str(rule.saturation)])
    print(report.table(["rule", "mismatches vs HF on GPU", "vs HF on CPU", "saturation (hi, lo)"], rows))


def model_check(shapes, seqs, batch):
    rows = []
    for shape in shapes:
        model = export.random_model(export.shaped_config(shape)).cuda()
        for seq in seqs:
            ids, mask = _cuda_inputs(model, batch, seq, seed=seq)
            torch.backends.cuda.matmul.allow_tf32 = False
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
                for dtype in (torch.float16, torch.bfloat16):
                    fused = fused_model.fuse(copy.deepcopy(model).to(dtype))
                    out = fused(input_ids=ids, attention_mask=mask).last_hidden_state
                    hf = copy.deepcopy(model).to(dtype)(input_ids=ids, attention_mask=mask).last_hidden_state
                    rows.append([shape, str(seq), str(batch), str(dtype).split(".")[-1],
                                 f"{valid_rel_l2(out, ref, mask):.2e}", f"{valid_rel_l2(hf, ref, mask):.2e}",
                                 str(bool(torch.isfinite(out).all().item()))])
                    del fused
        del model
        torch.cuda.empty_cache()
    print(report.table(["shape", "seq", "batch", "dtype", "fused rel L2 vs fp32", "HF same dtype rel L2",
                        "finite"], rows))


def variant_timing(seqs, tiles_list, batch=1):
    """Where the kernel's time goes, per tile choice: the real mix of tiles, every tile saturated (far), no position
    terms (plain flash attention with a padding mask), the position tables alone and with the near band, and SDPA
    on the same shapes; the real mix and the band with either band kernel (Triton: position tables, then gathers;
    window: the Gluon band and the edge vectors from the relative embeddings, one launch). "all tiles far" uses the default
    band kernel."""
    rows = []
    heads, dim = 6, 64
    big = 1 << 20
    for seq in seqs:
        qkv, positions, mask = inputs.attention_layer(seq, batch, heads, dim)
        q, k, v = qkv.view(batch, seq, 3, heads, dim).permute(2, 0, 3, 1, 4).contiguous()
        ranges = fa.valid_ranges(mask)
        sdpa = _graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for tiles in tiles_list:
            sat = positions.rule.saturation
            rows_ = fa._table_rows(seq)
            slots = fa.near_slots(sat, seq, tiles.block_m, tiles.block_n)
            cases = {
                "real, Triton band": lambda: fa.attention(qkv, mask, heads, dim, positions, 0.07, tiles=tiles,
                                                          band_kernel="triton"),
                "tables only": lambda: fa.position_tables(qkv, mask, ranges, heads, dim, positions),
                "tables + near band": lambda: fa.near_band(
                    fa.position_tables(qkv, mask, ranges, heads, dim, positions)[0], mask, ranges, positions, tiles,
                    heads),
                "real, window band": lambda: fa.attention(qkv, mask, heads, dim, positions, 0.07, tiles=tiles,
                                                          band_kernel="window"),
                "window band + edges only": lambda: window_band.near_band(
                    qkv, mask, ranges, positions, heads, dim, 0, heads, rows_, slots, sat),
                "real, near attention": lambda: fa.attention(qkv, mask, heads, dim, positions, 0.07, tiles=tiles,
                                                             band_kernel="near"),
                "near attention state only": lambda: near_attention.near_state(
                    qkv, mask, ranges, positions, heads, dim, 0, heads, rows_, sat, 0.1),
                "all tiles far": lambda: fa.attention(qkv, mask, heads, dim, positions, 0.07, tiles=tiles,
                                                      saturation=(-big, big)),
                "no position terms": lambda: fa.attention(qkv, mask, heads, dim, None, 0.07, tiles=tiles),
            }
            for name, fn in cases.items():
                try:
                    t = _graph_us(fn)
                except Exception as err:  # resource limits of a tile choice
                    rows.append([str(seq), _tiles(tiles), name, f"failed: {type(err).__name__}", "", ""])
                    continue
                rows.append([str(seq), _tiles(tiles), name, f"{t:.1f}", f"{sdpa:.1f}", f"{t / sdpa:.2f}"])
    print(f"batch {batch}, 6 heads of 64, fp16, rule (256, 256, 512); 10 launches per CUDA graph replay:")
    print(report.table(["seq", "tiles", "case", "us per call", "SDPA us", "/ SDPA"], rows))


def near_ablation(cases):
    """The near kernel's time with its position terms switched off one at a time (constexpr HAS_C2P / HAS_P2C: the
    window product and skew of that term are compiled out), for where its time goes; results are then wrong."""
    rows = []
    heads, dim = 6, 64
    for batch, seq in cases:
        qkv, positions, mask = inputs.attention_layer(seq, batch, heads, dim)
        ranges = fa.valid_ranges(mask)
        sat = positions.rule.saturation
        rows_ = fa._table_rows(seq)
        out = torch.empty(batch, seq, heads * dim, device="cuda", dtype=qkv.dtype)
        q, k, v = qkv.view(batch, seq, 3, heads, dim).permute(2, 0, 3, 1, 4).contiguous()
        sdpa = _graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for name, c2p, p2c in (("c2p + p2c", 0, 1), ("c2p only", 0, None), ("p2c only", None, 1),
                               ("no position terms", None, None)):
            pos = fa.Positions(positions.rule, positions.pos, c2p, p2c)
            if near_attention.finishes(qkv.device, batch, seq, heads, sat):
                fn = lambda: near_attention.near_output(qkv, mask, ranges, pos, heads, dim, sat, 0.1, out)  # noqa: E731
                kind = "context"
            else:
                fn = lambda: near_attention.near_state(qkv, mask, ranges, pos, heads, dim, 0, heads, rows_, sat, 0.1)  # noqa: E731
                kind = "state"
            rows.append([str(batch), str(seq), kind, name, f"{_graph_us(fn):.1f}", f"{sdpa:.1f}"])
    print("near kernel alone, 6 heads of 64, fp16, rule (256, 256, 512); 10 launches per CUDA graph replay:")
    print(report.table(["batch", "seq", "writes", "terms", "us per call", "SDPA (all tiles) us"], rows))


def _tiles(t):
    return f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}"


# The model the end-to-end timings build (`--model-shape`): the demo config or a v3 checkpoint's shape.
MODEL_SHAPE = "seed"


def _model(seq_config=512):
    return export.random_model(export.shaped_config(MODEL_SHAPE, seq_config)).cuda().half()


def _sdpa_backends_us(q, k, v):
    """Microseconds per call of PyTorch SDPA on q, k, v with each backend forced (FlashAttention-2, cuDNN, memory
    efficient), None where the backend does not take these inputs on this GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        try:
            times[name] = _graph_us(run)
        except RuntimeError as error:  # "No available kernel" for this backend
            print(f"SDPA {name}: {str(error).splitlines()[0]}")
            times[name] = None
    return times


def attention_layers(shapes, label, backends=False):
    """One attention layer of the demo config's shape (6 heads of 64, v3 position rule, no padding) in a CUDA graph
    of 10 calls, median, against PyTorch SDPA on the same Q/K/V with the backend it picks itself (cuDNN's on an H100
    with torch 2.11), and with `backends` also each backend forced (`_sdpa_backends_us`)."""
    rows = []
    names = ["flash", "cuDNN", "efficient"] if backends else []
    for batch, seq in shapes:
        qkv, positions, mask = inputs.attention_layer(seq, batch)
        ranges = fa.valid_ranges(mask)
        layer = _graph_us(lambda: fa.attention(qkv, mask, 6, 64, positions, 0.07, ranges=ranges))
        q, k, v = qkv.view(batch, seq, 3, 6, 64).permute(2, 0, 3, 1, 4).contiguous()
        sdpa = _graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        forced = _sdpa_backends_us(q, k, v) if backends else {}
        cells = [f"{forced[n]:.1f}" if forced[n] else "n/a" for n in names]
        ratios = [f"{layer / forced[n]:.2f}" if forced[n] else "n/a" for n in names]
        rows.append([label, f"{batch} x {seq}", f"{layer:.1f}", f"{sdpa:.1f}", *cells, f"{layer / sdpa:.2f}", *ratios])
    print(report.table(["", "batch x seq", "attention layer us", "SDPA us", *[f"SDPA {n} us" for n in names],
                        "layer / SDPA", *[f"layer / {n}" for n in names]], rows))


def masked_stages(settings):
    """A/B of fa.MASKED_LOOP_STAGES (the masked key-block loops of attention kernels that do not start from near
    states), alternating: one attention layer with the window band at 1 x 512 (the default there), with the
    Triton band (the default off Hopper) at 512 and 2048, and with no position terms at 2048 (SDPA beside them);
    then the whole model at 1 x 512 once per setting."""
    original = fa.MASKED_LOOP_STAGES
    rows = []
    try:
        for stages in settings:
            fa.MASKED_LOOP_STAGES = stages
            for seq, name, band, with_positions in ((512, "window band", "window", True),
                                                    (512, "Triton band", "triton", True),
                                                    (2048, "Triton band", "triton", True),
                                                    (2048, "no position terms", None, False)):
                qkv, positions, mask = inputs.attention_layer(seq)
                ranges = fa.valid_ranges(mask)
                pos = positions if with_positions else None
                t = _graph_us(lambda: fa.attention(qkv, mask, 6, 64, pos, 0.07, ranges=ranges, band_kernel=band))
                q, k, v = qkv.view(1, seq, 3, 6, 64).permute(2, 0, 3, 1, 4).contiguous()
                sdpa = _graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
                rows.append([str(stages), f"1 x {seq}", name, f"{t:.1f}", f"{sdpa:.1f}"])
        print(report.table(["masked loop stages", "batch x seq", "attention layer", "us per call", "SDPA us"], rows))
        for stages in dict.fromkeys(settings):
            fa.MASKED_LOOP_STAGES = stages
            end_to_end([512], [1], label=f"masked loop stages {stages}")
    finally:
        fa.MASKED_LOOP_STAGES = original


def flag_ab(flag, settings, module=fa):
    """A/B of a setting of fused_attention (SATURATED_TMA, OVERLAP_NEAR_TAIL) or of another module (near_attention's
    PROGRAMS_PER_SM, OVERLAP_PROGRAMS_PER_SM, FIRST_SHARE), alternating: first the layer's output with each value
    against the first on padded batches small enough for OVERLAP_NEAR_TAIL's grid rule (1 x 2048 with 1500 tokens,
    2 x 1000 with 1000 and 700 and a hole; the values differ only in how the same products are scheduled or summed,
    so they must agree to fp16 rounding); then one attention layer at 1 x 768 ... 4096, 2 x 1024 and 4 x 2048
    against SDPA, and the whole model at 1 x 1024, 1536, 2048, 8192 and 32 x 512, per value."""
    original = getattr(module, flag)
    values = list(dict.fromkeys(settings))
    try:
        for batch, seq, lengths, hole in ((1, 2048, (1500,), None), (2, 1000, (1000, 700), (1, 300, 420))):
            qkv, positions, mask = inputs.attention_layer(seq, batch)
            for b, length in enumerate(lengths):
                mask[b, length:] = 0
            if hole:
                mask[hole[0], hole[1]:hole[2]] = 0
            outs = []
            for value in values:
                setattr(module, flag, value)
                outs.append(fa.attention(qkv, mask, 6, 64, positions, 0.07).float())
            for value, out in zip(values[1:], outs[1:]):
                err = compare.relative_l2(out.cpu().numpy(), outs[0].cpu().numpy())
                print(f"{batch} x {seq}, lengths {lengths}, hole {hole}: {flag}={value} against {values[0]}, "
                      f"relative L2 {err:.1e}, finite {bool(torch.isfinite(out).all())}")
                if not err < 1e-3 or not torch.isfinite(out).all():
                    raise SystemExit(f"{flag}: {value} and {values[0]} disagree")
        for value in settings:
            setattr(module, flag, value)
            attention_layers([(1, 768), (1, 1024), (1, 1536), (1, 2048), (2, 1024), (1, 4096), (4, 2048)],
                             f"{flag}={value}")
        for value in values:
            setattr(module, flag, value)
            end_to_end([1024, 1536, 2048, 8192], [1], label=f"{flag}={value}")
            end_to_end([512], [32], label=f"{flag}={value}")
    finally:
        setattr(module, flag, original)


def end_to_end(seqs, batch_list, tiles=None, label="default tiles", budget=None):
    rows = []
    model = _model()
    fused = fused_model.fuse(model)
    original, original_budget = fa.default_tiles, fa.TABLE_BUDGET
    if tiles is not None:
        fa.default_tiles = lambda *a, **k: tiles
    if budget is not None:
        fa.TABLE_BUDGET = budget
        label = f"{label}, table budget {budget >> 20} MiB"
    try:
        runner = fused_model.GraphRunner(fused)
        for batch in batch_list:
            for seq in seqs:
                ids, mask = _cuda_inputs(model, batch, seq, seed=1)
                torch.cuda.reset_peak_memory_stats()
                t = do_bench(lambda: runner(ids, mask), warmup=50, rep=300, return_mode="median")
                rows.append([label, str(batch), str(seq), f"{t:.3f}", f"{batch * 1e3 / t:,.0f}",
                             f"{torch.cuda.max_memory_allocated() / 2**30:.3f}"])
                runner.graphs.clear()
                torch.cuda.empty_cache()
    finally:
        fa.default_tiles, fa.TABLE_BUDGET = original, original_budget
    print(report.table(["tiles", "batch", "seq", "fused + CUDA graph ms", "sequences/s", "peak GiB"], rows))


def _warm_runner(seq, batch):
    """A GraphRunner of the demo model with its graph for (batch, seq) captured and replayed a few times."""
    model = _model()
    runner = fused_model.GraphRunner(fused_model.fuse(model))
    ids, mask = _cuda_inputs(model, batch, seq, seed=1)
    for _ in range(5):
        runner(ids, mask)
    torch.cuda.synchronize()
    return runner, ids, mask


def profile(seq, batch):
    """CUDA time per kernel name over one replayed forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    runner, ids, mask = _warm_runner(seq, batch)
    # Eager run under the profiler (graph replays show as one item): same kernels as the captured graph.
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name[:60]
            count, us = totals.get(name, (0, 0.0))
            totals[name] = (count + 1, us + e.device_time)
    total = sum(us for _, us in totals.values()) / 10
    rows = [[name, str(count // 10), f"{us / 10:.1f}", f"{100 * us / 10 / total:.0f}%"]
            for name, (count, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:14]]
    print(f"batch {batch}, seq {seq}: GPU time per forward {total:.0f} us, launches per forward "
          f"{sum(c for c, _ in totals.values()) // 10}")
    print(report.table(["kernel", "launches", "us per forward", "share"], rows))


def launch_gaps(seq, batch, label):
    """Kernels of one replayed CUDA graph of a forward on the GPU's clock (torch.profiler): the span from the first
    kernel's start to the last one's end against the kernels' summed durations, and the time between one kernel's
    end and the next one's start (negative where two kernels overlap), by who launches the next one."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    runner, ids, mask = _warm_runner(seq, batch)
    replays = 20
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            runner(ids, mask)
            torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower())
    per = len(kernels) // replays
    ours = ("_attention_kernel", "_near_attention_kernel", "_window_band_kernel", "_add_layer_norm_kernel",
            "_valid_ranges_kernel")
    spans, busy, gaps = [], [], {True: [], False: []}
    for r in range(replays):
        run = kernels[r * per:(r + 1) * per]
        spans.append(max(e for _, e, _ in run) - run[0][0])
        busy.append(sum(e - s for s, e, _ in run))
        for (_, end, _), (start, _, name) in zip(run, run[1:]):
            gaps[name.startswith(ours)].append(start - end)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(report.table(["", "batch", "seq", "kernels", "span us", "kernel time us", "gap before ours us (median, n)",
                        "gap before others us (median, n)"],
                       [[label, str(batch), str(seq), str(per), f"{med(spans):.1f}", f"{med(busy):.1f}",
                         f"{med(gaps[True]):.2f} ({len(gaps[True]) // replays})",
                         f"{med(gaps[False]):.2f} ({len(gaps[False]) // replays})"]]))


def memory(seq):
    """Where the peak goes at one long sequence: weights, the fused weights, one forward."""
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = _model()
    weights = torch.cuda.memory_allocated() - base
    fused = fused_model.fuse(model)
    ids, mask = _cuda_inputs(model, 1, seq, seed=1)
    with torch.no_grad():
        fused(input_ids=ids, attention_mask=mask)
    prepared = torch.cuda.memory_allocated() - base - weights
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fused(input_ids=ids, attention_mask=mask)
    peak = torch.cuda.max_memory_allocated() - base
    mib = 2 ** 20
    print(report.table(["seq", "weights MiB", "fused extras MiB", "forward peak MiB (all)", "activations MiB"],
                       [[str(seq), f"{weights / mib:.0f}", f"{prepared / mib:.0f}", f"{peak / mib:.0f}",
                         f"{(peak - weights - prepared) / mib:.0f}"]]))


def graph_memory(seq, budgets):
    """Peak memory and latency at one long sequence, eager and through GraphRunner (capture, replay), timed both as
    here (triton do_bench) and as the benchmark times its cells (deberta_tools.timing.measure_cuda)."""
    from deberta_tools import timing
    rows = []
    original = fa.TABLE_BUDGET
    try:
        for budget in budgets:
            fa.TABLE_BUDGET = budget
            model = _model()
            fused = fused_model.fuse(model)
            ids, mask = _cuda_inputs(model, 1, seq, seed=1)
            gib = 2 ** 30
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                fused(input_ids=ids, attention_mask=mask)
            eager = torch.cuda.max_memory_allocated()
            runner = fused_model.GraphRunner(fused)
            torch.cuda.reset_peak_memory_stats()
            runner(ids, mask)
            capture = torch.cuda.max_memory_allocated()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            runner(ids, mask)
            replay = torch.cuda.max_memory_allocated()
            bench = do_bench(lambda: runner(ids, mask), warmup=50, rep=300, return_mode="median")
            events = timing.measure_cuda(lambda: runner(ids, mask), torch.cuda.current_stream(), warmup=10,
                                         iterations=100).median_ms
            rows.append([str(seq), f"{budget >> 20}", f"{base / gib:.3f}", f"{eager / gib:.3f}", f"{capture / gib:.3f}",
                         f"{held / gib:.3f}", f"{replay / gib:.3f}", f"{bench:.3f}", f"{events:.3f}"])
            runner = fused = model = None
            torch.cuda.empty_cache()
    finally:
        fa.TABLE_BUDGET = original
    # "allocated before": the weights, plus what earlier rows left in the process (cuBLAS's per-stream workspaces).
    print(report.table(["seq", "table budget MiB", "allocated before GiB", "eager peak", "capture peak",
                        "held after capture", "replay peak", "do_bench ms", "CUDA events ms"], rows))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--variants-only", action="store_true")
    parser.add_argument("--skip-variants", action="store_true")
    parser.add_argument("--graph-memory", action="store_true", help="only the 8192-token memory and timing probe")
    parser.add_argument("--tile-sweep", action="store_true", help="kernel variants and end to end for several tiles")
    parser.add_argument("--band", choices=["auto", "near", "window", "triton"], default="auto",
                        help="near band kernel for the model checks, end to end and profiles")
    parser.add_argument("--compare-bands", action="store_true",
                        help="kernel variants (batch 1 and 32) and end to end with each band kernel, then stop")
    parser.add_argument("--near-sweep", action="store_true",
                        help="end to end with the near attention for several near_attention.PROGRAMS_PER_SM (the "
                             "near kernel's parts where the kernel after it does not overlap it), then stop")
    parser.add_argument("--near-ablation", action="store_true",
                        help="the near kernel with its position terms switched off one at a time, then stop")
    parser.add_argument("--near-registers", action="store_true",
                        help="the near kernel under register caps (more programs per multiprocessor), then stop")
    parser.add_argument("--attention-layers", action="store_true",
                        help="only one attention layer against PyTorch SDPA (its own pick and each backend forced) "
                             "at 768 ... 8192 tokens")
    parser.add_argument("--model-shape", choices=[s for s in export.SHAPES if s != "tiny"], default="seed",
                        help="the model of the end-to-end timings (the A/B runs' and --end-to-end's): the demo "
                             "config (seed) or a v3 checkpoint's shape with random weights")
    parser.add_argument("--masked-stages", action="store_true",
                        help="only the A/B of fa.MASKED_LOOP_STAGES (1 against 2, alternating), then stop")
    parser.add_argument("--saturated-tma", action="store_true",
                        help="only the A/B of fa.SATURATED_TMA (False against True, alternating), then stop")
    parser.add_argument("--overlap-near-tail", action="store_true",
                        help="only the A/B of fa.OVERLAP_NEAR_TAIL (False against True, alternating), then stop")
    parser.add_argument("--programs-per-sm", type=int, nargs="+", metavar="N",
                        help="A/B of near_attention.PROGRAMS_PER_SM over these values, alternating")
    parser.add_argument("--overlap-programs-per-sm", type=int, nargs="+", metavar="N",
                        help="A/B of near_attention.OVERLAP_PROGRAMS_PER_SM over these values, alternating")
    parser.add_argument("--first-share", type=int, nargs="+", metavar="PERCENT",
                        help="A/B of near_attention.FIRST_SHARE (NOTES.md v58), these values in this order")
    parser.add_argument("--models-only", action="store_true",
                        help="only the index check and the fp16 / bf16 whole-model checks (4 shapes, 512 and 777 "
                             "tokens, batch 4, padded)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="only the whole model in a CUDA graph, batch 1 at 512 ... 8192 tokens and 32 x 512")
    parser.add_argument("--launch-gaps", action="store_true",
                        help="kernel time against the span of a replayed forward, and the gaps between kernels")
    args = parser.parse_args()
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    global MODEL_SHAPE
    MODEL_SHAPE = args.model_shape
    if MODEL_SHAPE != "seed":
        print(f"end-to-end model: {MODEL_SHAPE}-shaped, random weights")
    fa.BAND_KERNEL = args.band
    if args.compare_bands:
        variant_timing([512, 2048, 8192], [fa.Tiles(64, 64, 4, 3)])
        variant_timing([512], [fa.Tiles(64, 64, 4, 3)], batch=32)
        for band in ("triton", "window", "near"):
            fa.BAND_KERNEL = band
            end_to_end([512, 1024, 2048, 4096, 8192], [1], label=f"default tiles, {band} band")
            end_to_end([512], [32], label=f"default tiles, {band} band")
        return
    if args.end_to_end:
        end_to_end([512, 1024, 2048, 4096, 8192], [1])
        end_to_end([512], [32])
        return
    if args.launch_gaps:
        for seq in (512, 2048):
            launch_gaps(seq, 1, "default")
        return
    if args.near_ablation:
        near_ablation([(1, 512), (1, 2048), (32, 512), (1, 8192)])
        return
    if args.near_registers:
        for cap in (None, 168, 128):
            near_attention.MAX_REGISTERS = cap
            print(f"register cap {cap}")
            near_ablation([(1, 512), (1, 2048), (32, 512)])
        near_attention.MAX_REGISTERS = 168
        end_to_end([512, 2048], [1], label="register cap 168")
        end_to_end([512], [32], label="register cap 168")
        return
    if args.masked_stages:
        masked_stages([1, 2, 1, 2])
        return
    if args.saturated_tma:
        flag_ab("SATURATED_TMA", [False, True, False, True])
        return
    if args.overlap_near_tail:
        flag_ab("OVERLAP_NEAR_TAIL", [False, True, False, True])
        return
    if args.programs_per_sm:
        flag_ab("PROGRAMS_PER_SM", args.programs_per_sm, near_attention)
        return
    if args.overlap_programs_per_sm:
        flag_ab("OVERLAP_PROGRAMS_PER_SM", args.overlap_programs_per_sm, near_attention)
        return
    if args.first_share:
        flag_ab("FIRST_SHARE", args.first_share, near_attention)
        return
    if args.attention_layers:
        attention_layers([(1, 768), (1, 1024), (1, 1536), (1, 2048), (2, 1024), (1, 4096), (1, 8192)], "default",
                         backends=True)
        return
    if args.models_only:
        index_check()
        model_check(["seed", "v3-xsmall", "v3-base", "v3-large"], [512, 777], batch=4)
        return
    if args.near_sweep:
        fa.BAND_KERNEL = "near"
        for per_sm in (1, 2, 4, 5, 6, 8):
            near_attention.PROGRAMS_PER_SM = per_sm
            end_to_end([512, 1024, 2048, 8192], [1], label=f"near, {per_sm} programs per SM")
            end_to_end([512], [32], label=f"near, {per_sm} programs per SM")
        return
    if args.graph_memory:
        graph_memory(8192, [64 << 20, 96 << 20, 128 << 20, 1 << 40])
        return
    sweep = [fa.Tiles(64, 64, 4, 3), fa.Tiles(64, 64, 4, 2), fa.Tiles(32, 64, 4, 2), fa.Tiles(128, 64, 8, 2),
             fa.Tiles(128, 128, 8, 2)]
    if not args.skip_variants:
        variant_timing([512, 2048, 8192], sweep if args.tile_sweep else sweep[:1])
        if args.tile_sweep:
            variant_timing([512], sweep, batch=32)
    if args.variants_only:
        return
    index_check()
    if not args.skip_models:
        model_check(["seed", "v3-xsmall", "v3-base", "v3-large"], [512] if args.quick else [512, 777], batch=4)
    end_to_end([512, 1024, 2048, 4096, 8192], [1])
    end_to_end([512], [8, 32, 64])
    for budget in (64 << 20, 128 << 20, 1 << 40):
        end_to_end([8192], [1], budget=budget)
    if args.tile_sweep:
        for tiles in sweep:
            end_to_end([512, 2048, 8192], [1], tiles, _tiles(tiles))
            end_to_end([512], [32], tiles, _tiles(tiles))
    profile(512, 1)
    profile(2048, 1)
    profile(512, 32)
    profile(8192, 1)
    memory(8192)


if __name__ == "__main__":
    main()
