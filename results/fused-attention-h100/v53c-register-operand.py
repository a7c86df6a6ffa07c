"""Q.K^T on wgmma with Q as the register operand: loaded straight into the dot-operand layout, converted to it from
a blocked load, or from shared memory; then the first inside warp_specialize's default partition and inside its
worker (each partition one product); each against torch."""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma


# [64, 64] tiles on 4 warps: wgmma's accumulator, its register A operand, a 16-byte-vector load, shared operands.
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16]))
DOT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
LD = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))
OP = gl.constexpr(gl.NVMMASharedLayout.get_default_for([64, 64], gl.float16))


@gluon.jit
def offsets(layout: gl.constexpr):
    """Offsets of a row-major [64, 64] tile in `layout`."""
    return (gl.arange(0, 64, layout=gl.SliceLayout(1, layout))[:, None] * 64
            + gl.arange(0, 64, layout=gl.SliceLayout(0, layout))[None, :])


@gluon.jit
def product(Q, K, OUT, MODE: gl.constexpr):
    k_s = gl.allocate_shared_memory(gl.float16, [64, 64], OP, gl.load(K + offsets(LD)))
    if MODE == 0:
        a = gl.load(Q + offsets(DOT))
    elif MODE == 4:  # as 0, plus a row of Q's own first row added in float32 and rounded back (v53c's P2C row)
        a = gl.load(Q + offsets(DOT))
        row = gl.load(Q + gl.arange(0, 64, layout=gl.SliceLayout(0, DOT))).to(gl.float32)
        a = (a.to(gl.float32) + row[None, :]).to(gl.float16)
    elif MODE == 1:
        a = gl.convert_layout(gl.load(Q + offsets(LD)), DOT)
    else:
        a = gl.allocate_shared_memory(gl.float16, [64, 64], OP, gl.load(Q + offsets(LD)))
    fence_async_shared()
    gl.thread_barrier()
    s = warpgroup_mma(a, k_s.permute((1, 0)), gl.zeros([64, 64], gl.float32, MMA), use_acc=False)
    gl.store(OUT + offsets(MMA), s)


@gluon.jit
def loop(Q, K, V, OUT, REG: gl.constexpr):
    """sum over 4 key blocks n of softmax-free (Q.K_n^T).V_n: Q the register operand of Q.K^T (REG) or in shared
    memory, the product's fp16 rounding the register operand of .V, as in the saturated kernel's loop."""
    k_s = gl.allocate_shared_memory(gl.float16, [64, 64], OP)
    v_s = gl.allocate_shared_memory(gl.float16, [64, 64], OP)
    if REG:
        a = gl.load(Q + offsets(DOT))
    else:
        a = gl.allocate_shared_memory(gl.float16, [64, 64], OP, gl.load(Q + offsets(LD)))
    acc = gl.zeros([64, 64], gl.float32, MMA)
    for n in range(4):
        gl.thread_barrier()
        k_s.store(gl.load(K + n * 4096 + offsets(LD)))
        v_s.store(gl.load(V + n * 4096 + offsets(LD)))
        fence_async_shared()
        gl.thread_barrier()
        s = warpgroup_mma(a, k_s.permute((1, 0)), gl.zeros([64, 64], gl.float32, MMA), use_acc=False)
        acc = warpgroup_mma(gl.convert_layout((s * 0.125).to(gl.float16), DOT), v_s, acc)
    gl.store(OUT + offsets(MMA), acc)


@gluon.jit
def kernel(Q, K, OUT, MODE: gl.constexpr):
    if MODE != 3:
        product(Q, K, OUT, MODE)
    else:  # default partition: product 0 into OUT, worker: the same into OUT + 4096
        gl.warp_specialize([(product, (Q, K, OUT, 0)), (product, (Q, K, OUT + 4096, 0))], [4], [128])


torch.manual_seed(0)
q = torch.randn(64, 64, device="cuda", dtype=torch.float16)
k = torch.randn(64, 64, device="cuda", dtype=torch.float16)
want = q.float() @ k.float().T
for mode, name in enumerate(("straight load into the dot-operand layout", "blocked load converted", "shared memory",
                             "straight load, in warp_specialize's default partition and its worker",
                             "straight load, Q's first row added in float32")):
    out = torch.zeros(2, 64, 64, device="cuda", dtype=torch.float32)
    kernel[(1,)](q, k, out, MODE=mode, num_warps=4, **({"maxnreg": 128} if mode == 3 else {}))
    for n in range(2 if mode == 3 else 1):
        ref = ((q.float() + q[0].float()).half().float() @ k.float().T) if mode == 4 else want
        err = ((out[n] - ref).norm() / ref.norm()).item()
        print(f"{name}{[' (default)', ' (worker)'][n] if mode == 3 else ''}: relative L2 {err:.1e}")
kk = torch.randn(4, 64, 64, device="cuda", dtype=torch.float16)
vv = torch.randn(4, 64, 64, device="cuda", dtype=torch.float16)
ref = sum(((q.float() @ kk[n].float().T) * 0.125).half().float() @ vv[n].float() for n in range(4))
for reg in (False, True):
    out = torch.zeros(64, 64, device="cuda", dtype=torch.float32)
    loop[(1,)](q, kk, vv, out, REG=reg, num_warps=4)
    print(f"loop of 4 blocks, Q {'the register operand' if reg else 'in shared memory'}: relative L2 "
          f"{((out - ref).norm() / ref.norm()).item():.1e}")
