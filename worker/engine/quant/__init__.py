"""Weight quantisation of a loaded model: INT8 linears (`int8_linear.py`), the INT8 embedding table
that a tied lm_head shares (`int8_embedding.py`), the module swap (`quantize.py`) and the
`LLM_WEIGHTS` choice (`weights.py`)."""

from worker.engine.quant.int8_embedding import Int8Embedding, TiedInt8Linear
from worker.engine.quant.int8_linear import Int8Linear
from worker.engine.quant.quantize import QuantReport, quantize_embeddings, quantize_linears, quantize_model
from worker.engine.quant.weights import (
    WEIGHTS_CHOICES,
    WeightsPlan,
    dtype_name,
    plan_weights,
    weight_bytes,
    weights_label,
)

__all__ = [
    "WEIGHTS_CHOICES",
    "Int8Embedding",
    "Int8Linear",
    "QuantReport",
    "TiedInt8Linear",
    "WeightsPlan",
    "dtype_name",
    "plan_weights",
    "quantize_embeddings",
    "quantize_linears",
    "quantize_model",
    "weight_bytes",
    "weights_label",
]
