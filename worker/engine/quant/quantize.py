"""Swap a model's float weights for INT8, in place: `quantize_model` (what `LLM_WEIGHTS=int8|w8a8`
loads), made of `quantize_linears` (every `nn.Linear` but `lm_head` becomes an `Int8Linear`) and
`quantize_embeddings` (the embedding table and `lm_head`).

The embedding and `lm_head`: many small models (SmolLM2, Llama-3.2-1B) tie `lm_head` to the input
embedding, one float table of vocabulary x hidden (21% of Llama-3.2-1B's FP16 bytes). Quantising
`lm_head` alone would add an INT8 copy beside the float table the lookup still needs, so for a tied
model both become views of one INT8 table with a scale per vocabulary row (`Int8Embedding` and the
`TiedInt8Linear` that reads its buffers); the float table is dropped. An untied model gets an
`Int8Linear` lm_head and an `Int8Embedding` of its own (the lookup's rounding costs no measurable
perplexity on SmolLM2: docs/benchmarks.md). `lm_head` always runs weight-only, also under W8A8: it
decides the argmax over the vocabulary, and per-token activation rounding is what W8A8's quality cost
comes from.

Run it before `fused_layers.fuse_model` (which the engine does when it starts): the fused QKV and
gate/up projections of `Int8Linear` inputs are built by `Int8Linear.concat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from worker.engine.quant.int8_embedding import Int8Embedding, TiedInt8Linear
from worker.engine.quant.int8_linear import ActivationMode, Int8Linear

DEFAULT_SKIP = ("lm_head",)


@dataclass
class QuantReport:
    """What `quantize_linears` swapped, and the bytes those modules held before and after."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    # What `quantize_embeddings` did: "tied" (one INT8 table for the lookup and lm_head), "untied"
    # (an INT8 table and an INT8 lm_head), "lm_head" (lm_head only), "" (nothing).
    embedding: str = ""

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def swap(self, parent: nn.Module, attribute: str, name: str, old: nn.Module, new: nn.Module) -> None:
        """Put `new` in place of `old` at `parent.attribute` and count the bytes of both."""
        self.bytes_before += module_bytes(old)
        self.bytes_after += module_bytes(new)
        setattr(parent, attribute, new)
        self.quantized.append(name)


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
            report.swap(parent, child_name, name, child, Int8Linear.from_linear(child, activations))
    return report


def _find(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str, str] | None:
    """(parent, attribute, full name) of the first place `target` is registered in `model`."""
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if child is target:
                return parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name
    return None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two weights are one table. Meta tensors (a model built without storage,
    `streaming_load.py`) have no storage to compare, and all report address 0: only the same tensor is."""
    if a is b:
        return True
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The input embedding and the output projection of a transformers model (None where absent)."""

    def call(name: str) -> nn.Module | None:
        getter = getattr(model, name, None)
        try:
            return getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):  # transformers' default for models without one
            return None

    return call("get_input_embeddings"), call("get_output_embeddings")


def quantize_embeddings(model: nn.Module, *, untied_embedding: bool = True) -> QuantReport:
    """INT8 for the embedding table and `lm_head` (see the module doc): tied, one `Int8Embedding`
    serves both (lm_head a `TiedInt8Linear` over its buffers); untied, lm_head becomes an
    `Int8Linear` and, if `untied_embedding`, the embedding an `Int8Embedding`. Modules that are
    not a plain `nn.Embedding` / `nn.Linear` (already quantised, or computing something else) stay."""
    report = QuantReport()
    embedding, head = _embeddings(model)
    emb_at = _find(model, embedding) if type(embedding) is nn.Embedding else None
    head_at = _find(model, head) if type(head) is nn.Linear and head.bias is None else None
    tied = (
        emb_at is not None
        and head_at is not None
        and _same_storage(head.weight, embedding.weight)
        and head.weight.shape == embedding.weight.shape
    )
    if tied:
        assert emb_at is not None and head_at is not None and isinstance(embedding, nn.Embedding)
        table = Int8Embedding.from_embedding(embedding)
        report.swap(*emb_at, embedding, table)  # the tied float table, counted once
        setattr(head_at[0], head_at[1], TiedInt8Linear(table))  # over the table's buffers: no bytes
        report.quantized.append(head_at[2])
        report.embedding = "tied"
        return report
    if head_at is not None:
        assert isinstance(head, nn.Linear)
        report.swap(*head_at, head, Int8Linear.from_linear(head))
        report.embedding = "lm_head"
    if emb_at is not None and untied_embedding:
        assert isinstance(embedding, nn.Embedding)
        report.swap(*emb_at, embedding, Int8Embedding.from_embedding(embedding))
        report.embedding = "untied" if head_at is not None else "embedding"
    elif emb_at is not None:
        report.skipped.append(emb_at[2])
    return report


def quantize_model(
    model: nn.Module, *, activations: ActivationMode = "float", embeddings: bool = True
) -> QuantReport:
    """`LLM_WEIGHTS=int8|w8a8`: the linears (`quantize_linears`), then, if `embeddings`, the
    embedding table and lm_head (`quantize_embeddings`); one report of both."""
    report = quantize_linears(model, activations=activations)
    if not embeddings:
        return report
    extra = quantize_embeddings(model)
    report.quantized += extra.quantized
    report.skipped = [name for name in report.skipped if name not in extra.quantized] + extra.skipped
    report.bytes_before += extra.bytes_before
    report.bytes_after += extra.bytes_after
    report.embedding = extra.embedding
    return report
