"""A small token-sequence model for the ablation: embedding → n_layer residual blocks → RMSNorm → head.

Reference: Gu & Dao, "Mamba" (arXiv 2312.00752), §4.1 and Table 1 (2-layer models, D = 64, on
Selective Copying and Induction Heads); the blocks are ``ssmkit.layers.blocks.Block``.

It speaks ssmkit's one state protocol, like ``MambaLM``: ``model(ids)`` for a whole chunk at once
(convolution / scan); ``cache = model.new_cache(b)`` and ``model(ids, cache=cache)`` to continue from and
update the state, so a long sequence can be evaluated chunk by chunk with memory that does not grow with
its length (one-token decoding is the same call).

Glossary: vocab_size V; d_model D; n_layer the number of blocks; arch / layer as in ``blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssmkit.generate import check_input_ids, check_num_last_tokens
from ssmkit.layers.attention import N_HEAD, POSITIONALS, TransformerBlock, sinusoidal_positions
from ssmkit.layers.blocks import ARCHS, LAYERS, Block
from ssmkit.layers.norm import RMSNorm
from ssmkit.models.cache import Cache

# absolute positions would be added to the embedding, under the Mamba blocks: hybrids take rope or none
HYBRID_POSITIONALS = ("rope", "none")


@dataclass
class SequenceModelConfig:
    """Configuration of ``SequenceModel``."""

    vocab_size: int
    """number of token ids V."""
    d_model: int = 64
    """model width D."""
    n_layer: int = 2
    """number of residual blocks."""
    arch: str = "mamba"
    """block architecture: none | h3 | mamba | mamba2 | attention (Transformer baseline, 8 heads) |
    hybrid (Mamba blocks at even indices, attention blocks at odd ones, as mamba-ssm's attn_layer_idx)."""
    layer: str = "s6"
    """inner sequence layer: s4d | s4 | s6 (ssd with arch mamba2); for arch attention and hybrid the
    attention's positions: abs | rope | none (hybrid: rope | none)."""
    d_state: int = 16
    """SSM state size N (even for s4d/s4)."""
    d_conv: int = 4
    """width of the mamba conv1d / H3 shift filter."""
    expand: int = 2
    """d_inner = expand · d_model in the mamba arch."""
    s4d_init: str = "lin"
    """S4D initialisation: lin | inv | real | legs."""
    dt_min: float = 1e-3
    """smallest initial Δ."""
    dt_max: float = 0.1
    """largest initial Δ."""
    norm_eps: float = 1e-5
    """RMSNorm ε."""
    tie_embeddings: bool = True
    """share the embedding matrix with the output head."""
    headdim: int = 16
    """head size of the mamba2 arch (nheads = expand · d_model / headdim)."""

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand", "headdim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.arch in ("attention", "hybrid"):  # layer = the attention's positional encoding
            allowed = POSITIONALS if self.arch == "attention" else HYBRID_POSITIONALS
            if self.layer not in allowed:
                raise ValueError(f"layer of arch {self.arch!r} must be one of {allowed}, got {self.layer!r}")
            return
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS + ('attention', 'hybrid')}, got {self.arch!r}")
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        if (self.arch == "mamba2") != (self.layer == "ssd"):
            raise ValueError(
                f"layer 'ssd' goes with arch 'mamba2' and only with it, got {self.arch!r} × {self.layer!r}"
            )


class SequenceModel(nn.Module):
    """Embedding → ``n_layer`` × Block(arch, layer) → RMSNorm → linear head; logits (b, l, vocab).

    Args:
        config: :class:`SequenceModelConfig`.
    """

    def __init__(self, config: SequenceModelConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, SequenceModelConfig):
            raise ValueError(f"config must be a SequenceModelConfig, got {type(config).__name__}")
        c = self.config = config
        f = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(c.vocab_size, c.d_model, **f)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if c.arch == "attention":  # pre-norm Transformer blocks; positions "abs" are added to the embedding
            # Attention only, no MLP: the Mamba paper's MHA baselines of Table 11 have 137K parameters at
            # 2 layers × d_model 128, which is exactly embedding + 2 × (q, k, v, out projections) + head.
            self.layers = nn.ModuleList(
                TransformerBlock(c.d_model, N_HEAD, c.layer, d_mlp=0, **f) for _ in range(c.n_layer)
            )
        else:
            self.layers = nn.ModuleList(
                TransformerBlock(c.d_model, N_HEAD, c.layer, d_mlp=0, **f)
                if c.arch == "hybrid" and i % 2 == 1
                else Block(
                    c.d_model,
                    "mamba" if c.arch == "hybrid" else c.arch,
                    "s6" if c.arch == "hybrid" else c.layer,
                    c.d_state,
                    c.d_conv,
                    c.expand,
                    c.s4d_init,
                    c.dt_min,
                    c.dt_max,
                    c.norm_eps,
                    c.headdim,
                    **f,
                )
                for i in range(c.n_layer)
            )
        self.norm_f = RMSNorm(c.d_model, eps=c.norm_eps, **f)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, **f)
        if c.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def new_cache(self, batch_size: int) -> Cache:
        """Zero state for ``batch_size`` sequences: one block state per layer."""
        return Cache([blk.new_state(batch_size) for blk in self.layers], batch_size)

    def forward(self, input_ids: Tensor, cache: Cache | None = None, num_last_tokens: int = 0) -> Tensor:
        """input_ids (b, l) -> logits (b, l, V) (the last ``num_last_tokens`` if > 0); continues from
        ``cache`` and updates it when given."""
        check_input_ids(input_ids)
        check_num_last_tokens(num_last_tokens)
        if cache is not None:
            cache.check(len(self.layers), input_ids.shape[0])
        x = self.embedding(input_ids)  # (b, l, d)
        if self.config.arch == "attention" and self.config.layer == "abs":
            offset = 0 if cache is None else cache.seqlen_offset
            pos = torch.arange(offset, offset + input_ids.shape[1])  # (l,)
            x = x + sinusoidal_positions(pos, self.config.d_model).to(x.device, x.dtype)  # (b, l, d)
        for i, blk in enumerate(self.layers):
            x = blk(x, None if cache is None else cache.layers[i])  # (b, l, d)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if num_last_tokens > 0:
            x = x[:, -num_last_tokens:]  # (b, k, d)
        return self.lm_head(self.norm_f(x))  # (b, l, V)
