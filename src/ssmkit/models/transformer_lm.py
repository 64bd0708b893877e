"""A GPT-style Transformer language model: the baseline Mamba is compared against (same interface).

Reference: Radford et al. (2019) "Language Models are Unsupervised Multitask Learners" (GPT-2: pre-norm
blocks, GELU MLP, tied embeddings, residual projections initialised with std 0.02/√(2·n_layer)); the
attention layer and positions come from ``ssmkit.layers.attention`` (Vaswani et al. 2017; RoFormer).

    h_0     = E[ids] (+ PE(positions) for pos="abs")
    h_{i+1} = h_i + Attn_i(LN(h_i));   h_{i+1} ← h_{i+1} + MLP_i(LN(h_{i+1}))
    logits  = LN_f(h_L) E^T            (lm_head tied to the embedding unless tie_embeddings=False)

Interface shared with :class:`ssmkit.MambaLM`, so ``ssmkit.generate``, the trainer and the decode bench
drive either model: ``model(ids) -> logits (b, l, V_pad)``, ``cache = model.new_cache(b)``,
``model(ids, cache=cache, num_last_tokens=k)`` (prefill and decoding are the same call),
``config.vocab_size``, ``check_input_ids``, ``save_pretrained`` / ``from_pretrained``.

The KV cache. The state of a Transformer is the keys and values of every past token: 2 × n_layer × t × D
numbers for t tokens — it grows with the context (a Mamba layer's state does not). ``layers.attention``'s
own cached forward extends its cache with ``torch.cat`` (a full copy per new token); here the cached path
writes into preallocated buffers (capacity doubles when full, or is reserved up front with
``new_cache(b, capacity=...)``) and attends over the filled part — the same arithmetic as
``MultiheadAttention.forward`` on the same parameters (the slow twin, checked equal in the tests), so a
decode step costs one pass over the cache, not two. ``cache.nbytes`` counts the filled part.

Glossary: b batch; l new tokens; t tokens in the cache; D d_model; h n_head; e = D / h head size;
f d_mlp; V_pad the padded vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.generate import GenerationMixin
from ssmkit.layers.attention import MultiheadAttention, apply_rope, rope_angles, sinusoidal_positions

MODEL_TYPE = "ssmkit-transformer"
POSITIONS = ("rope", "abs")


@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`TransformerLM`."""

    d_model: int
    """Width D of the residual stream."""
    n_layer: int
    """Number of Transformer blocks."""
    vocab_size: int
    """Number of real tokens; embedding rows are padded up to ``padded_vocab_size``."""
    n_head: int = 8
    """Attention heads (head size D / n_head, which must be even for rotary positions)."""
    d_mlp: int | None = None
    """Hidden width f of each MLP; None: 4·D (GPT-2)."""
    pos: str = "rope"
    """Positions: 'rope' (rotary, every layer) or 'abs' (fixed sinusoids added to the embedding)."""
    norm_eps: float = 1e-5
    """ε of every LayerNorm."""
    pad_vocab_size_multiple: int = 8
    """Round the embedding / head rows up to a multiple of this."""
    tie_embeddings: bool = True
    """Share the LM head weight with the embedding."""

    def __post_init__(self) -> None:
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        for name in ("d_model", "n_layer", "vocab_size", "n_head", "d_mlp", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"TransformerConfig: d_model ({self.d_model}) must be a multiple of 2·n_head "
                f"(n_head={self.n_head}) so that heads have an even size"
            )
        if self.pos not in POSITIONS:
            raise ValueError(f"TransformerConfig.pos must be one of {POSITIONS}, got {self.pos!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"TransformerConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"TransformerConfig: unknown config fields {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})


class TransformerCache:
    """Preallocated keys and values of every layer for a batch of sequences.

    Attributes:
        k, v: per layer (b, h, capacity, e) buffers; positions [0, seqlen_offset) are filled.
        seqlen_offset: number of tokens consumed so far (t).
    """

    def __init__(
        self, n_layer: int, batch_size: int, n_head: int, head_dim: int, capacity: int, device, dtype
    ):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        shape = (batch_size, n_head, capacity, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.seqlen_offset = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        """Tokens the smallest layer buffer can hold without growing."""
        return min(k.shape[2] for k in self.k)

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part of the K and V buffers (what the sequence needs held)."""
        t = self.seqlen_offset
        return sum(k[:, :, :t].nbytes + v[:, :, :t].nbytes for k, v in zip(self.k, self.v))

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store (b, h, l, e) new keys/values at positions [t, t + l) of ``layer``; return views of all
        t + l cached keys and values. Grows the buffers (doubling) when full."""
        t, l = self.seqlen_offset, k_new.shape[2]
        cap = self.k[layer].shape[2]
        if t + l > cap:
            new_cap = max(t + l, 2 * cap)
            for buf in (self.k, self.v):
                old = buf[layer]
                grown = old.new_empty(old.shape[0], old.shape[1], new_cap, old.shape[3])  # (b, h, cap, e)
                grown[:, :, :t] = old[:, :, :t]
                buf[layer] = grown
        self.k[layer][:, :, t : t + l] = k_new
        self.v[layer][:, :, t : t + l] = v_new
        return self.k[layer][:, :, : t + l], self.v[layer][:, :, : t + l]  # (b, h, t + l, e) ×2


def attention_cached(attn: MultiheadAttention, x: Tensor, cache: TransformerCache, layer: int) -> Tensor:
    """``attn.forward(x, state)`` (the slow twin) with the keys/values kept in ``cache``'s buffers.

    x (b, l, D) -> (b, l, D). The new queries attend to all cached tokens and causally among themselves."""
    b, l, d = x.shape
    h, e, offset = attn.n_heads, attn.head_dim, cache.seqlen_offset
    q, k, v = attn.qkv(x).view(b, l, 3, h, e).permute(2, 0, 3, 1, 4)  # (b, h, l, e) ×3
    if attn.positional == "rope":
        pos = torch.arange(offset, offset + l)  # (l,) on the CPU, where rope_angles builds its frequencies
        cos, sin = rope_angles(pos, e, attn.rope_base)  # (l, e/2) ×2
        q, k = (
            apply_rope(q, cos.to(x.device), sin.to(x.device)),
            apply_rope(k, cos.to(x.device), sin.to(x.device)),
        )
    keys, values = cache.write(layer, k, v)  # (b, h, t, e) ×2, t = offset + l
    if offset == 0:
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)  # (b, h, l, e)
    elif l == 1:
        y = F.scaled_dot_product_attention(q, keys, values)  # (b, h, 1, e): one query sees every key
    else:
        qpos = torch.arange(offset, offset + l, device=x.device)[:, None]  # (l, 1)
        mask = torch.arange(offset + l, device=x.device)[None, :] <= qpos  # (l, t)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (b, h, l, e)
    return attn.out_proj(y.transpose(1, 2).reshape(b, l, d))  # (b, l, D)


class GPTBlock(nn.Module):
    """Pre-norm block: x ← x + Attn(LN(x)); x ← x + MLP(LN(x)), MLP = Linear(D, f) → GELU → Linear(f, D)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d, f = config.d_model, config.d_mlp
        self.norm1 = nn.LayerNorm(d, eps=config.norm_eps)
        self.attn = MultiheadAttention(d, config.n_head, config.pos)
        self.norm2 = nn.LayerNorm(d, eps=config.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))

    def forward(self, x: Tensor, cache: TransformerCache | None = None, layer: int = 0) -> Tensor:
        hn = self.norm1(x)  # (b, l, D)
        a = self.attn(hn)[0] if cache is None else attention_cached(self.attn, hn, cache, layer)  # (b, l, D)
        x = x + a
        return x + self.mlp(self.norm2(x))  # (b, l, D)


class TransformerLM(GenerationMixin, nn.Module):
    """GPT-style language model with the :class:`ssmkit.MambaLM` interface (see the module docstring)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList([GPTBlock(config) for _ in range(config.n_layer)])
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        """GPT-2: N(0, 0.02) weights, zero biases, residual projections N(0, 0.02/√(2·n_layer))."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, 0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            for layer in self.layers:
                for proj in (layer.attn.out_proj, layer.mlp[2]):
                    proj.weight.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer))

    # ------------------------------------------------------------------ inference
    def new_cache(self, batch_size: int, capacity: int = 0) -> TransformerCache:
        """An empty KV cache for ``batch_size`` sequences (``capacity`` tokens reserved up front)."""
        c = self.config
        w = self.embedding.weight
        return TransformerCache(
            c.n_layer, batch_size, c.n_head, c.d_model // c.n_head, capacity, w.device, w.dtype
        )

    def check_input_ids(self, input_ids: Tensor) -> None:
        """Raise ValueError unless ``input_ids`` is an integer (b, l) tensor with ids in [0, vocab_size)."""
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.dtype.is_floating_point
            or input_ids.dtype == torch.bool
        ):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor (torch.long) of shape (b, l), got {got}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (b, l) with b, l >= 1, got {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{lo}, {hi}]"
            )

    def forward(
        self, input_ids: Tensor, cache: TransformerCache | None = None, num_last_tokens: int = 0
    ) -> Tensor:
        """Logits for every position (or the last ``num_last_tokens``).

        Args:
            input_ids: (b, l) integer ids in [0, vocab_size).
            cache: optional :class:`TransformerCache` from :meth:`new_cache`; extended by these tokens.
            num_last_tokens: if > 0, return logits for the last this many positions only.
        Returns:
            logits (b, l, V_pad) float32.
        """
        self.check_input_ids(input_ids)
        offset = 0
        if cache is not None:
            if not isinstance(cache, TransformerCache) or len(cache.k) != len(self.layers):
                raise ValueError("cache must be a TransformerCache from this model's new_cache()")
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(
                    f"cache holds batch size {cache.batch_size}, "
                    f"input_ids has batch size {input_ids.shape[0]}"
                )
            offset = cache.seqlen_offset
        hidden = self.embedding(input_ids)  # (b, l, D)
        if self.config.pos == "abs":
            pos = torch.arange(offset, offset + input_ids.shape[1])  # (l,)
            hidden = hidden + sinusoidal_positions(pos, self.config.d_model).to(hidden.device, hidden.dtype)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, cache, i)  # (b, l, D)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]  # (b, k, D)
        return self.lm_head(self.norm_f(hidden)).float()  # (b, l, V_pad)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (with ``"model_type": "ssmkit-transformer"``) and ``model.safetensors``
        (a tied head is stored once, as the embedding), each atomically."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="model.", suffix=".tmp")
        os.close(fd)
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, folder / "model.safetensors")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="config.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"model_type": MODEL_TYPE, **self.config.to_dict()}, fh, indent=2)
        os.replace(tmp, folder / "config.json")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> TransformerLM:
        """Load a folder written by :meth:`save_pretrained` (strict: every key present, none extra)."""
        from safetensors.torch import load_file

        folder = Path(path)
        data = json.loads((folder / "config.json").read_text())
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{folder}/config.json has model_type {data.get('model_type')!r}, expected {MODEL_TYPE!r}"
            )
        model = cls(TransformerConfig.from_dict(data))
        state = load_file(str(folder / "model.safetensors"))
        if model.config.tie_embeddings:
            state["lm_head.weight"] = state["embedding.weight"]
        model.load_state_dict(state, strict=True)
        return model


def is_transformer_folder(path: str | os.PathLike) -> bool:
    """True when ``path/config.json`` was written by :meth:`TransformerLM.save_pretrained`."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
