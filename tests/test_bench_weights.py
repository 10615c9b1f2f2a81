"""The benchmarks' `--weights` option and decode_step_bench's weight bytes (parameters and buffers,
each storage once), on the tiny random Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtest"))

import decode_step_bench  # noqa: E402
import engine_bench  # noqa: E402

from worker.engine.fused_layers import fuse_model  # noqa: E402


def test_weights_option_reaches_load_model():
    args = decode_step_bench.parse_args(["--model", "tiny-random", "--weights", "int8"])
    assert args.weights == "int8"
    assert engine_bench.parse_args([]).weights == "auto"
    loaded = engine_bench.load(args)
    assert loaded.weights == "int8" and loaded.quant_report is not None


def test_weight_bytes_count_int8_buffers_and_each_storage_once():
    base = engine_bench.parse_args(["--model", "tiny-random", "--dtype", "float32"])
    fp32 = engine_bench.load(base)
    int8 = engine_bench.load(
        engine_bench.parse_args(["--model", "tiny-random", "--dtype", "float32", "--weights", "int8"])
    )
    report = int8.quant_report
    assert report is not None and report.bytes_after < report.bytes_before / 3
    # The tied embedding / lm_head is one INT8 table with a scale per row, counted once.
    vocab, hidden = fp32.model.model.embed_tokens.weight.shape
    assert report.embedding == "tied" and report.quantized[-2:] == ["model.embed_tokens", "lm_head"]
    assert int8.model.lm_head.weight is int8.model.model.embed_tokens.weight
    modules = fp32.model.named_modules()
    linears = [m for name, m in modules if type(m) is torch.nn.Linear and name != "lm_head"]
    weights = sum(m.weight.numel() for m in linears)
    channels = sum(m.out_features for m in linears)
    assert report.bytes_before == 4 * (weights + vocab * hidden)  # FP32, the table once; no biases
    assert report.bytes_after == weights + vocab * hidden + 4 * (channels + vocab)  # INT8 + FP32 scales
    assert any(t.dtype == torch.float32 for t in fp32.model.buffers())  # rotary frequencies
    expected = decode_step_bench.weight_bytes(fp32.model) - report.bytes_before + report.bytes_after
    assert decode_step_bench.weight_bytes(int8.model) == expected
    # Fused projections are new tensors and the originals views of them: the count does not change.
    fused = fuse_model(int8.model)
    assert fused.swaps and decode_step_bench.weight_bytes(int8.model) == expected
