#!/usr/bin/env python3
"""Run a DeBERTa ONNX model with ONNX Runtime (TensorRT execution provider, then CUDA, then CPU): latency, or the
per-layer correctness check between the original and plugin models.

    python deberta_ort_inference.py --onnx ./test/deberta_plugin.onnx --test fp16
    python deberta_ort_inference.py --onnx ./test/deberta --correctness-check fp32
"""

import argparse

from rich.progress import Progress

from deberta_tools import compare, inputs, onnx_io, ort_session, report
from deberta_tools.errors import run_main
from deberta_tools.timing import measure


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="model for --test; root name (./test/deberta) for "
                        "--correctness-check")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--test", choices=["fp32", "fp16"], help="measure latency in this precision")
    what.add_argument("--correctness-check", choices=["fp32", "fp16"], help="compare every layer's attention "
                      "scores of <root>_correctness_check_original.onnx and _plugin.onnx")
    parser.add_argument("--provider", choices=ort_session.ORDER, help="execution provider (default: the first "
                        "available of tensorrt, cuda, cpu)")
    parser.add_argument("--batch-size", type=int, default=1, help="default 1")
    parser.add_argument("--seq-len", type=int, help="default: the model's sequence length")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--iterations", type=int, default=100, help="timed runs (default 100, at least 100 for "
                        "reported numbers)")
    parser.add_argument("--seed", type=int, default=0, help="random input seed")
    return parser.parse_args()


def run_test(args):
    _, feeds, seq_len = inputs.for_model(args.onnx, args.batch_size, args.seq_len, args.seed)
    sess = ort_session.open_session(args.onnx, args.provider, fp16=args.test == "fp16")
    run = ort_session.timed_runner(sess, feeds)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"timing {args.iterations} runs", total=args.iterations)
        latency = measure(run, args.warmup, args.iterations, progress=lambda i: progress.update(task, completed=i))
    note = " (plugin replaced by its standard-op reference)" if sess.reference else ""
    print(report.environment({"provider": sess.provider}))
    print(f"{args.onnx}: batch {args.batch_size}, sequence {seq_len}, {args.test}, {sess.provider}{note}")
    print(report.latency_table([(f"{args.test} b{args.batch_size} s{seq_len}", latency)]))


def run_correctness(args):
    original_path, plugin_path = onnx_io.correctness_pair(args.onnx)
    _, feeds, seq_len = inputs.for_model(plugin_path, args.batch_size, args.seq_len, args.seed)
    fp16 = args.correctness_check == "fp16"
    results = []
    for path in (original_path, plugin_path):
        # Both models get the plugin's padded length, so they see identical inputs.
        sess = ort_session.open_session(path, args.provider, fp16=fp16, pad=True)
        results.append(sess.run(feeds))
        print(f"{path.name}: {sess.provider}" + (" (plugin replaced by its standard-op reference)"
                                                  if sess.reference else ""))
    original, fused = results
    rows = [compare.error_row(name, fused[name], original[name]) for name in original]
    tolerance = compare.TOLERANCE[args.correctness_check]
    print(report.environment())
    print(f"batch {args.batch_size}, sequence {seq_len}, {args.correctness_check}: plugin model vs original")
    print(report.correctness_lines(rows))
    ok, line = report.verdict(rows, args.correctness_check, tolerance)
    print(line)
    return 0 if ok else 1


def main():
    args = parse_args()
    return run_test(args) if args.test else run_correctness(args)


if __name__ == "__main__":
    run_main(main)
