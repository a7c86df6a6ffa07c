#!/usr/bin/env python3
"""Run a DebertaV2 model with the fused Triton attention (no TensorRT): check it against the Hugging Face model in
FP32 on a padded batch, then time it (CUDA graph on a GPU).

    python deberta_fused_inference.py --shape seed --seq-len 512 --batch-size 4 --dtype fp16
    python deberta_fused_inference.py --variant microsoft/deberta-v3-base --dtype bf16
"""

import argparse
import copy

import torch

from deberta_tools import export, fused_model, report, timing
from deberta_tools.benchmark import valid_rel_l2
from deberta_tools.compare import TOLERANCE
from deberta_tools.errors import UserError, run_main
from deberta_tools.fused_attention import INTERPRET
from deberta_tools.inputs import random_inputs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--variant", help="Hugging Face model id or save_pretrained folder (with its head)")
    source.add_argument("--shape", choices=export.SHAPES, help="random weights in this config (default: seed)")
    parser.add_argument("--seq-len", type=int, default=512, help="sequence length (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch; rows after the first are padded "
                        "(default 4)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="(default fp16)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    return parser.parse_args()


def main():
    args = parse_args()
    if args.seq_len < 2 or args.batch_size < 1 or args.iterations < 1:
        raise UserError("--seq-len must be >= 2, --batch-size and --iterations >= 1")
    cuda = torch.cuda.is_available() and not INTERPRET
    if not cuda and not INTERPRET:
        raise UserError("the fused kernels need a CUDA GPU (TRITON_INTERPRET=1 runs them on the CPU, slowly, "
                        "for tests)")
    device = torch.device("cuda" if cuda else "cpu")
    model = (export.load_variant(args.variant) if args.variant
             else export.random_model(export.shaped_config(args.shape or "seed", args.seq_len))).to(device)
    feeds = random_inputs(args.batch_size, args.seq_len, model.config.vocab_size, seed=7)
    ids = torch.from_numpy(feeds["input_ids"]).to(device)
    mask = torch.from_numpy(feeds["attention_mask"]).to(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = fused_model.first_output(model(input_ids=ids, attention_mask=mask)).float().cpu()
        fused = fused_model.fuse(copy.deepcopy(model).to(DTYPES[args.dtype]))
        out = fused_model.first_output(fused(input_ids=ids, attention_mask=mask))
    err = valid_rel_l2(out, ref, mask)
    tolerance = TOLERANCE["fp32" if args.dtype == "fp32" else "fp16"]
    ok = err == err and err < tolerance
    print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"batch {args.batch_size} (padded), sequence {args.seq_len}, {args.dtype}")
    print(f"{'PASS' if ok else 'FAIL'}: fused vs Hugging Face FP32, relative L2 {err:.3e} on the real tokens "
          f"(tolerance {tolerance:g})")
    if cuda:
        runner = fused_model.GraphRunner(fused)
        lat = timing.measure_cuda(lambda: runner(ids, mask), torch.cuda.current_stream(), args.warmup,
                                  args.iterations)
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    else:
        lat = timing.measure(lambda: fused(input_ids=ids, attention_mask=mask), args.warmup, args.iterations)
        env = {"device": "CPU (Triton interpreter: not a speed)", "torch": torch.__version__}
    print(report.latency_table([(f"fused {args.dtype}" + (" + CUDA graph" if cuda else ""), lat)]))
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
