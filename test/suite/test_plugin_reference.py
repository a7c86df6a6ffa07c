"""The plugin's index rule and its standard-op reference."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from deberta_tools import plugin


@pytest.mark.parametrize("span", [4, 32, 64, 256])
def test_index_rule_equals_hf_log_buckets_when_max_relative_is_twice_span(span):
    d = torch.arange(-6 * span - 7, 6 * span + 8)
    hf = torch.clamp(make_log_bucket_position(d, span, 2 * span).long() + span, 0, 2 * span - 1).numpy()
    assert np.array_equal(plugin.bucket_index(d.numpy(), span), hf)


def test_index_rule_differs_from_linear_positions_beyond_half_span():
    d = np.arange(-600, 601)
    linear = np.clip(d + 256, 0, 511)
    got = plugin.bucket_index(d, 256)
    assert np.array_equal(got[np.abs(d) <= 128], linear[np.abs(d) <= 128])
    assert not np.array_equal(got, linear)


def _plugin_model(span, factor, dtype):
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    node = helper.make_node(plugin.OP_TYPE, ["d0", "d1", "d2"], ["out"], **plugin.node_attrs(span, factor, "2"))
    inputs = [helper.make_tensor_value_info("d0", elem, ["n", "s", "s"]),
              helper.make_tensor_value_info("d1", elem, ["n", "s", "w"]),
              helper.make_tensor_value_info("d2", elem, ["n", "s", "w"])]
    graph = helper.make_graph([node], "p", inputs, [helper.make_tensor_value_info("out", elem, ["n", "s", "s"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float16, 2e-3)])
@pytest.mark.parametrize("span,seq", [(8, 64), (32, 192), (16, 100)])
def test_onnx_reference_matches_numpy_formula(span, seq, dtype, tol):
    rng = np.random.default_rng(span + seq)
    n = 3
    d0, d1, d2 = (rng.standard_normal(s).astype(dtype) for s in [(n, seq, seq), (n, seq, 2 * span), (n, seq, 2 * span)])
    model = plugin.expand_reference(_plugin_model(span, 0.125, dtype))
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"d0": d0, "d1": d1, "d2": d2})[0]
    want = plugin.reference_numpy(d0.astype(np.float64), d1.astype(np.float64), d2.astype(np.float64), span, 0.125)
    assert got.dtype == dtype
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_reference_numpy_by_hand():
    """One entry worked out by hand: span 4, mid 2, i=5, j=0 -> d=5 -> far bucket."""
    span, s = 4, 8
    d0 = np.zeros((1, s, s)); d1 = np.arange(s * 2 * span, dtype=float).reshape(1, s, 2 * span)
    d2 = np.zeros((1, s, 2 * span))
    # bucket(5) = ceil((ln5 - ln2) * (2-1)/(ln7 - ln2) * (1-1e-7)) + 2 = ceil(0.7314...) + 2 = 3 -> index 7
    assert plugin.bucket_index(np.array([5]), span)[0] == 7
    assert plugin.reference_numpy(d0, d1, d2, span, 1.0)[0, 5, 0] == d1[0, 5, 7]


def test_node_attrs_reject_unknown_version():
    with pytest.raises(ValueError):
        plugin.node_attrs(256, 0.1, "3")
