#!/usr/bin/env python3
"""On a CUDA GPU: the fused path's correctness on whole models and its kernel timings, in one run.

1. The kernel's log-bucket index against Hugging Face's make_log_bucket_position computed on this GPU and on the CPU.
2. Whole models, fp16 and bf16 fused vs the fp32 Hugging Face model (TF32 off), padded batch, for the demo config
   and v3-xsmall/base/large-shaped random configs: relative L2 on the real tokens, NaN check.
3. The attention kernel alone at S=2048 (and the other lengths) against PyTorch SDPA (flash) on the same Q/K/V
   shapes, for a few tile choices.

    python scripts/gpu_fused_check.py [--quick]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import export, fused_attention as fa, fused_model, report  # noqa: E402
from deberta_tools.benchmark import valid_rel_l2  # noqa: E402
from deberta_tools.inputs import random_inputs  # noqa: E402


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
            feeds = random_inputs(batch, seq, model.config.vocab_size, seed=seq)
            ids = torch.from_numpy(feeds["input_ids"]).cuda()
            mask = torch.from_numpy(feeds["attention_mask"]).cuda()
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


def kernel_timing(seqs, tiles_list):
    rows = []
    heads, dim, span = 6, 64, 256
    rule = fa.PositionRule(256, 256, 512)
    for seq in seqs:
        qkv = torch.randn(1, seq, 3 * heads * dim, device="cuda", dtype=torch.float16)
        pos = torch.randn(2, heads, 2 * span, dim, device="cuda", dtype=torch.float16)
        mask = torch.ones(1, seq, dtype=torch.int32, device="cuda")
        tables = fa.position_scores(qkv, pos, (0, heads * dim), heads, dim)
        t_tab = do_bench(lambda: fa.position_scores(qkv, pos, (0, heads * dim), heads, dim), return_mode="median")
        q, k, v = qkv.view(1, seq, 3, heads, dim).permute(2, 0, 3, 1, 4).contiguous()
        t_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), return_mode="median")
        for tiles in tiles_list:
            try:
                run = lambda: fa.attention(qkv, mask, heads, dim, rule, tables, 0, 1, 0.07, tiles=tiles)  # noqa
                t = do_bench(run, return_mode="median")
            except Exception as err:  # resource limits of a tile choice
                rows.append([str(seq), str(tiles), f"failed: {type(err).__name__}", "", "", ""])
                continue
            rows.append([str(seq), f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}",
                         f"{t * 1e3:.1f}", f"{t_tab * 1e3:.1f}", f"{t_sdpa * 1e3:.1f}", f"{t / t_sdpa:.2f}"])
    print(report.table(["seq", "tiles", "fused attention us", "position tables us", "SDPA us",
                        "attention / SDPA"], rows))


def variant_timing(seqs, tiles):
    """Where the kernel's time goes: every tile gathered (near), every tile saturated (far), no position terms."""
    rows = []
    heads, dim, span = 6, 64, 256
    rule = fa.PositionRule(256, 256, 512)
    big = 1 << 20
    for seq in seqs:
        qkv = torch.randn(1, seq, 3 * heads * dim, device="cuda", dtype=torch.float16)
        pos = torch.randn(2, heads, 2 * span, dim, device="cuda", dtype=torch.float16)
        mask = torch.ones(1, seq, dtype=torch.int32, device="cuda")
        tables = fa.position_scores(qkv, pos, (0, heads * dim), heads, dim)
        q, k, v = qkv.view(1, seq, 3, heads, dim).permute(2, 0, 3, 1, 4).contiguous()
        graph_time = {}
        cases = {
            "real": lambda: fa.attention(qkv, mask, heads, dim, rule, tables, 0, 1, 0.07, tiles=tiles),
            "all near (gather)": lambda: fa.attention(qkv, mask, heads, dim, rule, tables, 0, 1, 0.07, tiles=tiles,
                                                      saturation=(big, -big)),
            "all far (vectors)": lambda: fa.attention(qkv, mask, heads, dim, rule, tables, 0, 1, 0.07, tiles=tiles,
                                                      saturation=(-big, big)),
            "no position terms": lambda: fa.attention(qkv, mask, heads, dim, None, None, None, None, 0.07,
                                                      tiles=tiles),
            "position tables": lambda: fa.position_scores(qkv, pos, (0, heads * dim), heads, dim),
            "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        }
        for name, fn in cases.items():
            fn()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(10):
                    fn()
            graph_time[name] = do_bench(graph.replay, return_mode="median") / 10
        rows += [[str(seq), name, f"{t * 1e3:.1f}"] for name, t in graph_time.items()]
    print(f"tiles {tiles}, 10 launches per CUDA graph replay (no host launch cost):")
    print(report.table(["seq", "case", "us per call"], rows))


def end_to_end(seqs, batch_list):
    rows = []
    model = export.random_model(export.seed_config(512)).cuda().half()
    fused = fused_model.fuse(model)
    runner = fused_model.GraphRunner(fused)
    for batch in batch_list:
        for seq in seqs:
            feeds = random_inputs(batch, seq, model.config.vocab_size, seed=1)
            ids = torch.from_numpy(feeds["input_ids"]).cuda()
            mask = torch.from_numpy(feeds["attention_mask"]).cuda()
            torch.cuda.reset_peak_memory_stats()
            t = do_bench(lambda: runner(ids, mask), warmup=50, rep=300, return_mode="median")
            rows.append([str(batch), str(seq), f"{t:.3f}", f"{batch * 1e3 / t:,.0f}",
                         f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"])
            runner.graphs.clear()
            torch.cuda.empty_cache()
    print(report.table(["batch", "seq", "fused + CUDA graph ms", "sequences/s", "peak GiB"], rows))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--variants-only", action="store_true")
    parser.add_argument("--tile-sweep", action="store_true", help="kernel variants for several tile shapes")
    args = parser.parse_args()
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    for tiles in ([fa.Tiles(64, 64, 4, 2)] if not args.tile_sweep else
                  [fa.Tiles(64, 64, 4, 2), fa.Tiles(64, 64, 4, 3), fa.Tiles(64, 32, 4, 2), fa.Tiles(64, 64, 8, 2),
                   fa.Tiles(32, 64, 4, 2), fa.Tiles(128, 64, 8, 3), fa.Tiles(32, 32, 2, 2)]):
        variant_timing([512, 2048, 8192], tiles)
    if args.variants_only:
        return
    index_check()
    if not args.skip_models:
        model_check(["seed", "v3-xsmall", "v3-base", "v3-large"], [512] if args.quick else [512, 777], batch=4)
    tiles = [fa.Tiles(64, 64, 4, 2), fa.Tiles(64, 64, 4, 3), fa.Tiles(128, 64, 8, 2), fa.Tiles(128, 64, 4, 2),
             fa.Tiles(128, 32, 4, 2), fa.Tiles(64, 32, 4, 2), fa.Tiles(128, 128, 8, 2), fa.Tiles(32, 64, 4, 2)]
    kernel_timing([512, 2048, 8192], tiles)
    end_to_end([512, 2048, 8192], [1])
    end_to_end([512], [8, 32, 64])


if __name__ == "__main__":
    main()
