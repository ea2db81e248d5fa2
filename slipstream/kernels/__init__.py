"""Triton attention kernels (prefill and paged decode, dense and skip-softmax) with torch references.

Imports no other slipstream package.
"""
