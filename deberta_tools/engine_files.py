"""TensorRT engine bookkeeping that needs no TensorRT: GPU short names, engine file names, the record kept beside
each engine, optimization-profile shapes, and which precision a graph can be built in."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .plugin import SEQ_MULTIPLE

_DROP = re.compile(r"^(\d+GB|SXM\d*|PCIE|NVL|HBM\d*E?|GENERATION|EDITION|SERVER|WORKSTATION|LAPTOP|MAX|Q|GPU)$",
                   re.IGNORECASE)
_VENDOR = re.compile(r"^(NVIDIA|TESLA|QUADRO|GEFORCE)\s+", re.IGNORECASE)


def gpu_short_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA A100-SXM4-80GB' -> 'A100', 'NVIDIA GeForce RTX 4090' ->
    'RTX4090', 'NVIDIA RTX 6000 Ada Generation' -> 'RTX6000Ada', 'Tesla T4' -> 'T4'."""
    name = device_name.strip()
    while _VENDOR.match(name):
        name = _VENDOR.sub("", name, count=1)
    name = re.split(r"\bMIG\b", name, flags=re.IGNORECASE)[0]   # a MIG slice is named after its whole GPU
    tokens = [t for t in re.split(r"[\s\-_/]+", name) if t and not _DROP.match(t)]
    short = re.sub(r"[^A-Za-z0-9]", "", "".join(tokens))
    return short or "GPU"


def engine_path(onnx_path: str | Path, gpu: str, precision: str) -> Path:
    """<model>_<GPU>_<precision>.engine beside the ONNX file."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}_{gpu}_{precision}.engine")


@dataclass
class EngineInfo:
    """What an engine was built with, kept in <engine>.json: TensorRT engines only load on the TensorRT version
    and GPU model they were built for."""
    tensorrt: str
    device: str
    compute_capability: str
    precision: str
    onnx: str
    profile: dict

    def save(self, engine: Path) -> None:
        info_path(engine).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, engine: Path) -> "EngineInfo | None":
        path = info_path(engine)
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def info_path(engine: Path) -> Path:
    return Path(str(engine) + ".json")


def mismatch(info: EngineInfo | None, tensorrt: str, device: str, compute_capability: str) -> str | None:
    """Why an existing engine cannot run here, or None."""
    if info is None:
        return None
    if info.tensorrt.split(".")[:2] != tensorrt.split(".")[:2]:
        return f"it was built with TensorRT {info.tensorrt}, this is TensorRT {tensorrt}"
    if info.compute_capability != compute_capability or gpu_short_name(info.device) != gpu_short_name(device):
        return f"it was built on {info.device} (sm_{info.compute_capability}), this is {device} (sm_{compute_capability})"
    return None


def profile_shapes(inputs: list[str], batch: tuple[int, int, int], seq: tuple[int, int, int],
                   plugin: bool) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """min/opt/max [batch, seq] for every input. Plugin engines get sequence lengths rounded up to the plugin's
    multiple of 64, since their inputs are padded to it."""
    for label, (lo, opt, hi) in (("batch", batch), ("sequence length", seq)):
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"{label} profile must satisfy 1 <= min <= opt <= max, got {lo} {opt} {hi}")
    if plugin:
        seq = tuple(-(-s // SEQ_MULTIPLE) * SEQ_MULTIPLE for s in seq)  # type: ignore[assignment]
    return {name: ((batch[0], seq[0]), (batch[1], seq[1]), (batch[2], seq[2])) for name in inputs}


def precision_problem(requested: str, graph: str, strongly_typed: bool, onnx_path: str | Path) -> str | None:
    """Whether an engine in `requested` precision can be built from a graph in `graph` precision.

    TensorRT 11 networks are always strongly typed (no FP16 builder flag): an fp16 engine needs an fp16 graph, and
    an fp16 graph gives an fp16 engine. TensorRT 10 builds fp16 from fp32 graphs with its FP16 flag."""
    onnx_path = Path(onnx_path)
    if graph == "fp16" and requested != "fp16":
        return (f"{onnx_path} is an fp16 graph; build it with --build fp16, or use the fp32 graph for "
                f"{requested}")
    if requested == "fp16" and graph == "fp32" and strongly_typed:
        source = onnx_path.with_name(onnx_path.name.replace("_original", "").replace("_plugin", "")
                                     .replace("_correctness_check", ""))
        suffix = onnx_path.stem.replace(source.stem, "", 1)
        return (f"TensorRT 11 builds strongly typed networks, so fp16 needs an fp16 graph: run "
                f"'python deberta_onnx_modify.py {source} --fp16{' --plugin' if '_plugin' in suffix else ''}"
                f"{' --correctness-check' if 'correctness' in suffix else ''}' and build "
                f"{source.with_name(source.stem + '_fp16' + suffix + '.onnx')}")
    return None
