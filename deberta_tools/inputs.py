"""Model inputs: random token ids with a realistic padding mask, padding to the plugin's multiple of 64, and
random inputs of one fused attention layer for the GPU timing scripts."""

from __future__ import annotations

import numpy as np

from . import onnx_io
from .errors import UserError
from .plugin import SEQ_MULTIPLE


def random_inputs(batch: int, seq_len: int, vocab_size: int, seed: int = 0, padded: bool = True) -> dict:
    """input_ids in [1, vocab) and an attention mask. With `padded`, every sequence after the first is shorter
    (between half and all of seq_len), as in a real padded batch; the first always fills seq_len."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones((batch, seq_len), dtype=np.int64)
    if padded:
        for b in range(1, batch):
            mask[b, rng.integers(max(1, seq_len // 2), seq_len + 1):] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def attention_layer(seq_len: int, batch: int = 1, heads: int = 6, head_dim: int = 64, span: int = 256,
                    device: str = "cuda"):
    """(qkv, positions, mask) of one fused attention layer for timing (the demo config's 6 heads of 64 and v3's
    position rule by default): random fp16 projections and relative embeddings, no padding."""
    import torch

    from . import fused_attention as fa
    qkv = torch.randn(batch, seq_len, 3 * heads * head_dim, device=device, dtype=torch.float16)
    positions = fa.Positions(fa.PositionRule(span, span, 2 * span),
                             torch.randn(2, heads, 2 * span, head_dim, device=device, dtype=torch.float16), 0, 1)
    mask = torch.ones(batch, seq_len, dtype=torch.int32, device=device)
    return qkv, positions, mask


def pad_to_multiple(feeds: dict, multiple: int = SEQ_MULTIPLE) -> tuple[dict, int]:
    """Pad the sequence axis of every input to a multiple of `multiple` (ids 0, attention_mask 0).

    Returns the padded feeds and the original length, to cut outputs back with `cut_back`."""
    seq_len = next(iter(feeds.values())).shape[1]
    pad = (-seq_len) % multiple
    if pad == 0:
        return feeds, seq_len
    return {k: np.pad(v, ((0, 0), (0, pad))) for k, v in feeds.items()}, seq_len


def cut_back(array: np.ndarray, seq_len: int, axes: list[int]) -> np.ndarray:
    """Cut the given sequence axes of an output back to seq_len (see onnx_io.sequence_axes)."""
    index = tuple(slice(0, seq_len) if ax in axes else slice(None) for ax in range(array.ndim))
    return array[index]


def for_model(model_path, batch: int, seq_len: int | None, seed: int = 0):
    """Random inputs for the model at `model_path` (padded batch when batch > 1): (model, feeds, seq_len).

    The length defaults to the model's; a length past the plugin's proven-exact one (recorded by the surgery
    when --allow-inexact fused anyway) is refused."""
    model = onnx_io.load(model_path, load_external_data=False)
    seq_len = seq_len or onnx_io.default_seq_len(model)
    if batch < 1 or seq_len < 2:
        raise UserError("batch size must be >= 1 and sequence length >= 2")
    limit = onnx_io.get_meta(model, onnx_io.META_EXACT_SEQ_LEN)
    if limit and seq_len > int(limit):
        raise UserError(f"{model_path}: the plugin is exact for this model only up to sequence length {limit}, "
                        f"{seq_len} requested")
    feeds = random_inputs(batch, seq_len, onnx_io.vocab_size(model), seed=seed, padded=batch > 1)
    return model, feeds, seq_len
