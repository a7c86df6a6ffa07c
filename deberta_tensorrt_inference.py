#!/usr/bin/env python3
"""Build TensorRT engines from DeBERTa ONNX models, measure their latency, and check plugin engines against the
original per layer.

    python deberta_tensorrt_inference.py --onnx ./test/deberta_plugin.onnx --build fp16 --test fp16
    python deberta_tensorrt_inference.py --onnx ./test/deberta --correctness-check fp16
"""

import argparse

from deberta_tools.errors import UserError, run_main

PRECISIONS = ["fp32", "tf32", "fp16"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="model for --build/--test; root name (./test/deberta) for "
                        "--correctness-check")
    parser.add_argument("--build", nargs="+", choices=PRECISIONS, default=[], help="build engines in these "
                        "precisions (saved as <model>_<GPU>_<precision>.engine)")
    parser.add_argument("--test", choices=PRECISIONS, help="measure latency of the engine in this precision")
    parser.add_argument("--correctness-check", choices=PRECISIONS, help="compare the two correctness-check engines "
                        "layer by layer")
    parser.add_argument("--force", action="store_true", help="rebuild engines that already exist")
    parser.add_argument("--batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), help="batch sizes of the "
                        "optimization profile (default 1 1 1)")
    parser.add_argument("--seq-len", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), help="sequence lengths of "
                        "the optimization profile (default: the model's length for all three)")
    parser.add_argument("--workspace", type=int, default=4096, help="workspace memory pool limit in MiB "
                        "(default 4096)")
    parser.add_argument("--cuda-graph", action="store_true", help="time replays of a captured CUDA graph")
    parser.add_argument("--iterations", type=int, default=100, help="timed runs (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    args = parser.parse_args()
    if not (args.build or args.test or args.correctness_check):
        parser.error("nothing to do: pass --build, --test and/or --correctness-check")
    return args


def main():
    args = parse_args()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise UserError("TensorRT is not installed; install the GPU extras with: "
                        "pip install -r requirements-gpu.txt", exit_code=2) from None
    raise UserError("engine build and inference with TensorRT are not implemented yet in this version "
                    "(tracked as the TensorRT issue); use deberta_ort_inference.py or trtexec meanwhile", exit_code=2)


if __name__ == "__main__":
    run_main(main)
