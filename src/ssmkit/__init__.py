"""ssmkit: state space models, from the first equation to a Mamba language model.

Public API (re-exports only; each name is imported on first use so that ``import ssmkit`` stays light).

    ssmkit.lti  discretize, recurrent, kernel, convolve, scan, hippo, nplr, expm, continuous_response
    selective_scan        the S6 operator (reference / chunked / cpu backends)
    ssd, ssd_step         the Mamba-2 (SSD) operator and its one-token step (reference / chunked)
    RMSNorm, Mamba, Mamba2, S4D, S4                 layers
    MambaConfig, Mamba2Config, MambaLM              the Mamba language model (Mamba-1 or Mamba-2 mixers)
    TransformerConfig, TransformerLM                its Transformer baseline
    SequenceModelConfig, SequenceModel              the ablation models (Mamba paper, Table 1 / 11)
    Cache, generate                                 the one state protocol; decoding
    load_model                                      any model folder or Hub id, by its model type
    quantize                                        weight-only int8 for the fused decode step
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "selective_scan": "ssmkit.scan",
    "ssd": "ssmkit.scan.ssd",
    "ssd_step": "ssmkit.scan.ssd",
    "RMSNorm": "ssmkit.layers.norm",
    "Mamba": "ssmkit.layers.mamba",
    "Mamba2": "ssmkit.layers.mamba2",
    "S4D": "ssmkit.layers.s4d",
    "S4": "ssmkit.layers.s4",
    "MambaConfig": "ssmkit.models.config",
    "Mamba2Config": "ssmkit.models.config",
    "MambaLM": "ssmkit.models.mamba_lm",
    "TransformerConfig": "ssmkit.models.transformer_lm",
    "TransformerLM": "ssmkit.models.transformer_lm",
    "SequenceModelConfig": "ssmkit.models.sequence",
    "SequenceModel": "ssmkit.models.sequence",
    "Cache": "ssmkit.models.cache",
    "load_model": "ssmkit.models.load",
    "quantize": "ssmkit.engine.quant",
    "generate": "ssmkit.generate",
    "param_groups": "ssmkit.train.optim",
}

__all__ = ["__version__", "lti", *_EXPORTS]


def __getattr__(name: str):
    if name == "lti":
        return import_module("ssmkit.lti")
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssmkit' has no attribute {name!r}")
