"""The fp16 graph conversion, run under ONNX Runtime CPU with the fp16 tolerance."""

import numpy as np
import onnx
import pytest

from deberta_tools import compare, onnx_io, precision, surgery
from deberta_tools.inputs import random_inputs
from deberta_tools.ort_session import open_session

FP16 = compare.TOLERANCE["fp16"]


def _outputs(model, feeds, tmp_path, name, fp16):
    path = onnx_io.save(model, tmp_path / f"{name}.onnx") if isinstance(model, onnx.ModelProto) else model
    sess = open_session(path, "cpu", fp16=fp16)
    return {k: compare.valid_only(v, feeds["attention_mask"], sess.seq_axes.get(k, []))
            for k, v in sess.run(feeds).items()}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fp16_graph_close_to_fp32_on_v3_shaped_config(export_cache, tmp_path, exporter):
    """256/512 log buckets at 640 tokens with a padded batch: within 1e-2 relative L2, no NaN, both for the
    original graph and the plugin graph (its reference) in fp16."""
    path, _ = export_cache("v3_span256", exporter, head="DebertaV2ForSequenceClassification", seq_len=640)
    model = onnx_io.load(path)
    feeds = random_inputs(3, 640, 500, seed=4)
    want = _outputs(path, feeds, tmp_path, "fp32", fp16=False)["logits"]
    half = precision.to_fp16(model)
    assert precision.graph_precision(half) == "fp16" and precision.graph_precision(model) == "fp32"
    prepared = surgery.prepare(model, "m", 640, need_plan=True)
    surgery.fuse(prepared.graph, prepared.regions, prepared.plan)
    plugin_half = precision.to_fp16(onnx_io.from_graph(prepared.graph, model))
    for name, candidate in [("fp16", half), ("fp16_plugin", plugin_half)]:
        got = _outputs(candidate, feeds, tmp_path, name, fp16=True)["logits"]
        assert not np.isnan(got).any(), name
        assert compare.relative_l2(got, want) < FP16, name


def test_fp16_keeps_position_indices_and_statistics_in_fp32(export_cache):
    path, _ = export_cache("v3_span256", "dynamo", head="DebertaV2ForSequenceClassification", seq_len=640)
    half = precision.to_fp16(onnx_io.load(path))
    graph = onnx.shape_inference.infer_shapes(half).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}
    types.update({init.name: init.data_type for init in graph.initializer})
    ops = {n.op_type for n in graph.node}
    for node in graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "Log", "Ceil"):
            assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, (node.op_type, node.name)
    assert "Log" in ops
    # no lossy fp32 -> fp16 -> fp32 round trips left
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT:
            up = producer.get(node.input[0])
            assert not (up is not None and up.op_type == "Cast" and up.attribute[0].i == onnx.TensorProto.FLOAT16
                        and types.get(up.input[0]) == onnx.TensorProto.FLOAT), node.name


def test_mask_fill_value_is_fp16_safe_and_fp32_equivalent(export_cache, tmp_path):
    """Fully padded rows must not become NaN in fp16: the fill value is -65504, not float32's lowest."""
    path, _ = export_cache("v3", "dynamo")
    half = precision.to_fp16(onnx_io.load(path))
    feeds = random_inputs(2, 128, 500, seed=9)
    feeds["attention_mask"][1, 64:] = 0
    got = open_session(onnx_io.save(half, tmp_path / "h.onnx"), "cpu", fp16=True).run(feeds)["last_hidden_state"]
    assert np.isfinite(got).all()
