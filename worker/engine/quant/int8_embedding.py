"""`Int8Embedding`: an INT8 embedding table with one scale per vocabulary row, and `TiedInt8Linear`,
the output projection (`lm_head`) that reads the same table.

The table is quantised like an `Int8Linear` weight (`quantize_weight`: symmetric, one scale per row,
`scale[v] = max_i |E[v, i]| / 127`). A vocabulary row of the embedding is an output channel of a tied
`lm_head` (`logits = h @ E.T`), so the per-row scale of the table is exactly the per-output-channel
scale `Int8Linear` needs: one INT8 table and one scale vector serve both, and no float copy of the
table stays in the model.

- The lookup gathers the INT8 rows and multiplies each by its scale, in the scale's (the model's
  activation) dtype: `E_q[ids] * scale[ids, None]`. Both factors are exact in that dtype (|q| <= 127)
  and the product is rounded once, so a looked-up row equals `dequantized_weight()[ids]` bit for bit.
  Only temporaries of the output's size are allocated, with no host synchronisation: the step stays
  CUDA-graph capturable.
- `TiedInt8Linear` is an `Int8Linear` whose `weight` and `scale` are the embedding's buffers (read
  through properties, so they follow the embedding through `model.to(...)`, which would otherwise
  give each module its own copy of a shared buffer). Its forward is `Int8Linear.forward`: the
  Triton weight-only kernel on CUDA for decode steps, torch elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.quant.int8_linear import ActivationMode, Int8Linear, quantize_weight


class Int8Embedding(nn.Module):
    """`nn.Embedding` with an INT8 table [num_embeddings, embedding_dim] and a scale per row."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        # Buffers, as in Int8Linear: nothing trains them, and `next(model.parameters())` keeps naming
        # the model's float dtype.
        self.register_buffer(
            "weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Quantise a float `nn.Embedding`; the scale keeps its dtype (the activation dtype)."""
        weight = embedding.weight
        module = cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
            dtype=weight.dtype, device=weight.device,
        )  # fmt: skip
        module.weight, module.scale = quantize_weight(weight, weight.dtype)
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float table the lookup reproduces (for tests and comparisons)."""
        dtype = dtype or self.scale.dtype
        return (self.weight.to(torch.float32) * self.scale.float()[:, None]).to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight)
        return rows.to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, int8"


class TiedInt8Linear(Int8Linear):
    """An `Int8Linear` over an `Int8Embedding`'s table: `logits = (h @ E_q.T) * scale`; no buffers of
    its own, so the model holds the table once (see the module doc)."""

    _table: Int8Embedding

    def __init__(self, embedding: Int8Embedding, activations: ActivationMode = "float"):
        nn.Module.__init__(self)  # not Int8Linear.__init__: it would register buffers of its own
        if activations not in ("float", "int8"):
            raise ValueError(f"activations must be 'float' or 'int8', not {activations!r}")
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.activations = activations
        self.bias = None
        # A plain attribute, not a submodule: the embedding is registered where it belongs (the
        # decoder), and a second registration would list its table twice in `state_dict`.
        object.__setattr__(self, "_table", embedding)

    # Read-write, as the attributes they override, but the table is the embedding's to change.
    @property
    def weight(self) -> torch.Tensor:
        return self._table.weight

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        raise AttributeError("a tied lm_head's weight is its embedding's table: set that instead")

    @property
    def scale(self) -> torch.Tensor:
        return self._table.scale

    @scale.setter
    def scale(self, value: torch.Tensor) -> None:
        raise AttributeError("a tied lm_head's scale is its embedding's: set that instead")

    @property
    def table(self) -> Int8Embedding:
        """The embedding whose table this module multiplies by."""
        return self._table

    def extra_repr(self) -> str:
        return super().extra_repr() + ", tied to the INT8 embedding"
