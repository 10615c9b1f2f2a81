"""Fixtures for engine tests: the real default model, loaded once, and its greedy `generate()` oracle."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_helpers import greedy_reference

from worker.engine.model_files import LoadedModel
from worker.engine.model_loader import load_model

# The CI and dev boxes have 2 shared cores; a second intra-op thread spin-waits on a busy core and
# makes small forwards ~10x slower, so the suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def reference(smol: LoadedModel) -> Callable[[list[int], int], list[int]]:
    return lambda prompt_ids, n: greedy_reference(smol, prompt_ids, n)
