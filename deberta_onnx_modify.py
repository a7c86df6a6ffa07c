#!/usr/bin/env python3
"""Prepare an exported DeBERTa ONNX model for TensorRT.

    python deberta_onnx_modify.py ./test/deberta.onnx                      # -> deberta_original.onnx
    python deberta_onnx_modify.py ./test/deberta.onnx --plugin             # -> deberta_plugin.onnx
    python deberta_onnx_modify.py ./test/deberta.onnx --correctness-check  # -> deberta_correctness_check_{original,plugin}.onnx
"""

import argparse
import sys

from deberta_tools import onnx_io, plugin, precision, surgery
from deberta_tools.errors import UserError, run_main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="ONNX model from deberta_pytorch2onnx.py (or another DebertaV2 export)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plugin", action="store_true", help="replace each layer's disentangled attention with "
                      "one DisentangledAttention_TRT node")
    mode.add_argument("--correctness-check", action="store_true", help="write an original and a plugin model that "
                      "both output every layer's attention scores (attention_scores_<layer>)")
    parser.add_argument("--output", help="output path (default: the input name with _original or _plugin)")
    parser.add_argument("--plugin-version", choices=["1", "2"], default="2",
                        help="2 = IPluginV3 (TensorRT >= 10.11, default); 1 = the deprecated IPluginV2DynamicExt")
    parser.add_argument("--seq-len", type=int, help="longest sequence length the plugin must be exact for "
                        "(default: the length recorded at export, else 512)")
    parser.add_argument("--fp16", action="store_true", help="write fp16 graphs (<stem>_fp16_*.onnx) that keep "
                        "Softmax, LayerNorm and the position indices in fp32; TensorRT 11 needs them for fp16 engines")
    parser.add_argument("--allow-inexact", action="store_true", help="fuse even where the plugin does not compute "
                        "what the model does (prints a warning; the output changes)")
    return parser.parse_args()


def warn(message):
    print(message, file=sys.stderr)


def main():
    args = parse_args()
    if args.output and args.correctness_check:
        raise UserError("--output names one file but --correctness-check writes two "
                        "(<input>_correctness_check_original.onnx and _plugin.onnx)")
    model = onnx_io.load(args.input)
    if args.fp16 and precision.graph_precision(model) == "fp16":
        raise UserError(f"{args.input} is already an fp16 graph; pass the fp32 export")
    # With --fp16 every name gets _fp16 after the stem: deberta_fp16_plugin.onnx, root ./test/deberta_fp16.
    root = onnx_io.with_suffix(args.input, "_fp16") if args.fp16 else args.input
    seq_len = args.seq_len or onnx_io.default_seq_len(model)
    fusing = args.plugin or args.correctness_check
    prepared = surgery.prepare(model, args.input, seq_len, need_plan=fusing)
    print(f"Found {len(prepared.regions)} disentangled-attention layers; removed {prepared.casts_removed} uint8 Casts")
    if fusing:
        p = prepared.plan
        surgery.check_exact(prepared, onnx_io.get_config(model), seq_len, args.allow_inexact, warn)
        limit = p.max_exact_seq_len
        print(f"Plugin: span {p.span}, factor {p.factor:.8g}, plugin_version {args.plugin_version}; indices equal "
              f"the model's " + ("for every sequence length" if limit is None else f"up to sequence length {limit}"))

    if args.correctness_check:
        original = prepared.graph.copy()
        regions = surgery.find_regions(original)
        surgery.expose_region_outputs(original, regions)
        surgery.fuse(prepared.graph, prepared.regions, prepared.plan, args.plugin_version)
        surgery.expose_region_outputs(prepared.graph, prepared.regions)
        items = [(_finish(original, model, None, args.fp16), onnx_io.with_suffix(root, "_correctness_check_original"),
                  _check_original),
                 (_finish(prepared.graph, model, prepared.plan, args.fp16),
                  onnx_io.with_suffix(root, "_correctness_check_plugin"), _check_plugin)]
        for path in onnx_io.save_many(items):
            print(f"Saved {path}")
        print(f"Fused {len(prepared.regions)} layers")
        return
    if args.plugin:
        surgery.fuse(prepared.graph, prepared.regions, prepared.plan, args.plugin_version)
        out, check, suffix = _finish(prepared.graph, model, prepared.plan, args.fp16), _check_plugin, "_plugin"
    else:
        prepared.graph.cleanup().toposort()
        out, check, suffix = _finish(prepared.graph, model, None, args.fp16), _check_original, "_original"
    path = onnx_io.save(out, args.output or onnx_io.with_suffix(root, suffix), check=check)
    if args.plugin:
        print(f"Fused {plugin.count_nodes(out)} layers")
    print(f"Saved {path}")


def _finish(graph, like, plan, fp16):
    out = onnx_io.from_graph(graph, like)
    if plan is not None:
        limit = plan.max_exact_seq_len
        onnx_io.set_meta(out, onnx_io.META_EXACT_SEQ_LEN, "" if limit is None else str(limit))
    return precision.to_fp16(out) if fp16 else out


def _check_original(path):
    import onnx
    onnx.checker.check_model(str(path), full_check=True)


def _check_plugin(path):
    """The plugin op is not an ONNX op: check the model with each plugin node replaced by its reference."""
    import onnx
    model = onnx_io.load(path)
    if model.ByteSize() < 1_900_000_000:
        onnx.checker.check_model(plugin.expand_reference(model), full_check=True)


if __name__ == "__main__":
    run_main(main)
