"""The weight-only INT8 kernel on the GPU: FP16/BF16 at Llama-3.2-1B's projection shapes against the
float64 reference, inside `Int8Linear` (no float copy of the weight), in a CUDA graph, and through
the engine's fused layers and decode graphs against the dequantise-and-cuBLAS path."""

from __future__ import annotations

import random
import time

import pytest
import torch
from gpu_helpers import rel_error

from scheduler import BatchPolicy
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.model_runner import ScheduledSequence
from worker.engine.quant import Int8Linear

# Relative error bounds: FP32 accumulation, one rounding of the output to FP16 (2^-11) or BF16
# (2^-8); the measured error is the output rounding, far below these.
BOUND = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)]  # (K, N): qkv, o, gate/up, down


def module(k: int, n: int, dtype: torch.dtype, bias: bool = False, seed: int = 0) -> Int8Linear:
    torch.manual_seed(seed)
    return Int8Linear.from_linear(torch.nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype))


def reference(lin: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    out = x.double() @ lin.dequantized_weight(torch.float64).T
    return out if lin.bias is None else out + lin.bias.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 33, 64])
def test_kernel_at_llama_1b_shapes(dtype: torch.dtype, k: int, n: int, m: int):
    from worker.engine.kernels.int8_matmul import int8_matmul

    lin = module(k, n, dtype, bias=m == 3)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = int8_matmul(x, lin.weight, lin.scale, lin.bias)
    assert out.dtype == dtype and rel_error(out, reference(lin, x)) < BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_candidate_config(dtype: torch.dtype):
    from worker.engine.kernels.int8_matmul import candidate_configs, int8_matmul

    lin = module(1000, 700, dtype, bias=True)  # K and N multiples of no tile
    for m in (1, 9, 20, 50):
        x = torch.randn(m, 1000, device="cuda", dtype=dtype)
        ref = reference(lin, x)
        for cfg in candidate_configs(m):
            out = int8_matmul(x, lin.weight, lin.scale, lin.bias, config=cfg)
            assert rel_error(out, ref) < BOUND.get(dtype, 1e-6), cfg


def test_int8_linear_takes_the_kernel_for_decode_steps_without_a_float_weight_copy(
    monkeypatch: pytest.MonkeyPatch,
):
    import worker.engine.kernels.int8_matmul as kernel
    from worker.engine.quant.int8_linear import TRITON_MAX_ROWS

    calls = []
    original = kernel.int8_matmul
    monkeypatch.setattr(
        kernel, "int8_matmul", lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw)
    )
    lin = module(2048, 16384, torch.float16)
    rows = (1, 64, TRITON_MAX_ROWS, TRITON_MAX_ROWS + 1)
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(1, m, 2048, device="cuda", dtype=torch.float16)
            lin(x)  # tunes (first call), then a measured call
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = lin(x)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
            assert rel_error(out[0], reference(lin, x[0])) < BOUND[torch.float16]
            float_copy = lin.weight.numel() * 2
            if m <= TRITON_MAX_ROWS:  # the output and a split-K workspace (at most 4 x 64 x 16384 FP32)
                assert extra < float_copy / 2, (m, extra)
            else:  # prefill-sized: the dequantised weight for cuBLAS
                assert extra >= float_copy, (m, extra)
    assert calls == [(m, 2048) for m in rows[:-1] for _ in range(2)]


@pytest.mark.parametrize("m", [1, 16, 40])
def test_kernel_in_a_cuda_graph(m: int):
    lin = module(8192, 2048, torch.float16, bias=True)
    x = torch.randn(m, 8192, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        lin(x)  # eager warm-up: tunes the config the capture then uses
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lin(x)
        for seed in range(3):
            x.copy_(torch.randn(m, 8192, generator=torch.Generator("cuda").manual_seed(seed), device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, lin(x))  # deterministic: split K sums in a fixed order
            assert rel_error(out, reference(lin, x)) < BOUND[torch.float16]


@pytest.mark.parametrize("m", [1, 16, 64, 65])
def test_tied_lm_head_over_the_int8_embedding_table(m: int):
    """Llama-3.2-1B's tied lm_head (2048 x 128,256) reads the embedding's INT8 table: the kernel for
    decode rows, the cast path in slices of output channels above 64 rows; the lookup is exact."""
    from worker.engine.quant import Int8Embedding, TiedInt8Linear

    torch.manual_seed(0)
    float_table = torch.nn.Embedding(128256, 2048, device="cuda", dtype=torch.float16)
    table = Int8Embedding.from_embedding(float_table)
    del float_table
    head = TiedInt8Linear(table)
    assert head.weight.data_ptr() == table.weight.data_ptr()
    x = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
    out = head(x)
    ref = x.double() @ table.dequantized_weight(torch.float64).T
    assert out.dtype == torch.float16 and rel_error(out, ref) < BOUND[torch.float16]
    ids = torch.randint(0, 128256, (m,), device="cuda")
    assert torch.equal(table(ids), table.dequantized_weight()[ids])


def test_engine_decode_graphs_with_int8_weights_match_the_cublas_path(monkeypatch: pytest.MonkeyPatch):
    """Llama-3.2-1B's shape with INT8 weights: the decode graphs (fused QKV and gate/up through the
    kernel, the INT8 embedding lookup, the tied lm_head over the same table) against an eager forward
    with the kernel switched off (dequantised weights, cuBLAS)."""
    from worker.engine.model_loader import load_model
    from worker.engine.paged_engine import PagedEngine
    from worker.engine.quant import Int8Embedding, TiedInt8Linear

    loaded = load_model("llama-1b-random", device="cuda", dtype="float16", weights="int8")
    assert isinstance(loaded.model.model.embed_tokens, Int8Embedding)
    assert isinstance(loaded.model.lm_head, TiedInt8Linear)
    engine = PagedEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            kv_cache_bytes=1 << 30,
            prefill_interval_steps=0,
            policy=BatchPolicy(
                max_wait_ms=0, max_num_seqs=24, max_batch_tokens=8192, max_prefill_chunk_tokens=4096
            ),
        ),
    )
    assert engine.runner.graphs is not None
    rng = random.Random(0)
    for i in range(21):  # a bucket of 24, padded with 3 rows
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randint(5, 500))]
        engine.add_request(
            GenerationRequest(
                f"r{i}", prompt, SamplingParams(max_tokens=32, ignore_eos=True), time.monotonic()
            )
        )
    while any(seq.num_uncomputed_tokens > 1 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    rows = [ScheduledSequence(seq, 1) for seq in engine.scheduler.running]
    with torch.inference_mode():
        graph = engine.runner._graph_logits(rows).float().clone()
        monkeypatch.setattr("worker.engine.quant.int8_linear.TRITON_MAX_ROWS", 0)
        eager, _ = engine.runner._eager_logits(rows)
    engine.close()
    # Same INT8 weights; only FP16 roundings differ (the kernel rounds each output once, the cuBLAS
    # path twice), compounded over 16 layers: looser than the kernel tests, which bound each product.
    assert rel_error(graph, eager.float()) < 2e-2
