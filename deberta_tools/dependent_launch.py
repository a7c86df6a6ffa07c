"""Programmatic dependent launch (Hopper and later) for the fused path's own kernels.

A kernel launched with CUDA's programmatic stream serialization may be scheduled before the kernel ahead of it in
the stream has finished: its programs start on the multiprocessors the previous kernel leaves free, then wait in
`griddepcontrol.wait` until that kernel has completed and its writes are visible. What it saves is the gap between
one kernel's end and the next one's start, a few microseconds a launch even inside a CUDA graph (stream capture
turns the attribute into a programmatic edge of the graph), which at batch 1 x 512 tokens is a large part of a
forward of ~110 short kernels.

The rule every kernel here follows, so that no memory is read or written early: `wait_for_previous` is the first
thing the kernel does (before any load or store), and right after it the kernel lets the next kernel launch
(`griddepcontrol.launch_dependents`): that one waits in turn. Kernels of other libraries (cuBLAS, PyTorch's own)
are launched as before; after one of ours they simply start when it ends.

`options(device)` gives a kernel call's keywords: the kernel's PDL constexpr and Triton's launch option, both off
under TRITON_INTERPRET, before compute capability 9.0 and when the switch ENABLED is False.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

ENABLED = True


@lru_cache(maxsize=None)
def _capable(device: torch.device) -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(device)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched dependent on the kernel before them."""
    return ENABLED and device.type == "cuda" and _capable(device)


def options(device: torch.device) -> dict:
    """Keywords for a call of one of our kernels on `device`: PDL (the kernel's constexpr, for wait_for_previous)
    and launch_pdl (Triton's launch option; the interpreter drops it)."""
    flag = enabled(device)
    return {"PDL": flag, "launch_pdl": flag}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has finished (its writes visible), then let the next one
    launch. A no-op otherwise."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # a Triton without Gluon: the Gluon kernels are not built either
    gluon = None

if gluon is not None:

    @gluon.jit
    def gluon_wait_for_previous(PDL: gl.constexpr):
        """wait_for_previous for Gluon kernels (the same two PTX instructions)."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
