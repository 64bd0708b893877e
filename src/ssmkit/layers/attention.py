"""Causal multi-head attention with absolute (sinusoidal) or rotary positions and a KV cache, and the
pre-norm Transformer block built on it — the attention baseline of the Mamba paper's Table 11.

References: Vaswani et al. (2017) "Attention Is All You Need" (§3.2 attention, §3.5 sinusoidal
positions); Su et al. (2021) "RoFormer" (rotary embedding, eq. 34); Gu & Dao (2023) §4.1.2 (MHA-Abs,
MHA-RoPE with 8 heads as induction-heads baselines).

    q, k, v  = W_q x, W_k x, W_v x               split into h heads of size d_h = d_model / h
    rope:      q_m ← R(m θ) q_m,  k_n ← R(n θ) k_n,  θ_i = base^(−2i/d_h)  (pairs (i, i + d_h/2) rotated)
    y_m      = Σ_{n ≤ m} softmax_n(q_m·k_n / √d_h) v_n                     (causal)
    out      = W_o concat_heads(y)

Absolute positions are the fixed sinusoids PE(m)_{2i} = sin(m/10000^{2i/d}), PE(m)_{2i+1} = cos(·),
added to the residual stream by the first block (``add_positions=True``) — fixed rather than learned so
that evaluation past the training length is defined (the paper's learned-or-not choice is not stated).

Caching (decoding and chunked evaluation): the state is a :class:`KVCache` holding the keys and values of
all tokens seen so far (rotary already applied) and their count; ``forward(x, state)`` appends the new
tokens' keys/values and lets the new queries attend to everything cached (causally among themselves).
Unlike an SSM's state this grows linearly with the length — the point Table 11 makes.

Glossary: b batch, l new tokens, t cached + new tokens, h heads (n_heads), e head size d_h, d d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIONALS = ("abs", "rope", "none")
N_HEADS = 8  # heads of the Table 11 baselines (SequenceModel's arch "attention")


@dataclass
class KVCache:
    """Keys/values of the tokens consumed so far, for one attention layer.

    Attributes:
        k, v: (b, h, t, e) keys (rotary applied) and values.
        offset: t, the number of tokens consumed (the position of the next token).
    """

    k: Tensor
    v: Tensor
    offset: int


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """Vaswani et al. (2017) §3.5: (l,) integer positions -> (l, d_model) float32 embeddings."""
    half = d_model // 2
    inv = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) * 2 / d_model)  # (d/2,)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # (l, d/2)
    pe = torch.zeros(positions.shape[0], d_model, dtype=torch.float64)  # (l, d)
    pe[:, 0 : 2 * half : 2] = torch.sin(ang)
    pe[:, 1 : 2 * half : 2] = torch.cos(ang)
    return pe.float()


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of m·θ_i for (l,) positions -> two (l, e/2) float64 tensors; θ_i = base^(−2i/e)."""
    i = torch.arange(0, head_dim // 2, dtype=torch.float64, device=positions.device)  # (e/2,)
    inv = base ** (-2 * i / head_dim)  # (e/2,)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # (l, e/2)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x_i, x_{i+e/2}) of x (b, h, l, e) by the angles (l, e/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (b, h, l, e/2)
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)  # (b, h, l, e)


class MultiheadAttention(nn.Module):
    """Causal multi-head self-attention with optional rotary positions and a KV cache."""

    def __init__(self, d_model: int, n_heads: int = 8, positional: str = "rope", rope_base: float = 10000.0):
        super().__init__()
        if positional not in POSITIONALS:
            raise ValueError(f"positional must be one of {POSITIONALS}, got {positional!r}")
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model ({d_model}) must be a multiple of 2·n_heads (n_heads={n_heads})")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.positional, self.rope_base = positional, rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def new_state(self, batch: int, device=None, dtype=None) -> KVCache:
        dev = device if device is not None else self.qkv.weight.device
        dt = dtype if dtype is not None else self.qkv.weight.dtype
        empty = torch.zeros(batch, self.n_heads, 0, self.head_dim, device=dev, dtype=dt)  # (b, h, 0, e)
        return KVCache(empty, empty.clone(), 0)

    def forward(self, x: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """x (b, l, d) -> (y (b, l, d), the cache extended by these l tokens)."""
        b, l, d = x.shape
        if d != self.d_model:
            raise ValueError(f"x must be (b, l, {self.d_model}), got {tuple(x.shape)}")
        offset = 0 if state is None else state.offset
        if state is not None and state.k.shape[0] != b:
            raise ValueError(f"state batch {state.k.shape[0]} does not match x batch {b}")
        q, k, v = (
            self.qkv(x).view(b, l, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (b, h, l, e)
        if self.positional == "rope":
            pos = torch.arange(offset, offset + l, device=x.device)  # (l,)
            cos, sin = rope_angles(pos, self.head_dim, self.rope_base)
            cos, sin = cos.to(x.device), sin.to(x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None and offset > 0:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)  # (b, h, t, e)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)  # (b, h, t, e)
        t = k.shape[2]
        if t == l:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, l, e)
        else:
            qpos = torch.arange(offset, offset + l, device=x.device)[:, None]  # (l, 1)
            mask = torch.arange(t, device=x.device)[None, :] <= qpos  # (l, t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, h, l, e)
        y = self.out_proj(y.transpose(1, 2).reshape(b, l, d))  # (b, l, d)
        return y, KVCache(k, v, offset + l)


@dataclass
class TransformerBlockConfig:
    """One pre-norm Transformer block."""

    d_model: int = 64
    """Width of the residual stream."""
    n_heads: int = 8
    """Attention heads (the paper's Table 11: 8)."""
    positional: str = "rope"
    """'abs' (sinusoids added by the first block), 'rope' (rotary in every block) or 'none'."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of d_model; 0: no MLP (an attention-only block)."""
    add_positions: bool = False
    """Add the sinusoidal position embedding to the input (the first block of an 'abs' model)."""


class TransformerBlock(nn.Module):
    """Pre-norm block: x ← x + Attn(LN(x)); x ← x + MLP(LN(x)) (MLP only if mlp_ratio > 0). Same call
    shape as ``layers.blocks``:
    ``forward(x, state=None, return_state=False)``, ``step(x_t, state)``, ``new_state(batch)``."""

    def __init__(self, config: TransformerBlockConfig):
        super().__init__()
        c = self.config = config
        self.norm1 = nn.LayerNorm(c.d_model)
        self.attn = MultiheadAttention(c.d_model, c.n_heads, c.positional)
        if c.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0, got {c.mlp_ratio}")
        self.norm2 = self.mlp = None
        if c.mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(c.d_model)
            self.mlp = nn.Sequential(
                nn.Linear(c.d_model, c.mlp_ratio * c.d_model),
                nn.GELU(),
                nn.Linear(c.mlp_ratio * c.d_model, c.d_model),
            )

    def new_state(self, batch: int, device=None, dtype=None) -> KVCache:
        return self.attn.new_state(batch, device, dtype)

    def forward(self, x: Tensor, state: KVCache | None = None, return_state: bool = False):
        """x (b, l, d) -> y (b, l, d) [, new state]."""
        if self.config.add_positions and self.config.positional == "abs":
            offset = 0 if state is None else state.offset
            pos = torch.arange(offset, offset + x.shape[1])  # (l,)
            x = x + sinusoidal_positions(pos, self.config.d_model).to(x.device, x.dtype)  # (b, l, d)
        a, new = self.attn(self.norm1(x), state)  # (b, l, d)
        x = x + a
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))  # (b, l, d)
        return (x, new) if return_state else x

    def step(self, x_t: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        """One token: x_t (b, d) -> (y_t (b, d), state)."""
        y, new = self.forward(x_t[:, None, :], state, return_state=True)  # (b, 1, d)
        return y[:, 0], new
