"""Weight-only int8 quantization of a Mamba language model, and its safetensors I/O.

Scheme: symmetric, one scale per output row (per output channel) of every large matrix, stored in the
model's float dtype (float32, or bfloat16 for a bfloat16 model):

    s_o = max_k |W_ok| / 127        q_ok = round(W_ok / s_o) ∈ [−127, 127]        Ŵ_ok = s_o · q_ok

so the rounding error of each weight is at most s_o / 2 and a row's dot product is computed as
s_o · Σ_k q_ok x_k (the scale is applied once, after the sum). Activations, the residual stream and the
SSM state stay float32; only the weights are stored in 8 bits. Quantized: every Mamba mixer's
``in_proj``, ``x_proj``, ``dt_proj`` and ``out_proj`` (a Mamba-2 mixer's ``in_proj`` and ``out_proj``)
and the ``lm_head`` (with the embedding when the two
are tied, as they are by default). Kept as they were: the norms, ``conv1d``, ``A_log``, ``D`` and the
biases (a few kB per layer).

Why per row and not per group of 32–128 columns (llama.cpp's Q8_0 uses blocks of 32): measured on small
byte-level models trained on text (``tests/test_engine.py``), per-row int8 moves the held-out perplexity
by +0.2 % (8.85 -> 8.86; a Mamba-2 model of the same size: +0.14 %, 10.80 -> 10.81), and on another such
model per-row / per-64 / per-32 groups gave −0.02 % / +0.08 % / +0.05 % — no measurable gain from
groups — while a per-row scale costs nothing in the inner loop of the matrix-vector product (one
multiply per row after the sum, no scale per block) and 4 bytes per row.
``benchmarks/bench_decode_engine.py`` measures the speed.

The quantized layers keep the module path working (it is the fused step's slow twin):
:class:`QuantLinear` and :class:`QuantEmbedding` hold ``qweight`` (int8) and ``scale`` buffers and expose
the dequantized ``weight`` Ŵ (in the scale's dtype) as a read-only property, so code that reads
``layer.weight`` (the Mamba mixer does) computes exactly with Ŵ.

Checkpoints: :func:`save_quantized` writes one safetensors file of the state dict (``….qweight``,
``….scale`` beside the float tensors; a tied embedding is stored once, as ``lm_head``), with the scheme in
the file's metadata (``ssmkit_quantization``); :func:`quantization_of` reads it back without loading the
tensors, and :func:`load_quantized` fills a freshly built float model of the same configuration.

Glossary: q the int8 weight, s its per-row scale, Ŵ = s q the dequantized weight, o output row, k input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.layers.mamba import Mamba
from ssmkit.layers.mamba2 import Mamba2
from ssmkit.utils import atomic_save

METHODS = ("int8",)
SCHEME = "int8-per-row-symmetric"  # the metadata value of a quantized checkpoint
_META_KEY = "ssmkit_quantization"
_TIED_KEY = "ssmkit_tied_embeddings"
_MIXER_LINEARS = {Mamba: ("in_proj", "x_proj", "dt_proj", "out_proj"), Mamba2: ("in_proj", "out_proj")}
_MIXERS = tuple(_MIXER_LINEARS)
structure_changes = [0]  # bumped whenever a model's modules are replaced here (the fused decoder re-packs)


def quantize_rows(weight: Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: weight (o, k) -> (q (o, k) int8, s (o,) ``scale_dtype``), Ŵ = s[:, None] q.

    The scale is rounded to ``scale_dtype`` (the model's float dtype) before q is computed against it, so
    |Ŵ − W| <= s / 2 holds for the stored s (up to the clamp at ±127). A row of zeros gets s = 1, q = 0.
    """
    w = weight.detach().float()  # (o, k)
    scale = w.abs().amax(dim=1) / 127.0  # (o,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)  # (o,)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # (o, k)
    return q, scale


class QuantLinear(nn.Module):
    """``y = x Ŵᵀ + bias`` with Ŵ = scale[:, None] · qweight: an int8 ``nn.Linear`` (weight-only).

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: whether there is a (float) bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """Quantize ``linear``'s weight (bias kept, in float32)."""
        out = cls(linear.in_features, linear.out_features, False, linear.weight.device)
        out.qweight, out.scale = quantize_rows(linear.weight, linear.weight.dtype)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone())
        return out

    @property
    def weight(self) -> Tensor:
        """The dequantized weight Ŵ (out_features, in_features) in the scale's dtype (the model's float
        dtype), recomputed on every access."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]  # (o, k)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is Ŵ = scale[:, None] · qweight (rows are looked up, then scaled)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer(
            "qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    @property
    def weight(self) -> Tensor:
        """The dequantized table (num_embeddings, embedding_dim) in the scale's dtype."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight).to(self.scale.dtype) * self.scale[ids][..., None]  # (..., d)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Quantize a Mamba language model's weights in place (see the module docstring); returns the model.

    Args:
        model: a ``MambaLM`` (``backbone.layers[i].mixer`` Mamba or Mamba-2 mixers, ``lm_head``,
            ``backbone.embedding``)
            with float weights; quantizing twice is an error.
        method: ``"int8"`` (weight-only, symmetric, one scale per output row).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "lm_head"):
        raise ValueError(f"quantize expects a MambaLM (backbone + lm_head), got {type(model).__name__}")
    mixers = [layer.mixer for layer in backbone.layers if isinstance(getattr(layer, "mixer", None), _MIXERS)]
    if len(mixers) != len(backbone.layers):
        raise ValueError("quantize supports models whose every layer is a Mamba (S6) or Mamba-2 mixer")
    with torch.no_grad():
        for mixer in mixers:
            for name in _MIXER_LINEARS[type(mixer)]:
                setattr(mixer, name, QuantLinear.from_linear(getattr(mixer, name)))
        tied = model.lm_head.weight is backbone.embedding.weight
        model.lm_head = QuantLinear.from_linear(model.lm_head)
        if tied:
            emb = QuantEmbedding(
                model.lm_head.out_features, model.lm_head.in_features, model.lm_head.qweight.device
            )
            emb.qweight = model.lm_head.qweight  # the same buffers: still one table
            emb.scale = model.lm_head.scale
            backbone.embedding = emb
    structure_changes[0] += 1
    return model


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write a quantized model's tensors to one safetensors file (atomically), the scheme in its metadata.

    A tied embedding is stored once, under the ``lm_head`` keys.
    """
    from safetensors.torch import save_file

    if not is_quantized(model):
        raise ValueError("save_quantized needs a quantized model (ssmkit.engine.quantize(model, 'int8'))")
    emb = model.backbone.embedding
    tied = isinstance(emb, QuantEmbedding) and emb.qweight is model.lm_head.qweight
    tensors = {}
    for key, value in model.state_dict().items():
        if tied and key.startswith("backbone.embedding."):
            continue
        tensors[key] = value.detach().contiguous()
    metadata = {"format": "pt", _META_KEY: SCHEME, _TIED_KEY: json.dumps(tied)}
    atomic_save(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def quantization_of(path: str | Path) -> str | None:
    """The quantization scheme in a safetensors file's metadata (``SCHEME``); None for a float file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(_META_KEY)


def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Fill ``model`` — a freshly built float ``MambaLM`` of the checkpoint's configuration — from a file
    written by :func:`save_quantized`: quantize its structure, then load every tensor strictly, each in
    the dtype the file holds it in."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    scheme = quantization_of(path)
    if scheme != SCHEME:
        raise ValueError(
            f"{path}: expected {_META_KEY} = {SCHEME!r} in the safetensors metadata, got {scheme!r}"
        )
    with safe_open(str(path), framework="pt") as f:
        tied = json.loads((f.metadata() or {}).get(_TIED_KEY, "false"))
    if tied != (model.lm_head.weight is model.backbone.embedding.weight):
        raise ValueError(f"{path}: tied embeddings = {tied} in the file, the model has the opposite")
    quantize(model)  # the quantized module tree; every value is overwritten below
    tensors = load_file(str(path))
    if tied:
        tensors["backbone.embedding.qweight"] = tensors["lm_head.qweight"]
        tensors["backbone.embedding.scale"] = tensors["lm_head.scale"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, t in tensors.items():  # keep the file's dtypes (e.g. float32 A_log in a bfloat16 model)
        if key in own and own[key].dtype != t.dtype:
            own[key].data = t.to(own[key].device)
    if tied:  # load_state_dict copied into both buffers; share them again
        model.backbone.embedding.qweight = model.lm_head.qweight
        model.backbone.embedding.scale = model.lm_head.scale
    structure_changes[0] += 1
    return model
