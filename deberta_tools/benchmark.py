"""The benchmark's backends and cells: every way to run one DebertaV2 model, timed the same way.

A backend is set up once (model conversion, compilation, ONNX export), runs all its cells, and is torn down before
the next one starts, so the peak GPU memory of a cell is that backend's alone (weights included). A backend that
cannot run here raises `Unavailable` with the reason, which the tables print in its cells.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import fused_model, timing
from .compare import relative_l2
from .inputs import random_inputs

ROOT = Path(__file__).resolve().parents[1]


class Unavailable(Exception):
    """This backend cannot run here; the message says why (printed in its cells)."""


@dataclass
class Cell:
    backend: str
    batch: int
    seq: int
    median_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0
    peak_gib: float | None = None
    rel_l2: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.median_ms is not None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """What every backend shares: the fp32 model on the CPU, the device, a work folder and timing settings."""

    model: torch.nn.Module
    shape: str
    device: torch.device
    workdir: Path
    warmup: int = 10
    iterations: int = 100
    exportable: bool = True   # a --shape config that deberta_pytorch2onnx.py --shape can export
    onnx_files: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def inputs(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random non-zero token ids; batches > 1 are padded like real ones (every row after the first shorter)."""
        feeds = random_inputs(batch, seq, self.model.config.vocab_size, seed=batch * 100003 + seq)
        return (torch.from_numpy(feeds["input_ids"]).to(self.device),
                torch.from_numpy(feeds["attention_mask"]).to(self.device))


class Backend:
    name = ""
    label = ""
    needs_cuda = False
    tracks_memory = True   # peak memory read from torch's allocator

    def setup(self, ctx: Context) -> None:
        if self.needs_cuda and not ctx.cuda:
            raise Unavailable("needs a CUDA GPU")

    def runner(self, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def context(self):
        return contextlib.nullcontext()

    def teardown(self) -> None:
        pass


def _tf32(enabled: bool):
    @contextlib.contextmanager
    def manager():
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return manager()


class TorchEager(Backend):
    def __init__(self, name: str, label: str, dtype: torch.dtype, tf32: bool = False, needs_cuda: bool = False):
        self.name, self.label, self.dtype, self.tf32, self.needs_cuda = name, label, dtype, tf32, needs_cuda

    def setup(self, ctx):
        super().setup(ctx)
        self.model = self._prepare(copy.deepcopy(ctx.model).to(ctx.device, self.dtype))

    def _prepare(self, model):
        return model

    def runner(self, ids, mask):
        model = self.model

        def run():
            with torch.no_grad():
                return fused_model.first_output(model(input_ids=ids, attention_mask=mask))
        return run

    def context(self):
        return _tf32(self.tf32)

    def teardown(self):
        del self.model


class TorchCompile(TorchEager):
    def __init__(self, name, label, mode):
        super().__init__(name, label, torch.float16, needs_cuda=True)
        self.mode = mode

    def _prepare(self, model):
        return torch.compile(model, mode=self.mode)


class Fused(TorchEager):
    def __init__(self, name, label, dtype, graph: bool):
        super().__init__(name, label, dtype, needs_cuda=graph)
        self.graph = graph

    def setup(self, ctx):
        if not ctx.cuda and not fused_model.fa.INTERPRET:
            raise Unavailable("needs a CUDA GPU (or TRITON_INTERPRET=1, for tests)")
        super().setup(ctx)

    def _prepare(self, model):
        return fused_model.fuse(model)

    def runner(self, ids, mask):
        if not self.graph:
            return super().runner(ids, mask)
        replay = fused_model.GraphRunner(self.model)
        return lambda: replay(ids, mask)


class Peer(TorchEager):
    """A fused-attention package from PyPI, used the way its README says."""

    def __init__(self, name, label, module):
        super().__init__(name, label, torch.float16, needs_cuda=True)
        self.module = module

    def setup(self, ctx):
        Backend.setup(self, ctx)
        try:
            self.package = importlib.import_module(self.module)
        except ImportError as err:
            raise Unavailable(f"{name_of(self.module)} not installed (pip install -r requirements-bench.txt): "
                              f"{err}") from err
        base = fused_model.backbone(ctx.model)
        try:
            if self.module == "disentangled_flash":
                model = copy.deepcopy(base).to(ctx.device, self.dtype)
                self.package.enable_deberta_inference(model)
            else:
                model = self.package.FlashDebertaV2Model(base.config)
                model.load_state_dict(base.state_dict(), strict=False)
                model = model.eval().to(ctx.device, self.dtype)
        except Exception as err:
            raise Unavailable(f"{name_of(self.module)} refused this model: {type(err).__name__}: {err}") from err
        self.model = model

    def runner(self, ids, mask):
        if self.module == "disentangled_flash":
            self.model.encoder.prepare_for_inference(int(ids.shape[1]))  # its per-length plans, as its README says
        return super().runner(ids, mask)


def name_of(module: str) -> str:
    return {"disentangled_flash": "disentangled-flash", "flashdeberta": "flashdeberta"}.get(module, module)


class OnnxRuntime(Backend):
    """The exported ONNX model (original or with the plugin) on ONNX Runtime's best provider.

    The files are made by the project's own scripts (deberta_pytorch2onnx.py, deberta_onnx_modify.py), exactly
    as the README runs them. Off TensorRT, the plugin nodes run as standard ops (the reference), not the plugin."""

    tracks_memory = False

    def __init__(self, name, label, plugin: bool):
        self.name, self.label, self.plugin = name, label, plugin

    def setup(self, ctx):
        from . import ort_session
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise Unavailable("onnxruntime not installed") from err
        self.fp16 = ctx.cuda
        providers = ort_session.available()
        if ctx.cuda and providers[0] == "cpu":
            raise Unavailable("this onnxruntime has no GPU provider (install requirements-gpu.txt)")
        path = onnx_file(ctx, self.plugin, self.fp16)
        failures = []
        # TensorRT, CUDA, CPU: the first that starts here (on a GPU machine, the first GPU provider that starts).
        for provider in [p for p in providers if not (ctx.cuda and p == "cpu")]:
            try:
                self.session = ort_session.open_session(path, provider=provider, fp16=self.fp16)
                break
            except Exception as err:
                failures.append(f"{provider}: {type(err).__name__}: {str(err)[:120]}")
        else:
            raise Unavailable("; ".join(failures))
        provider = self.session.provider.replace("ExecutionProvider", "")
        ref = " (plugin as standard ops)" if self.session.reference else ""
        self.label = f"{self.label} {provider} {'FP16' if self.fp16 else 'FP32'}{ref}"

    def runner(self, ids, mask):
        from . import ort_session
        feeds = {"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()}
        run = ort_session.timed_runner(self.session, feeds)
        session = self.session

        def timed():
            run()
        timed.output = lambda: torch.from_numpy(next(iter(session.run(feeds).values())))  # type: ignore[attr-defined]
        return timed

    def teardown(self):
        del self.session


def onnx_file(ctx: Context, plugin: bool, fp16: bool) -> Path:
    """Export (once) and modify with the top-level scripts; returns the file this backend runs."""
    key = (plugin, fp16)
    if key in ctx.onnx_files:
        return ctx.onnx_files[key]
    if not ctx.exportable:
        raise Unavailable("exported only for --shape configs here; for a --variant, export it with "
                          "deberta_pytorch2onnx.py --variant and run deberta_ort_inference.py / "
                          "deberta_tensorrt_inference.py")
    base = ctx.workdir / f"{ctx.shape}.onnx"
    if not base.exists():
        _script("deberta_pytorch2onnx.py", "--filename", base, "--shape", ctx.shape, "--verify-seq-len", 64)
    flags = (["--plugin"] if plugin else []) + (["--fp16"] if fp16 else [])
    path = base
    if flags:   # the same calls as the README: deberta_onnx_modify.py <original> [--plugin] [--fp16]
        path = base.with_name(base.stem + "".join(f.replace("--", "_") for f in flags) + ".onnx")
        if not path.exists():
            _script("deberta_onnx_modify.py", base, *flags, "--output", path)
    ctx.onnx_files[key] = path
    return path


def _script(name: str, *args) -> None:
    done = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise Unavailable(f"{name} failed: {lines[-1] if lines else done.returncode}")


class TensorRT(Backend):
    """TensorRT engines from the original or plugin ONNX file (FP16), where TensorRT is installed."""

    tracks_memory = False

    def __init__(self, name, label, plugin: bool):
        self.name, self.label, self.plugin = name, label, plugin

    def setup(self, ctx):
        super().setup(ctx)
        if not ctx.cuda:
            raise Unavailable("needs a CUDA GPU")
        try:
            from . import tensorrt_runtime
        except ImportError as err:
            raise Unavailable("TensorRT is not installed (pip install -r requirements-gpu.txt)") from err
        self.trt = tensorrt_runtime
        self.ctx = ctx
        self.path = onnx_file(ctx, self.plugin, fp16=tensorrt_runtime.STRONGLY_TYPED)
        self.engines: dict = {}

    def runner(self, ids, mask):
        shape = tuple(ids.shape)
        if self.plugin and shape[1] % 64:
            raise Unavailable("plugin engines take sequence lengths that are multiples of 64 (the kernel has no "
                              "bounds checks)")
        profile = {"input_ids": (shape, shape, shape), "attention_mask": (shape, shape, shape)}
        engine = self.trt.Engine(self.trt.build_engine(self.path, "fp16", profile, 4096), self.path.name)
        engine.bind({"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})
        stream = torch.cuda.current_stream()
        run = engine.runner(stream)

        def timed():
            run()
        timed.output = lambda: torch.from_numpy(next(iter(engine.outputs_on_host().values())))  # type: ignore
        self.engines[shape] = engine
        return timed

    def teardown(self):
        self.engines.clear()


def all_backends() -> list[Backend]:
    """In table order. Names are what --backends takes."""
    return [
        TorchEager("torch-fp32", "PyTorch eager FP32", torch.float32),
        TorchEager("torch-tf32", "PyTorch eager TF32", torch.float32, tf32=True, needs_cuda=True),
        TorchEager("torch-fp16", "PyTorch eager FP16", torch.float16, needs_cuda=True),
        TorchCompile("compile-fp16", "torch.compile FP16", "default"),
        TorchCompile("compile-fp16-graphs", "torch.compile FP16 + CUDA graphs", "reduce-overhead"),
        OnnxRuntime("ort", "ONNX Runtime", plugin=False),
        OnnxRuntime("ort-plugin", "ONNX Runtime w/ plugin", plugin=True),
        TensorRT("tensorrt", "TensorRT FP16", plugin=False),
        TensorRT("tensorrt-plugin", "TensorRT w/ plugin FP16", plugin=True),
        Peer("disentangled-flash", "disentangled-flash 1.x FP16", "disentangled_flash"),
        Peer("flashdeberta", "flashdeberta FP16", "flashdeberta"),
        Fused("fused-fp16", "fused (ours) FP16", torch.float16, graph=False),
        Fused("fused-fp16-graphs", "fused (ours) FP16 + CUDA graph", torch.float16, graph=True),
    ]


def measure_cell(backend: Backend, ctx: Context, batch: int, seq: int, reference: torch.Tensor | None,
                 progress: Callable[[int], None] | None = None) -> Cell:
    """Time one backend at one shape: warm-up, then ctx.iterations runs (CUDA events on a GPU), peak memory and
    relative L2 of the first output against `reference` (PyTorch FP32) on the real tokens."""
    cell = Cell(backend.name, batch, seq)
    ids, mask = ctx.inputs(batch, seq)
    try:
        with backend.context():
            run = backend.runner(ids, mask)
            if ctx.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            first = run()
            output = getattr(run, "output", lambda: first)().detach().clone()
            if ctx.cuda:
                lat = timing.measure_cuda(run, torch.cuda.current_stream(), warmup=ctx.warmup,
                                          iterations=ctx.iterations, progress=progress)
                if backend.tracks_memory:
                    cell.peak_gib = torch.cuda.max_memory_allocated() / 2**30
            else:
                lat = timing.measure(run, warmup=ctx.warmup, iterations=ctx.iterations, progress=progress)
    except Unavailable as err:
        cell.note = str(err)
        return cell
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        cell.note = "out of GPU memory"
        return cell
    except Exception as err:  # a backend that breaks at one shape must not end the whole run
        cell.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        return cell
    cell.median_ms, cell.p90_ms, cell.mean_ms, cell.runs = lat.median_ms, lat.p90_ms, lat.mean_ms, lat.runs
    if reference is not None:
        cell.rel_l2 = valid_rel_l2(output, reference, mask)
    elif not torch.isfinite(output.float()).all():
        cell.note = "NaN/inf in the output"
    return cell


def valid_rel_l2(output: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    """Relative L2 over the real (unpadded) tokens; NaN if the output has NaN or inf."""
    out = output.detach().float().cpu().numpy()
    ref = reference.float().cpu().numpy()
    if not np.isfinite(out).all():
        return float("nan")
    if out.ndim == 3 and out.shape[:2] == tuple(mask.shape):
        keep = mask.cpu().numpy().astype(bool)
        out, ref = out[keep], ref[keep]
    return relative_l2(out, ref)


def reference_outputs(ctx: Context, shapes: list[tuple[int, int]]) -> dict:
    """PyTorch FP32 (no TF32) first outputs per (batch, seq), kept on the CPU."""
    ref = TorchEager("reference", "", torch.float32)
    ref.setup(ctx)
    outputs = {}
    with _tf32(False):
        for batch, seq in shapes:
            ids, mask = ctx.inputs(batch, seq)
            try:
                outputs[(batch, seq)] = ref.runner(ids, mask)().float().cpu()
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
    ref.teardown()
    return outputs


def run_all(ctx: Context, backends: list[Backend], shapes: list[tuple[int, int]], references: dict,
            on_start: Callable[[Backend, int, int], None], on_cell: Callable[[Cell], None],
            progress: Callable[[int], None] | None = None) -> list[Cell]:
    """Every backend at every (batch, seq): set up, cells, torn down, one backend at a time."""
    cells = []
    for backend in backends:
        try:
            on_start(backend, *shapes[0])
            backend.setup(ctx)
            reason = None
        except Unavailable as err:
            reason = str(err)
        for batch, seq in shapes:
            on_start(backend, batch, seq)
            if reason is not None:
                cell = Cell(backend.name, batch, seq, note=reason)
            else:
                cell = measure_cell(backend, ctx, batch, seq, references.get((batch, seq)), progress)
            cells.append(cell)
            on_cell(cell)
        if reason is None:
            backend.teardown()
        if ctx.cuda:
            torch.cuda.empty_cache()
    return cells
