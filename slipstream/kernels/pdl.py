"""Programmatic dependent launch (PDL, Hopper and newer) for the decode step's kernels.

A decode step of a small model is a chain of short kernels, and in a CUDA graph each still pays
the GPU's launch latency after the one before it drains. Launched with PDL, a kernel's blocks may
be scheduled while the previous kernel in the stream is still running; the kernel then waits
(`griddepcontrol.wait`) for that kernel to finish and its writes to be visible, and only then
lets its own successor launch. Every kernel launched this way takes a `PDL: tl.constexpr` and
calls `pdl_prologue(PDL)` before it reads anything its predecessor writes, so the chain stays
ordered as without PDL (a successor launched without PDL, e.g. cuBLAS, waits for completion as
usual). Because a kernel releases its successor only after its own wait, every kernel before the
predecessor is complete when a kernel starts: what those wrote may be read before the wait.
`SLIPSTREAM_PDL=0` turns it off.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_enabled: dict[int, bool] = {}


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether kernels on `x`'s device launch with PDL: CUDA, compute capability >= 9, a Triton
    that has the griddepcontrol ops, and SLIPSTREAM_PDL not set to 0."""
    if triton is None or x.device.type != "cuda":
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _enabled:  # decided once per device: every launch of the decode step asks
        cuda_ops = getattr(getattr(tl, "extra", None), "cuda", None)
        _enabled[index] = (os.environ.get("SLIPSTREAM_PDL", "1") != "0"
                           and torch.cuda.get_device_capability(index)[0] >= 9
                           and hasattr(cuda_ops, "gdc_wait") and hasattr(cuda_ops, "gdc_launch_dependents"))
    return _enabled[index]


def pdl_kwargs(x: torch.Tensor) -> dict:
    """Launch keyword arguments of a PDL-aware kernel for tensors on `x`'s device."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(x) else {"PDL": False}


if triton is not None:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        """Wait for the previous kernel's writes, then let the next kernel launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
