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
``config.vocab_size``, ``save_pretrained`` / ``from_pretrained``.

The KV cache. The state of a Transformer is the keys and values of every past token: 2 × n_layer × t × D
numbers for t tokens — it grows with the context (a Mamba layer's state does not). The model's cache
(``ssmkit.models.cache.Cache``) holds one :class:`~ssmkit.layers.attention.KVCache` per layer:
preallocated buffers that double when full (or are reserved up front with ``new_cache(b, capacity=...)``),
so a decode step costs one pass over the cache; ``cache.nbytes`` counts the filled part.

Glossary: b batch; l new tokens; t tokens in the cache; D d_model; h n_head; e = D / h head size;
f d_mlp; V_pad the padded vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ssmkit.generate import GenerationMixin, check_input_ids, check_num_last_tokens
from ssmkit.layers.attention import TransformerBlock, sinusoidal_positions
from ssmkit.models.cache import Cache
from ssmkit.models.folder import build_loaded, dtype_name, model_dtype, parse_dtype, read_config, read_weights
from ssmkit.utils import atomic_save, atomic_write_text, config_from_dict

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
    def from_dict(cls, data: dict, where: str = "TransformerConfig") -> TransformerConfig:
        """Strict: unknown keys or wrong types are one ValueError naming ``where`` (model_type ignored)."""
        return config_from_dict(cls, data, where, ignore=("model_type",))


class TransformerLM(GenerationMixin, nn.Module):
    """GPT-style language model with the :class:`ssmkit.MambaLM` interface (see the module docstring)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            TransformerBlock(config.d_model, config.n_head, config.pos, config.d_mlp, config.norm_eps)
            for _ in range(config.n_layer)
        )
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
    def new_cache(self, batch_size: int, capacity: int = 0) -> Cache:
        """An empty cache for ``batch_size`` sequences: a KV cache per layer, ``capacity`` tokens reserved."""
        return Cache([layer.new_state(batch_size, capacity) for layer in self.layers], batch_size)

    def forward(self, input_ids: Tensor, cache: Cache | None = None, num_last_tokens: int = 0) -> Tensor:
        """Logits for every position (or the last ``num_last_tokens``).

        Args:
            input_ids: (b, l) int64/int32 ids in [0, vocab_size) (range checked by ``generate`` / the CLI).
            cache: optional :class:`~ssmkit.models.cache.Cache` from :meth:`new_cache`, extended by
                these tokens.
            num_last_tokens: if > 0, return logits for the last this many positions only.
        Returns:
            logits (b, l, V_pad) float32 (float64 for a float64 model).
        """
        check_input_ids(input_ids)
        check_num_last_tokens(num_last_tokens)
        offset = 0
        if cache is not None:
            cache.check(len(self.layers), input_ids.shape[0])
            offset = cache.seqlen_offset
        hidden = self.embedding(input_ids)  # (b, l, D)
        if self.config.pos == "abs":
            pos = torch.arange(offset, offset + input_ids.shape[1])  # (l,)
            hidden = hidden + sinusoidal_positions(pos, self.config.d_model).to(hidden.device, hidden.dtype)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, None if cache is None else cache.layers[i])  # (b, l, D)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]  # (b, k, D)
        logits = self.lm_head(self.norm_f(hidden))  # (b, l, V_pad)
        return logits if logits.dtype == torch.float64 else logits.float()

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (with ``"model_type": "ssmkit-transformer"`` and ``"dtype"``, the dtype of
        the weights) and ``model.safetensors`` (a tied head is stored once, as the embedding), each
        atomically."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        atomic_save(
            folder / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})
        )
        config = {
            "model_type": MODEL_TYPE,
            **self.config.to_dict(),
            "dtype": dtype_name(state["embedding.weight"].dtype),
        }
        atomic_write_text(folder / "config.json", json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> TransformerLM:
        """Load a folder written by :meth:`save_pretrained`, or a Hub id holding one (strict: every key
        present, none extra; one-line errors naming the file otherwise). The weights may be one
        model.safetensors or shards with a model.safetensors.index.json. Arguments as
        :meth:`ssmkit.MambaLM.from_pretrained` (dtype: the argument, else config.json's, else float32)."""
        from ssmkit.models.hub import resolve

        if dtype is not None:
            parse_dtype(dtype)  # a bad argument is refused before anything is read or fetched
        folder = resolve(name_or_path, revision, cache_dir, local_files_only)
        where = folder / "config.json"
        data = read_config(folder)
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{where} has model_type {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        dtype = model_dtype(dtype, data, str(where))
        fields = {k: v for k, v in data.items() if k not in ("dtype", "torch_dtype")}
        config = TransformerConfig.from_dict(fields, where=str(where))
        if (
            not (folder / "model.safetensors").is_file()
            and not (folder / "model.safetensors.index.json").is_file()
        ):
            raise FileNotFoundError(
                f"{folder / 'model.safetensors'} not found (a TransformerLM folder holds config.json and it, "
                "or its shards and model.safetensors.index.json)"
            )
        state, source = read_weights(folder)
        weights = folder / source
        if config.tie_embeddings and "embedding.weight" in state:
            state["lm_head.weight"] = state["embedding.weight"]
        with torch.device("meta"):
            expected = set(cls(config).state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match its config.json: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            )
        return build_loaded(lambda: cls(config), state, dtype, device)
