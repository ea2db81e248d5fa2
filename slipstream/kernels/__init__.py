"""Triton attention kernels (prefill and paged decode, dense and skip-softmax) with torch references.

`paged_attention` (attention.py) is the op the engine calls: Triton kernels on GPU, the torch
reference on CPU. The package imports without Triton; where Triton is installed its kernel modules
are loaded here, before the op is bound, so that the submodule `slipstream.kernels.paged_attention`
(the decode kernel) never shadows the function `slipstream.kernels.paged_attention`. Take names
from the kernel modules with `from slipstream.kernels.paged_attention import ...`
(`import slipstream.kernels.paged_attention as m` binds the function).
Imports no other slipstream package.
"""

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs: the torch path still works
    pass
else:
    from slipstream.kernels import paged_attention as _decode_kernels  # noqa: F401
    from slipstream.kernels import prefill_attention as _prefill_kernels  # noqa: F401

from slipstream.kernels.attention import paged_attention
from slipstream.kernels.reference import paged_attention_ref, store_kv

__all__ = ["paged_attention", "paged_attention_ref", "store_kv"]
