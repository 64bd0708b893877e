"""A small token-sequence model for the ablation: embedding → n_layer residual blocks → RMSNorm → head.

Reference: Gu & Dao, "Mamba" (arXiv 2312.00752), §4.1 and Table 1 (2-layer models, D = 64, on
Selective Copying and Induction Heads); the blocks are ``ssmkit.layers.blocks.Block``.

Two ways to run it, with the same outputs:

    forward(ids, state=None, return_state=False)   a whole chunk at once (convolution / scan); from a
                                                   state and returning the state after the chunk, so a
                                                   long sequence can be evaluated chunk by chunk with
                                                   memory that does not grow with its length
    step(ids_t, state)                             one token through every block's recurrence

Glossary: vocab_size V; d_model D; n_layer the number of blocks; arch / layer as in ``blocks``; state a
list with one block state per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssmkit.layers.attention import N_HEADS, POSITIONALS, TransformerBlock, TransformerBlockConfig
from ssmkit.layers.blocks import ARCHS, LAYERS, Block
from ssmkit.layers.norm import RMSNorm


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
    """block architecture: none | h3 | mamba | attention (Transformer baseline, 8 heads)."""
    layer: str = "s6"
    """inner sequence layer: s4d | s4 | s6; for arch attention the positions: abs | rope | none."""
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

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.arch == "attention":  # the Transformer baseline; layer = its positional encoding
            if self.layer not in POSITIONALS:
                raise ValueError(
                    f"layer of arch 'attention' must be one of {POSITIONALS}, got {self.layer!r}"
                )
            return
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS + ('attention',)}, got {self.arch!r}")
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")


class SequenceModel(nn.Module):
    """Embedding → ``n_layer`` × Block(arch, layer) → RMSNorm → linear head; logits (b, l, vocab)."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        arch: str,
        layer: str,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        s4d_init: str = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        norm_eps: float = 1e-5,
        tie_embeddings: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        cfg = SequenceModelConfig(
            vocab_size,
            d_model,
            n_layer,
            arch,
            layer,
            d_state,
            d_conv,
            expand,
            s4d_init,
            dt_min,
            dt_max,
            norm_eps,
            tie_embeddings,
        )
        self.config = cfg
        f = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(vocab_size, d_model, **f)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if arch == "attention":  # pre-norm Transformer blocks; the first adds absolute positions if "abs"
            # Attention only, no MLP: the Mamba paper's MHA baselines of Table 11 have 137K parameters at
            # 2 layers × d_model 128, which is exactly embedding + 2 × (q, k, v, out projections) + head.
            blocks = [TransformerBlockConfig(d_model, N_HEADS, layer, 0, i == 0) for i in range(n_layer)]
            self.layers = nn.ModuleList(TransformerBlock(c).to(**f) for c in blocks)
        else:
            self.layers = nn.ModuleList(
                Block(d_model, arch, layer, d_state, d_conv, expand, s4d_init, dt_min, dt_max, norm_eps, **f)
                for _ in range(n_layer)
            )
        self.norm_f = RMSNorm(d_model, eps=norm_eps, **f)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False, **f)
        if tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @classmethod
    def from_config(cls, cfg: SequenceModelConfig, device=None, dtype=None) -> SequenceModel:
        return cls(**vars(cfg), device=device, dtype=dtype)

    def new_state(self, batch: int) -> list:
        """Zero state for ``batch`` sequences: one block state per layer."""
        return [blk.new_state(batch) for blk in self.layers]

    def _check_ids(self, ids: Tensor, dims: int, hint: str) -> None:
        if not isinstance(ids, Tensor) or ids.dim() != dims or ids.dtype not in (torch.long, torch.int32):
            got = (tuple(ids.shape), ids.dtype) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an integer tensor of shape {hint}, got {got}")

    def forward(self, ids: Tensor, state: list | None = None, return_state: bool = False):
        """ids (b, l) -> logits (b, l, V) [, state]; continues from ``state`` when given."""
        self._check_ids(ids, 2, "(b, l)")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state must hold {len(self.layers)} block states, got {len(state)}")
        x = self.embedding(ids)  # (b, l, d)
        new_state = []
        for i, blk in enumerate(self.layers):
            if return_state:
                x, s = blk(x, None if state is None else state[i], return_state=True)  # (b, l, d)
                new_state.append(s)
            else:
                x = blk(x, None if state is None else state[i])  # (b, l, d)
        logits = self.lm_head(self.norm_f(x))  # (b, l, V)
        return (logits, new_state) if return_state else logits

    def step(self, ids_t: Tensor, state: list) -> tuple[Tensor, list]:
        """One token per sequence through every block's recurrence: ids_t (b,) -> (logits (b, V), state)."""
        self._check_ids(ids_t, 1, "(b,)")
        x = self.embedding(ids_t)  # (b, d)
        new_state = []
        for blk, s in zip(self.layers, state, strict=True):
            x, s = blk.step(x, s)  # (b, d)
            new_state.append(s)
        return self.lm_head(self.norm_f(x)), new_state
