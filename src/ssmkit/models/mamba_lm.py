"""The Mamba language model: embedding → n_layer pre-norm Mamba blocks → RMSNorm → LM head.

Reference: Gu & Dao 2023 (arXiv 2312.00752) §3.4 and App. E.2, Dao & Gu 2024 (Mamba-2, arXiv
2405.21060); the module tree, state-dict keys and initialisation are those of mamba-ssm's
``MambaLMHeadModel`` (``mamba_ssm/models/mixer_seq_simple.py``). The mixer of every block is Mamba-1
(``ssmkit.layers.mamba.Mamba``) for a :class:`MambaConfig`, Mamba-2 (``ssmkit.layers.mamba2.Mamba2``) for a
:class:`Mamba2Config` — one model class, as in mamba-ssm, because everything but the mixer (embedding,
norms, residual, head, cache, generation, checkpoint layout) is shared:

    backbone.embedding.weight              (V_pad, D)     N(0, 0.02)
    backbone.layers.{i}.norm.weight        (D,)           ones
    backbone.layers.{i}.mixer.*            see ssmkit.layers.mamba / mamba2 (out_proj.weight rescaled by
                                                          1/√n_layer; Linear biases zeroed but dt_proj.bias)
    backbone.norm_f.weight                 (D,)
    lm_head.weight                         (V_pad, D)     tied to the embedding unless tie_embeddings=False

Each block is pre-norm with a residual stream kept in float32 (``residual_in_fp32``):
    h_{i+1} = h_i + Mamba_i(RMSNorm_i(h_i))
which equals mamba-ssm's fused "Add → Norm → Mixer" ordering and transformers' ``MambaBlock``.

Cached inference (ssmkit's one state protocol, ``ssmkit.models.cache``): ``cache = model.new_cache(b)``;
``model(ids, cache=cache)`` consumes any number of new tokens and continues from the cache (one
:class:`~ssmkit.layers.mamba.MambaState` or ``Mamba2State`` per layer, constant size in the sequence
length). Prefill,
chunked prefill and one-token decoding are one code path. Without autograd, a one-token call is
handed to the fused C++ decode step (``ssmkit.engine.decode_step``: every weight read once per token, in
float32 / bfloat16 / int8) where it applies; the module path is its slow twin, tested token by token
against it (``tests/test_engine.py``; ``ssmkit.engine.decode.disabled()`` forces the module path).

Glossary: D d_model; V_pad padded vocabulary; l sequence length; b batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ssmkit.engine.decode import decode_step
from ssmkit.generate import GenerationMixin, check_input_ids, check_num_last_tokens
from ssmkit.layers.attention import KVCache, MultiheadAttention
from ssmkit.layers.mamba import Mamba, MambaState
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.mlp import GatedMLP
from ssmkit.layers.norm import RMSNorm
from ssmkit.models.cache import Cache
from ssmkit.models.config import Mamba2Config, MambaConfig, attention_kwargs


class MambaBlock(nn.Module):
    """Pre-norm residual block ``h = h + mixer(norm(h))``, then, when ``d_intermediate > 0``,
    ``h = h + mlp(norm2(h))`` (mamba-ssm's ``Block``); the residual stream is kept in float32 if asked.

    The mixer is ``Mamba`` for a :class:`MambaConfig`, ``Mamba2`` for a :class:`Mamba2Config`, and causal
    self-attention (``MultiheadAttention`` with mamba-ssm's ``MHA`` names) for the layers in
    ``attn_layer_idx`` of a hybrid; every one of them speaks the same state protocol."""

    def __init__(self, config: MambaConfig | Mamba2Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, **f)
        if layer_idx in config.attn_layer_idx:
            self.mixer = MultiheadAttention(**attention_kwargs(config.d_model, config.attn_cfg), **f)
        else:
            mixer = Mamba if config.layer == "Mamba1" else Mamba2
            self.mixer = mixer(config.d_model, layer_idx=layer_idx, **f, **config.mixer_kwargs())
            if config.layer == "Mamba2" and config.rmsnorm:
                self.mixer.norm.eps = config.norm_eps  # transformers' gated norm uses layer_norm_epsilon too
        self.norm2 = self.mlp = None
        if config.d_intermediate > 0:
            self.norm2 = RMSNorm(config.d_model, eps=config.norm_eps, **f)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate, **f)

    def forward(
        self, hidden_states: Tensor, state: MambaState | Mamba2State | KVCache | None = None
    ) -> Tensor:
        keep = not self.residual_in_fp32 or hidden_states.dtype == torch.float64  # float64 stays float64
        residual = hidden_states if keep else hidden_states.float()  # (b, l, d)
        hidden = residual + self.mixer(
            self.norm(hidden_states.to(self.norm.weight.dtype)), state
        )  # (b, l, d)
        if self.mlp is not None:
            hidden = hidden + self.mlp(self.norm2(hidden.to(self.norm2.weight.dtype)))  # (b, l, d)
        return hidden


class MambaBackbone(nn.Module):
    """Embedding, blocks and final norm (mamba-ssm's ``MixerModel``; key prefix ``backbone.``)."""

    def __init__(self, config: MambaConfig | Mamba2Config, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            [MambaBlock(config, i, device=device, dtype=dtype) for i in range(config.n_layer)]
        )
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)

    def forward(self, input_ids: Tensor, cache: Cache | None = None) -> Tensor:
        hidden = self.embedding(input_ids)  # (b, l, d)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, state=None if cache is None else cache.layers[i])  # (b, l, d)
        return self.norm_f(hidden.to(self.norm_f.weight.dtype))  # (b, l, d)


def init_weights(model: nn.Module, n_layer: int, initializer_range: float = 0.02) -> None:
    """mamba-ssm's ``_init_weights`` (``mamba_ssm/models/mixer_seq_simple.py``), in place.

    Zero every Linear bias except those marked ``_no_reinit`` (dt_proj.bias); embeddings N(0,
    initializer_range); every ``out_proj.weight`` and ``fc2.weight`` re-drawn with kaiming_uniform(a=√5)
    and divided by √(r · n_layer), r the residuals per block (1, or 2 with an MLP): the GPT-2
    prenorm-residual rescale.
    """
    residuals = 2 if any(isinstance(m, GatedMLP) for m in model.modules()) else 1
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, initializer_range)
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                p.div_(math.sqrt(residuals * n_layer))


class MambaLM(GenerationMixin, nn.Module):
    """Mamba language model with mamba-ssm ``MambaLMHeadModel`` state-dict keys.

    Args:
        config: :class:`MambaConfig` (Mamba-1 mixers) or :class:`Mamba2Config` (Mamba-2 mixers).
    """

    def __init__(self, config: MambaConfig | Mamba2Config, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, (MambaConfig, Mamba2Config)):
            raise ValueError(f"config must be a MambaConfig or a Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.backbone = MambaBackbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(
            config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype
        )
        init_weights(self, config.n_layer)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    # ------------------------------------------------------------------ inference
    def new_cache(self, batch_size: int) -> Cache:
        """A zero cache for ``batch_size`` sequences, on the model's device: one ``MambaState`` per layer."""
        return Cache([layer.mixer.new_state(batch_size) for layer in self.backbone.layers], batch_size)

    def forward(self, input_ids: Tensor, cache: Cache | None = None, num_last_tokens: int = 0) -> Tensor:
        """Logits for every position (or the last ``num_last_tokens``).

        Args:
            input_ids: (b, l) int64/int32 token ids in [0, vocab_size) (the range is checked by
                ``generate`` and the CLI, not here: a check would read a value back every call).
            cache: optional :class:`~ssmkit.models.cache.Cache` from :meth:`new_cache`; consumed and updated.
            num_last_tokens: if > 0, return logits for the last this many positions only.
        Returns:
            logits (b, l, V_pad) float32 (V_pad = config.padded_vocab_size), float64 for a float64 model.
        """
        check_input_ids(input_ids)
        check_num_last_tokens(num_last_tokens)
        if cache is not None:
            cache.check(len(self.backbone.layers), input_ids.shape[0])
            if input_ids.shape[1] == 1 and not torch.is_grad_enabled():
                logits = decode_step(self, input_ids, cache)  # the fused C++ step, where it applies
                if logits is not None:
                    return logits  # (b, 1, V_pad)
        hidden = self.backbone(input_ids, cache)  # (b, l, d)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]  # (b, k, d)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))  # (b, l, V_pad)
        return logits if logits.dtype == torch.float64 else logits.float()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
    ) -> MambaLM:
        """Load a model folder or Hub id in Hugging Face or mamba-ssm format (``ssmkit.models.checkpoint``).

        Args:
            name_or_path: a local folder, or a Hub id such as "state-spaces/mamba-130m-hf" (resolved by
                ``ssmkit.models.hub.resolve`` through the Hugging Face cache; offline, the cache only).
            revision: branch, tag or commit of a Hub id (default "main").
            dtype: float32 / bfloat16 / float16 / float64 (a torch.dtype or its name); None: config.json's
                ``dtype`` / ``torch_dtype``, else float32 (a mamba-ssm config.json has neither).
            device: where the weights go (default cpu).
            cache_dir: the Hub cache (default: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``).
            local_files_only: True: never use the network; None: follow ``HF_HUB_OFFLINE``.
        Returns:
            the model in training mode; the weights are the checkpoint's, nothing is randomly initialised.
        """
        from ssmkit.models.checkpoint import config_from_file, load_checkpoint, quantization_scheme
        from ssmkit.models.folder import (
            QUANTIZED_WEIGHTS,
            build_loaded,
            model_dtype,
            parse_dtype,
            read_config,
        )
        from ssmkit.models.hub import resolve

        if dtype is not None:
            parse_dtype(dtype)  # a bad argument is refused before anything is read or fetched
        folder = resolve(name_or_path, revision, cache_dir, local_files_only)
        raw = read_config(folder)
        dtype = model_dtype(dtype, raw, str(folder / "config.json"))
        if quantization_scheme(raw, str(folder / "config.json")) is not None:
            from ssmkit.engine.quant import load_quantized

            model = cls(config_from_file(raw, str(folder / "config.json"))).to(dtype)
            return load_quantized(model, folder / QUANTIZED_WEIGHTS).to(device or "cpu")
        config, state_dict = load_checkpoint(folder)
        return build_loaded(lambda: cls(config), state_dict, dtype, device)

    def save_pretrained(self, path: str | Path, format: str = "hf") -> None:
        """Write ``config.json`` + weights in the dtype the model holds; ``format="hf"``
        (model.safetensors, config.json ``"dtype"``; loads in transformers' ``MambaForCausalLM``) or
        ``"mamba-ssm"`` (pytorch_model.bin, mamba-ssm's ``from_pretrained``; its config.json has no dtype
        key, so it loads as float32 unless ``dtype=`` is given). A quantized model (``ssmkit.quantize``)
        is written in Hugging Face layout with its int8 weights and scales and config.json's
        ``quantization_config``; ``from_pretrained`` loads it back quantized (transformers cannot read it)."""
        from ssmkit.engine.quant import is_quantized
        from ssmkit.models.checkpoint import save_checkpoint, save_quantized_checkpoint

        if is_quantized(self):
            if format != "hf":
                raise ValueError(f"a quantized model is saved in format 'hf' only, got format={format!r}")
            save_quantized_checkpoint(path, self)
            return
        save_checkpoint(path, self.config, self.state_dict(), format=format)
