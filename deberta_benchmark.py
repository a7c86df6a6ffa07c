#!/usr/bin/env python3
"""Measure one DebertaV2 model on every backend side by side: latency per sequence length, throughput per batch
size, peak GPU memory and accuracy against PyTorch FP32. Writes a markdown table, a JSON file and a PNG plot.

    python deberta_benchmark.py --shape seed --seq-len 512 1024 2048 --output-dir results/bench
    python deberta_benchmark.py --shape seed --seq-len 512 --batch-size 1 8 32 64 --backends fused-fp16-graphs
"""

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deberta_tools import benchmark, export, plot, report
from deberta_tools.errors import UserError, run_main

BACKENDS = [b.name for b in benchmark.all_backends()]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--variant", help="Hugging Face model id or save_pretrained folder (pretrained weights)")
    source.add_argument("--shape", choices=export.SHAPES, help="random weights in this config: the demo's ('seed', "
                        "default), a DeBERTa-v3 checkpoint's shape, or 'tiny' (CPU smoke runs)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512], help="sequence lengths (default 512)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--backends", nargs="+", default=["all"], metavar="NAME",
                        help=f"'all' (default) or some of: {', '.join(BACKENDS)}")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per cell (default 10)")
    parser.add_argument("--iterations", type=int, default=100, help="timed runs per cell (default 100)")
    parser.add_argument("--output-dir", default="results/benchmark", help="where results.md, results.json and "
                        "latency.png go (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = parser.parse_args()
    if args.variant is None and args.shape is None:
        args.shape = "seed"
    return args


def main():
    args = parse_args()
    console = Console(stderr=True)
    names = BACKENDS if args.backends == ["all"] else args.backends
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if min(args.seq_len) < 2 or min(args.batch_size) < 1 or args.iterations < 1 or args.warmup < 0:
        raise UserError("sequence lengths must be >= 2, batch sizes and --iterations >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")

    if args.variant:
        with console.status(f"Loading {args.variant}"):
            model = export.load_variant(args.variant)
        shape = args.variant.rstrip("/").split("/")[-1]
    else:
        model = export.random_model(export.shaped_config(args.shape, max(args.seq_len)))
        shape = args.shape
    backends = [b for b in benchmark.all_backends() if b.name in names]
    labels = {b.name: b.label for b in backends}
    shapes = [(b, s) for b in sorted(set(args.batch_size)) for s in sorted(set(args.seq_len))]
    env = report.gpu_environment()
    config = model.config
    title = (f"{shape}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
             f"{config.num_attention_heads} heads, {env['device']}")
    print(title)
    print(", ".join(f"{k} {v}" for k, v in env.items()))

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / "cells.partial.jsonl"   # every finished cell at once, in case the run is cut short
    partial.write_text("")
    with tempfile.TemporaryDirectory(prefix="deberta-bench-") as work:
        ctx = benchmark.Context(model, shape, device, Path(work), args.warmup, args.iterations,
                                exportable=not args.variant)
        with console.status("PyTorch FP32 reference outputs"):
            references = benchmark.reference_outputs(ctx, shapes)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as bar:
            cells_task = bar.add_task("cells", total=len(backends) * len(shapes))
            runs_task = bar.add_task("runs", total=args.iterations)

            def on_start(backend, batch, seq):
                bar.update(cells_task, description=f"{backend.name} batch {batch} seq {seq}")
                bar.reset(runs_task)

            def on_cell(cell):
                with partial.open("a") as f:
                    f.write(json.dumps(cell.to_json()) + "\n")
                bar.advance(cells_task)
                text = f"{cell.median_ms:.3f} ms" if cell.ok else f"— {cell.note}"
                bar.console.print(f"  {cell.backend:<20} batch {cell.batch:<3} seq {cell.seq:<5} {text}")

            cells = benchmark.run_all(ctx, backends, shapes, references, on_start, on_cell,
                                      progress=lambda n: bar.update(runs_task, completed=n))
        labels.update({b.name: b.label for b in backends})  # ONNX Runtime labels name the provider after setup

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    sections = [f"# {title}", "", f"`{command}`", "", ", ".join(f"{k} {v}" for k, v in env.items()), "",
                f"Median and p90 of {args.iterations} runs after {args.warmup} warm-up runs"
                f"{' (CUDA events)' if device.type == 'cuda' else ' (host clock)'}; peak GiB is PyTorch's "
                "allocator peak during the cell, weights included; relative L2 against PyTorch FP32 on the real "
                "(unpadded) tokens.", ""]
    for batch in sorted(set(args.batch_size)):
        if len(args.seq_len) > 1 or len(args.batch_size) == 1:
            sections += [f"## Latency, batch {batch}", "", report.benchmark_latency_table(cells, labels, batch), ""]
    if len(args.batch_size) > 1:
        for seq in sorted(set(args.seq_len)):
            sections += [f"## Throughput, sequences/s at sequence {seq}", "",
                         report.benchmark_throughput_table(cells, labels, seq), ""]
    markdown = "\n".join(sections)
    plot_path = None
    try:
        plot_path = plot.latency_plot(cells, labels, min(args.batch_size), title, out_dir / "latency.png")
    except ImportError:
        console.print("matplotlib is not installed: no plot (pip install matplotlib)")
    if plot_path:
        markdown += "\n![latency against sequence length](latency.png)\n"
    data = {"command": command, "title": title, "environment": env, "iterations": args.iterations,
            "warmup": args.warmup, "config": config.to_diff_dict(), "labels": labels,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cells": [c.to_json() for c in cells]}
    for name, text in (("results.json", json.dumps(data, indent=1, default=str)), ("results.md", markdown)):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)
    partial.unlink()
    print(markdown)
    print(f"Wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}" + (f", {plot_path}" if plot_path else ""))


if __name__ == "__main__":
    run_main(main)
