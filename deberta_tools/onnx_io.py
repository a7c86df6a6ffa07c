"""Loading and saving ONNX files: atomic writes, external data for large models, our metadata, derived file names."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from .errors import UserError

# Metadata the export writes into the model, read back by the later steps.
META_CONFIG = "deberta.config"          # the Hugging Face config as JSON
META_SEQ_LEN = "deberta.seq_len"        # default sequence length for tests and engine profiles
META_EXACT_SEQ_LEN = "deberta.plugin_exact_max_seq_len"  # longest length the plugin is proven exact for ("" = any)
_PROTOBUF_LIMIT = 1_900_000_000


def load(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as err:  # protobuf raises several types for a file that is not ONNX
        raise UserError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})") from err


def save(model: onnx.ModelProto, path: str | os.PathLike, check: Callable[[Path], object] | None = None) -> Path:
    """Write `model` to `path` atomically (see save_many)."""
    return save_many([(model, path, check)])[0]


def save_many(items: list[tuple[onnx.ModelProto, str | os.PathLike, Callable[[Path], object] | None]]) -> list[Path]:
    """Write models atomically, all or none: each goes to a temporary folder beside its destination, every
    `check(temporary_path)` runs, and only then are the files renamed into place.

    A model over protobuf's 2 GB limit keeps its weights in `<name>.data` beside it (renamed before the .onnx,
    so the .onnx never points at a missing file). After a failure nothing new is left at the destinations.
    """
    paths = [Path(p) for _, p, _ in items]
    with contextlib.ExitStack() as stack:
        staged = []
        for (model, _, check), path in zip(items, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.")))
            tmp_model = tmp / path.name
            large = model.ByteSize() > _PROTOBUF_LIMIT
            if large:
                onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + ".data", size_threshold=1024)
            else:
                onnx.save_model(model, str(tmp_model))
            if check is not None:
                check(tmp_model)
            staged.append((tmp_model, path, large))
        for tmp_model, path, large in staged:
            if large:
                os.replace(tmp_model.with_name(path.name + ".data"), path.with_name(path.name + ".data"))
            os.replace(tmp_model, path)
    return paths


def from_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graphsurgeon graph as a model with the IR version and metadata of `like` (graphsurgeon writes its
    own IR version, newer than onnxruntime 1.31 reads, and drops metadata)."""
    out = gs.export_onnx(graph)
    out.ir_version = like.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    return out


def get_meta(model: onnx.ModelProto, key: str) -> str | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return None


def set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def get_config(model: onnx.ModelProto) -> dict | None:
    raw = get_meta(model, META_CONFIG)
    return json.loads(raw) if raw else None


def default_seq_len(model: onnx.ModelProto, fallback: int = 512) -> int:
    """The model's sequence length: our metadata, else a static input dimension, else `fallback`."""
    raw = get_meta(model, META_SEQ_LEN)
    if raw:
        return int(raw)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value"):
            return dims[1].dim_value
    return fallback


def sequence_axes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """For each graph output, the axes that carry the sequence (same symbolic dim as input_ids' axis 1)."""
    seq_dims = set()
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].dim_param:
            seq_dims.add(dims[1].dim_param)
    return {out.name: [ax for ax, d in enumerate(out.type.tensor_type.shape.dim) if d.dim_param in seq_dims]
            for out in model.graph.output}


def with_suffix(path: str | os.PathLike, suffix: str) -> Path:
    """./test/deberta.onnx + '_plugin' -> ./test/deberta_plugin.onnx"""
    path = Path(path)
    return path.with_name(path.stem + suffix + (path.suffix or ".onnx"))


def correctness_pair(root: str | os.PathLike) -> tuple[Path, Path]:
    """The two correctness-check models for a root name (./test/deberta or ./test/deberta.onnx)."""
    root = Path(root)
    if root.suffix == ".onnx":
        root = root.with_suffix("")
    pair = (with_suffix(root, "_correctness_check_original"), with_suffix(root, "_correctness_check_plugin"))
    missing = [str(p) for p in pair if not p.is_file()]
    if missing:
        raise UserError(f"correctness-check model(s) not found: {', '.join(missing)}; "
                        f"make them with: python deberta_onnx_modify.py {root}.onnx --correctness-check")
    return pair


def vocab_size(model: onnx.ModelProto, fallback: int = 1000) -> int:
    """Vocabulary size: from our metadata, else the rows of the embedding table that input_ids index."""
    config = get_config(model)
    if config and "vocab_size" in config:
        return int(config["vocab_size"])
    tables = {init.name: init.dims for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids":
            dims = tables.get(node.input[0])
            if dims:
                return int(dims[0])
    return fallback
