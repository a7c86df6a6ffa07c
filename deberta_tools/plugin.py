"""The `DisentangledAttention_TRT` op: its contract, its index rule, and a reference built from standard ONNX ops.

TensorRT runs the real plugin. Every other runtime (ONNX Runtime's CPU and CUDA providers, our tests) runs
`expand_reference`, which replaces each plugin node by standard ops that follow the plugin kernel's own formula:
indices are computed from `span` with the kernel's float32 log-bucket rule, never taken from the original graph.
A plugin node wired to the wrong inputs, or given a wrong `span` or `factor`, therefore changes the output here too.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import onnx_io

OP_TYPE = "DisentangledAttention_TRT"
# Kernel tile: no bounds checks, so sequence lengths must be a multiple of this.
SEQ_MULTIPLE = 64
_EPSILON = np.float32(1e-7)


def bucket_index(rel: np.ndarray, span: int) -> np.ndarray:
    """Index into the 2*span relative-position axis for relative distances `rel` (= i - j), as the kernel computes it.

    bucket(d) = d for |d| <= mid (mid = span // 2), else sign(d) * (ceil((ln|d| - ln mid) * t) + mid) with
    t = (mid - 1) / (ln(2*span - 1) - ln mid) * (1 - 1e-7), all in float32; index = clamp(bucket + span, 0, 2*span - 1).
    """
    if span < 2:
        raise ValueError(f"span must be >= 2, got {span}")
    rel = np.asarray(rel, dtype=np.int64)
    mid = span // 2
    log_mid = np.log(np.float32(mid))
    t = np.float32(mid - 1) / (np.log(np.float32(2 * span - 1)) - log_mid) * (np.float32(1) - _EPSILON)
    absd = np.maximum(np.abs(rel), 1).astype(np.float32)
    far = (np.ceil((np.log(absd) - log_mid) * t) + np.float32(mid)).astype(np.int64)
    bucket = np.where(np.abs(rel) <= mid, rel, np.sign(rel) * far)
    return np.clip(bucket + span, 0, 2 * span - 1)


def reference_numpy(data0, data1, data2, span: int, factor: float) -> np.ndarray:
    """out[n,i,j] = factor * (data0[n,i,j] + data1[n,i,idx(i-j)] + data2[n,j,idx(i-j)]) in numpy (for tests)."""
    s = data0.shape[1]
    rel = np.arange(s)[:, None] - np.arange(s)[None, :]
    idx = bucket_index(rel, span)
    c2p = np.take_along_axis(data1, np.broadcast_to(idx, data0.shape), axis=2)
    p2c = np.take_along_axis(data2, np.broadcast_to(idx.T, data0.shape), axis=2).transpose(0, 2, 1)
    return (data0 + c2p + p2c) * data0.dtype.type(factor)


def node_attrs(span: int, factor: float, version: str) -> dict:
    """Attributes for the plugin node. The ONNX parser reads plugin_version (default "1") and plugin_namespace."""
    if version not in ("1", "2"):
        raise ValueError(f"plugin_version must be '1' or '2', got {version!r}")
    return {"span": int(span), "factor": float(factor), "plugin_version": version, "plugin_namespace": ""}


def _index_table(graph: gs.Graph, tag: str, seq: gs.Variable, span: int, transpose: bool) -> gs.Variable:
    """Build idx(i - j) (or idx(j - i) when transpose) as an int64 [S, S] tensor from the runtime length `seq`."""
    def c(name, value):
        return gs.Constant(f"{tag}_{name}", np.array(value))

    pos = graph.layer(op="Range", inputs=[c("zero", np.int64(0)), seq, c("one", np.int64(1))],
                      outputs=[f"{tag}_pos"])[0]
    rows = graph.layer(op="Unsqueeze", inputs=[pos, c("ax1", np.array([1], np.int64))], outputs=[f"{tag}_rows"])[0]
    cols = graph.layer(op="Unsqueeze", inputs=[pos, c("ax0", np.array([0], np.int64))], outputs=[f"{tag}_cols"])[0]
    a, b = (cols, rows) if transpose else (rows, cols)
    rel = graph.layer(op="Sub", inputs=[a, b], outputs=[f"{tag}_rel"])[0]

    mid = span // 2
    log_mid = np.log(np.float32(mid))
    t = np.float32(mid - 1) / (np.log(np.float32(2 * span - 1)) - log_mid) * (np.float32(1) - _EPSILON)
    absd = graph.layer(op="Abs", inputs=[rel], outputs=[f"{tag}_abs"])[0]
    absf = graph.layer(op="Cast", inputs=[absd], outputs=[f"{tag}_absf"], attrs={"to": onnx.TensorProto.FLOAT})[0]
    absf = graph.layer(op="Max", inputs=[absf, c("fone", np.float32(1))], outputs=[f"{tag}_absf1"])[0]
    logd = graph.layer(op="Log", inputs=[absf], outputs=[f"{tag}_log"])[0]
    shifted = graph.layer(op="Sub", inputs=[logd, c("logmid", log_mid)], outputs=[f"{tag}_shift"])[0]
    scaled = graph.layer(op="Mul", inputs=[shifted, c("t", t)], outputs=[f"{tag}_scaled"])[0]
    ceiled = graph.layer(op="Ceil", inputs=[scaled], outputs=[f"{tag}_ceil"])[0]
    far = graph.layer(op="Cast", inputs=[ceiled], outputs=[f"{tag}_fari"], attrs={"to": onnx.TensorProto.INT64})[0]
    far = graph.layer(op="Add", inputs=[far, c("mid", np.int64(mid))], outputs=[f"{tag}_far"])[0]
    sign = graph.layer(op="Sign", inputs=[rel], outputs=[f"{tag}_sign"])[0]
    far = graph.layer(op="Mul", inputs=[far, sign], outputs=[f"{tag}_farsigned"])[0]
    near = graph.layer(op="LessOrEqual", inputs=[absd, c("midi", np.int64(mid))], outputs=[f"{tag}_near"])[0]
    bucket = graph.layer(op="Where", inputs=[near, rel, far], outputs=[f"{tag}_bucket"])[0]
    shifted_idx = graph.layer(op="Add", inputs=[bucket, c("span", np.int64(span))], outputs=[f"{tag}_idxu"])[0]
    return graph.layer(op="Clip", inputs=[shifted_idx, c("lo", np.int64(0)), c("hi", np.int64(2 * span - 1))],
                       outputs=[f"{tag}_idx"])[0]


def _replace_node(graph: gs.Graph, node: gs.Node, tag: str) -> None:
    data0, data1, data2 = node.inputs
    out = node.outputs[0]
    span = int(node.attrs["span"])
    factor = float(node.attrs["factor"])
    node.outputs.clear()
    node.inputs.clear()

    shape0 = graph.layer(op="Shape", inputs=[data0], outputs=[f"{tag}_shape0"])[0]
    seq = graph.layer(op="Gather", inputs=[shape0, gs.Constant(f"{tag}_i1", np.array(1, np.int64))],
                      outputs=[f"{tag}_seq"], attrs={"axis": 0})[0]
    c2p_idx = _index_table(graph, f"{tag}_c2p", seq, span, transpose=False)
    p2c_idx = _index_table(graph, f"{tag}_p2c", seq, span, transpose=True)
    c2p_idx = graph.layer(op="Expand", inputs=[c2p_idx, shape0], outputs=[f"{tag}_c2p_full"])[0]
    p2c_idx = graph.layer(op="Expand", inputs=[p2c_idx, shape0], outputs=[f"{tag}_p2c_full"])[0]
    c2p = graph.layer(op="GatherElements", inputs=[data1, c2p_idx], outputs=[f"{tag}_c2p"], attrs={"axis": 2})[0]
    p2c = graph.layer(op="GatherElements", inputs=[data2, p2c_idx], outputs=[f"{tag}_p2c_t"], attrs={"axis": 2})[0]
    p2c = graph.layer(op="Transpose", inputs=[p2c], outputs=[f"{tag}_p2c"], attrs={"perm": [0, 2, 1]})[0]
    # Same order as the kernel: (data0 + c2p + p2c) * factor; factor cast to the data type at run time.
    total = graph.layer(op="Add", inputs=[data0, c2p], outputs=[f"{tag}_sum01"])[0]
    total = graph.layer(op="Add", inputs=[total, p2c], outputs=[f"{tag}_sum"])[0]
    factor_t = graph.layer(op="CastLike", inputs=[gs.Constant(f"{tag}_factor", np.array(factor, np.float32)), total],
                           outputs=[f"{tag}_factor_t"])[0]
    graph.layer(op="Mul", inputs=[total, factor_t], outputs=[out])


def expand_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` where every plugin node is replaced by its standard-op reference."""
    graph = gs.import_onnx(model)
    nodes = [n for n in graph.nodes if n.op == OP_TYPE]
    for i, node in enumerate(nodes):
        _replace_node(graph, node, f"dattn_ref{i}")
    graph.cleanup().toposort()
    return onnx_io.from_graph(graph, model)


def count_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == OP_TYPE)
