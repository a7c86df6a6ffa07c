"""Model inputs: random token ids with a realistic padding mask, and padding to the plugin's multiple of 64."""

from __future__ import annotations

import numpy as np

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
