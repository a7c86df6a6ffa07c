"""Graph surgery on real exports: plugin graphs equal the original in fp32, wrong wiring shows, refusals."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from deberta_tools import compare, onnx_io, plugin, surgery
from deberta_tools.errors import UserError
from deberta_tools.inputs import random_inputs
from deberta_tools.ort_session import open_session

FP32 = compare.TOLERANCE["fp32"]


def _plugin_model(path, seq_len=256, correctness=False, version="2"):
    model = onnx_io.load(path)
    prepared = surgery.prepare(model, str(path), seq_len, need_plan=True)
    assert surgery.exactness_problem(prepared.plan, onnx_io.get_config(model), seq_len) is None
    original = None
    if correctness:
        original = prepared.graph.copy()
        surgery.expose_region_outputs(original, surgery.find_regions(original))
    surgery.fuse(prepared.graph, prepared.regions, prepared.plan, version)
    if correctness:
        surgery.expose_region_outputs(prepared.graph, prepared.regions)
        original = onnx_io.from_graph(original, model)
    return onnx_io.from_graph(prepared.graph, model), original, prepared


def _run(model_or_path, feeds, tmp_path, name):
    """Outputs on ORT CPU, padded positions zeroed (see compare.valid_only)."""
    path = model_or_path
    if isinstance(model_or_path, onnx.ModelProto):
        path = onnx_io.save(model_or_path, tmp_path / f"{name}.onnx")
    sess = open_session(path, "cpu")
    return {k: compare.valid_only(v, feeds["attention_mask"], sess.seq_axes.get(k, []))
            for k, v in sess.run(feeds).items()}


@pytest.mark.parametrize("name,exporter", [("v3", "dynamo"), ("v3", "torchscript"),
                                           ("v3_separate_keys", "dynamo"), ("v3_separate_keys", "torchscript"),
                                           ("c2p_only", "dynamo"), ("p2c_only", "torchscript")])
def test_plugin_graph_equals_original_fp32(export_cache, tmp_path, name, exporter):
    path, _ = export_cache(name, exporter)
    fused, _, prepared = _plugin_model(path)
    assert plugin.count_nodes(fused) == 2
    assert prepared.plan.unlimited
    for batch, seq in [(2, 256), (3, 100), (1, 64)]:
        feeds = random_inputs(batch, seq, 500, seed=seq)
        want = _run(path, feeds, tmp_path, "orig")
        got = _run(fused, feeds, tmp_path, "fused")
        for key in want:
            assert compare.relative_l2(got[key], want[key]) < FP32, (key, batch, seq)


def test_per_layer_scores_equal_original_fp32(export_cache, tmp_path):
    path, _ = export_cache("v3", "dynamo")
    fused, original, _ = _plugin_model(path, correctness=True)
    feeds = random_inputs(2, 192, 500, seed=7)
    want = _run(original, feeds, tmp_path, "cc_orig")
    got = _run(fused, feeds, tmp_path, "cc_plugin")
    assert sorted(want) == sorted(got) == sorted(["last_hidden_state", "attention_scores_0", "attention_scores_1"])
    for key in want:
        assert got[key].shape == want[key].shape
        assert compare.relative_l2(got[key], want[key]) < FP32, key


def test_v3_shaped_classifier_logits_with_256_buckets(export_cache, tmp_path):
    """position_buckets 256 / max_relative_positions 512 as in every DeBERTa-v3 checkpoint, with a head, at a
    length past 2*span so the saturated buckets are exercised."""
    path, model = export_cache("v3_span256", "dynamo", head="DebertaV2ForSequenceClassification", seq_len=640)
    fused, _, _ = _plugin_model(path, seq_len=640)
    feeds = random_inputs(2, 640, 500, seed=3)
    want = _run(path, feeds, tmp_path, "orig")["logits"]
    got = _run(fused, feeds, tmp_path, "fused")["logits"]
    assert got.shape == (2, 3)
    assert compare.relative_l2(got, want) < FP32


def _mutated(fused, **change):
    g = gs.import_onnx(fused)
    node = [n for n in g.nodes if n.op == plugin.OP_TYPE][0]
    if "swap" in change:
        node.inputs[1], node.inputs[2] = node.inputs[2], node.inputs[1]
    for key in ("span", "factor"):
        if key in change:
            node.attrs[key] = change[key](node.attrs[key])
    return onnx_io.from_graph(g, fused)


@pytest.mark.parametrize("change", [dict(swap=True), dict(span=lambda k: k - 4), dict(factor=lambda f: f * 1.01)],
                         ids=["c2p-p2c-swapped", "wrong-span", "wrong-factor"])
def test_wrong_wiring_or_attributes_show_in_the_output(export_cache, tmp_path, change):
    path, _ = export_cache("v3", "dynamo")
    fused, _, _ = _plugin_model(path)
    feeds = random_inputs(2, 256, 500, seed=11)
    want = _run(path, feeds, tmp_path, "orig")["last_hidden_state"]
    good = _run(fused, feeds, tmp_path, "good")["last_hidden_state"]
    bad = _run(_mutated(fused, **change), feeds, tmp_path, "bad")["last_hidden_state"]
    assert compare.relative_l2(good, want) < FP32
    assert compare.relative_l2(bad, want) > 100 * FP32


def test_linear_positions_exact_only_for_short_sequences(export_cache):
    path, _ = export_cache("linear", "dynamo", seq_len=256)
    model = onnx_io.load(path)
    prepared = surgery.prepare(model, "linear", 256, need_plan=True)
    # span 64, mid 32: log buckets equal linear ones for |i-j| <= 34 here (exact for S <= first mismatch)
    limit = prepared.plan.max_exact_seq_len
    assert limit is not None and 33 <= limit < 64
    problem = surgery.exactness_problem(prepared.plan, onnx_io.get_config(model), 256)
    assert "position_buckets=-1" in problem
    assert surgery.exactness_problem(prepared.plan, onnx_io.get_config(model), limit) is None


def test_linear_positions_fused_within_exact_length_equal_original(export_cache, tmp_path):
    path, _ = export_cache("linear", "dynamo", seq_len=256)
    model = onnx_io.load(path)
    prepared = surgery.prepare(model, "linear", 32, need_plan=True)
    surgery.fuse(prepared.graph, prepared.regions, prepared.plan)
    fused = onnx_io.from_graph(prepared.graph, model)
    feeds = random_inputs(2, 32, 500, seed=5)
    want = _run(path, feeds, tmp_path, "orig")["last_hidden_state"]
    # the plugin model is padded to 64 tokens, where |i-j| of real tokens stays < 32
    got = _run(fused, feeds, tmp_path, "fused")["last_hidden_state"]
    assert compare.relative_l2(got, want) < FP32


def test_max_relative_positions_mismatch_is_named(export_cache):
    path, _ = export_cache("mrp_mismatch", "dynamo")
    model = onnx_io.load(path)
    prepared = surgery.prepare(model, "m", 256, need_plan=True)
    problem = surgery.exactness_problem(prepared.plan, onnx_io.get_config(model), 256)
    assert "max_relative_positions=128" in problem and "2*position_buckets=64" in problem


def test_no_relative_attention_is_not_fusable(export_cache):
    path, _ = export_cache("no_relative", "dynamo")
    with pytest.raises(UserError, match="no disentangled-attention region"):
        surgery.prepare(onnx_io.load(path), "norel", 256, need_plan=False)


def test_uint8_casts_removed_and_harmless(tmp_path):
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Cast", ["m"], ["m8"], to=TensorProto.UINT8),
             helper.make_node("Cast", ["m8"], ["mb"], to=TensorProto.BOOL),
             helper.make_node("Where", ["mb", "x", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("m", TensorProto.INT64, [4]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    g = gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert surgery.remove_uint8_casts(g) == 1
    assert surgery.remove_uint8_casts(g) == 0
    model = gs.export_onnx(g)
    assert not any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.UINT8 for n in model.graph.node)
    import onnxruntime as ort
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"m": np.array([1, 0, 2, 0]), "x": np.array([1, 2, 3, 4], np.float32)})[0]
    assert out.tolist() == [1, 0, 3, 0]
