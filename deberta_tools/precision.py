"""Graph precision: converting an fp32 DeBERTa graph to fp16 without the usual DeBERTa fp16 failures, and telling
which precision a graph is in.

Kept in fp32: Softmax and LayerNormalization (their statistics overflow or lose too much in fp16) and the
integer relative-position index computation (its float log-bucket arithmetic would round to wrong buckets).
The attention mask's fill value, float32's lowest (-3.4e38), becomes -65504: in fp16 the former is -inf, and a
fully masked (padded) row then softmaxes to NaN, which leaks into real tokens through P·V (0 × NaN). In fp32 the
two values give identical results, since exp underflows to exactly 0 for both.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import onnx_io
from .surgery import const_value, replace_uses

FP16_LOWEST = float(np.finfo(np.float16).min)
KEEP_FP32_OPS = ["Softmax", "LayerNormalization"]
META_PRECISION = "deberta.precision"


def _clamp_mask_constants(graph: gs.Graph) -> int:
    """Replace float32 fill values below fp16's range in Where nodes (the attention mask) by -65504."""
    safe: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        if node.op != "Where":
            continue
        for i, t in enumerate(node.inputs[1:], start=1):
            value = const_value(t)
            if value is None or value.dtype != np.float32 or value.size != 1 or float(value.ravel()[0]) >= FP16_LOWEST:
                continue
            if t.name not in safe:
                safe[t.name] = gs.Constant(f"{t.name}_fp16_safe", np.full_like(value, FP16_LOWEST))
            node.inputs[i] = safe[t.name]
    return len(safe)


def _index_nodes(graph: gs.Graph) -> list[str]:
    """Names of the nodes that compute GatherElements indices (the relative-position buckets)."""
    names, stack, seen = set(), [n.inputs[1] for n in graph.nodes if n.op == "GatherElements"], set()
    while stack:
        t = stack.pop()
        if id(t) in seen or isinstance(t, gs.Constant):
            continue
        seen.add(id(t))
        for node in t.inputs:
            names.add(node.name)
            stack.extend(node.inputs)
    return sorted(names)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp16 copy of an fp32 graph; inputs and outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = gs.import_onnx(model)
    for i, node in enumerate(graph.nodes):
        node.name = node.name or f"node_{i}"   # the converter blocks nodes by name
    _clamp_mask_constants(graph)
    block = _index_nodes(graph)
    out = convert_float_to_float16(onnx_io.from_graph(graph, model), keep_io_types=True, op_block_list=KEEP_FP32_OPS, node_block_list=block)
    # The converter emits one Cast per use of a shared initializer, all identical: keep one.
    seen, nodes = set(), []
    for node in out.graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out = _drop_round_trips(out, like=model)
    onnx_io.set_meta(out, META_PRECISION, "fp16")
    return out


def _drop_round_trips(model: onnx.ModelProto, like: onnx.ModelProto) -> onnx.ModelProto:
    """Remove fp32 -> fp16 -> fp32 Cast pairs. The converter puts one on every tensor between two nodes it keeps
    in fp32, which rounds the log-bucket arithmetic to fp16 between steps and moves indices to wrong buckets."""
    graph = gs.import_onnx(model)
    for node in graph.nodes:
        if node.op != "Cast" or node.attrs.get("to") != onnx.TensorProto.FLOAT:
            continue
        down = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if down is None or down.op != "Cast" or down.attrs.get("to") != onnx.TensorProto.FLOAT16:
            continue
        source = down.inputs[0]
        if source.dtype != np.float32:
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        replace_uses(out, source)
    graph.cleanup().toposort()
    return onnx_io.from_graph(graph, like)


def graph_precision(model: onnx.ModelProto) -> str:
    """'fp16' for a graph whose weights are fp16 (made by to_fp16 or elsewhere), else 'fp32'."""
    marked = onnx_io.get_meta(model, META_PRECISION)
    if marked:
        return marked
    kinds = [init.data_type for init in model.graph.initializer if len(init.dims) >= 2]
    half = sum(k == onnx.TensorProto.FLOAT16 for k in kinds)
    return "fp16" if kinds and half * 2 >= len(kinds) else "fp32"
