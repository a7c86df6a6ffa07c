"""Each script driven through its command line, as the README shows, including its error paths."""

import importlib.util

import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from conftest import make_model, run_script
from deberta_tools import onnx_io, plugin


def _ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _one_error_line(proc, code=1):
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_readme_chain_on_the_seed_config(tmp_path):
    """Export the demo's application config at 512, make all four models, and pass the fp32 correctness check."""
    onnx_path = tmp_path / "test" / "deberta.onnx"
    out = _ok(run_script("deberta_pytorch2onnx.py", "--filename", onnx_path, "--seq-len", "512"))
    assert "last_hidden_state" in out and onnx_path.is_file()
    _ok(run_script("deberta_onnx_modify.py", onnx_path))
    out = _ok(run_script("deberta_onnx_modify.py", onnx_path, "--plugin"))
    assert "Fused 12 layers" in out and "span 256" in out and "every sequence length" in out
    _ok(run_script("deberta_onnx_modify.py", onnx_path, "--correctness-check"))
    out = _ok(run_script("deberta_ort_inference.py", "--onnx", tmp_path / "test" / "deberta",
                         "--correctness-check", "fp32"))
    assert "PASS" in out and out.count("| attention_scores_") == 12
    out = _ok(run_script("deberta_ort_inference.py", "--onnx", tmp_path / "test" / "deberta_plugin.onnx",
                         "--test", "fp32", "--iterations", "3", "--warmup", "1", "--seq-len", "128"))
    assert "CPUExecutionProvider" in out and "median ms" in out
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == sorted(
        ["deberta.onnx", "deberta_original.onnx", "deberta_plugin.onnx",
         "deberta_correctness_check_original.onnx", "deberta_correctness_check_plugin.onnx"])


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-classifier")
    make_model("v3", head="DebertaV2ForSequenceClassification").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_variant_folder_with_its_head(tmp_path, classifier_dir, exporter):
    onnx_path = tmp_path / "cls.onnx"
    out = _ok(run_script("deberta_pytorch2onnx.py", "--variant", classifier_dir, "--filename", onnx_path,
                         "--exporter", exporter, "--verify-seq-len", "200"))
    assert "logits" in out and "DebertaV2ForSequenceClassification" in out
    out = _ok(run_script("deberta_onnx_modify.py", onnx_path, "--plugin", "--output", tmp_path / "p.onnx"))
    assert "Fused 2 layers" in out
    assert plugin.count_nodes(onnx.load(tmp_path / "p.onnx")) == 2
    out = _ok(run_script("deberta_ort_inference.py", "--onnx", tmp_path / "p.onnx", "--test", "fp32",
                         "--iterations", "5", "--warmup", "1", "--batch-size", "2", "--seq-len", "100"))
    assert "b2 s100" in out


def test_variant_and_seq_len_conflict():
    proc = run_script("deberta_pytorch2onnx.py", "--variant", "x", "--seq-len", "128")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


def test_variant_that_is_not_deberta(tmp_path):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    line = _one_error_line(run_script("deberta_pytorch2onnx.py", "--variant", tmp_path / "bert",
                                      "--filename", tmp_path / "b.onnx"))
    assert "'bert'" in line and "not DebertaV2" in line
    assert not (tmp_path / "b.onnx").exists()


def _not_deberta(path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Softmax", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)])
    onnx.save(helper.make_model(graph, ir_version=10), path)


@pytest.mark.parametrize("flag", [[], ["--plugin"], ["--correctness-check"]])
def test_graph_that_is_not_deberta_writes_nothing(tmp_path, flag):
    _not_deberta(tmp_path / "mlp.onnx")
    line = _one_error_line(run_script("deberta_onnx_modify.py", tmp_path / "mlp.onnx", *flag))
    assert "no disentangled-attention region" in line
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.onnx"]


def test_missing_file_and_conflicting_flags(tmp_path):
    line = _one_error_line(run_script("deberta_onnx_modify.py", tmp_path / "nope.onnx"))
    assert "not found" in line
    proc = run_script("deberta_onnx_modify.py", tmp_path / "nope.onnx", "--plugin", "--correctness-check")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    line = _one_error_line(run_script("deberta_onnx_modify.py", tmp_path / "x.onnx", "--correctness-check",
                                      "--output", tmp_path / "y.onnx"))
    assert "--output" in line
    line = _one_error_line(run_script("deberta_ort_inference.py", "--onnx", tmp_path / "nothing",
                                      "--correctness-check", "fp32"))
    assert "--correctness-check" in line and "not found" in line


def test_inexact_config_is_refused_then_forced_loudly(tmp_path, export_cache):
    path, _ = export_cache("mrp_mismatch", "dynamo")
    work = tmp_path / "m.onnx"
    work.write_bytes(path.read_bytes())
    line = _one_error_line(run_script("deberta_onnx_modify.py", work, "--plugin"))
    assert "max_relative_positions=128" in line and "Nothing was written" in line
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    proc = run_script("deberta_onnx_modify.py", work, "--plugin", "--allow-inexact")
    assert proc.returncode == 0 and "WARNING" in proc.stderr
    model = onnx.load(tmp_path / "m_plugin.onnx")
    assert plugin.count_nodes(model) == 2
    assert onnx_io.get_meta(model, onnx_io.META_EXACT_SEQ_LEN) not in (None, "")
    # the inference script refuses lengths past the proven-exact one
    line = _one_error_line(run_script("deberta_ort_inference.py", "--onnx", tmp_path / "m_plugin.onnx",
                                      "--test", "fp32", "--seq-len", "256", "--iterations", "1"))
    assert "exact for this model only up to sequence length" in line


def test_correctness_check_fails_on_a_wrong_plugin(tmp_path, export_cache):
    path, _ = export_cache("v3", "dynamo")
    work = tmp_path / "w.onnx"
    work.write_bytes(path.read_bytes())
    _ok(run_script("deberta_onnx_modify.py", work, "--correctness-check"))
    _ok(run_script("deberta_ort_inference.py", "--onnx", tmp_path / "w", "--correctness-check", "fp32",
                   "--batch-size", "2"))
    bad = tmp_path / "w_correctness_check_plugin.onnx"
    graph = gs.import_onnx(onnx.load(bad))
    for node in graph.nodes:
        if node.op == plugin.OP_TYPE:
            node.attrs["span"] = node.attrs["span"] // 2
    onnx_io.save(gs.export_onnx(graph), bad)  # drops our metadata too: the script must cope
    proc = run_script("deberta_ort_inference.py", "--onnx", tmp_path / "w", "--correctness-check", "fp32")
    assert proc.returncode == 1 and "FAIL" in proc.stdout


def test_fp16_without_tensorrt_provider_says_what_to_do(tmp_path, export_cache):
    path, _ = export_cache("v3", "dynamo")
    line = _one_error_line(run_script("deberta_ort_inference.py", "--onnx", path, "--test", "fp16",
                                      "--provider", "cpu"))
    assert "fp32 graph" in line and "--fp16" in line


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_script_without_tensorrt(tmp_path):
    line = _one_error_line(run_script("deberta_tensorrt_inference.py", "--onnx", tmp_path / "m.onnx",
                                      "--build", "fp16"), code=2)
    assert "requirements-gpu.txt" in line
    assert list(tmp_path.iterdir()) == []


def test_polygraphy_on_the_original_model_agrees_with_our_ort_path(tmp_path, export_cache):
    """The README's `polygraphy run <model>_original.onnx --onnxrt`, on the same inputs as our ORT session."""
    import numpy as np
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    from deberta_tools import compare
    from deberta_tools.inputs import random_inputs
    from deberta_tools.ort_session import open_session

    path, _ = export_cache("v3", "dynamo")
    work = tmp_path / "p.onnx"
    work.write_bytes(path.read_bytes())
    _ok(run_script("deberta_onnx_modify.py", work))
    original = tmp_path / "p_original.onnx"
    feeds = random_inputs(2, 128, 500, seed=6)
    save_json([feeds], tmp_path / "inputs.json")
    proc = run_script(_polygraphy_script(), "run", original, "--onnxrt", "--load-inputs", tmp_path / "inputs.json",
                      "--save-outputs", tmp_path / "outputs.json")
    assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    (runner, iterations), = RunResults.load(str(tmp_path / "outputs.json")).items()
    theirs = iterations[0]["last_hidden_state"]
    ours = open_session(original, "cpu").run(feeds)["last_hidden_state"]
    assert theirs.shape == ours.shape == (2, 128, 64)
    assert compare.relative_l2(np.asarray(theirs), ours) < 1e-6


def _polygraphy_script():
    """polygraphy's console script in this interpreter's environment (run with this interpreter)."""
    import shutil
    import sys
    from pathlib import Path
    found = Path(sys.executable).parent / "polygraphy"
    return found if found.is_file() else shutil.which("polygraphy")
