"""ONNX Runtime sessions: execution provider choice (TensorRT, then CUDA, then CPU), plugin models made runnable
on providers without the plugin, padding for plugin models, and device-resident runs for timing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from . import onnx_io, plugin, precision
from .errors import UserError
from .inputs import cut_back, pad_to_multiple

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
ORDER = ("tensorrt", "cuda", "cpu")


@dataclass
class Session:
    session: object          # onnxruntime.InferenceSession
    provider: str            # the provider that runs the model's first node, as ONNX Runtime reports it
    pad: bool                # inputs padded to a multiple of 64 and outputs cut back (plugin models)
    seq_axes: dict           # output name -> sequence axes, for cutting back
    reference: bool          # plugin nodes replaced by the standard-op reference (no TensorRT)

    @property
    def on_gpu(self) -> bool:
        return self.provider != PROVIDERS["cpu"]

    def run(self, feeds: dict) -> dict:
        """Run on host arrays; a plugin model gets padded inputs and its outputs cut back."""
        if self.pad:
            feeds, seq_len = pad_to_multiple(feeds)
        names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, feeds)
        if self.pad:
            values = [cut_back(v, seq_len, self.seq_axes.get(n, [])) for n, v in zip(names, values)]
        return dict(zip(names, values))


def available() -> list[str]:
    import onnxruntime as ort
    have = set(ort.get_available_providers())
    return [key for key in ORDER if PROVIDERS[key] in have]


def open_session(path: str | Path, provider: str | None = None, fp16: bool = False,
                 cache_dir: str | Path | None = None, pad: bool | None = None) -> Session:
    """Open `path` on the requested provider, or the first of TensorRT, CUDA, CPU that this onnxruntime has.

    `pad` (default: whether the model has plugin nodes) pads inputs to the plugin's multiple of 64."""
    import onnxruntime as ort

    path = Path(path)
    model = onnx_io.load(path)
    choices = available()
    if provider is not None and provider not in choices:
        raise UserError(f"execution provider {provider!r} is not in this onnxruntime build "
                        f"(it has: {', '.join(choices)}); for GPUs install requirements-gpu.txt")
    chosen = provider or choices[0]
    graph = precision.graph_precision(model)
    if graph == "fp16" and not fp16:
        raise UserError(f"{path} is an fp16 graph: run it with fp16, or use the fp32 graph for fp32")
    if fp16 and graph == "fp32" and chosen != "tensorrt":
        raise UserError(f"{path} is an fp32 graph; on the {chosen} provider fp16 needs an fp16 graph: make one with "
                        "deberta_onnx_modify.py <model>.onnx --fp16 (the TensorRT provider can also build fp16 "
                        "from fp32 graphs)")
    if chosen != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()   # CUDA and cuDNN from the nvidia-* pip packages, where the system has none
    has_plugin = plugin.count_nodes(model) > 0
    reference = has_plugin and chosen != "tensorrt"
    if reference:
        model = plugin.expand_reference(model)
    providers = []
    if chosen == "tensorrt":
        cache = Path(cache_dir) if cache_dir else path.with_name(path.stem + "_trt_cache")
        cache.mkdir(parents=True, exist_ok=True)
        providers.append((PROVIDERS["tensorrt"], {
            "trt_fp16_enable": fp16 and graph == "fp32", "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}))
    if chosen in ("tensorrt", "cuda"):
        # fp32 means fp32: the CUDA provider otherwise runs MatMul in TF32 on Ampere and newer (4e-4 relative
        # drift between two equal graphs on an H100, 2026-11-24).
        providers.append((PROVIDERS["cuda"], {"use_tf32": 0}))
    providers.append(PROVIDERS["cpu"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if reference or model.ByteSize() < 1_900_000_000 else str(path)
    missing_trt = ("onnxruntime lists the TensorRT provider but could not start it (TensorRT 10 libraries, "
                   "libnvinfer.so.10, not found?): install requirements-gpu.txt or pass --provider cuda")
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as err:
        if chosen == "tensorrt":
            raise UserError(f"{missing_trt} ({type(err).__name__}: {str(err)[:200]})") from err
        raise
    if chosen == "tensorrt" and session.get_providers()[0] != PROVIDERS["tensorrt"]:
        raise UserError(missing_trt)
    return Session(session, session.get_providers()[0], has_plugin if pad is None else pad,
                   onnx_io.sequence_axes(model), reference)


def timed_runner(sess: Session, feeds: dict):
    """A zero-argument callable that runs the model once on inputs already resident where the provider runs.

    GPU providers: inputs and outputs bound on the device through IOBinding, so no host copies are timed;
    run_with_iobinding returns after the device work is done."""
    if sess.pad:
        feeds, _ = pad_to_multiple(feeds)
    if not sess.on_gpu:
        names = [o.name for o in sess.session.get_outputs()]
        return lambda: sess.session.run(names, feeds)
    import onnxruntime as ort

    binding = sess.session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0))
    for out in sess.session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)
    return lambda: sess.session.run_with_iobinding(binding)
