"""Graph surgery on exported DebertaV2 models: uint8 Cast removal, finding each layer's disentangled-attention
region, proving the plugin exact for it, inserting `DisentangledAttention_TRT`, and correctness-check outputs.

A region is found from each Softmax by data flow, not fixed hops: back through the mask (Where) and reshapes to an
Add tree whose terms are, after stripping a scale (Div/Mul) and a [0,2,1] Transpose,
  c2c: MatMul(Q, Kᵀ)                    (the scale may sit on Q or Kᵀ, as current transformers does)
  c2p: GatherElements(Q·Krᵀ, index)
  p2c: Transpose(GatherElements(K·Qrᵀ, index))
Scales and index tables are read by evaluating the graph's own tensors under ONNX Runtime CPU, so it does not
matter whether an exporter left them as Constant nodes, initializers or small shape computations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import plugin
from .errors import UserError

_PASS_THROUGH = {"Expand", "Squeeze", "Unsqueeze", "Reshape", "Cast", "Identity"}


@dataclass
class Region:
    """One layer's attention-score sum, factor * (c2c + c2p + p2c), as found in the graph."""
    layer: int
    output: gs.Variable
    query: gs.Tensor
    key_t: gs.Tensor
    scales: list = field(default_factory=list)   # tensors whose value divides each term
    c2p_data: gs.Tensor | None = None
    c2p_index: gs.Tensor | None = None
    p2c_data: gs.Tensor | None = None
    p2c_index: gs.Tensor | None = None


@dataclass
class Plan:
    """What the plugin needs, and how far it is proven exact."""
    span: int
    factor: float
    checked_seq_len: int
    first_mismatch: int | None       # smallest |i-j| where the model's indices differ from the plugin's
    unlimited: bool                  # exact for every length (indices equal and saturated at the checked edge)

    @property
    def max_exact_seq_len(self) -> int | None:
        """Longest sequence length for which the plugin is exact; None means any length."""
        if self.first_mismatch is not None:
            return self.first_mismatch
        return None if self.unlimited else self.checked_seq_len


# ---------------------------------------------------------------------------------------------- small helpers
def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor, whether an initializer, a Constant node's output or an Identity of one."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = _producer(t)
    if node is None:
        return None
    if node.op == "Constant" and "value" in node.attrs:
        return np.asarray(node.attrs["value"].values)
    if node.op == "Identity":
        return const_value(node.inputs[0])
    return None


def _is_zero(t: gs.Tensor) -> bool:
    v = const_value(t)
    return v is not None and v.size <= 1 and not np.any(v)


def _is_scalar_const(t: gs.Tensor) -> bool:
    v = const_value(t)
    return v is not None and v.size == 1


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads `old` read `new` instead (graph outputs are left to the caller)."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


# ---------------------------------------------------------------------------------------------- Cast removal
def remove_uint8_casts(graph: gs.Graph) -> int:
    """Bypass Cast(to=UINT8) nodes fed by bool or integer tensors (old transformers' `.byte()` masks, which
    TensorRT rejects). Current exports have none; then this does nothing. Returns how many were removed."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "Cast" or node.attrs.get("to") != onnx.TensorProto.UINT8:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if src.dtype is not None and np.issubdtype(np.dtype(src.dtype), np.floating):
            continue  # a float quantised to uint8 is real arithmetic, not a mask; leave it
        replace_uses(dst, src)
        if dst in graph.outputs:
            graph.outputs[graph.outputs.index(dst)] = src
        node.outputs.clear()
        removed += 1
    if removed:
        graph.cleanup()
    return removed


# ---------------------------------------------------------------------------------------------- matching
def _classify(t: gs.Tensor, region: Region) -> str | None:
    """Put one Add-tree term into `region`; returns its kind or None if it is not a disentangled-attention term."""
    transposed = False
    scale = None
    for _ in range(4):  # a scale and a transpose, in either order
        node = _producer(t)
        if node is None:
            return None
        if node.op == "Div" and scale is None and _is_scalar_const_or_computed(node.inputs[1]):
            scale, t = ("div", node.inputs[1]), node.inputs[0]
        elif node.op == "Mul" and scale is None and _is_scalar_const(node.inputs[1]):
            scale, t = ("mul", node.inputs[1]), node.inputs[0]
        elif node.op == "Transpose" and not transposed and list(node.attrs.get("perm", [])) == [0, 2, 1]:
            transposed, t = True, node.inputs[0]
        else:
            break
    node = _producer(t)
    if node is None:
        return None
    if node.op == "GatherElements" and node.attrs.get("axis", 0) in (-1, 2):
        kind = "p2c" if transposed else "c2p"
        setattr(region, f"{kind}_data", node.inputs[0])
        setattr(region, f"{kind}_index", node.inputs[1])
    elif node.op == "MatMul" and not transposed:
        kind = "c2c"
        query, key_t = node.inputs
        for side in ("query", "key_t"):
            operand = query if side == "query" else key_t
            op = _producer(operand)
            if op is not None and op.op in ("Div", "Mul") and scale is None and _is_scalar_const_or_computed(op.inputs[1]):
                scale = ("div" if op.op == "Div" else "mul", op.inputs[1])
                operand = op.inputs[0]
            if side == "query":
                query = operand
            else:
                key_t = operand
        region.query, region.key_t = query, key_t
    else:
        return None
    if scale is None:
        return None
    region.scales.append(scale)
    return kind


def _is_scalar_const_or_computed(t: gs.Tensor) -> bool:
    """A divisor that is a scalar constant, or a small computation (torchscript's sqrt(head_size * n))."""
    if _is_scalar_const(t):
        return True
    return isinstance(t, gs.Variable) and (t.shape is None or len(t.shape) == 0 or t.shape == [1])


def _add_terms(t: gs.Tensor) -> list[gs.Tensor]:
    node = _producer(t)
    if node is None or node.op != "Add":
        return [t]
    a, b = node.inputs
    if _is_zero(a):
        return _add_terms(b)
    if _is_zero(b):
        return _add_terms(a)
    if const_value(a) is not None or const_value(b) is not None:
        return [t]
    return _add_terms(a) + _add_terms(b)


def _score_sum(softmax: gs.Node) -> gs.Variable | None:
    """Walk back from a Softmax through the mask and reshapes to the Add that sums the attention scores."""
    t = softmax.inputs[0]
    for _ in range(6):
        node = _producer(t)
        if node is None:
            return None
        if node.op == "Add":
            return t
        if node.op == "Where":
            candidates = [x for x in node.inputs[1:] if const_value(x) is None]
            if len(candidates) != 1:
                return None
            t = candidates[0]
        elif node.op in ("Reshape", "Cast", "Identity"):
            t = node.inputs[0]
        else:
            return None
    return None


def find_regions(graph: gs.Graph) -> list[Region]:
    graph.toposort()
    regions = []
    for node in graph.nodes:
        if node.op != "Softmax":
            continue
        total = _score_sum(node)
        if total is None:
            continue
        region = Region(layer=len(regions), output=total, query=None, key_t=None)
        kinds = [_classify(t, region) for t in _add_terms(total)]
        if None in kinds or kinds.count("c2c") != 1 or len(set(kinds)) != len(kinds) or len(kinds) < 2:
            continue
        regions.append(region)
    return regions


def describe_graph(graph: gs.Graph) -> str:
    ops = [n.op for n in graph.nodes]
    return f"{ops.count('Softmax')} Softmax, {ops.count('GatherElements')} GatherElements, {len(ops)} nodes"


def require_regions(graph: gs.Graph, name: str) -> list[Region]:
    regions = find_regions(graph)
    if not regions:
        raise UserError(f"{name}: no disentangled-attention region found; not a DebertaV2 (v2/v3) export with "
                        f"relative attention ({describe_graph(graph)})")
    return regions


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(graph: gs.Graph, tensors: list[gs.Tensor], dtype, seq_len: int,
             shapes_of: list[gs.Tensor] = ()) -> list:
    """Evaluate tensors of `graph` under ONNX Runtime CPU, cast to `dtype`, for a batch of 1 and `seq_len`
    tokens; then the shapes of `shapes_of`. Constants are returned directly, without running anything."""
    import onnxruntime as ort

    results: list = [None] * (len(tensors) + len(shapes_of))
    sub = graph.copy()
    by_name = sub.tensors()
    outputs = []
    for i, t in enumerate(tensors):
        value = const_value(t)
        if value is not None:
            results[i] = value.astype(dtype)
            continue
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        out = sub.layer(op="Cast", inputs=[by_name[t.name]], outputs=[f"__eval_{i}"], attrs={"to": to})[0]
        out.dtype = dtype
        outputs.append((i, out))
    for j, t in enumerate(shapes_of):
        out = sub.layer(op="Shape", inputs=[by_name[t.name]], outputs=[f"__eval_shape_{j}"])[0]
        out.dtype = np.int64
        outputs.append((len(tensors) + j, out))
    if not outputs:
        return results
    sub.outputs = [out for _, out in outputs]
    sub.cleanup(remove_unused_graph_inputs=True).toposort()
    session = ort.InferenceSession(gs.export_onnx(sub).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        kind = np.int64 if "int64" in inp.type else np.int32 if "int32" in inp.type else np.float32
        feeds[inp.name] = np.ones((1, seq_len), dtype=kind)
    for (slot, _), value in zip(outputs, session.run(None, feeds)):
        results[slot] = value
    return results


def _strip_to_table(t: gs.Tensor) -> gs.Tensor:
    """Follow an index tensor back through broadcasts and reshapes to its smallest [.., S, S] source."""
    for _ in range(8):
        node = _producer(t)
        if node is None or node.op not in _PASS_THROUGH:
            return t
        t = node.inputs[0]
    return t


def plan(graph: gs.Graph, regions: list[Region], seq_len: int) -> Plan:
    """Read span and factor from the graph and compare the model's own index tables with the plugin's rule."""
    scales, widths = [], []
    for r in regions:
        scales += [s for _, s in r.scales]
        widths += [r.c2p_data if r.c2p_data is not None else r.p2c_data]
    evaluated = evaluate(graph, scales, np.float32, 64, shapes_of=widths)
    scale_values, shapes = evaluated[: len(scales)], evaluated[len(scales):]
    kinds = [kind for r in regions for kind, _ in r.scales]
    divisors = [float(np.asarray(v).ravel()[0]) if k == "div" else 1.0 / float(np.asarray(v).ravel()[0])
                for k, v in zip(kinds, scale_values)]
    if not np.allclose(divisors, divisors[0], rtol=1e-6):
        raise UserError(f"the attention terms are scaled differently ({sorted(set(divisors))}); "
                        "the plugin applies one factor to all three")
    spans = {int(s[-1]) // 2 for s in shapes}
    if len(spans) != 1 or any(int(s[-1]) % 2 for s in shapes):
        raise UserError(f"relative-position widths differ between layers or are odd: {[int(s[-1]) for s in shapes]}")
    span = spans.pop()
    if span < 2:
        raise UserError(f"relative span {span} is too small for the plugin (needs >= 2)")

    # Index tables: the model's own, at a length past where both rules saturate (4*span + 64), or at the requested
    # length when the graph cannot run that long (absolute position embeddings).
    tables, expect = [], []
    for r in regions:
        if r.c2p_index is not None:
            tables.append(_strip_to_table(r.c2p_index))
            expect.append(False)
        if r.p2c_index is not None:
            tables.append(_strip_to_table(r.p2c_index))
            expect.append(True)
    check_len = 4 * span + 64
    try:
        values = evaluate(graph, tables, np.int64, check_len)
    except Exception:
        check_len = seq_len
        values = evaluate(graph, tables, np.int64, check_len)
    rel = np.arange(check_len)[:, None] - np.arange(check_len)[None, :]
    want = plugin.bucket_index(rel, span)
    first_mismatch = None
    for value, transposed in zip(values, expect):
        value = np.asarray(value)
        table = value.reshape(-1, check_len, check_len)
        target = want.T if transposed else want
        bad = np.any(table != target[None], axis=0)
        if bad.any():
            d = int(np.abs(rel[bad]).min())
            first_mismatch = d if first_mismatch is None else min(first_mismatch, d)
    edge = check_len - 1
    saturated = want[edge, 0] == 2 * span - 1 and want[0, edge] == 0
    return Plan(span=span, factor=float(np.float32(1.0 / divisors[0])), checked_seq_len=check_len,
                first_mismatch=first_mismatch, unlimited=first_mismatch is None and bool(saturated))


# ---------------------------------------------------------------------------------------------- exactness
def exactness_problem(plan_: Plan, config: dict | None, seq_len: int) -> str | None:
    """None when the plugin computes exactly what the model does up to seq_len; else why not, naming the
    config field and value where the model carries its config."""
    limit = plan_.max_exact_seq_len
    if limit is None or seq_len <= limit:
        return None
    where = f"exact only up to sequence length {limit}, {seq_len} requested"
    if config:
        buckets = config.get("position_buckets", -1)
        max_rel = config.get("max_relative_positions", -1)
        if buckets is None or buckets <= 0:
            return (f"position_buckets={buckets} (linear relative positions): the plugin always uses log buckets, "
                    f"so it is {where}")
        if max_rel != 2 * buckets:
            return (f"max_relative_positions={max_rel} but the plugin's log buckets assume 2*position_buckets="
                    f"{2 * buckets}: it is {where}")
    return f"the model's relative-position indices differ from the plugin's log-bucket rule: it is {where}"


# ---------------------------------------------------------------------------------------------- rewriting
def _zeros_like(graph: gs.Graph, like: gs.Tensor, tag: str) -> gs.Variable:
    shape = graph.layer(op="Shape", inputs=[like], outputs=[f"{tag}_shape"])[0]
    zero = gs.Constant(f"{tag}_zero", np.zeros(1, dtype=like.dtype or np.float32))
    return graph.layer(op="ConstantOfShape", inputs=[shape], outputs=[f"{tag}_zeros"], attrs={"value": zero})[0]


def fuse(graph: gs.Graph, regions: list[Region], plan_: Plan, version: str = "2") -> None:
    """Replace each region by one plugin node. A config with only c2p (or p2c) gets zeros for the missing term,
    which keeps the plugin exact."""
    for r in regions:
        tag = f"dattn{r.layer}"
        qk = graph.layer(op="MatMul", inputs=[r.query, r.key_t], outputs=[f"{tag}_qk"])[0]
        qk.dtype = r.output.dtype
        c2p = r.c2p_data if r.c2p_data is not None else _zeros_like(graph, r.p2c_data, f"{tag}_c2p")
        p2c = r.p2c_data if r.p2c_data is not None else _zeros_like(graph, r.c2p_data, f"{tag}_p2c")
        r.output.inputs.clear()
        graph.layer(op=plugin.OP_TYPE, name=f"{tag}_plugin", inputs=[qk, c2p, p2c], outputs=[r.output],
                    attrs=plugin.node_attrs(plan_.span, plan_.factor, version))
    graph.cleanup().toposort()


def expose_region_outputs(graph: gs.Graph, regions: list[Region]) -> list[str]:
    """Add every region's output to the graph outputs as attention_scores_<layer>, [B*heads, seq, seq]."""
    seq = _seq_symbol(graph)
    names = []
    for r in regions:
        r.output.name = f"attention_scores_{r.layer}"
        r.output.dtype = r.output.dtype or graph.outputs[0].dtype or np.float32
        r.output.shape = ["batch_x_heads", seq, seq]
        names.append(r.output.name)
        graph.outputs.append(r.output)
    return names


def _seq_symbol(graph: gs.Graph) -> str:
    for inp in graph.inputs:
        if inp.shape and len(inp.shape) >= 2 and isinstance(inp.shape[1], str):
            return inp.shape[1]
    return "seq"


# ---------------------------------------------------------------------------------------------- the script's steps
@dataclass
class Prepared:
    graph: gs.Graph
    regions: list[Region]
    plan: Plan | None
    casts_removed: int


def prepare(model: onnx.ModelProto, name: str, seq_len: int, need_plan: bool) -> Prepared:
    """Import, remove uint8 Casts, find the regions and (for the plugin) read span/factor and check exactness."""
    graph = gs.import_onnx(model)
    removed = remove_uint8_casts(graph)
    regions = require_regions(graph, name)
    return Prepared(graph, regions, plan(graph, regions, seq_len) if need_plan else None, removed)


def check_exact(prepared: Prepared, config: dict | None, seq_len: int, allow_inexact: bool, warn) -> None:
    problem = exactness_problem(prepared.plan, config, seq_len)
    if problem is None:
        return
    if not allow_inexact:
        raise UserError(f"refusing to fuse: {problem}. Nothing was written "
                        "(--allow-inexact fuses anyway and changes the model's output)")
    warn(f"WARNING: fusing although {problem}. The plugin model's output differs from the original model.")
