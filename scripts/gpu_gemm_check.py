#!/usr/bin/env python3
"""On a CUDA GPU: the fused layer's work outside attention (four GEMMs, the GELU) done other ways, alone and end to
end, in one run.

At 2048 tokens of the demo config the four cuBLAS GEMMs of a layer take ~29 us and the GELU pass ~4.7
(results/fused-attention-h100/NOTES.md). Per GEMM shape of the layer (QKV, attention output, FFN up, FFN down) and
token count this times

    F.linear          cuBLAS, weight [N, K] (transposed operand), what fused_model does for three of the four
    addmm NN          the weight stored transposed once, [K, N] contiguous
    cublaslt ...      both, with torch.backends.cuda.preferred_blas_library("cublaslt")
    Triton ptr / TMA  a tiled Triton GEMM with the bias in its epilogue, pointer loads or TMA descriptors
                      (gemm.linear), the best of a set of tiles (the winning tile is printed)

then the FFN's up projection with the GELU: cuBLAS + F.gelu, cuBLAS + a Triton GELU in place, and gemm.linear with
DebertaV2's exact (erf) GELU as its epilogue (what fused_model does since v30); the up projection + GELU of the
v3-xsmall/demo, -base and -large shapes with gemm.linear's default tile against cuBLAS + F.gelu; and the whole fused
model end to end (CUDA graph) with each alternative swapped into the layer. Every variant is checked against a
float32 product first (relative L2 < 2e-3; a variant that fails is reported, not timed).

    python scripts/gpu_gemm_check.py [--tokens 512 2048 16384] [--skip-end-to-end]
    TRITON_INTERPRET=1 python scripts/gpu_gemm_check.py --check-only     (CPU: the Triton kernels' results only)
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import fused_attention as fa, fused_model, gemm, report  # noqa: E402

SHAPES = {"qkv": (384, 1152), "out": (384, 384), "up": (384, 1536), "down": (1536, 384)}  # (K, N), demo config


@triton.jit
def _mm_ptr(A, W, BIAS, C, M, N, K, GELU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            STAGES: tl.constexpr, GROUP: tl.constexpr):
    """gemm.linear's kernel with pointer loads instead of TMA descriptors; N and K multiples of BN and BK."""
    pm, pn = gemm._tile_of_program(M, N, BM, BN, GROUP)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
        w = tl.load(W + rn[:, None] * K + (k + rk)[None, :])
        acc = tl.dot(a, w.T, acc)
    acc = gemm.bias_gelu(acc, BIAS, rn, N, GELU)
    tl.store(C + rm[:, None] * N + rn[None, :], acc.to(C.dtype.element_ty), mask=(rm < M)[:, None])


@triton.jit
def _gelu_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n).to(tl.float32)
    tl.store(Y + offs, gemm.gelu(x).to(Y.dtype.element_ty), mask=offs < n)


def gelu_(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Exact GELU in place (contiguous x)."""
    _gelu_kernel[(triton.cdiv(x.numel(), block),)](x, x, x.numel(), BLOCK=block, num_warps=4)
    return x


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tile, kind="tma", gelu=False) -> torch.Tensor:
    """x . wᵀ + b (GELU) with a Triton GEMM: "tma" is the model's (gemm.linear), "ptr" the pointer-load variant;
    tile = (BM, BN, BK, stages, warps)."""
    if kind == "tma":
        return gemm.linear(x, w, b, gelu, tile)
    bm, bn, bk, stages, warps = tile
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.shape[0]
    assert n % bn == 0 and k % bk == 0, (n, k, tile)
    c = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm) * (n // bn),)
    _mm_ptr[grid](x2, w, b, c, m, n, k, GELU=gelu, BM=bm, BN=bn, BK=bk, STAGES=stages, GROUP=8, num_warps=warps)
    return c.view(*x.shape[:-1], n)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_kernels(device):
    """Each Triton kernel against a float32 product on small shapes (on a CPU: under TRITON_INTERPRET)."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(80, 64, generator=g).to(device, dtype)  # 80 rows: the last row block is partial
    w = (torch.randn(128, 64, generator=g) / 8).to(device, dtype)
    b = torch.randn(128, generator=g).to(device, dtype)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    rows, worst = [], 0.0
    tile = (32, 64, 32, 2, 4) if device == "cpu" else (64, 64, 64, 3, 4)
    for kind, gelu in itertools.product(("ptr", "tma"), (False, True)):
        want = torch.nn.functional.gelu(ref) if gelu else ref
        err = _rel(linear(x, w, b, tile, kind, gelu), want)
        worst = max(worst, err)
        rows.append([f"Triton {kind}" + (" + GELU" if gelu else ""), f"{err:.1e}"])
    y = ref.to(dtype)
    err = _rel(gelu_(y.clone()), torch.nn.functional.gelu(y.float()))
    worst = max(worst, err)
    rows.append(["Triton GELU in place", f"{err:.1e}"])
    print(report.table(["kernel", "rel L2 vs float32"], rows))
    limit = 1e-5 if dtype == torch.float32 else 2e-3
    if worst > limit:
        raise SystemExit(f"a kernel is off: relative L2 {worst:.1e} > {limit:.0e}")


TILES = [t for t in itertools.product((64, 128), (64, 128, 256), (64,), (3, 4), (4, 8))
         if not (t[0] == 64 and t[4] == 8) and not (t[0] == 128 and t[1] == 256 and t[4] == 4)]


def gemm_table(tokens_list):
    """Per shape and token count: microseconds a call (CUDA graph of 10 calls, median) of each way; returns the best
    Triton tile per (tokens, shape, kind, gelu)."""
    from deberta_tools.timing import graph_us
    best_tiles, rows = {}, []
    for m, (name, (k, n)) in itertools.product(tokens_list, SHAPES.items()):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        wt = w.t().contiguous()
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
        times = {}  # way: (us, tile)
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            times[f"{lib} F.linear"] = (graph_us(lambda: torch.nn.functional.linear(x, w, b)), None)
            times[f"{lib} addmm NN"] = (graph_us(lambda: torch.addmm(b, x, wt)), None)
        torch.backends.cuda.preferred_blas_library("cublas")
        variants = [("ptr", False), ("tma", False)] + ([("tma", True)] if name == "up" else [])
        for kind, gelu in variants:
            want = torch.nn.functional.gelu(ref) if gelu else ref
            found = None
            for tile in TILES:
                if n % tile[1]:
                    continue
                try:
                    err = _rel(linear(x, w, b, tile, kind, gelu), want)
                    if err > 2e-3:
                        print(f"off: {kind} gelu={gelu} {m} x {name} {tile}: {err:.1e}")
                        continue
                    t = graph_us(lambda: linear(x, w, b, tile, kind, gelu))
                except Exception as e:  # noqa: BLE001 (a tile the compiler refuses: out of shared memory)
                    print(f"skipped: {kind} {tile}: {str(e).splitlines()[0][:100]}")
                    continue
                if found is None or t < found[0]:
                    found = (t, tile)
            if found:
                best_tiles[(m, name, kind, gelu)] = found[1]
                times[f"Triton {kind}" + (" + GELU" if gelu else "")] = found
        if name == "up":
            y = torch.nn.functional.linear(x, w, b)
            times["cublas + F.gelu"] = (graph_us(lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))),
                                        None)
            times["cublas + Triton GELU"] = (graph_us(lambda: gelu_(torch.nn.functional.linear(x, w, b))), None)
            times["F.gelu alone"] = (graph_us(lambda: torch.nn.functional.gelu(y)), None)
            times["Triton GELU alone"] = (graph_us(lambda: gelu_(y)), None)
        rows += [[str(m), name, way, f"{t:.2f}", str(tile or "")] for way, (t, tile) in times.items()]
    print(report.table(["tokens", "GEMM", "way", "us a call", "tile (BM, BN, BK, stages, warps)"], rows))
    return best_tiles


FFN_SHAPES = {"demo / v3-xsmall": (384, 1536), "v3-base": (768, 3072), "v3-large": (1024, 4096)}


def ffn_table(tokens_list):
    """The up projection + exact GELU of three model shapes: gemm.linear with its default tile against cuBLAS +
    F.gelu (what fused_model falls back to), microseconds a call."""
    from deberta_tools.timing import graph_us
    rows = []
    for (name, (k, n)), m in itertools.product(FFN_SHAPES.items(), tokens_list):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        err = _rel(gemm.linear(x, w, b), torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), w.float(),
                                                                                              b.float())))
        ours = graph_us(lambda: gemm.linear(x, w, b))
        cublas = graph_us(lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)))
        rows.append([name, str(m), f"{k} x {n}", str(gemm.default_tile(m)), f"{cublas:.2f}", f"{ours:.2f}",
                     f"{ours / cublas:.2f}", f"{err:.1e}"])
    print(report.table(["shape", "tokens", "K x N", "tile", "cuBLAS + F.gelu us", "gemm.linear us", "ratio",
                        "rel L2 vs fp32"], rows))


def _layer_call(way, best_tiles):
    """fused_model._Layer.__call__ with the work outside attention done `way`."""
    def call(self, x, mask, ranges):
        tokens = x.shape[0] * x.shape[1]
        if way == "NN":
            if not hasattr(self, "_nn"):
                self._nn = [t.t().contiguous() for t in (self.w_qkv, self.out_dense.weight, self.inter_dense.weight,
                                                          self.ffn_dense.weight)]
            mm = lambda v, wt, b: torch.addmm(b, v.reshape(-1, v.shape[-1]), wt).view(*v.shape[:-1], -1)  # noqa
            qkv = mm(x, self._nn[0], self.b_qkv)
        else:
            qkv = torch.nn.functional.linear(x, self.w_qkv, self.b_qkv)
        ctx = fa.attention(qkv, mask, self.heads, self.head_dim, self.positions, self.factor, ranges=ranges)
        if way == "NN":
            h = fused_model.add_layer_norm(mm(ctx, self._nn[1], self.out_dense.bias), x, self.out_norm)
            inter = self.act(mm(h, self._nn[2], self.inter_dense.bias))
            return fused_model.add_layer_norm(mm(inter, self._nn[3], self.ffn_dense.bias), h, self.ffn_norm)
        h = fused_model.add_layer_norm(self.out_dense(ctx), x, self.out_norm)
        if way == "Triton GELU in place":
            inter = gelu_(self.inter_dense(h))
        else:  # the epilogue with this run's best tile
            inter = linear(h, self.inter_dense.weight, self.inter_dense.bias, best_tiles[(tokens, "up", "tma", True)],
                           "tma", True)
        return fused_model.add_layer_norm(self.ffn_dense(inter), h, self.ffn_norm)
    return call


def end_to_end_table(best_tiles, shapes):
    import gpu_fused_check as g
    original, epilogue = fused_model._Layer.__call__, fused_model.GELU_EPILOGUE
    # "as it is": gemm.linear's default tile; "GELU pass": cuBLAS then F.gelu, the layer before v30.
    ways = ["as it is", "GELU pass", "NN", "cublaslt", "Triton GELU in place", "epilogue, best tile of this run"]
    try:
        for way in ways:
            patched = way not in ("as it is", "GELU pass", "cublaslt")
            fused_model._Layer.__call__ = _layer_call(way, best_tiles) if patched else original
            fused_model.GELU_EPILOGUE = way != "GELU pass"
            torch.backends.cuda.preferred_blas_library("cublaslt" if way == "cublaslt" else "cublas")
            for batch, seq in shapes:
                if way.startswith("epilogue") and (batch * seq, "up", "tma", True) not in best_tiles:
                    continue
                g.end_to_end([seq], [batch], label=way)
    finally:
        fused_model._Layer.__call__, fused_model.GELU_EPILOGUE = original, epilogue
        torch.backends.cuda.preferred_blas_library("cublas")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 16384])
    parser.add_argument("--check-only", action="store_true", help="only the kernels' results (works on a CPU)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--ffn-only", action="store_true", help="only the up projection + GELU of three model shapes")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not fa.INTERPRET else "cpu"
    if device == "cuda":
        print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    check_kernels(device)
    if args.check_only or device == "cpu":
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.ffn_only:
        ffn_table(sorted(set(args.tokens) | {777}))
        return
    best_tiles = gemm_table(args.tokens)
    ffn_table(sorted(set(args.tokens) | {777}))
    if not args.skip_end_to_end:
        shapes = [(1, t) if t <= 8192 else (t // 512, 512) for t in args.tokens]
        end_to_end_table(best_tiles, shapes)


if __name__ == "__main__":
    main()
