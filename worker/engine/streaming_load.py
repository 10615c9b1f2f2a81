"""Load a model onto its device one tensor at a time, each linear quantised to INT8 as it arrives.

A 70B model holds 140 GB in FP16 and fits on no single GPU; in INT8 it holds 70 GB and fits one H200.
Loading it through transformers (`from_pretrained`, then `quant.quantize_model`) would hold the whole
float model first. Here the model is built with its parameters on the meta device (shapes, no storage:
accelerate's `init_empty_weights`, so small buffers such as the rotary frequencies are still computed),
its modules are swapped for INT8 ones there (`quantize_model` on meta: the skeleton and the byte
report, no data), and each tensor is then put in place as it arrives (`StreamingLoad.put`): cast to the
model's dtype on the device and, for the weight of a linear or of the embedding, quantised at once
(`quantize_weight`), its float copy dropped before the next tensor. Peak device memory is the INT8 model
plus one float tensor (the largest: a 70B's embedding table, 2.1 GB in FP16) and the quantiser's
temporaries.

Where the tensors come from:
- A safetensors checkpoint (`Checkpoint`): its single file, or the shards `model.safetensors.index.json`
  lists. safetensors maps a file and reads a tensor where it lies, so the host holds at most the file
  being read (its pages stay mapped until its last tensor is dropped); float tensors are copied out of
  the mapping. Before any tensor is read, every file's header is checked against the model (`check`):
  a missing shard, a truncated or corrupt file, a tensor of the wrong shape, of another model, or
  missing: each raises one `CheckpointError` that names the file (and the tensor).
- Seeded random weights of the benchmark shapes (`random_model.random_tensors`).

Without INT8 (`activations=None`) the same path materialises float weights (`random_causal_lm(...,
streamed=True)`): the float model an INT8 load of the same seed quantises. A tied lm_head is one tensor,
listed under the embedding's name (its other name is an alias); an INT8 model holds it as the
embedding's INT8 table, which a `TiedInt8Linear` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.engine.quant import Int8Embedding, Int8Linear, QuantReport, TiedInt8Linear, quantize_model
from worker.engine.quant.int8_linear import ActivationMode, quantize_weight

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_LISTED = 5  # missing tensors named in an error


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the model; the message starts with the file."""


def empty_causal_lm(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` with its parameters on the meta device (buffers computed on the host), tied
    as its config says."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # transformers ties at init only where parameters have storage
    return model


@dataclass
class _Slot:
    """Where one named tensor goes: its places (two for a tied float weight), shape, dtype, and whether it
    is quantised on arrival (the weight of an `Int8Linear` or `Int8Embedding`, whose scale comes with it)."""

    places: list[tuple[nn.Module, str]]
    shape: tuple[int, ...]
    dtype: torch.dtype
    quantized: bool


@dataclass
class StreamingLoad:
    """A meta-device model being filled tensor by tensor on `device` (see the module doc).

    `activations` is the INT8 mode of `LLM_WEIGHTS` (`quant.plan_weights`); None keeps float weights.
    """

    model: nn.Module
    device: torch.device
    activations: ActivationMode | None = None
    report: QuantReport | None = None
    slots: dict[str, _Slot] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # a tied weight's other names -> its slot's
    ignored: set[str] = field(default_factory=set)  # computed buffers some checkpoints carry (inv_freq)
    done: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        seen: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                self.aliases[name] = seen[id(param)]
            else:
                seen[id(param)] = name
        if self.activations is not None:
            self.report = quantize_model(self.model, activations=self.activations)
        for prefix, module in self.model.named_modules():
            if not isinstance(module, TiedInt8Linear):  # it reads the embedding's table: nothing of its own
                self._add_slots(prefix, module)

    def _add_slots(self, prefix: str, module: nn.Module) -> None:
        # An INT8 module's weight is quantised on arrival, in its scale's dtype; its scale comes with it.
        scale_dtype = module.scale.dtype if isinstance(module, (Int8Linear, Int8Embedding)) else None
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            name = f"{prefix}.{attr}" if prefix else attr
            if tensor is None or scale_dtype is not None and attr == "scale":
                continue
            if attr in module._non_persistent_buffers_set:
                self.ignored.add(name)
            elif name in self.aliases:
                self.slots[self.aliases[name]].places.append((module, attr))
            elif scale_dtype is not None and attr == "weight":
                self.slots[name] = _Slot([(module, attr)], tuple(tensor.shape), scale_dtype, quantized=True)
            else:
                self.slots[name] = _Slot([(module, attr)], tuple(tensor.shape), tensor.dtype, quantized=False)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs, by name (a tied weight once), in the model's order."""
        return {name: slot.shape for name, slot in self.slots.items()}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Put one tensor in place on the device, quantised if its slot is; a tied weight's second copy and
        computed buffers are skipped."""
        name = self.aliases.get(name, name)
        if name in self.ignored or name in self.done:
            return
        slot = self.slots[name]
        if tuple(tensor.shape) != slot.shape:
            wanted = list(slot.shape)
            raise ValueError(f"tensor {name} has shape {list(tensor.shape)}; the model expects {wanted}")
        if slot.quantized:
            module, _ = slot.places[0]
            module.weight, module.scale = quantize_weight(tensor.to(self.device, slot.dtype), slot.dtype)
        else:
            # A copy: a tensor read from a file is a view of its mapping, which it would keep alive.
            value = nn.Parameter(tensor.to(self.device, slot.dtype, copy=True), requires_grad=False)
            for module, attr in slot.places:
                if attr in module._parameters:
                    module._parameters[attr] = value
                else:
                    module._buffers[attr] = value.data
        self.done.add(name)

    def missing(self) -> list[str]:
        """Names of the tensors not put yet."""
        return [name for name in self.slots if name not in self.done]

    def finish(self) -> nn.Module:
        """The loaded model on the device, in eval mode; raises if a tensor never came."""
        missing = self.missing()
        if missing:
            raise ValueError(f"{len(missing)} tensors were never loaded: {', '.join(missing[:_LISTED])}")
        # Moves what was computed on the host (the rotary frequencies); the weights are there already.
        self.model.to(self.device)
        return self.model.eval()


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint: its files, and which file the index places each tensor in."""

    directory: Path
    files: tuple[Path, ...]
    listed: Mapping[str, str] = field(default_factory=dict)  # tensor -> file name, from the index

    @classmethod
    def find(cls, directory: Path) -> Checkpoint | None:
        """The checkpoint in `directory` (a shard index or a single `model.safetensors`); None if neither."""
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            try:
                listed = json.loads(index.read_text())["weight_map"]
                files = tuple(directory / name for name in sorted(set(listed.values())))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from exc
            return cls(directory, files, listed)
        single = directory / SAFETENSORS
        return cls(directory, (single,)) if single.is_file() else None

    @property
    def where(self) -> Path:
        """The file that says which tensors the checkpoint holds: the index, or the single file."""
        return self.directory / SAFETENSORS_INDEX if self.listed else self.files[0]

    def headers(self) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """(file, shape) of every tensor, read from the headers alone."""
        from safetensors import SafetensorError, safe_open

        found: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing; {self.where.name} lists it")
            try:
                with safe_open(str(path), framework="pt") as file:
                    for name in file.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                        found[name] = (path, tuple(file.get_slice(name).get_shape()))
            except SafetensorError as exc:
                raise CheckpointError(
                    f"{path}: not a readable safetensors file, truncated or corrupt ({exc})"
                ) from exc
        for name, file_name in self.listed.items():
            if name not in found or found[name][0].name != file_name:
                where = self.directory / file_name
                raise CheckpointError(f"{where}: lacks {name}, which {SAFETENSORS_INDEX} places there")
        return found

    def check(self, load: StreamingLoad) -> None:
        """Raise `CheckpointError` unless the files hold exactly the model's tensors, in its shapes."""
        found = self.headers()
        expected = load.shapes
        for name, (path, shape) in found.items():
            target = load.aliases.get(name, name)
            if target in load.ignored:
                continue
            if target not in expected:
                raise CheckpointError(f"{path}: tensor {name} is not a weight of this model")
            if shape != expected[target]:
                wanted = list(expected[target])
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {list(shape)}; the model expects {wanted}"
                )
        covered = {load.aliases.get(name, name) for name in found}
        missing = [name for name in expected if name not in covered]
        if missing:
            raise CheckpointError(
                f"{self.where}: lacks {len(missing)} tensors of the model: {', '.join(missing[:_LISTED])}"
            )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, file by file, each read when asked for (a view of its file's mapping)."""
        from safetensors import SafetensorError, safe_open

        for path in self.files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as file:
                    names = list(file.keys())  # noqa: SIM118 (a safetensors handle, not a dict)
                    for name in names:
                        tensor = file.get_tensor(name)
                        yield name, tensor
                        del tensor
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: {exc}") from exc

    def load_into(self, load: StreamingLoad) -> nn.Module:
        """Check the files, then stream every tensor into `load`; the loaded model."""
        self.check(load)
        for name, tensor in self.tensors():
            load.put(name, tensor)
        return load.finish()
