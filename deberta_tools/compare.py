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
