"""Weight quantisation of a loaded model: INT8 linears (`int8_linear.py`), the module swap
(`quantize.py`) and the `LLM_WEIGHTS` choice (`weights.py`)."""

from worker.engine.quant.int8_linear import Int8Linear
from worker.engine.quant.quantize import QuantReport, quantize_linears
from worker.engine.quant.weights import WEIGHTS_CHOICES, WeightsPlan, dtype_name, plan_weights, weights_label

__all__ = [
    "WEIGHTS_CHOICES",
    "Int8Linear",
    "QuantReport",
    "WeightsPlan",
    "dtype_name",
    "plan_weights",
    "quantize_linears",
    "weights_label",
]
