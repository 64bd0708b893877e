"""ssmkit's inference engine: the fused decode step and weight-only int8 quantization.

    FusedDecoder(model)        a Mamba LM packed for the fused C++ decode step (fp32 / bf16 / int8 weights)
    decode_step(model, ids, cache)   that step for ``model(ids, cache=cache)`` with one token (None where it
                               does not apply); MambaLM.forward calls it without autograd;
                               ``with disabled():`` sends one-token calls down the module path
    quantize(model, "int8")    weight-only int8, one scale per output row (in place)
    save_quantized / load_quantized / quantization_of   safetensors I/O of quantized models

This package sits above ``ssmkit.layers`` and ``ssmkit.kernels`` and below ``ssmkit.models``: it reads a
model's modules by name and imports no model class.
"""

from ssmkit.engine.decode import (
    DECODE,
    FusedDecoder,
    available_isas,
    decode_step,
    disabled,
    forget,
    unsupported_reason,
)
from ssmkit.engine.quant import (
    QuantEmbedding,
    QuantLinear,
    is_quantized,
    load_quantized,
    quantization_of,
    quantize,
    quantize_rows,
    save_quantized,
)

__all__ = [
    "DECODE",
    "FusedDecoder",
    "QuantEmbedding",
    "QuantLinear",
    "available_isas",
    "decode_step",
    "disabled",
    "forget",
    "is_quantized",
    "load_quantized",
    "quantization_of",
    "quantize",
    "quantize_rows",
    "save_quantized",
    "unsupported_reason",
]
