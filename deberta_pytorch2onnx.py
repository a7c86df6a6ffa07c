#!/usr/bin/env python3
"""Export a Hugging Face DebertaV2 model (v2 or v3) to ONNX with dynamic batch and sequence axes, then check the
file against PyTorch under ONNX Runtime CPU.

    python deberta_pytorch2onnx.py --filename ./test/deberta.onnx [--variant microsoft/deberta-v3-xsmall | --seq-len 2048]
                                   [--shape v3-large]
"""

import argparse

from rich.console import Console

from deberta_tools import export, report
from deberta_tools.errors import UserError, run_main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filename", default="./test/deberta.onnx", help="output ONNX path; folders are created "
                        "(default: %(default)s)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--variant", help="Hugging Face model id or a save_pretrained folder: pretrained weights and "
                        "its own head")
    source.add_argument("--seq-len", type=int, help="random weights in the demo's application config, with this "
                        "default sequence length (default 512)")
    parser.add_argument("--shape", choices=export.SHAPES, default="seed",
                        help="random weights in this config when no --variant: the demo's ('seed', default) or a "
                        "DeBERTa-v3 checkpoint's shape")
    parser.add_argument("--exporter", choices=export.EXPORTERS, default=export.DEFAULT_EXPORTER,
                        help="torch exporter (default: %(default)s)")
    parser.add_argument("--verify-batch", type=int, default=2, help="batch of the ONNX Runtime check (default 2)")
    parser.add_argument("--verify-seq-len", type=int, help="sequence length of the ONNX Runtime check "
                        "(default: the model's, at most 1024)")
    return parser.parse_args()


def main():
    args = parse_args()
    console = Console(stderr=True)
    if args.seq_len is not None and args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    if args.variant and args.shape != "seed":
        raise UserError("--variant loads a checkpoint's own config: it cannot take --shape")
    if args.variant:
        with console.status(f"Loading {args.variant}"):
            model = export.load_variant(args.variant)
        seq_len = min(512, model.config.max_position_embeddings)
    else:
        seq_len = args.seq_len or 512
        model = export.random_model(export.shaped_config(args.shape, seq_len))
    verify_len = args.verify_seq_len or min(seq_len, 1024)
    print(f"Exporting {type(model).__name__} ({model.config.num_hidden_layers} layers, hidden "
          f"{model.config.hidden_size}, {model.config.num_attention_heads} heads) with the {args.exporter} exporter")
    with console.status(f"Exporting with {args.exporter}"):
        proto = export.export(model, args.exporter)
    export.annotate(proto, model.config, seq_len, args.exporter)
    rows = []
    with console.status(f"Checking against PyTorch under ONNX Runtime CPU (batch {args.verify_batch}, "
                        f"sequence {verify_len})"):
        path = export.onnx_io.save(proto, args.filename,
                                   check=lambda tmp: rows.extend(export.verify(model, tmp, args.verify_batch, verify_len)))
    print(f"ONNX Runtime CPU vs PyTorch, batch {args.verify_batch}, sequence {verify_len}:")
    print(report.table(["output", "max abs diff", "relative L2"], [[n, f"{a:.3e}", f"{r:.3e}"] for n, a, r in rows]))
    print(f"Saved {path}")


if __name__ == "__main__":
    run_main(main)
