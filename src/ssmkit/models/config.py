"""Configuration of the Mamba language model, with mamba-ssm's field names.

``MambaConfig`` is the flattened union of mamba-ssm's ``MambaConfig`` (d_model, n_layer, vocab_size,
residual_in_fp32, pad_vocab_size_multiple, tie_embeddings) and the keyword arguments of its ``Mamba``
mixer (``ssm_cfg``: d_state, d_conv, expand, dt_rank, dt_*, conv_bias, bias). The mapping to and from
transformers' names (hidden_size, state_size, ...) lives in ``ssmkit.models.checkpoint``. Reference: Gu &
Dao 2023 (arXiv 2312.00752) §3.4 and mamba-ssm's ``mamba_ssm/models/config_mamba.py``.

Glossary: d_model D; n_layer the number of blocks; d_state N; d_inner = expand·D; dt_rank R;
padded_vocab_size V_pad (vocab_size rounded up to a multiple of pad_vocab_size_multiple).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ssmkit.utils import config_from_dict


@dataclass
class MambaConfig:
    """Hyper-parameters of :class:`ssmkit.MambaLM` (mamba-ssm names and defaults)."""

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

    def __post_init__(self) -> None:
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
        for name in ("conv_bias", "bias", "residual_in_fp32", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MambaConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def d_inner(self) -> int:
        """Inner width E·D of each mixer."""
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        """dt_rank with "auto" resolved to ceil(d_model / 16)."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple (mamba-ssm's rule)."""
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m

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
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "MambaConfig") -> MambaConfig:
        """Build from a dict with these field names, strictly: an unknown key or a value of the wrong
        type is one ValueError naming ``where`` (e.g. the file it came from) and the key."""
        return config_from_dict(cls, data, where)
