#!/usr/bin/env python3
"""Build TensorRT engines from DeBERTa ONNX models, measure their latency, and check plugin engines against the
original per layer.

    python deberta_tensorrt_inference.py --onnx ./test/deberta_plugin.onnx --build fp16 --test fp16
    python deberta_tensorrt_inference.py --onnx ./test/deberta --correctness-check fp16
"""

import argparse
import importlib.util
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from deberta_tools import compare, engine_files, inputs, onnx_io, precision, report
from deberta_tools.errors import UserError, run_main
from deberta_tools.inputs import cut_back, pad_to_multiple
from deberta_tools.plugin import count_nodes
from deberta_tools.timing import measure_cuda

PRECISIONS = ["fp32", "tf32", "fp16"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="model for --build/--test; root name (./test/deberta) for "
                        "--correctness-check")
    parser.add_argument("--build", nargs="+", choices=PRECISIONS, default=[], help="build engines in these "
                        "precisions, saved as <model>_<GPU>_<precision>.engine (existing ones are reused)")
    parser.add_argument("--test", choices=PRECISIONS, help="measure latency of the engine in this precision")
    parser.add_argument("--correctness-check", choices=PRECISIONS, help="compare the engines of "
                        "<root>_correctness_check_original.onnx and _plugin.onnx layer by layer (builds them if "
                        "missing)")
    parser.add_argument("--force", action="store_true", help="rebuild engines that already exist")
    parser.add_argument("--batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), default=[1, 1, 1],
                        help="batch sizes of the optimization profile (default 1 1 1)")
    parser.add_argument("--seq-len", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), help="sequence lengths of "
                        "the optimization profile (default: the model's length for all three)")
    parser.add_argument("--workspace", type=int, default=4096, help="workspace memory pool limit in MiB "
                        "(default 4096)")
    parser.add_argument("--cuda-graph", action="store_true", help="with --test: time replays of a CUDA graph")
    parser.add_argument("--iterations", type=int, default=100, help="timed runs (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    args = parser.parse_args()
    if not (args.build or args.test or args.correctness_check):
        parser.error("nothing to do: pass --build, --test and/or --correctness-check")
    if args.correctness_check and (args.build or args.test):
        parser.error("--correctness-check takes the root name and builds its own engines; run --build/--test "
                     "separately")
    return args


class Context:
    """The GPU, TensorRT and profile settings shared by every step of one invocation."""

    def __init__(self, args):
        import torch

        from deberta_tools import tensorrt_runtime as rt

        if not torch.cuda.is_available():
            raise UserError("no CUDA GPU is visible to torch; TensorRT engines need one", exit_code=2)
        self.rt, self.args = rt, args
        self.device = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        self.capability = f"{major}{minor}"
        self.gpu = engine_files.gpu_short_name(self.device)
        self.console = Console(stderr=True)

    def engine(self, onnx_path: Path, prec: str, force: bool = False) -> Path:
        """Build (or reuse) the engine of `onnx_path` in precision `prec`; returns its path."""
        path = engine_files.engine_path(onnx_path, self.gpu, prec)
        if path.is_file() and not force:
            problem = engine_files.mismatch(engine_files.EngineInfo.load(path), self.rt.TRT_VERSION, self.device,
                                            self.capability)
            if problem:
                raise UserError(f"{path} cannot run here: {problem}; rebuild it with --build {prec} --force")
            print(f"Reusing {path} (--force rebuilds)")
            return path
        model = onnx_io.load(onnx_path, load_external_data=False)
        problem = engine_files.precision_problem(prec, precision.graph_precision(model), self.rt.STRONGLY_TYPED,
                                                 onnx_path)
        if problem:
            raise UserError(problem)
        seq_len = onnx_io.default_seq_len(model)
        seq = tuple(self.args.seq_len or (seq_len, seq_len, seq_len))
        inputs = [i.name for i in model.graph.input]
        profile = engine_files.profile_shapes(inputs, tuple(self.args.batch), seq, plugin=count_nodes(model) > 0)
        with self.console.status(f"Building {path.name} with TensorRT {self.rt.TRT_VERSION} (minutes)"):
            data = self.rt.build_engine(onnx_path, prec, profile, self.args.workspace)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        engine_files.EngineInfo(self.rt.TRT_VERSION, self.device, self.capability, prec, onnx_path.name,
                                {k: list(v) for k, v in profile.items()}).save(path)
        print(f"Saved {path}")
        return path

    def load(self, path: Path):
        return self.rt.Engine(path.read_bytes(), str(path))


def run_test(ctx: Context, onnx_path: Path):
    import torch

    engine = ctx.load(ctx.engine(onnx_path, ctx.args.test))
    batch = ctx.args.batch[1]
    seq_opt = ctx.args.seq_len[1] if ctx.args.seq_len else None
    model, feeds, seq_len = inputs.for_model(onnx_path, batch, seq_opt)
    if count_nodes(model):
        feeds, _ = pad_to_multiple(feeds)
    engine.bind(feeds)
    stream = torch.cuda.Stream()
    with Progress(transient=True) as progress:
        task = progress.add_task(f"timing {ctx.args.iterations} runs", total=ctx.args.iterations)
        latency = measure_cuda(engine.runner(stream), stream, ctx.args.warmup, ctx.args.iterations,
                               ctx.args.cuda_graph, progress=lambda i: progress.update(task, completed=i))
    print(report.environment({"tensorrt": ctx.rt.TRT_VERSION, "torch": torch.__version__, "gpu": ctx.device}))
    label = f"{ctx.args.test} b{batch} s{seq_len}" + (" cuda-graph" if ctx.args.cuda_graph else "")
    print(report.latency_table([(label, latency)]))


def run_correctness(ctx: Context):
    prec = ctx.args.correctness_check
    original_onnx, plugin_onnx = onnx_io.correctness_pair(ctx.args.onnx)
    _, feeds, seq_len = inputs.for_model(plugin_onnx, ctx.args.batch[1], ctx.args.seq_len[1] if ctx.args.seq_len else None)
    padded, _ = pad_to_multiple(feeds)   # both engines see the plugin's padded inputs
    import torch

    results = []
    for onnx_path in (original_onnx, plugin_onnx):
        engine = ctx.load(ctx.engine(onnx_path, prec, ctx.args.force))
        engine.bind(padded)
        stream = torch.cuda.Stream()
        engine.runner(stream)()
        axes = onnx_io.sequence_axes(onnx_io.load(onnx_path, load_external_data=False))
        results.append({k: cut_back(v, seq_len, axes.get(k, [])) for k, v in engine.outputs_on_host().items()})
    original, fused = results
    rows = [compare.error_row(name, fused[name], original[name]) for name in original]
    print(report.environment({"tensorrt": ctx.rt.TRT_VERSION, "gpu": ctx.device}))
    print(f"batch {ctx.args.batch[1]}, sequence {seq_len}, {prec}: plugin engine vs original engine")
    print(report.correctness_lines(rows))
    ok, line = report.verdict(rows, prec, compare.TOLERANCE[prec])
    print(line)
    return 0 if ok else 1


def main():
    args = parse_args()
    if importlib.util.find_spec("tensorrt") is None:
        raise UserError("TensorRT is not installed; install the GPU extras with: "
                        "pip install -r requirements-gpu.txt", exit_code=2)
    ctx = Context(args)
    if args.correctness_check:
        return run_correctness(ctx)
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    for prec in args.build:
        ctx.engine(onnx_path, prec, args.force)
    if args.test:
        run_test(ctx, onnx_path)
    return 0


if __name__ == "__main__":
    run_main(main)
