"""Kernel tests run the Triton kernels on CPU through Triton's interpreter (see tests/conftest.py
for how the kernels get decorated in interpreter mode); the fixture below turns the interpreter on
around each kernel test, so the dispatchers take the Triton path."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_interpreter():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


def _build(lens, q_lens, heads, kv_heads, head_dim, page, dtype=torch.float32, seed=0, spare_blocks=7,
           keys=None, values=None, queries=None):
    """A paged batch: per-sequence K/V scattered over shuffled blocks, block tables padded with -1.

    `keys`/`values`/`queries`: optional per-sequence tensors ([L, kv_heads, D], [n, heads, D]);
    random normal ones otherwise. Unused cache blocks hold large garbage, so a kernel that reads
    outside its sequence's pages shows.
    """
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [-(-L // page) for L in lens]
    total = sum(n_blocks) + spare_blocks
    k_cache = torch.full((total, page, kv_heads, head_dim), 1e3, dtype=dtype)
    v_cache = torch.full_like(k_cache, -1e3)
    order = torch.randperm(total, generator=gen).tolist()
    tables = torch.full((len(lens), max(n_blocks) + 2), -1, dtype=torch.int32)
    for s, L in enumerate(lens):
        blocks = [order.pop() for _ in range(n_blocks[s])]
        tables[s, : n_blocks[s]] = torch.tensor(blocks, dtype=torch.int32)
        k = keys[s] if keys is not None else torch.randn(L, kv_heads, head_dim, generator=gen)
        v = values[s] if values is not None else torch.randn(L, kv_heads, head_dim, generator=gen)
        kv = torch.zeros(n_blocks[s] * page, kv_heads, head_dim)
        kv[:L] = k
        k_cache[blocks] = kv.view(-1, page, kv_heads, head_dim).to(dtype)
        kv = torch.zeros_like(kv)
        kv[:L] = v
        v_cache[blocks] = kv.view(-1, page, kv_heads, head_dim).to(dtype)
        # The tail of a sequence's last block is garbage too.
        if L % page:
            k_cache[blocks[-1], L % page :] = 1e3
            v_cache[blocks[-1], L % page :] = -1e3
    if queries is not None:
        q = torch.cat(list(queries)).to(dtype)
    else:
        q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, cu, torch.tensor(lens, dtype=torch.int32), tables


@pytest.fixture
def paged_batch():
    """Builder of paged batches: (q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)."""
    return _build
