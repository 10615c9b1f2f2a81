"""The streaming INT8 loader (`streaming_load.py`) on multi-shard safetensors checkpoints written here:
the same INT8 model as transformers' FP32 load quantised afterwards, greedy tokens within the INT8 bar,
peak host memory of the INT8 model plus one shard, one clear error per bad file; the random shapes
streamed in INT8 and in float from the same seeded tensors; and `LLM_KV_CACHE_BYTES=auto`, the pool
that takes the memory the INT8 weights leave."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from worker.engine.config import DEFAULT_KV_CACHE_BYTES
from worker.engine.kv_cache import (
    CPU_DEFAULT_KV_CACHE_BYTES,
    DEFAULT_STEP_WORKSPACE_BYTES,
    GPU_KV_MARGIN_FRACTION,
    KVCacheSpec,
    num_blocks_for_budget,
    step_workspace_bytes,
)
from worker.engine.model_files import LoadedModel
from worker.engine.model_loader import load_model
from worker.engine.quant import Int8Embedding, Int8Linear, TiedInt8Linear, quantize_model
from worker.engine.random_model import TINY_SHAPE, llama_config, load_default_tokenizer, random_tensors
from worker.engine.streaming_load import SAFETENSORS_INDEX, CheckpointError, StreamingLoad, empty_causal_lm
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def write_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], config: Any, shard_bytes: int
) -> list[Path]:
    """Shards of at most `shard_bytes` (a larger tensor alone), in the order given, their index, the
    config and SmolLM2's tokenizer: a directory `MODEL=` may name. Returns the shards."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    directory.mkdir(parents=True)
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, path.name))
        paths.append(path)
    index = {"metadata": {"total_size": sum(p.stat().st_size for p in paths)}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index))
    config.save_pretrained(directory)
    load_default_tokenizer().save_pretrained(directory)
    return paths


def random_checkpoint(directory: Path, shape: dict[str, Any], shard_bytes: int, seed: int = 1) -> list[Path]:
    """A checkpoint of seeded random FP32 weights in a Llama shape (a tied lm_head stored once)."""
    config = llama_config(shape)
    names = StreamingLoad(empty_causal_lm(config, torch.float32), CPU).shapes
    tensors = dict(random_tensors(names, seed=seed, device=CPU, dtype=torch.float32, std=0.02))
    return write_checkpoint(directory, tensors, config, shard_bytes)


def assert_same_tensors(model: nn.Module, other: nn.Module) -> None:
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, different


# --- a real checkpoint: SmolLM2's first layers, in FP16 shards -------------------------------------

LAYERS = 4
NEW_TOKENS = 10
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "Three tips for better sleep:",
    "What is 12 times 12?",
]


def greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=[],
            pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def smol_checkpoint(smol: LoadedModel, directory: Path, tied: bool) -> list[Path]:
    """SmolLM2's embedding, first LAYERS layers and final norm in FP16, sharded; untied: with an lm_head
    of its own, the embedding scaled by 1.1 (the same argmax; loading the wrong table shows in its scales)."""
    config = smol.model.config.__class__.from_dict(smol.model.config.to_dict())
    config.num_hidden_layers, config.tie_word_embeddings = LAYERS, tied
    tensors = {
        name: tensor.detach().half()
        for name, tensor in smol.model.state_dict().items()
        if name != "lm_head.weight" and not any(f"layers.{i}." in name for i in range(LAYERS, 99))
    }
    if not tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 1.1
    return write_checkpoint(directory, tensors, config, shard_bytes=8 << 20)


@pytest.mark.model
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_sharded_checkpoint_streams_into_the_int8_model_transformers_would_quantise(
    smol: LoadedModel, tmp_path: Path, tied: bool
) -> None:
    shards = smol_checkpoint(smol, tmp_path / "ckpt", tied)
    assert len(shards) >= 4
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    prompts = [smol.tokenizer(text).input_ids for text in PROMPTS]
    expected = [greedy(reference, p, NEW_TOKENS) for p in prompts]
    with structlog.testing.capture_logs() as logs:
        streamed = load_model(str(tmp_path / "ckpt"), weights="int8", dtype="float32")
    (event,) = [e for e in logs if e["event"] == "model_quantized"]
    assert event["streamed"] and event["files"] == len(shards)
    assert event["embedding"] == ("tied" if tied else "untied")
    model = streamed.model
    head = model.lm_head
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert isinstance(head, TiedInt8Linear) if tied else type(head) is Int8Linear
    assert model.generation_config.eos_token_id == smol.model.generation_config.eos_token_id
    # Greedy tokens against transformers' own FP32 load, with test_int8_weights.py's bar (measured:
    # every prompt identical over its 10 tokens, tied and untied).
    prefixes = [
        common_prefix(e, greedy(model, p, NEW_TOKENS)) for e, p in zip(expected, prompts, strict=True)
    ]
    assert sum(p >= 8 for p in prefixes) >= 3, prefixes
    assert sum(prefixes) >= 0.7 * NEW_TOKENS * len(PROMPTS), prefixes
    # And exactly the model the float load gives once quantised: every INT8 value and scale.
    report = quantize_model(reference)
    assert_same_tensors(model, reference)
    assert streamed.quant_report is not None and streamed.quant_report.bytes_after == report.bytes_after


# --- peak host memory -----------------------------------------------------------------------------

# A Llama whose FP32 weights (209 MB) dwarf its INT8 model (53 MB) plus one shard (at most 8 MB).
PEAK_SHAPE = {
    **TINY_SHAPE, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 16,
    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False,
}  # fmt: skip
# What the bound allows beyond the INT8 model and one shard: the quantiser's FP32 temporaries of the
# largest tensor (|w|, w / scale, its rounding: 3 x its FP32 bytes) and 32 MiB of allocator slack and
# Python objects (the model's modules, the file handles).
SLACK_BYTES = 32 << 20
# The loader's core, as `load_model` runs it for a directory (without the tokenizer, which `load_model`
# reads beside it). The peak is the process's VmHWM, not `getrusage`'s ru_maxrss: that one survives exec
# and would report the peak of the test process that spawned this one.
PEAK_SCRIPT = """
import json, re, sys
from pathlib import Path
import psutil, torch
from transformers import AutoConfig
from worker.engine.quant import weight_bytes
from worker.engine.streaming_load import Checkpoint, StreamingLoad, empty_causal_lm

torch.set_num_threads(1)
path = Path(sys.argv[1])
config = AutoConfig.from_pretrained(path)
empty_causal_lm(config, torch.float32)  # first-use costs (the model classes) out of the measure
before = psutil.Process().memory_info().rss
model = Checkpoint.find(path).load_into(StreamingLoad(empty_causal_lm(config, torch.float32), "cpu", "float"))
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
print(json.dumps({"before": before, "peak": peak, "int8": weight_bytes(model)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
def test_streaming_a_sharded_checkpoint_holds_the_int8_model_plus_one_shard(tmp_path: Path) -> None:
    shards = random_checkpoint(tmp_path / "ckpt", PEAK_SHAPE, shard_bytes=8 << 20)
    float_bytes = sum(p.stat().st_size for p in shards)
    largest_tensor = 4096 * 512 * 4  # an embedding table in FP32
    # glibc's malloc keeps freed blocks up to its dynamic mmap threshold (raised to the largest block freed)
    # in its heap; a fixed threshold returns every large block at once, so RSS measures what is held.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "ckpt")], capture_output=True, text=True, env=env,
        timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    bound = measured["int8"] + max(p.stat().st_size for p in shards) + 3 * largest_tensor + SLACK_BYTES
    # The bound is tight enough to tell: the FP32 model alone would exceed it.
    assert len(shards) >= 20 and bound < 0.7 * float_bytes, (bound, float_bytes)
    # Measured: 77 MiB above the baseline (the INT8 model 50 MiB), against a bound of 114 MiB.
    assert measured["peak"] - measured["before"] <= bound, (measured, bound)


# --- bad files --------------------------------------------------------------------------------------

SMALL_SHAPE = {**TINY_SHAPE, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 512}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("small") / "ckpt"
    assert len(random_checkpoint(directory, SMALL_SHAPE, shard_bytes=64 << 10)) >= 3
    return directory


def broken_copy(small_checkpoint: Path, tmp_path: Path) -> tuple[Path, list[Path], dict[str, str]]:
    directory = tmp_path / "ckpt"
    shutil.copytree(small_checkpoint, directory)
    weight_map = json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"]
    return directory, sorted(directory.glob("model-*.safetensors")), weight_map


def load_int8(directory: Path) -> LoadedModel:
    return load_model(str(directory), weights="int8", dtype="float32")


def test_the_small_checkpoint_loads(small_checkpoint: Path) -> None:
    loaded = load_int8(small_checkpoint)
    assert isinstance(loaded.model.lm_head, TiedInt8Linear)
    assert {t.device.type for t in loaded.model.state_dict().values()} == {"cpu"}


def test_a_missing_shard_is_named(small_checkpoint: Path, tmp_path: Path) -> None:
    directory, shards, _ = broken_copy(small_checkpoint, tmp_path)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"^{shards[1]}: missing; {SAFETENSORS_INDEX} lists it$"):
        load_int8(directory)


def test_a_truncated_file_is_named(small_checkpoint: Path, tmp_path: Path) -> None:
    directory, shards, _ = broken_copy(small_checkpoint, tmp_path)
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"^{shards[2]}: not a readable safetensors file, truncated"):
        load_int8(directory)


def test_a_tensor_of_the_wrong_shape_is_named_with_its_file(small_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    directory, shards, weight_map = broken_copy(small_checkpoint, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = directory / weight_map[name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    expected = rf"^{shard}: tensor {name} has shape \[128, 32\]; the model expects \[128, 64\]$"
    with pytest.raises(CheckpointError, match=expected):
        load_int8(directory)


def test_a_tensor_missing_from_the_checkpoint_or_its_listed_file_is_named(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    directory, _, weight_map = broken_copy(small_checkpoint, tmp_path)
    name = "model.norm.weight"
    shard = directory / weight_map[name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"^{shard}: lacks {name}, which {SAFETENSORS_INDEX} places"):
        load_int8(directory)
    index = json.loads((directory / SAFETENSORS_INDEX).read_text())
    del index["weight_map"][name]
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"^{directory / SAFETENSORS_INDEX}: lacks 1 tensors .*: {name}$"
    ):
        load_int8(directory)


# --- the random shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_random_shapes_stream_in_int8_the_weights_of_the_streamed_float_load(tied: bool) -> None:
    from worker.engine.random_model import random_causal_lm

    shape = {**SMALL_SHAPE, "tie_word_embeddings": tied}
    float_model = random_causal_lm(shape, streamed=True).model
    assert (float_model.lm_head.weight is float_model.model.embed_tokens.weight) == tied
    assert not any(t.is_meta for t in [*float_model.parameters(), *float_model.buffers()])
    assert_same_tensors(random_causal_lm(shape, streamed=True).model, float_model)  # seeded
    up = random_causal_lm(shape, seed=1, streamed=True).model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(up, float_model.model.layers[0].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 7, 300]])
    for activations in ("float", "int8"):
        streamed = random_causal_lm(shape, activations=activations)
        expected = copy.deepcopy(float_model)
        report = quantize_model(expected, activations=activations)
        assert_same_tensors(streamed.model, expected)
        assert streamed.quant_report is not None and streamed.quant_report.quantized == report.quantized
        assert (streamed.quant_report.bytes_before, streamed.quant_report.bytes_after) == (
            report.bytes_before, report.bytes_after,
        )  # fmt: skip
        int8 = [
            m for name, m in streamed.model.named_modules() if type(m) is Int8Linear and name != "lm_head"
        ]
        assert {m.activations for m in int8} == {activations}  # lm_head stays weight-only
        with torch.inference_mode():
            assert torch.equal(streamed.model(input_ids=ids).logits, expected(input_ids=ids).logits)


# --- LLM_KV_CACHE_BYTES=auto -----------------------------------------------------------------------


def test_kv_cache_bytes_auto_maps_to_the_engines_unsized_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().engine_config().kv_cache_bytes == DEFAULT_KV_CACHE_BYTES
    monkeypatch.setenv("LLM_KV_CACHE_BYTES", "auto")
    assert (
        WorkerSettings().kv_cache_bytes == "auto" and WorkerSettings().engine_config().kv_cache_bytes is None
    )
    monkeypatch.setenv("LLM_KV_CACHE_BYTES", str(64 << 20))
    assert WorkerSettings().engine_config().kv_cache_bytes == 64 << 20
    for bad in ("lots", "1000"):
        monkeypatch.setenv("LLM_KV_CACHE_BYTES", bad)
        with pytest.raises(ValueError, match="kv_cache_bytes"):
            WorkerSettings()
    spec = KVCacheSpec(2, 2, 64, torch.float32)
    assert num_blocks_for_budget(spec, 16, CPU, None) == CPU_DEFAULT_KV_CACHE_BYTES // spec.bytes_per_block(
        16
    )


def test_auto_pool_takes_the_free_memory_less_the_workspace_and_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA arithmetic, on the memory figures `torch.cuda.mem_get_info` would give an H200 holding
    a 70B model in INT8 (70.6 GB of weights and scales)."""
    config = llama_config("llama-70b")
    gib = 1 << 30
    total, free = int(139.8 * gib), int(139.8 * gib) - 71_000_000_000 - gib // 2
    workspace = step_workspace_bytes(
        config, torch.float16, max_batch_tokens=4096, max_num_seqs=32, graph_rows=87, int8_weights=True
    )
    # Prefill activations (4096 rows x 129,024 FP16 values), FP32 logits x3, graph logits, gate/up cast.
    assert workspace == 4096 * 129_024 * 2 + 3 * 32 * 128256 * 4 + 87 * 128256 * 2 + 2 * 28672 * 8192 * 2
    assert 1.9 * gib < workspace < DEFAULT_STEP_WORKSPACE_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    spec = KVCacheSpec.from_model_config(config, torch.int8)
    with structlog.testing.capture_logs() as logs:
        blocks = num_blocks_for_budget(spec, 16, torch.device("cuda"), None, workspace)
    (event,) = logs
    margin = int(total * GPU_KV_MARGIN_FRACTION)
    pool = free - workspace - margin
    assert event == {
        "event": "kv_pool_sized", "log_level": "info", "free_bytes": free, "total_bytes": total,
        "workspace_bytes": workspace, "margin_bytes": margin, "kv_cache_bytes": pool,
    }  # fmt: skip
    assert blocks == pool // spec.bytes_per_block(16)
    assert pool > 55 * gib  # the headline: more than 50 GiB of INT8 KV beside a 70B model on one H200
    # Refused when the weights leave no room, before anything is allocated.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, total))
    with pytest.raises(ValueError, match="holds less than one block"):
        num_blocks_for_budget(spec, 16, torch.device("cuda"), None, workspace)
