"""Expandable segments for INT8 weights (`worker/engine/cuda_allocator.py`), never over the user's choice."""

from __future__ import annotations

import os

import pytest

from worker.engine.cuda_allocator import ALLOC_CONF, allocator_defaults


@pytest.mark.parametrize("weights", ["int8", "w8a8"])
def test_int8_weights_get_expandable_segments(monkeypatch: pytest.MonkeyPatch, weights: str) -> None:
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    assert allocator_defaults(weights) is True
    assert os.environ[ALLOC_CONF] == "expandable_segments:True"


@pytest.mark.parametrize("weights", ["auto", "fp16", "bf16"])
def test_float_weights_keep_the_allocator_as_it_is(monkeypatch: pytest.MonkeyPatch, weights: str) -> None:
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    assert allocator_defaults(weights) is False
    assert ALLOC_CONF not in os.environ


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOC_CONF, "max_split_size_mb:512")
    assert allocator_defaults("int8") is False
    assert os.environ[ALLOC_CONF] == "max_split_size_mb:512"

