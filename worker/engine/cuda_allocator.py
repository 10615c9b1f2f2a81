"""The CUDA caching allocator's settings for quantised models: expandable segments.

A streamed INT8 load (`streaming_load.py`) draws each float tensor, quantises it and frees it, one at a
time, so the INT8 weights end up interleaved with the holes of the freed float tensors. With a
70B-class model that leaves gigabytes reserved but unusable for the engine's next large allocations
(its fused gate/up weights, the KV pool): measured on an NVIDIA H100 80GB with the Llama-3-70B shape,
the engine's MLP fusion ran out of memory with 9 GiB reserved but unallocated, and the same run with
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` loaded, sized its pool and served. PyTorch reads the
variable when CUDA is first initialised, so it is set before that, in the worker and the benchmarks,
and only where the user has not set it.
"""

from __future__ import annotations

import os

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
QUANTISED_WEIGHTS = ("int8", "w8a8")


def allocator_defaults(weights: str) -> bool:
    """Expandable segments for INT8 weights (`LLM_WEIGHTS` int8 or w8a8) unless `PYTORCH_CUDA_ALLOC_CONF`
    is set; True when it set them. Call before anything initialises CUDA (the engine process inherits it)."""
    if weights not in QUANTISED_WEIGHTS or ALLOC_CONF in os.environ:
        return False
    os.environ[ALLOC_CONF] = "expandable_segments:True"
    return True
