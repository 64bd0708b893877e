"""Configurations of the Mamba language models, with mamba-ssm's field names: Mamba-1 and Mamba-2.

``MambaConfig`` is the flattened union of mamba-ssm's ``MambaConfig`` (d_model, n_layer, vocab_size,
residual_in_fp32, pad_vocab_size_multiple, tie_embeddings) and the keyword arguments of its ``Mamba``
mixer (``ssm_cfg``: d_state, d_conv, expand, dt_rank, dt_*, conv_bias, bias). The mapping to and from
transformers' names (hidden_size, state_size, ...) lives in ``ssmkit.models.checkpoint``. Reference: Gu &
Dao 2023 (arXiv 2312.00752) §3.4 and mamba-ssm's ``mamba_ssm/models/config_mamba.py``.

``Mamba2Config`` is the same flattening for mamba-ssm's ``ssm_cfg={"layer": "Mamba2", ...}``: the model
fields plus the keyword arguments of its ``Mamba2`` mixer, with *that* mixer's defaults (d_state 128,
headdim 64, ...). Two classes rather than one with a layer switch because the two mixers have different
arguments and different defaults (mamba-ssm's ``ssm_cfg`` gets its defaults from the mixer class it
names; transformers, too, has ``MambaConfig`` and ``Mamba2Config``); ``MambaLM`` takes either and builds
the matching mixer in every block. Reference: Dao & Gu 2024 (arXiv 2405.21060), mamba-ssm's
``mamba_ssm/modules/mamba2.py``.

Glossary: d_model D; n_layer the number of blocks; d_state N; d_inner = expand·D; dt_rank R;
padded_vocab_size V_pad (vocab_size rounded up to a multiple of pad_vocab_size_multiple); Mamba-2:
headdim P, nheads H = d_inner / P, ngroups G (heads share B and C within a group).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ssmkit.utils import config_from_dict

# mamba-ssm's MHA keywords (``attn_cfg``) that ssmkit's attention implements, and the values it requires
# of the others: the hybrid layers are causal self-attention without an MLP part or a conv.
ATTN_CFG_KEYS = {
    "num_heads", "num_heads_kv", "head_dim", "rotary_emb_dim", "rotary_emb_base", "causal",
    "qkv_proj_bias", "out_proj_bias", "softmax_scale", "rotary_emb_interleaved", "mlp_dim", "d_conv",
}  # fmt: skip
_ATTN_CFG_REQUIRED_VALUES = {"causal": True, "rotary_emb_interleaved": False, "mlp_dim": 0, "d_conv": 0}


def check_hybrid(name: str, n_layer: int, d_intermediate, attn_layer_idx, attn_cfg) -> None:
    """ValueError unless d_intermediate / attn_layer_idx / attn_cfg describe a hybrid ssmkit builds."""
    if isinstance(d_intermediate, bool) or not isinstance(d_intermediate, int) or d_intermediate < 0:
        raise ValueError(f"{name}.d_intermediate must be an int >= 0, got {d_intermediate!r}")
    if not isinstance(attn_layer_idx, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layer for i in attn_layer_idx
    ):
        raise ValueError(
            f"{name}.attn_layer_idx must be a list of layer indices in [0, {n_layer}), got {attn_layer_idx!r}"
        )
    if len(set(attn_layer_idx)) != len(attn_layer_idx):
        raise ValueError(f"{name}.attn_layer_idx has repeated layers: {attn_layer_idx}")
    if not isinstance(attn_cfg, dict):
        raise ValueError(f"{name}.attn_cfg must be a dict, got {attn_cfg!r}")
    if not attn_layer_idx:
        return
    unknown = sorted(set(attn_cfg) - ATTN_CFG_KEYS)
    if unknown:
        raise ValueError(f"{name}.attn_cfg: unknown keys {unknown} (known: {sorted(ATTN_CFG_KEYS)})")
    if not isinstance(attn_cfg.get("num_heads"), int) or attn_cfg["num_heads"] <= 0:
        raise ValueError(
            f"{name}.attn_cfg needs num_heads (a positive int), got {attn_cfg.get('num_heads')!r}"
        )
    for key, required in _ATTN_CFG_REQUIRED_VALUES.items():
        if key in attn_cfg and attn_cfg[key] != required:
            raise ValueError(
                f"{name}.attn_cfg.{key}={attn_cfg[key]!r} is not supported (ssmkit needs {required!r})"
            )
    if "causal" not in attn_cfg:
        raise ValueError(f"{name}.attn_cfg must say causal: true (mamba-ssm's MHA defaults to non-causal)")


def attention_kwargs(d_model: int, attn_cfg: dict) -> dict:
    """Keyword arguments of ``ssmkit.layers.attention.MultiheadAttention`` for mamba-ssm's ``attn_cfg``."""
    rotary = attn_cfg.get("rotary_emb_dim", 0)
    return {
        "d_model": d_model,
        "n_head": attn_cfg["num_heads"],
        "n_head_kv": attn_cfg.get("num_heads_kv"),
        "head_dim": attn_cfg.get("head_dim"),
        "positional": "rope" if rotary > 0 else "none",
        "rotary_dim": rotary if rotary > 0 else None,
        "rope_base": float(attn_cfg.get("rotary_emb_base", 10000.0)),
        "qkv_bias": attn_cfg.get("qkv_proj_bias", True),
        "out_bias": attn_cfg.get("out_proj_bias", True),
        "softmax_scale": attn_cfg.get("softmax_scale"),
    }


class _LMConfig:
    """What the two Mamba LM configs share (methods only; each dataclass keeps its own field order)."""

    @property
    def d_inner(self) -> int:
        """Inner width E·D of each mixer."""
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple (mamba-ssm's rule)."""
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable; an infinite dt_limit is JSON's Infinity)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None):
        """Build from a dict with these field names, strictly: an unknown key or a value of the wrong
        type is one ValueError naming ``where`` (e.g. the file it came from) and the key."""
        return config_from_dict(cls, data, where or cls.__name__)


@dataclass
class MambaConfig(_LMConfig):
    """Hyper-parameters of :class:`ssmkit.MambaLM` (mamba-ssm names and defaults)."""

    layer = "Mamba1"  # the mixer every block holds (mamba-ssm's ssm_cfg["layer"]); not a field

    d_model: int
    """Model width D (embedding and residual size)."""
    n_layer: int
    """Number of Mamba blocks."""
    vocab_size: int
    """Number of real tokens; the embedding is padded up to ``padded_vocab_size`` rows."""
    d_state: int = 16
    """SSM state size N per channel."""
    d_conv: int = 4
    """Width of the causal depthwise convolution."""
    expand: int = 2
    """Expansion factor: d_inner = expand · d_model."""
    dt_rank: int | str = "auto"
    """Rank R of the Δ projection; "auto" = ceil(d_model / 16)."""
    dt_min: float = 1e-3
    """Lower end of the log-uniform initial Δ."""
    dt_max: float = 0.1
    """Upper end of the log-uniform initial Δ."""
    dt_init: str = "random"
    """dt_proj.weight init: "random" (uniform ±R^-½·dt_scale) or "constant"."""
    dt_scale: float = 1.0
    """Scale of the dt_proj.weight init range."""
    dt_init_floor: float = 1e-4
    """Lower clamp of the initial Δ."""
    conv_bias: bool = True
    """Whether the convolution has a bias."""
    bias: bool = False
    """Whether in_proj and out_proj have biases."""
    norm_eps: float = 1e-5
    """ε of every RMSNorm."""
    residual_in_fp32: bool = True
    """Keep the residual stream in float32 whatever the parameter dtype."""
    pad_vocab_size_multiple: int = 8
    """Round the embedding / head rows up to a multiple of this."""
    tie_embeddings: bool = True
    """Share the LM head weight with the embedding."""
    mixer_rms_eps: float | None = None
    """None: Mamba. A float: Falcon-Mamba — weightless RMSNorms (this ε) on δ, B and C in every mixer."""
    d_intermediate: int = 0
    """Hidden width of a GatedMLP (with its own pre-norm ``norm2``) after every mixer; 0: no MLP."""
    attn_layer_idx: list[int] = field(default_factory=list)
    """Layers whose mixer is causal self-attention instead of Mamba (a hybrid model)."""
    attn_cfg: dict = field(default_factory=dict)
    """mamba-ssm's MHA keywords for those layers: num_heads, num_heads_kv, head_dim, rotary_emb_dim, ..."""

    def __post_init__(self) -> None:
        check_hybrid(
            type(self).__name__, self.n_layer, self.d_intermediate, self.attn_layer_idx, self.attn_cfg
        )
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.expand, bool) or not isinstance(self.expand, int) or self.expand <= 0:
            raise ValueError(f"MambaConfig.expand must be a positive int, got {self.expand!r}")
        if self.dt_rank != "auto" and (
            isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank <= 0
        ):
            raise ValueError(f"MambaConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if not (isinstance(self.dt_min, (int, float)) and isinstance(self.dt_max, (int, float))):
            raise ValueError(
                f"MambaConfig.dt_min/dt_max must be numbers, got {self.dt_min!r}, {self.dt_max!r}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"MambaConfig needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}"
            )
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"MambaConfig.dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        if not self.dt_scale > 0:
            raise ValueError(f"MambaConfig.dt_scale must be > 0, got {self.dt_scale!r}")
        if not self.dt_init_floor >= 0:
            raise ValueError(f"MambaConfig.dt_init_floor must be >= 0, got {self.dt_init_floor!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"MambaConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.mixer_rms_eps is not None and not self.mixer_rms_eps > 0:
            raise ValueError(f"MambaConfig.mixer_rms_eps must be None or > 0, got {self.mixer_rms_eps!r}")
        for name in ("conv_bias", "bias", "residual_in_fp32", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MambaConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def resolved_dt_rank(self) -> int:
        """dt_rank with "auto" resolved to ceil(d_model / 16)."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def mixer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ssmkit.layers.mamba.Mamba` (mamba-ssm's ``ssm_cfg``)."""
        return {
            "d_state": self.d_state,
            "d_conv": self.d_conv,
            "expand": self.expand,
            "dt_rank": self.dt_rank,
            "dt_min": self.dt_min,
            "dt_max": self.dt_max,
            "dt_init": self.dt_init,
            "dt_scale": self.dt_scale,
            "dt_init_floor": self.dt_init_floor,
            "conv_bias": self.conv_bias,
            "bias": self.bias,
            "bcdt_rms_eps": self.mixer_rms_eps,
        }


@dataclass
class Mamba2Config(_LMConfig):
    """Hyper-parameters of :class:`ssmkit.MambaLM` with Mamba-2 mixers (mamba-ssm names and defaults)."""

    layer = "Mamba2"  # the mixer every block holds (mamba-ssm's ssm_cfg["layer"]); not a field

    d_model: int
    """Model width D (embedding and residual size)."""
    n_layer: int
    """Number of Mamba-2 blocks."""
    vocab_size: int
    """Number of real tokens; the embedding is padded up to ``padded_vocab_size`` rows."""
    d_state: int = 128
    """SSM state size N per head."""
    d_conv: int = 4
    """Width of the causal depthwise convolution over x, B and C."""
    expand: int = 2
    """Expansion factor: d_inner = expand · d_model."""
    headdim: int = 64
    """Head size P; nheads = d_inner / P (A, Δ and D are per head)."""
    ngroups: int = 1
    """Number of groups G sharing B and C (nheads must be a multiple of it)."""
    A_init_range: tuple[float, float] = (1.0, 16.0)
    """A = −U(A_init_range) per head at initialisation."""
    D_has_hdim: bool = False
    """D per head-dimension channel (d_inner,) instead of per head (nheads,)."""
    rmsnorm: bool = True
    """Gated RMSNorm before out_proj (mamba-ssm's ``rmsnorm``); False: y ⊙ SiLU(z) without a norm."""
    norm_before_gate: bool = False
    """Gated norm order: False = norm(y ⊙ SiLU(z)) (mamba-ssm's default), True = norm(y) ⊙ SiLU(z)."""
    dt_min: float = 1e-3
    """Lower end of the log-uniform initial Δ."""
    dt_max: float = 0.1
    """Upper end of the log-uniform initial Δ."""
    dt_init_floor: float = 1e-4
    """Lower clamp of the initial Δ."""
    dt_limit: tuple[float, float] = (0.0, math.inf)
    """Δ is clamped to this range after the softplus."""
    conv_bias: bool = True
    """Whether the convolution has a bias."""
    bias: bool = False
    """Whether in_proj and out_proj have biases."""
    chunk_size: int = 256
    """Chunk length of the SSD algorithm (speed only; any value gives the same outputs)."""
    norm_eps: float = 1e-5
    """ε of every RMSNorm (the blocks', the final one and the gated one)."""
    residual_in_fp32: bool = True
    """Keep the residual stream in float32 whatever the parameter dtype."""
    pad_vocab_size_multiple: int = 8
    """Round the embedding / head rows up to a multiple of this."""
    tie_embeddings: bool = True
    """Share the LM head weight with the embedding."""
    d_intermediate: int = 0
    """Hidden width of a GatedMLP (with its own pre-norm ``norm2``) after every mixer; 0: no MLP."""
    attn_layer_idx: list[int] = field(default_factory=list)
    """Layers whose mixer is causal self-attention instead of Mamba-2 (a hybrid model)."""
    attn_cfg: dict = field(default_factory=dict)
    """mamba-ssm's MHA keywords for those layers: num_heads, num_heads_kv, head_dim, rotary_emb_dim, ..."""

    def __post_init__(self) -> None:
        check_hybrid(
            type(self).__name__, self.n_layer, self.d_intermediate, self.attn_layer_idx, self.attn_cfg
        )
        self.A_init_range = tuple(float(v) for v in self.A_init_range)
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        for name in (
            "d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups",
            "chunk_size", "pad_vocab_size_multiple",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.d_inner % self.headdim:
            raise ValueError(
                f"Mamba2Config: d_inner = expand·d_model = {self.d_inner} must be a multiple of "
                f"headdim={self.headdim}"
            )
        if self.nheads % self.ngroups:
            raise ValueError(
                f"Mamba2Config: nheads = {self.nheads} must be a multiple of ngroups={self.ngroups}"
            )
        lo, hi = self.A_init_range if len(self.A_init_range) == 2 else (0, -1)
        if not 0 < lo <= hi:
            raise ValueError(
                f"Mamba2Config.A_init_range must be (lo, hi) with 0 < lo <= hi, got {self.A_init_range}"
            )
        lo, hi = self.dt_limit if len(self.dt_limit) == 2 else (0, -1)
        if not 0 <= lo < hi:
            raise ValueError(f"Mamba2Config.dt_limit must be (lo, hi) with 0 <= lo < hi, got {self.dt_limit}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"Mamba2Config needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"Mamba2Config.norm_eps must be > 0, got {self.norm_eps!r}")
        for name in ("D_has_hdim", "rmsnorm", "norm_before_gate", "conv_bias", "bias", "residual_in_fp32",
                     "tie_embeddings"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Mamba2Config.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def nheads(self) -> int:
        """Number of heads H = d_inner / headdim."""
        return self.d_inner // self.headdim

    def mixer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ssmkit.layers.mamba2.Mamba2` (mamba-ssm's ``ssm_cfg``)."""
        return {
            "d_state": self.d_state,
            "d_conv": self.d_conv,
            "expand": self.expand,
            "headdim": self.headdim,
            "ngroups": self.ngroups,
            "A_init_range": self.A_init_range,
            "D_has_hdim": self.D_has_hdim,
            "rmsnorm": self.rmsnorm,
            "norm_before_gate": self.norm_before_gate,
            "dt_min": self.dt_min,
            "dt_max": self.dt_max,
            "dt_init_floor": self.dt_init_floor,
            "dt_limit": self.dt_limit,
            "bias": self.bias,
            "conv_bias": self.conv_bias,
            "chunk_size": self.chunk_size,
        }
