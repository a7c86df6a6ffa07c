"""Engine names, profiles, precision rules and the stale-engine check: everything around TensorRT that needs no
TensorRT."""

from pathlib import Path

import pytest

from deberta_tools import engine_files as ef
from deberta_tools.errors import UserError


@pytest.mark.parametrize("device,short", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"), ("NVIDIA B200", "B200"), ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA GeForce RTX 4090", "RTX4090"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX6000Ada"), ("NVIDIA RTX A6000", "RTXA6000"),
    ("NVIDIA GeForce RTX 3080 Ti", "RTX3080Ti"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "H100"), ("", "GPU")])
def test_gpu_short_names(device, short):
    assert ef.gpu_short_name(device) == short


def test_engine_path_beside_the_model():
    assert ef.engine_path("./test/deberta_plugin.onnx", "H100", "fp16") == Path("test/deberta_plugin_H100_fp16.engine")


def test_profiles_round_plugin_lengths_up_to_64_and_validate():
    shapes = ef.profile_shapes(["input_ids", "attention_mask"], (1, 4, 8), (100, 512, 1000), plugin=True)
    assert shapes["input_ids"] == ((1, 128), (4, 512), (8, 1024)) == shapes["attention_mask"]
    assert ef.profile_shapes(["input_ids"], (1, 1, 1), (100, 100, 100), plugin=False)["input_ids"][0] == (1, 100)
    with pytest.raises(UserError, match="min <= opt <= max"):
        ef.profile_shapes(["input_ids"], (2, 1, 4), (64, 64, 64), plugin=False)


def test_precision_rules_for_tensorrt_10_and_11():
    assert ef.precision_problem("fp16", "fp32", strongly_typed=False, onnx_path="t/d_plugin.onnx") is None
    message = ef.precision_problem("fp16", "fp32", strongly_typed=True, onnx_path="t/d_plugin.onnx")
    assert "--fp16 --plugin" in message and "d_fp16_plugin.onnx" in message
    message = ef.precision_problem("fp16", "fp32", True, "t/d_correctness_check_original.onnx")
    assert "--fp16 --correctness-check" in message
    for strongly_typed in (False, True):
        assert "fp16 graph" in ef.precision_problem("fp32", "fp16", strongly_typed, "t/d_fp16_plugin.onnx")
        assert ef.precision_problem("fp16", "fp16", strongly_typed, "t/d_fp16_plugin.onnx") is None
        assert ef.precision_problem("tf32", "fp32", strongly_typed, "t/d_plugin.onnx") is None


def test_engines_from_another_version_or_gpu_are_detected(tmp_path):
    engine = tmp_path / "m_H100_fp16.engine"
    info = ef.EngineInfo("10.16.1.11", "NVIDIA H100 80GB HBM3", "90", "fp16", "m.onnx", {})
    info.save(engine)
    loaded = ef.EngineInfo.load(engine)
    assert loaded == info
    assert ef.mismatch(loaded, "10.16.0.72", "NVIDIA H100 80GB HBM3", "90") is None
    assert "TensorRT 10.16.1.11" in ef.mismatch(loaded, "11.4.0.106", "NVIDIA H100 80GB HBM3", "90")
    assert "NVIDIA H100" in ef.mismatch(loaded, "10.16.1.11", "NVIDIA L4", "89")
    assert ef.mismatch(ef.EngineInfo.load(tmp_path / "none.engine"), "10.16.1.11", "x", "90") is None
