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
    assert any(t.dtype == torch.float32 for t in fp32.model.buffers())  # rotary frequencies
    expected = decode_step_bench.weight_bytes(fp32.model) - report.bytes_before + report.bytes_after
    assert decode_step_bench.weight_bytes(int8.model) == expected
    # Fused projections are new tensors and the originals views of them: the count does not change.
    fused = fuse_model(int8.model)
    assert fused.swaps and decode_step_bench.weight_bytes(int8.model) == expected
