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


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def benchmark_latency_table(cells, labels: dict, batch: int) -> str:
    """Upstream-shaped: one block of rows per sequence length, one row per backend, then the speed-up row.
    Empty cells say why in the last column."""
    seqs = sorted({c.seq for c in cells if c.batch == batch})
    rows = []
    for seq in seqs:
        block = [c for c in cells if c.batch == batch and c.seq == seq]
        base = next((c for c in block if c.backend == "torch-fp32" and c.ok), None)
        for c in block:
            speed = f"{base.median_ms / c.median_ms:.1f}x" if base and c.ok else "—"
            rows.append([str(seq), labels[c.backend], _ms(c.median_ms), _ms(c.p90_ms),
                         "—" if c.peak_gib is None else f"{c.peak_gib:.2f}",
                         "—" if c.rel_l2 is None else f"{c.rel_l2:.1e}", speed, c.note])
        measured = [c for c in block if c.ok]
        if base and measured:
            best = min(measured, key=lambda c: c.median_ms)
            rows.append([str(seq), f"**Speed-up** (fastest: {labels[best.backend]})", "", "", "", "",
                         f"**{base.median_ms / best.median_ms:.1f}x**", ""])
    return table(["sequence", "backend", "median ms", "p90 ms", "peak GiB", "rel. L2 vs FP32",
                  "vs PyTorch FP32", "why empty"], rows)


def benchmark_throughput_table(cells, labels: dict, seq: int) -> str:
    """Sequences per second (batch / median latency) for every batch size at one sequence length."""
    batches = sorted({c.batch for c in cells if c.seq == seq})
    order = list(dict.fromkeys(c.backend for c in cells))
    rows = []
    for name in order:
        row = [labels[name]]
        notes = set()
        for b in batches:
            c = next((c for c in cells if c.backend == name and c.batch == b and c.seq == seq), None)
            if c is not None and c.ok:
                row.append(f"{b * 1e3 / c.median_ms:,.0f}")
            else:
                row.append("—")
                if c is not None and c.note:
                    notes.add(c.note)
        rows.append(row + ["; ".join(sorted(notes))])
    return table(["backend"] + [f"batch {b}" for b in batches] + ["why empty"], rows)


def gpu_environment() -> dict:
    """Device, driver and library versions for the benchmark's header and JSON."""
    import importlib.metadata as md
    import subprocess

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "triton", "onnxruntime", "onnxruntime-gpu", "tensorrt", "disentangled-flash",
                 "flashdeberta"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return env
