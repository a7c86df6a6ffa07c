#!/usr/bin/env python3
"""Compile the fused-attention kernels for an NVIDIA GPU on a machine without one, and print what the compiler made.

Runs the fused path's host code on CPU tensors with the kernel launches recorded instead of run, then compiles each
recorded launch ahead of time with Triton's own compiler and ptxas (both ship in the triton wheel) for the chosen
architecture. Per kernel: registers, spills, shared memory, the global loads by vector width in the PTX (a change
that stops a table read from vectorising shows up without a GPU), whether it uses wgmma, and whether ptxas
serialises those (its C7515 advisory).

    python scripts/inspect_kernels.py [--arch 90] [--seq-len 2048] [--batch-size 1] [--band window|near] [--dump DIR]
                                      [--masked-loop-stages N] [--record-times] [--saturated-tma]
                                      [--no-overlap-near-tail]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # compile for real, whatever the shell says (imported by the tests: leave it alone)
    os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import fused_attention as fa, near_attention, program_times, report, window_band  # noqa: E402

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn.fn if isinstance(fn, _Recorder) else fn, calls

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((self.fn, grid, args, kwargs))
        return record


def _source(fn, args, kwargs):
    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg", "launch_pdl") if k in kwargs}
    for n, name in enumerate(names):
        if name in kwargs:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name]
            continue
        value = args[n]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(n,)] = [["tt.divisibility", 16]]
        elif isinstance(value, TensorDescriptor):
            signature[name] = f"tensordesc<{_TYPES[value.base.dtype]}{list(value.block_shape)}>"
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(n,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource
        return GluonASTSource(fn, signature, constexprs, attrs), options
    return ASTSource(fn, signature, constexprs, attrs), options


def record_launches(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype, band: str = "triton",
                    tiles: "fa.Tiles | None" = None) -> list:
    """Run `fused_attention.attention` on CPU tensors with every kernel launch recorded instead of run (the
    demo config's position rule); band "window" or "near" takes that Gluon kernel as if on a Hopper GPU."""
    calls = []
    for name in ("_attention_kernel", "_position_tables_kernel", "_near_band_kernel", "_valid_ranges_kernel"):
        setattr(fa, name, _Recorder(getattr(fa, name), calls))
    window_band._window_band_kernel = _Recorder(window_band._window_band_kernel, calls)
    near_attention._near_attention_kernel = _Recorder(near_attention._near_attention_kernel, calls)
    window_band.supported = lambda *args: band in ("window", "near")
    near_attention._multiprocessors = lambda device: 132  # an H100 SXM's
    fa._sm90_or_newer = lambda device: True
    fa.index_table = lambda rule, device: (rule.index(torch.arange(rule.saturation[1], rule.saturation[0] + 1))
                                           .to(torch.int32), rule.saturation[1])
    rule = fa.PositionRule(256, 256, 512)
    positions = fa.Positions(rule, torch.zeros(2, heads, 512, head_dim, dtype=dtype), 0, 1)
    fa.attention(torch.zeros(batch, seq, 3 * heads * head_dim, dtype=dtype), torch.ones(batch, seq, dtype=torch.int32),
                 heads, head_dim, positions, 0.07, tiles=tiles, band_kernel=band)
    return calls


def _resource_usage(cubin: bytes) -> dict:
    """REG, STACK (spill), SHARED... from cuobjdump --dump-resource-usage (shipped with triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+):(\d+)", text.split("Resource usage:")[-1]))


def _wgmma_serialized(ptx: str, arch: int) -> bool:
    """Whether ptxas serialises the kernel's tensor-core products (its C7515 advisory: every wgmma of the function
    waits for the one before, the hot loop's included; NOTES.md, v32)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(tool), f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}", "-v", str(src),
                              "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True).stderr
    return "C7515" in log


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--block-m", type=int)
    parser.add_argument("--block-n", type=int)
    parser.add_argument("--num-warps", type=int)
    parser.add_argument("--num-stages", type=int)
    parser.add_argument("--band", choices=["triton", "window", "near"], default="triton",
                        help="near tiles: Triton (position tables + gathers), the Gluon window band, or the Gluon "
                             "near attention")
    parser.add_argument("--masked-loop-stages", type=int, default=fa.MASKED_LOOP_STAGES,
                        help="fused_attention.MASKED_LOOP_STAGES for this compile")
    parser.add_argument("--record-times", action="store_true",
                        help="the kernels as scripts/gpu_program_times.py runs them (program_times.RECORDING)")
    parser.add_argument("--saturated-tma", action="store_true",
                        help="fused_attention.SATURATED_TMA: unmasked saturated blocks through a tensor descriptor")
    parser.add_argument("--no-overlap-near-tail", action="store_true",
                        help="fused_attention.OVERLAP_NEAR_TAIL off: the kernel after the near kernel not its dependent")
    parser.add_argument("--dump", type=Path, help="write each kernel's TTGIR and PTX here")
    args = parser.parse_args()

    fa.MASKED_LOOP_STAGES = args.masked_loop_stages
    fa.SATURATED_TMA = args.saturated_tma
    fa.OVERLAP_NEAR_TAIL = not args.no_overlap_near_tail
    if args.record_times:
        program_times.RECORDING = []
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    b, s, h, d = args.batch_size, args.seq_len, args.heads, args.head_dim
    tiles = None
    if args.block_m:
        tiles = fa.Tiles(args.block_m, args.block_n or 64, args.num_warps or 4, args.num_stages or 2)
    calls = record_launches(b, s, h, d, dtype, args.band, tiles)

    rows, seen = [], set()
    for fn, grid, a, kw in calls:
        src, options = _source(fn, a, kw)
        if (fn.__name__, src.hash()) in seen:
            continue
        seen.add((fn.__name__, src.hash()))
        kernel = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=options)
        ptx = kernel.asm["ptx"]
        loads = {w: len(re.findall(rf"ld\.global(?:\.\w+)*\.v{w}\.", ptx)) for w in (2, 4)}
        scalar = len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b16|u16|b32|f32|u32|s32)\s", ptx))
        usage = _resource_usage(kernel.asm["cubin"])
        rows.append([fn.__name__, str(grid), ", ".join(f"{k}={kw[k]}" for k in kw if k.startswith("BLOCK")),
                     usage.get("REG", "?"), usage.get("STACK", "?"), str(kernel.metadata.shared), str(loads[4]),
                     str(loads[2]), str(scalar), str("wgmma" in ptx),
                     str(_wgmma_serialized(ptx, args.arch)) if "wgmma" in ptx else ""])
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            for kind in ("ttgir", "ptx"):
                (args.dump / f"{fn.__name__}.{kind}").write_text(kernel.asm[kind])
    print(f"sm_{args.arch}, {args.dtype}, {args.band} band, batch {b}, seq {s}, {h} heads of {d}, triton {triton.__version__}")
    print(report.table(["kernel", "grid", "tiles", "registers", "stack bytes", "shared bytes", "ld.v4", "ld.v2",
                        "scalar loads", "wgmma", "wgmma serialized"], rows))


if __name__ == "__main__":
    main()
