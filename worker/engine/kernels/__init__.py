"""Triton kernels of the paged engine's GPU path.

Attention (`paged_decode`, `paged_prefill`, sharing the loop of `paged_softmax`) and the KV store
are called by `worker/engine/attention.py`; the fused layers of `worker/engine/fused_layers.py` call
`rope_store`, `rms_norm` and `silu_mul`; `quant.Int8Linear` calls `int8_matmul` (weight-only INT8
matmul for decode-sized steps). Each module holds one `@triton.jit` kernel (or a kernel
and its reduction) and a torch-facing wrapper. The torch code they replace stays the reference:
every kernel is tested against it, on the GPU and on CPU tensors under `TRITON_INTERPRET=1`
(how CI checks them without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it must be chosen before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of `device` in this process."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def num_decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    """Context splits per sequence for the decode kernel: enough programs for about two waves of the GPU.

    A power of two, so the kernel (specialised on it) compiles for at most six values.
    """
    programs = max(num_seqs * num_kv_heads, 1)
    wanted = -(-2 * num_sms // programs)
    return min(max_splits, 1 << (wanted - 1).bit_length())
