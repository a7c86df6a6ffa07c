"""The benchmark script end to end on a CPU: a smoke test of its code paths (not a timing test)."""

import json

from conftest import run_script


def test_benchmark_smoke_on_tiny_config(tmp_path):
    out_dir = tmp_path / "bench"
    proc = run_script("deberta_benchmark.py", "--shape", "tiny", "--seq-len", "24", "40", "--batch-size", "1", "2",
                      "--iterations", "2", "--warmup", "1", "--output-dir", out_dir, "--backends", "torch-fp32",
                      "torch-fp16", "ort", "ort-plugin", "tensorrt", "flashdeberta", "fused-fp16", "fused-fp16-graphs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out_dir / "results.json").read_text())
    cells = {(c["backend"], c["batch"], c["seq"]): c for c in data["cells"]}
    assert len(cells) == 8 * 4
    for (name, batch, seq), c in cells.items():
        # every cell has a number or says why not, never both
        assert (c["median_ms"] is None) == bool(c["note"]), c
    for shape in [(1, 24), (2, 24), (1, 40), (2, 40)]:
        assert cells[("torch-fp32", *shape)]["rel_l2"] < 1e-6
        assert cells[("ort", *shape)]["rel_l2"] < 1e-5              # ONNX Runtime CPU, fp32 graph
        assert cells[("fused-fp16", *shape)]["rel_l2"] < 1e-2       # Triton interpreter, fp16
        assert "CUDA" in cells[("torch-fp16", *shape)]["note"]
        assert "CUDA" in cells[("fused-fp16-graphs", *shape)]["note"]
        assert cells[("tensorrt", *shape)]["note"]
    markdown = (out_dir / "results.md").read_text()
    assert "## Latency, batch 1" in markdown and "## Throughput, sequences/s at sequence 40" in markdown
    assert "**Speed-up**" in markdown and "vs PyTorch FP32" in markdown
    assert (out_dir / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_rejects_unknown_backend(tmp_path):
    proc = run_script("deberta_benchmark.py", "--shape", "tiny", "--backends", "warp-drive", "--output-dir", tmp_path)
    assert proc.returncode == 1 and "unknown backend" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_benchmark_variant_says_why_onnx_cells_are_empty(tmp_path):
    """A --variant (here a save_pretrained folder) runs the PyTorch rows; the ONNX rows say how to get them."""
    from conftest import make_model
    make_model("v3", "DebertaV2ForSequenceClassification").save_pretrained(tmp_path / "seed")
    out_dir = tmp_path / "bench"
    proc = run_script("deberta_benchmark.py", "--variant", tmp_path / "seed", "--seq-len", "24", "--iterations", "2",
                      "--warmup", "1", "--output-dir", out_dir, "--backends", "torch-fp32", "ort")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = {c["backend"]: c for c in json.loads((out_dir / "results.json").read_text())["cells"]}
    assert cells["torch-fp32"]["median_ms"] is not None
    assert cells["ort"]["median_ms"] is None and "--variant" in cells["ort"]["note"]
