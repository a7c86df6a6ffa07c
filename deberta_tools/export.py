"""PyTorch -> ONNX: the seed config, loading a pretrained variant, export with either torch exporter, and the check
of the exported file against PyTorch under ONNX Runtime CPU."""

from __future__ import annotations

import io
import json
import logging
import os
import warnings

import numpy as np
import onnx
import torch
import transformers
from transformers import AutoConfig, DebertaV2Config, DebertaV2Model

from . import onnx_io
from .compare import relative_l2
from .errors import UserError
from .inputs import random_inputs

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
OPSET = 18
INPUT_NAMES = ["input_ids", "attention_mask"]
EXPORT_TOLERANCE = 1e-5  # relative L2 between PyTorch and ONNX Runtime, fp32


def seed_config(seq_len: int) -> DebertaV2Config:
    """The demo's application config (hidden 384, intermediate 1536, 12 layers, 6 heads, relative span 256,
    vocabulary 128K) with DeBERTa-v3's log-bucket positions (position_buckets 256, max_relative_positions 512,
    c2p and p2c), which the plugin computes exactly. `seq_len` is the length the later steps default to."""
    return DebertaV2Config(
        vocab_size=128100, hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
        hidden_act="gelu", max_position_embeddings=max(512, seq_len), type_vocab_size=0, layer_norm_eps=1e-7,
        relative_attention=True, position_buckets=256, max_relative_positions=512, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
    )


# Random-weight configs shaped like the public DeBERTa-v3 checkpoints (hidden, intermediate, layers, heads); every
# other field as in their config.json: log buckets 256, max_relative_positions -1 (-> 512), shared keys.
V3_SHAPES = {"v3-xsmall": (384, 1536, 12, 6), "v3-small": (768, 3072, 6, 12), "v3-base": (768, 3072, 12, 12),
             "v3-large": (1024, 4096, 24, 16)}
# A tiny config for smoke tests on a CPU (not a real model shape).
TINY = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            position_buckets=16, max_relative_positions=32)
SHAPES = ("seed", *V3_SHAPES, "tiny")


def shaped_config(shape: str, seq_len: int = 512) -> DebertaV2Config:
    """'seed' (the demo's config), a v3 checkpoint's shape with random weights, or 'tiny'."""
    if shape == "seed":
        return seed_config(seq_len)
    if shape == "tiny":
        return DebertaV2Config(**{**seed_config(seq_len).to_diff_dict(), **TINY})
    if shape not in V3_SHAPES:
        raise UserError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    hidden, inter, layers, heads = V3_SHAPES[shape]
    return DebertaV2Config(
        vocab_size=128100, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
        layer_norm_eps=1e-7, relative_attention=True, position_buckets=256, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
    )


def random_model(config: DebertaV2Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return DebertaV2Model(config).eval()


def load_variant(variant: str) -> torch.nn.Module:
    """A Hugging Face model id or a save_pretrained folder, with its weights and its own head."""
    try:
        config = AutoConfig.from_pretrained(variant)
    except Exception as err:
        raise UserError(f"cannot load a config for --variant {variant!r}: {err}") from err
    if config.model_type != "deberta-v2":
        raise UserError(f"--variant {variant!r} is a {config.model_type!r} model, not DebertaV2 (deberta-v2/v3)")
    arch = (config.architectures or ["DebertaV2Model"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None or not arch.startswith("DebertaV2"):
        cls = DebertaV2Model
    return cls.from_pretrained(variant).eval()


class _TupleOutputs(torch.nn.Module):
    """Calls the model with named inputs and returns its outputs as a tuple, in a fixed order."""

    def __init__(self, model: torch.nn.Module, output_names: list[str]):
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return tuple(out[name] for name in self.output_names)


def _output_names(model: torch.nn.Module, feeds: dict) -> list[str]:
    with torch.no_grad():
        out = model(**feeds)
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


def _trace_feeds(config) -> dict:
    # Trace at a prime length, unlike any hidden size or head count, so neither the exporter nor the output axis
    # naming ties the sequence axis to another dimension.
    seq = min(97, config.max_position_embeddings) if getattr(config, "position_biased_input", True) else 97
    feeds = random_inputs(2, seq, config.vocab_size, seed=1)
    return {k: torch.from_numpy(v) for k, v in feeds.items()}


def export(model: torch.nn.Module, exporter: str = DEFAULT_EXPORTER) -> onnx.ModelProto:
    """Export with dynamic batch and sequence axes; returns the ONNX model in memory."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    feeds = _trace_feeds(model.config)
    names = _output_names(model, feeds)
    wrapper = _TupleOutputs(model, names).eval()
    args = (feeds["input_ids"], feeds["attention_mask"])
    # The exporters warn about tracing details of transformers' code that do not affect this export (the check
    # against PyTorch afterwards is what counts); keep the user's terminal for our own progress.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2)
            program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=INPUT_NAMES, output_names=names, opset_version=OPSET,
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)
            proto = program.model_proto
        else:
            axes = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES}
            seq = args[0].shape[1]
            for name, value in zip(names, wrapper(*args)):
                # batch first; "seq" only where the traced size is the sequence length (not logits' labels)
                axes[name] = {0: "batch", **{ax: "seq" for ax in range(1, value.dim()) if value.shape[ax] == seq}}
            buffer = io.BytesIO()
            torch.onnx.export(wrapper, args, buffer, dynamo=False, input_names=INPUT_NAMES, output_names=names,
                              opset_version=OPSET, dynamic_axes=axes, do_constant_folding=True)
            proto = onnx.load_from_string(buffer.getvalue())
    return proto


def annotate(proto: onnx.ModelProto, config, seq_len: int, exporter: str) -> None:
    """Record what the later steps need: the config (for exactness checks), the default length, provenance."""
    onnx_io.set_meta(proto, onnx_io.META_CONFIG, config.to_json_string(use_diff=False))
    onnx_io.set_meta(proto, onnx_io.META_SEQ_LEN, str(seq_len))
    onnx_io.set_meta(proto, "deberta.exporter", exporter)
    onnx_io.set_meta(proto, "deberta.versions",
                     json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}))


def verify(model: torch.nn.Module, path: str | os.PathLike, batch: int, seq_len: int) -> list[tuple[str, float, float]]:
    """Run the exported file under ONNX Runtime CPU and PyTorch on the same padded random batch.

    Returns (output name, max absolute difference, relative L2) per output; raises UserError above tolerance."""
    import onnxruntime as ort

    feeds = random_inputs(batch, seq_len, model.config.vocab_size, seed=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    rows = []
    for meta, value in zip(session.get_outputs(), got):
        ref = out[meta.name].numpy()
        rows.append((meta.name, float(np.max(np.abs(value - ref))), relative_l2(value, ref)))
    bad = [r for r in rows if not (r[2] < EXPORT_TOLERANCE)]
    if bad:
        raise UserError(f"exported model differs from PyTorch: {bad[0][0]} relative L2 {bad[0][2]:.3e} "
                        f"(tolerance {EXPORT_TOLERANCE:g})")
    return rows
