"""The engine's Triton path (fused layers, paged kernels) against its torch reference, on the real model.

Without a GPU the kernels run under Triton's interpreter, so this checks on CPU that the whole GPU
path (row ordering, metadata, fused QKV/RoPE/store, fused norms and MLP, layer restore) computes
what the reference computes. Slow under the interpreter, so the prompts are short.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import chat, collect, drain, engine_config, request

from worker.engine.kernels import kernels_usable
from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not kernels_usable(torch.device("cpu")), reason="needs TRITON_INTERPRET=1"),
]


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_triton_path_gives_the_reference_tokens_and_restores_the_model(smol: LoadedModel, kv_dtype: str):
    """With an INT8 cache too: the fused store rotates and quantises, the kernels read the scales in
    pairs and rotate their output back in the epilogue, where the torch path calls `unrotate_output`."""
    modules_before = [type(m).__name__ for m in smol.model.modules()]
    results: dict[str, dict[str, list[int]]] = {}
    for backend in ("torch", "triton"):
        engine = PagedEngine(
            smol.model,
            smol.tokenizer,
            engine_config(
                kv_cache_bytes=16 << 20,
                max_batch_tokens=64,
                max_prefill_chunk_tokens=40,
                attention_backend=backend,
                kv_dtype=kv_dtype,
            ),
        )
        assert (engine.kv_cache.rotation is not None) == (kv_dtype == "int8")
        assert engine.attention_backend == backend
        if backend == "triton":
            engine.runner.warm_up()  # compiles the kernels; must leave the cache untouched
            assert not engine.kv_cache.data.any()
        prompt = chat(engine, "What is the capital of France?", "Answer briefly.")
        # Chunked prefill (40-token chunks), a prefix hit, and decodes sharing steps with prefills.
        for rid, ids in (("full", prompt), ("prefix", prompt[:-3] + prompt[-3:]), ("short", prompt[:20])):
            engine.add_request(request(rid, ids, max_tokens=4, ignore_eos=True))
        results[backend] = {rid: collect(outs)[0] for rid, outs in drain(engine).items()}
        if backend == "triton":
            assert any(type(m).__name__ == "PagedSelfAttention" for m in smol.model.modules())
        engine.close()
        assert [type(m).__name__ for m in smol.model.modules()] == modules_before
    assert results["triton"] == results["torch"]
    assert all(len(tokens) == 4 for tokens in results["torch"].values())
