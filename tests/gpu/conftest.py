"""The GPU suite: kernels vs the torch reference, graph replay vs eager, greedy tokens vs `generate()`.

Run on a CUDA machine with `python -m pytest tests/gpu` (README, "GPU hosts"); everywhere else
every test here is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)
