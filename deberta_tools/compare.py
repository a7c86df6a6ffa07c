"""Comparing outputs: relative L2, per-layer error rows, and the tolerances by precision."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Relative L2 tolerance by precision (the project's rule: fp32 under 1e-5, fp16 under 1e-2, never NaN).
TOLERANCE = {"fp32": 1e-5, "tf32": 1e-2, "fp16": 1e-2}


def relative_l2(value: np.ndarray, ref: np.ndarray) -> float:
    value = np.asarray(value, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(value - ref) / (denom if denom > 0 else 1.0))


@dataclass
class ErrorRow:
    name: str
    mean_abs: float
    max_abs: float
    rel_l2: float

    def passes(self, tolerance: float) -> bool:
        return bool(np.isfinite(self.max_abs) and self.rel_l2 < tolerance)


def error_row(name: str, value: np.ndarray, ref: np.ndarray) -> ErrorRow:
    diff = np.abs(np.asarray(value, np.float64) - np.asarray(ref, np.float64))
    if not (np.all(np.isfinite(value)) and np.all(np.isfinite(ref))):
        return ErrorRow(name, float("nan"), float("nan"), float("nan"))
    return ErrorRow(name, float(diff.mean()), float(diff.max()), relative_l2(value, ref))


def valid_only(value: np.ndarray, mask: np.ndarray, seq_axes: list[int]) -> np.ndarray:
    """Zero the padded positions of an output along its sequence axes.

    A padded query row attends uniformly to every key, so its (meaningless) output depends on how far the batch
    was padded; compare runs that were padded differently (the plugin's multiple of 64) on real tokens only.
    Outputs with a leading batch*heads axis ([B*H, S, S]) are handled by repeating the mask per head."""
    value = np.array(value, copy=True)
    if not seq_axes:
        return value
    repeat = value.shape[0] // mask.shape[0]
    keep = np.repeat(mask.astype(bool), repeat, axis=0)          # [value.shape[0], S]
    for ax in seq_axes:
        shape = [1] * value.ndim
        shape[0], shape[ax] = keep.shape[0], keep.shape[1]
        value = np.where(keep.reshape(shape), value, 0)
    return value
