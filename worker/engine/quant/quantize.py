"""`quantize_linears`: swap a model's `nn.Linear` modules for `Int8Linear`, in place.

Skipped by default: `lm_head` (and the embedding, which is not a Linear). The output projection
decides the argmax over the whole vocabulary, the step most sensitive to weight rounding, and many
small models (SmolLM2 among them) tie it to the embedding: quantising it would add an INT8 copy
beside the float embedding that stays, saving nothing. `skip=()` quantises it anyway (measured by
`loadtest/kv_quality.py --rows int8-weights-lm-head`).

Run it before `fused_layers.fuse_model` (which the engine does when it starts): the fused QKV and
gate/up projections of `Int8Linear` inputs are built by `Int8Linear.concat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from worker.engine.quant.int8_linear import ActivationMode, Int8Linear

DEFAULT_SKIP = ("lm_head",)


@dataclass
class QuantReport:
    """What `quantize_linears` swapped, and the bytes those modules held before and after."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (not its children's)."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_linears(
    model: nn.Module, *, activations: ActivationMode = "float", skip: tuple[str, ...] = DEFAULT_SKIP
) -> QuantReport:
    """Replace every `nn.Linear` (not those named in `skip`, by full or last name) by `Int8Linear`."""
    report = QuantReport()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # subclasses may compute something else
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if _skipped(name, skip):
                report.skipped.append(name)
                continue
            quantized = Int8Linear.from_linear(child, activations)
            report.bytes_before += module_bytes(child)
            report.bytes_after += module_bytes(quantized)
            setattr(parent, child_name, quantized)
            report.quantized.append(name)
    return report
