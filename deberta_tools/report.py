"""What the scripts print: markdown tables people can paste, the environment beside every table, and the
per-layer correctness report."""

from __future__ import annotations

import platform

from tabulate import tabulate

from .compare import ErrorRow
from .timing import Latency


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; cells are printed as given (format numbers before passing them)."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def environment(extra: dict | None = None) -> str:
    """One line with the machine and library versions, printed beside every table."""
    import onnx
    import onnxruntime

    parts = {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    parts.update(extra or {})
    return "environment: " + ", ".join(f"{k} {v}" for k, v in parts.items())


def latency_table(rows: list[tuple[str, Latency]]) -> str:
    return table(["run", "median ms", "mean ms", "p90 ms", "min ms", "runs"],
                 [[name, f"{lat.median_ms:.3f}", f"{lat.mean_ms:.3f}", f"{lat.p90_ms:.3f}", f"{lat.min_ms:.3f}",
                   str(lat.runs)] for name, lat in rows])


def correctness_lines(rows: list[ErrorRow]) -> str:
    """One line per layer, like the upstream demo, as a table."""
    return table(["layer output", "mean abs error", "max abs error", "relative L2"],
                 [[r.name, f"{r.mean_abs:.3e}", f"{r.max_abs:.3e}", f"{r.rel_l2:.3e}"] for r in rows])


def verdict(rows: list[ErrorRow], precision: str, tolerance: float) -> tuple[bool, str]:
    worst = max(rows, key=lambda r: (r.rel_l2 != r.rel_l2, r.rel_l2))  # NaN sorts last
    ok = all(r.passes(tolerance) for r in rows)
    word = "PASS" if ok else "FAIL"
    return ok, (f"{word}: {len(rows)} outputs, worst relative L2 {worst.rel_l2:.3e} ({worst.name}), "
                f"{precision} tolerance {tolerance:g}")
