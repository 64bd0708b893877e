"""Causal multi-head attention with absolute (sinusoidal) or rotary positions and a KV cache, and the
pre-norm Transformer block built on it — ssmkit's one attention module, used by ``TransformerLM`` and by
the attention baseline of the Mamba paper's Table 11.

References: Vaswani et al. (2017) "Attention Is All You Need" (§3.2 attention, §3.5 sinusoidal
positions); Su et al. (2021) "RoFormer" (rotary embedding, eq. 34); Gu & Dao (2023) §4.1.2 (MHA-Abs,
MHA-RoPE with 8 heads as induction-heads baselines).

    q, k, v  = W_q x, W_k x, W_v x               split into h heads of size d_h = d_model / h
    rope:      q_m ← R(m θ) q_m,  k_n ← R(n θ) k_n,  θ_i = base^(−2i/d_h)  (pairs (i, i + d_h/2) rotated)
    y_m      = Σ_{n ≤ m} softmax_n(q_m·k_n / √d_h) v_n                     (causal)
    out      = W_o concat_heads(y)

Absolute positions are the fixed sinusoids PE(m)_{2i} = sin(m/10000^{2i/d}), PE(m)_{2i+1} = cos(·),
added to the token embedding by the model (``TransformerLM``, ``SequenceModel``) — fixed rather than
learned so that evaluation past the training length is defined (the paper's learned-or-not choice is
not stated).

Caching (decoding and chunked evaluation) follows ssmkit's one state protocol: ``state =
attn.new_state(b)`` is a :class:`KVCache` — preallocated key/value buffers (rotary already applied) and
the count t of tokens in them; ``attn(x, state)`` writes the new tokens' keys/values at positions
[t, t + l) (the buffers double when full; ``new_state(b, capacity)`` reserves room up front) and lets the
new queries attend to all t + l tokens, causally among themselves. Unlike an SSM's state this grows
linearly with the length — the point Table 11 makes; ``KVCache.nbytes`` counts the filled part.

Glossary: b batch, l new tokens, t cached tokens, h heads (n_head), e head size d_h, d d_model, f d_mlp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIONALS = ("abs", "rope", "none")
N_HEAD = 8  # heads of the Table 11 baselines (SequenceModel's arch "attention")


class KVCache:
    """Keys and values of the tokens consumed so far by one attention layer, in preallocated buffers.

    Attributes:
        k, v: (b, h, capacity, e) buffers; positions [0, t) hold the keys (rotary applied) and values.
        t: number of tokens consumed (the position of the next token).
    """

    def __init__(self, k: Tensor, v: Tensor, t: int = 0):
        self.k, self.v, self.t = k, v, t

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold before they grow."""
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part of the buffers (what the sequence needs held)."""
        return self.k[:, :, : self.t].nbytes + self.v[:, :, : self.t].nbytes

    def append(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store (b, h, l, e) keys/values at positions [t, t + l); return views of all t + l of them.

        When full, the buffers are replaced by ones of twice the size (or t + l, if larger)."""
        t, l = self.t, k_new.shape[2]
        if t + l > self.capacity:
            cap = max(t + l, 2 * self.capacity)
            b, h, _, e = self.k.shape
            k, v = self.k.new_empty(b, h, cap, e), self.v.new_empty(b, h, cap, e)  # (b, h, cap, e) ×2
            k[:, :, :t], v[:, :, :t] = self.k[:, :, :t], self.v[:, :, :t]
            self.k, self.v = k, v
        self.k[:, :, t : t + l] = k_new
        self.v[:, :, t : t + l] = v_new
        self.t = t + l
        return self.k[:, :, : t + l], self.v[:, :, : t + l]  # (b, h, t + l, e) ×2


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
    """Rotate the pairs (x_i, x_{i+r/2}) of the first r = 2·cos.shape[-1] features of x (b, h, l, e) by the
    angles (l, r/2); features past r pass unchanged (partial rotary, GPT-NeoX / flash-attn's
    non-interleaved layout)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]  # (b, h, l, r/2) ×2, rest
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)  # (b, h, l, e)


class MultiheadAttention(nn.Module):
    """Causal multi-head self-attention with optional rotary positions, grouped KV heads and a KV cache.

    Parameter names and layout are mamba-ssm's ``MHA`` (``in_proj``: q for h heads, then k and v for h_kv
    heads; ``out_proj``), so a hybrid model's attention layers load unchanged.

    Args:
        d_model: width d (input and output).
        n_head: number of query heads h.
        positional: "rope" (rotary in this layer), "abs" or "none" (no positions in this layer).
        rope_base: base of the rotary frequencies θ_i = base^(−2i/r).
        n_head_kv: key/value heads h_kv (GQA; h must be a multiple of it); None: h (multi-head).
        head_dim: head size e; None: d / h.
        rotary_dim: features r of each head that are rotated (even, <= e); None: all of them.
        qkv_bias, out_bias: biases of in_proj and out_proj.
        softmax_scale: the attention scale; None: 1/√e.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int = 8,
        positional: str = "rope",
        rope_base: float = 10000.0,
        n_head_kv: int | None = None,
        head_dim: int | None = None,
        rotary_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        softmax_scale: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if positional not in POSITIONALS:
            raise ValueError(f"positional must be one of {POSITIONALS}, got {positional!r}")
        n_head_kv = n_head if n_head_kv is None else n_head_kv
        if not (isinstance(n_head_kv, int) and n_head_kv > 0 and n_head % n_head_kv == 0):
            raise ValueError(
                f"n_head ({n_head}) must be a multiple of n_head_kv, got n_head_kv={n_head_kv!r}"
            )
        if head_dim is None:
            if d_model % n_head:
                raise ValueError(
                    f"d_model ({d_model}) must be a multiple of n_head ({n_head}), or give head_dim"
                )
            head_dim = d_model // n_head
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if positional == "rope" and (rotary_dim % 2 or not 0 < rotary_dim <= head_dim):
            raise ValueError(
                f"rotary positions rotate an even number of features <= the head size {head_dim}, "
                f"got rotary_dim={rotary_dim}"
            )
        self.d_model, self.n_head, self.n_head_kv, self.head_dim = d_model, n_head, n_head_kv, head_dim
        self.positional, self.rope_base, self.rotary_dim = positional, rope_base, rotary_dim
        self.softmax_scale = softmax_scale
        f = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(d_model, head_dim * (n_head + 2 * n_head_kv), bias=qkv_bias, **f)
        self.out_proj = nn.Linear(head_dim * n_head, d_model, bias=out_bias, **f)

    def new_state(self, batch: int, capacity: int = 0) -> KVCache:
        """An empty KV cache for ``batch`` sequences with room for ``capacity`` tokens before it grows."""
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        w = self.in_proj.weight
        shape = (batch, self.n_head_kv, capacity, self.head_dim)  # (b, h_kv, capacity, e)
        return KVCache(w.new_empty(shape), w.new_empty(shape), 0)

    def forward(self, x: Tensor, state: KVCache | None = None) -> Tensor:
        """x (b, l, d) -> y (b, l, d); with ``state``, attend to its tokens too and append these l."""
        b, l, d = x.shape
        if d != self.d_model:
            raise ValueError(f"x must be (b, l, {self.d_model}), got {tuple(x.shape)}")
        if state is not None and state.batch_size != b:
            raise ValueError(f"state holds batch size {state.batch_size}, x has batch size {b}")
        offset = 0 if state is None else state.t
        h, hkv, e = self.n_head, self.n_head_kv, self.head_dim
        q, k, v = self.in_proj(x).split([h * e, hkv * e, hkv * e], dim=-1)  # (b, l, ·)
        q = q.view(b, l, h, e).transpose(1, 2)  # (b, h, l, e)
        k, v = k.view(b, l, hkv, e).transpose(1, 2), v.view(b, l, hkv, e).transpose(1, 2)  # (b, h_kv, l, e)
        if self.positional == "rope":
            pos = torch.arange(offset, offset + l)  # (l,) on the CPU, where rope_angles builds its tables
            cos, sin = rope_angles(pos, self.rotary_dim, self.rope_base)  # (l, r/2) ×2
            cos, sin = cos.to(x.device), sin.to(x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k, v = state.append(k.to(state.k.dtype), v.to(state.v.dtype))  # (b, h_kv, t + l, e) ×2
            k, v = k.to(q.dtype), v.to(q.dtype)
        if hkv != h:  # grouped-query attention: every key/value head serves h / h_kv query heads
            k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)  # (b, h, t, e)
        scale = self.softmax_scale
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # (b, h, l, e)
        elif l == 1:
            y = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (b, h, 1, e): one query sees all keys
        else:
            qpos = torch.arange(offset, offset + l, device=x.device)[:, None]  # (l, 1)
            mask = torch.arange(offset + l, device=x.device)[None, :] <= qpos  # (l, t + l)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (b, h, l, e)
        return self.out_proj(y.transpose(1, 2).reshape(b, l, h * e))  # (b, l, d)


class TransformerBlock(nn.Module):
    """Pre-norm block: x ← x + Attn(LN(x)); x ← x + MLP(LN(x)), MLP = Linear(d, f) → GELU → Linear(f, d).

    The one block of ssmkit's Transformers (``TransformerLM`` and the ablation's attention baseline).

    Args:
        d_model: width d of the residual stream.
        n_head: attention heads.
        positional: "rope" (rotary in the attention), "abs" or "none" (positions, if any, are added to
            the embedding by the model).
        d_mlp: MLP hidden width f; 0 means no MLP (an attention-only block, the paper's Table 11 MHA).
        norm_eps: ε of the LayerNorms.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int = 8,
        positional: str = "rope",
        d_mlp: int = 0,
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(d_mlp, int) or d_mlp < 0:
            raise ValueError(f"d_mlp must be an int >= 0, got {d_mlp!r}")
        f = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps, **f)
        self.attn = MultiheadAttention(d_model, n_head, positional, **f)
        self.norm2 = self.mlp = None
        if d_mlp > 0:
            self.norm2 = nn.LayerNorm(d_model, eps=norm_eps, **f)
            self.mlp = nn.Sequential(
                nn.Linear(d_model, d_mlp, **f), nn.GELU(), nn.Linear(d_mlp, d_model, **f)
            )

    def new_state(self, batch: int, capacity: int = 0) -> KVCache:
        return self.attn.new_state(batch, capacity)

    def forward(self, x: Tensor, state: KVCache | None = None) -> Tensor:
        """x (b, l, d) -> (b, l, d); with ``state``, continue from it and append these tokens."""
        x = x + self.attn(self.norm1(x), state)  # (b, l, d)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))  # (b, l, d)
        return x
