"""Checkpoint I/O for :class:`ssmkit.MambaLM`: Hugging Face format and mamba-ssm format, local folders only.

Two on-disk formats hold the same weights:

    Hugging Face (transformers ``MambaForCausalLM``)       mamba-ssm (``MambaLMHeadModel``)
    config.json: model_type "mamba", hidden_size,          config.json: d_model, n_layer, vocab_size
      num_hidden_layers, state_size, conv_kernel, ...        (unpadded), ssm_cfg {layer, d_state, ...}
      vocab_size (already padded)                            (no model_type key)
    model.safetensors (or sharded, with an index)           pytorch_model.bin (pickle; read with
                                                              weights_only=True) or model.safetensors
    backbone.embeddings.weight                              backbone.embedding.weight
    lm_head.weight omitted when tied                        lm_head.weight always present

Every other key is identical. In memory we use mamba-ssm's keys (``MambaLM.state_dict()``).

Reading is strict and says what is wrong in one line naming the file. The files themselves are read by
``ssmkit.models.folder`` (UTF-8 JSON object, intact safetensors, tensor-only pickles, shards inside the
folder). Here the model type (``model_type``, or mamba-ssm's ``ssm_cfg.layer``) is checked first; every
config key must be one this module maps, checks, or deliberately ignores (the generic keys transformers'
``PretrainedConfig`` writes, and run-time switches such as ``use_cache``) — anything else is an error,
since a key we do not understand may change what the weights mean; values must have the field's JSON
type. The whole state dict is checked against the shapes the config implies *before* any model is
built, and every missing, unexpected and mis-shaped key is reported by name — nothing is half loaded.
Writes are atomic (``ssmkit.utils.atomic_save``). Nothing is fetched from the network.

Field mapping (ours = mamba-ssm's names; HF name in brackets): d_model [hidden_size], n_layer
[num_hidden_layers], d_state [state_size], d_conv [conv_kernel], expand [intermediate_size / hidden_size
when the file has intermediate_size — transformers builds from it — else expand], dt_rank
[time_step_rank], dt_min/dt_max [time_step_min/max], dt_init [time_step_init_scheme], dt_scale
[time_step_scale], dt_init_floor [time_step_floor], conv_bias [use_conv_bias], bias [use_bias], norm_eps
[layer_norm_epsilon], residual_in_fp32 [same], tie_embeddings [tie_word_embeddings]. HF stores the padded
vocabulary only, so a model read from HF format has vocab_size = the padded size."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssmkit.layers.mlp import gated_mlp_width
from ssmkit.models.config import Mamba2Config, MambaConfig
from ssmkit.models.folder import WEIGHT_FILES, model_type, read_config, read_index, read_weights, weight_files
from ssmkit.utils import atomic_save, atomic_write_text, config_from_dict

FORMATS = ("hf", "mamba-ssm")
MODEL_TYPE = "mamba"  # Mamba-1 (transformers' name)
MODEL_TYPE_2 = "mamba2"  # Mamba-2 (transformers' name)
MODEL_TYPE_FALCON = "falcon_mamba"  # Falcon-Mamba: Mamba-1 with RMS-normalised δ, B, C (transformers' name)
MODEL_TYPES = (MODEL_TYPE, MODEL_TYPE_2, MODEL_TYPE_FALCON)  # what MambaLM reads
AnyMambaConfig = MambaConfig | Mamba2Config

# HF config keys we map to MambaConfig fields.
_HF_MAPPED = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "vocab_size": "vocab_size",
    "state_size": "d_state",
    "conv_kernel": "d_conv",
    "expand": "expand",
    "time_step_rank": "dt_rank",
    "time_step_min": "dt_min",
    "time_step_max": "dt_max",
    "time_step_init_scheme": "dt_init",
    "time_step_scale": "dt_scale",
    "time_step_floor": "dt_init_floor",
    "use_conv_bias": "conv_bias",
    "use_bias": "bias",
    "layer_norm_epsilon": "norm_eps",
    "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings",
}
# HF keys read and checked here: model_type, hidden_act (must be silu), intermediate_size (a multiple of
# hidden_size; it decides the inner width, as in transformers), pad_vocab_size_multiple (kept when it
# divides the padded vocabulary).
_HF_CHECKED = {"model_type", "hidden_act", "intermediate_size", "pad_vocab_size_multiple"}
# HF keys accepted and ignored, deliberately: they do not change what the weights compute. transformers'
# MambaConfig switches (cache, initialisation, which scan implementation), the generic keys every
# ``PretrainedConfig`` may write (bookkeeping, token ids, task heads, and the generation defaults
# transformers 4.x saved into config.json), and the legacy mamba-ssm keys the released ``*-hf``
# checkpoints carry beside the HF ones.
_HF_IGNORED = {
    # transformers MambaConfig: run-time and init switches
    "use_cache", "use_mambapy", "use_associative_scan", "initializer_range", "rescale_prenorm_residual",
    # PretrainedConfig: bookkeeping and outputs
    "architectures", "transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype",
    "use_bfloat16", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "id2label", "label2id",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "_attn_implementation_autoset",
    # PretrainedConfig: token ids
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    # PretrainedConfig (transformers 4.x): generation defaults saved into config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
    # legacy mamba-ssm names in released *-hf configs (the HF names above are the ones read)
    "d_model", "d_inner", "n_layer", "rms_norm", "fused_add_norm", "ssm_cfg",
}  # fmt: skip
# mamba-ssm's MambaConfig has exactly these fields; its Mamba mixer exactly these ssm_cfg keywords.
_MAMBA_SSM_KEYS = {
    "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
    "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings",
}  # fmt: skip
_SSM_CFG_MAPPED = {
    "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
    "conv_bias", "bias",
}  # fmt: skip
_SSM_CFG_IGNORED = {"layer", "use_fast_path"}  # layer is checked as the model type; the other is speed only

# Mamba-2: transformers' Mamba2Config keys we map, with the value transformers assumes when a key is absent
# (its defaults differ from mamba-ssm's: n_groups 8, untied embeddings).
_HF2_MAPPED = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "vocab_size": "vocab_size",
    "state_size": "d_state",
    "conv_kernel": "d_conv",
    "expand": "expand",
    "head_dim": "headdim",
    "n_groups": "ngroups",
    "time_step_min": "dt_min",
    "time_step_max": "dt_max",
    "time_step_floor": "dt_init_floor",
    "time_step_limit": "dt_limit",
    "use_conv_bias": "conv_bias",
    "use_bias": "bias",
    "chunk_size": "chunk_size",
    "layer_norm_epsilon": "norm_eps",
    "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings",
}
_HF2_DEFAULTS = {
    "state_size": 128, "conv_kernel": 4, "expand": 2, "head_dim": 64, "n_groups": 8, "use_bias": False,
    "use_conv_bias": True, "chunk_size": 256, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True,
    "tie_word_embeddings": False, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
}  # fmt: skip
# checked: num_heads (= expand·hidden_size / head_dim), rms_norm (must be true); time_step_rank is
# computed by transformers but unused by a Mamba-2 mixer, hence ignored with the generic keys.
_HF2_CHECKED = {"model_type", "hidden_act", "num_heads", "rms_norm", "pad_vocab_size_multiple"}
_HF2_IGNORED = (_HF_IGNORED - {"d_model", "n_layer", "ssm_cfg"}) | {"time_step_rank", "norm_before_gate"}
_SSM2_CFG_MAPPED = {
    "d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "D_has_hdim", "rmsnorm",
    "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size",
}  # fmt: skip
# checked: d_ssm (must be the whole inner width); ignored: speed-only switches and the conv init scale.
_SSM2_CFG_IGNORED = {"layer", "use_mem_eff_path", "conv_init", "d_ssm"}

# Tokenizer files a conversion carries over from the source folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


# ---------------------------------------------------------------------------- configs
def _build_config(
    kwargs: dict[str, Any], where: str, names: dict[str, str] | None = None, cls: type = MambaConfig
) -> AnyMambaConfig:
    """``config_from_dict(cls, ...)`` with every message naming ``where`` and, through ``names``
    (ours -> the file's), the key as the file spells it."""
    try:
        return config_from_dict(cls, kwargs, where)
    except ValueError as err:
        msg = str(err)
        for ours, theirs in (names or {}).items():
            msg = re.sub(rf"\b(?:Mamba2?Config\.)?{ours}\b(?= must)", theirs, msg)
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _check_hf_keys(d: dict[str, Any], where: str, what: str, mapped: dict, accepted: set) -> None:
    """The checks every transformers config gets: no unknown key, the required fields, SiLU."""
    unknown = sorted(set(d) - set(mapped) - accepted)
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {unknown} for a Hugging Face {what} config (ssmkit reads "
            f"{sorted(mapped)} and ignores only keys that do not change the weights' meaning)"
        )
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key not in d:
            raise ValueError(f"{where} lacks required field {key!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: only hidden_act='silu' is supported, got {d['hidden_act']!r}")


def _hf_pad_multiple(d: dict[str, Any]) -> int:
    """transformers stores the padded vocabulary; keep its pad_vocab_size_multiple when it divides it."""
    vocab, pad = d["vocab_size"], d.get("pad_vocab_size_multiple", 1)
    return pad if isinstance(pad, int) and isinstance(vocab, int) and pad > 0 and vocab % pad == 0 else 1


def config_from_hf(d: dict[str, Any], where: str = "Hugging Face config.json") -> MambaConfig:
    """MambaConfig from a transformers ``MambaConfig`` dict (config.json); ValueError naming ``where``.

    A ``FalconMambaConfig`` (model type "falcon_mamba") is the same plus ``mixer_rms_eps`` (its default
    1e-6 when absent), read into ``MambaConfig.mixer_rms_eps``."""
    falcon = d.get("model_type") == MODEL_TYPE_FALCON
    extra = {"mixer_rms_eps", "use_falcon_mambapy"} if falcon else set()
    _check_hf_keys(d, where, "Mamba", _HF_MAPPED, _HF_CHECKED | _HF_IGNORED | extra)
    kwargs = {ours: d[hf] for hf, ours in _HF_MAPPED.items() if hf in d}
    expand = _hf_expand(d, where)
    if expand is not None:
        kwargs["expand"] = expand
    kwargs.setdefault("bias", False)  # transformers' default (some 5.x-era versions differed; be explicit)
    kwargs.setdefault("tie_embeddings", True)
    if falcon:
        kwargs["mixer_rms_eps"] = d.get("mixer_rms_eps", 1e-6)
    config = _build_config(
        {**kwargs, "pad_vocab_size_multiple": _hf_pad_multiple(d)},
        where,
        {ours: hf for hf, ours in _HF_MAPPED.items()},
    )
    if config.dt_rank == math.ceil(config.d_model / 16):
        config = dataclasses.replace(config, dt_rank="auto")  # HF stores the resolved rank; keep round trips
    return config


def _hf_expand(d: dict[str, Any], where: str) -> int | None:
    """The inner width as ``expand``: transformers builds the mixer from ``intermediate_size`` when the
    file has it (its config sets intermediate_size = expand·hidden_size, then the file's own value
    replaces it), so that key decides and ``expand`` is ignored — tiiuae/falcon-mamba-7b's config.json
    says expand 16 beside intermediate_size 8192 = 2 × 4096, and its weights are 8192 wide."""
    width, hidden = d.get("intermediate_size"), d.get("hidden_size")
    if width is None or not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        return None  # a hidden_size of the wrong type is named by the config's own check
    if (
        not isinstance(width, int)
        or not isinstance(hidden, int)
        or width <= 0
        or hidden <= 0
        or width % hidden
    ):
        raise ValueError(
            f"{where}: intermediate_size={width!r} must be a positive multiple of hidden_size={hidden!r} "
            "(ssmkit holds the inner width as expand·hidden_size)"
        )
    return width // hidden


def _refuse_hybrid_in_hf(config: AnyMambaConfig) -> None:
    if config.attn_layer_idx or config.d_intermediate:
        raise ValueError(
            "transformers has no model with mamba-ssm's hybrid layout (attention layers / GatedMLP); "
            f"attn_layer_idx={config.attn_layer_idx}, d_intermediate={config.d_intermediate}: "
            "save it in mamba-ssm format"
        )


def config_to_hf(config: MambaConfig) -> dict[str, Any]:
    """transformers ``MambaConfig`` (or ``FalconMambaConfig``) dict for ``config`` (vocab_size padded)."""
    _refuse_hybrid_in_hf(config)
    falcon = config.mixer_rms_eps is not None
    return {
        "architectures": ["FalconMambaForCausalLM" if falcon else "MambaForCausalLM"],
        "model_type": MODEL_TYPE_FALCON if falcon else MODEL_TYPE,
        **({"mixer_rms_eps": config.mixer_rms_eps} if falcon else {}),
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "time_step_rank": config.resolved_dt_rank,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_init_scheme": config.dt_init,
        "time_step_scale": config.dt_scale,
        "time_step_floor": config.dt_init_floor,
        "use_conv_bias": config.conv_bias,
        "use_bias": config.bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "rescale_prenorm_residual": False,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "dtype": "float32",  # save_checkpoint writes the dtype of the weights it saves
    }


def config2_from_hf(d: dict[str, Any], where: str = "Hugging Face config.json") -> Mamba2Config:
    """Mamba2Config from a transformers ``Mamba2Config`` dict; absent keys take transformers' defaults."""
    _check_hf_keys(d, where, "Mamba-2", _HF2_MAPPED, _HF2_CHECKED | _HF2_IGNORED)
    if d.get("rms_norm", True) is not True:
        raise ValueError(f"{where}: rms_norm must be true (transformers' Mamba2 always has the gated norm)")
    full = {**_HF2_DEFAULTS, **d}
    if isinstance(full.get("time_step_limit"), list):  # transformers 5 writes ∞ as {"__float__": "Infinity"}
        full["time_step_limit"] = [
            float(v["__float__"]) if isinstance(v, dict) and set(v) == {"__float__"} else v
            for v in full["time_step_limit"]
        ]
    kwargs = {ours: full[hf] for hf, ours in _HF2_MAPPED.items() if hf in full}
    kwargs["pad_vocab_size_multiple"] = _hf_pad_multiple(d)
    config = _build_config(kwargs, where, {ours: hf for hf, ours in _HF2_MAPPED.items()}, Mamba2Config)
    if "num_heads" in d and d["num_heads"] != config.nheads:
        raise ValueError(
            f"{where}: num_heads={d['num_heads']!r} must equal expand*hidden_size/head_dim = {config.nheads}"
        )
    return config


def config2_to_hf(config: Mamba2Config) -> dict[str, Any]:
    """transformers ``Mamba2Config`` dict for ``config`` (vocab_size is the padded size)."""
    _refuse_hybrid_in_hf(config)
    if config.D_has_hdim or not config.rmsnorm or config.norm_before_gate:
        raise ValueError(
            "transformers' Mamba2 has D per head, the gated RMSNorm and norm_before_gate=False; this config "
            f"has D_has_hdim={config.D_has_hdim}, rmsnorm={config.rmsnorm}, "
            f"norm_before_gate={config.norm_before_gate} (save it in mamba-ssm format instead)"
        )
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": MODEL_TYPE_2,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "head_dim": config.headdim,
        "num_heads": config.nheads,
        "n_groups": config.ngroups,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "time_step_limit": list(config.dt_limit),
        "use_conv_bias": config.conv_bias,
        "use_bias": config.bias,
        "chunk_size": config.chunk_size,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "rescale_prenorm_residual": False,
        "dtype": "float32",  # save_checkpoint writes the dtype of the weights it saves
    }


def config_from_mamba_ssm(d: dict[str, Any], where: str = "mamba-ssm config.json") -> AnyMambaConfig:
    """MambaConfig from a mamba-ssm ``MambaConfig`` dict (config.json); ValueError naming ``where``."""
    unknown = sorted(set(d) - _MAMBA_SSM_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {unknown} for a mamba-ssm config (known: {sorted(_MAMBA_SSM_KEYS)})"
        )
    for key in ("d_model", "n_layer", "vocab_size"):
        if key not in d:
            raise ValueError(f"{where} lacks required field {key!r}")
    if d.get("rms_norm", True) is not True:
        raise ValueError(f"{where}: rms_norm must be true (LayerNorm models are not supported)")
    ssm_cfg = d.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise ValueError(f"{where}: ssm_cfg must be a JSON object, got {ssm_cfg!r}")
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"{where}: ssm_cfg.layer must be 'Mamba1' or 'Mamba2', got {layer!r}")
    mapped, ignored = (
        (_SSM_CFG_MAPPED, _SSM_CFG_IGNORED) if layer == "Mamba1" else (_SSM2_CFG_MAPPED, _SSM2_CFG_IGNORED)
    )
    unknown = sorted(set(ssm_cfg) - mapped - ignored)
    if unknown:
        raise ValueError(
            f"{where}: unknown ssm_cfg keys {unknown} for {layer} (known: {sorted(mapped | ignored)})"
        )
    if layer == "Mamba2" and ssm_cfg.get("d_ssm") is not None:
        d_inner = ssm_cfg.get("expand", 2) * d["d_model"]
        if ssm_cfg["d_ssm"] != d_inner:
            raise ValueError(
                f"{where}: ssm_cfg.d_ssm={ssm_cfg['d_ssm']!r} differs from expand*d_model={d_inner} "
                "(a Mamba-2 mixer with an MLP part is not supported)"
            )
    kwargs = {k: v for k, v in ssm_cfg.items() if k in mapped}
    for key in (
        "d_model",
        "n_layer",
        "vocab_size",
        "residual_in_fp32",
        "pad_vocab_size_multiple",
        "tie_embeddings",
        "d_intermediate",
        "attn_layer_idx",
        "attn_cfg",
    ):
        if key in d:
            kwargs[key] = d[key]
    return _build_config(kwargs, where, cls=MambaConfig if layer == "Mamba1" else Mamba2Config)


def config_to_mamba_ssm(config: AnyMambaConfig) -> dict[str, Any]:
    """mamba-ssm ``MambaConfig`` dict for ``config`` (its norm ε is fixed at 1e-5)."""
    if config.norm_eps != 1e-5:
        raise ValueError(f"mamba-ssm format fixes norm_eps at 1e-5, config has norm_eps={config.norm_eps}")
    if getattr(config, "mixer_rms_eps", None) is not None:
        raise ValueError(
            "Falcon-Mamba has no mamba-ssm format (mamba-ssm's Mamba has no δ/B/C norms); save as hf"
        )
    return {
        "d_model": config.d_model,
        "d_intermediate": config.d_intermediate,
        "n_layer": config.n_layer,
        "vocab_size": config.vocab_size,
        "ssm_cfg": {
            "layer": config.layer,
            **_json_ready({k: v for k, v in config.mixer_kwargs().items() if k != "bcdt_rms_eps"}),
        },
        "attn_layer_idx": list(config.attn_layer_idx),
        "attn_cfg": dict(config.attn_cfg),
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }


def detect_format(d: dict[str, Any], where: str = "config.json") -> str:
    """'hf' when config.json has transformers' names (hidden_size), 'mamba-ssm' for d_model."""
    if "hidden_size" in d:
        return "hf"
    if "d_model" in d:
        return "mamba-ssm"
    raise ValueError(f"{where} has neither 'hidden_size' (Hugging Face) nor 'd_model' (mamba-ssm)")


QUANT_CONFIG_KEY = "quantization_config"  # transformers' key for a quantized checkpoint's scheme
QUANT_METHOD = "ssmkit"  # its quant_method for ssmkit's weight-only int8 (ssmkit.engine.quant)


def quantization_scheme(d: dict[str, Any], where: str = "config.json") -> str | None:
    """The scheme of a config.json's ``quantization_config`` written by ssmkit (None when there is
    none); ValueError for another library's quantization, which ssmkit cannot read."""
    q = d.get(QUANT_CONFIG_KEY)
    if q is None:
        return None
    if (
        not isinstance(q, dict)
        or q.get("quant_method") != QUANT_METHOD
        or not isinstance(q.get("scheme"), str)
    ):
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ValueError(
            f"{where}: {QUANT_CONFIG_KEY} with quant_method {method!r} is not supported; ssmkit reads float "
            f"weights and its own int8 ({{'quant_method': {QUANT_METHOD!r}, 'scheme': ...}})"
        )
    return q["scheme"]


def config_from_file(d: dict[str, Any], where: str = "config.json") -> AnyMambaConfig:
    """MambaConfig (Mamba-1) or Mamba2Config from a config.json dict of either format, after checking its
    model type (an ssmkit ``quantization_config`` is checked and set aside: it describes the weights)."""
    if quantization_scheme(d, where) is not None:
        d = {k: v for k, v in d.items() if k != QUANT_CONFIG_KEY}
    found = model_type(d, where)
    if found not in MODEL_TYPES:
        raise ValueError(
            f"{where}: model type {found!r} is not a Mamba model; MambaLM reads model types "
            f"{list(MODEL_TYPES)} (ssmkit.models.load.load_model dispatches on the type)"
        )
    if detect_format(d, where) == "hf":
        return config2_from_hf(d, where) if found == MODEL_TYPE_2 else config_from_hf(d, where)
    return config_from_mamba_ssm(d, where)


# ---------------------------------------------------------------------------- state dicts
def _mamba2_mixer_shapes(config: Mamba2Config, p: str) -> dict[str, tuple[int, ...]]:
    """The Mamba-2 mixer's keys (prefix ``p``) with their shapes (mamba-ssm's and transformers' names)."""
    D, E, N, H, G, W = (
        config.d_model,
        config.d_inner,
        config.d_state,
        config.nheads,
        config.ngroups,
        config.d_conv,
    )
    conv_dim = E + 2 * G * N  # x, B, C
    shapes = {p + "in_proj.weight": (2 * E + 2 * G * N + H, D)}  # [z, x, B, C, dt]
    if config.bias:
        shapes[p + "in_proj.bias"] = (2 * E + 2 * G * N + H,)
    shapes[p + "conv1d.weight"] = (conv_dim, 1, W)
    if config.conv_bias:
        shapes[p + "conv1d.bias"] = (conv_dim,)
    shapes[p + "dt_bias"] = (H,)
    shapes[p + "A_log"] = (H,)
    shapes[p + "D"] = (E,) if config.D_has_hdim else (H,)
    if config.rmsnorm:
        shapes[p + "norm.weight"] = (E,)
    shapes[p + "out_proj.weight"] = (D, E)
    if config.bias:
        shapes[p + "out_proj.bias"] = (D,)
    return shapes


def _attention_shapes(config: AnyMambaConfig, p: str) -> dict[str, tuple[int, ...]]:
    """A hybrid's attention mixer keys (mamba-ssm's MHA: in_proj = [q, k, v], out_proj) with shapes."""
    cfg, D = config.attn_cfg, config.d_model
    h = cfg["num_heads"]
    hkv = cfg.get("num_heads_kv") or h
    e = cfg.get("head_dim") or D // h
    shapes = {p + "in_proj.weight": (e * (h + 2 * hkv), D)}
    if cfg.get("qkv_proj_bias", True):
        shapes[p + "in_proj.bias"] = (e * (h + 2 * hkv),)
    shapes[p + "out_proj.weight"] = (D, e * h)
    if cfg.get("out_proj_bias", True):
        shapes[p + "out_proj.bias"] = (D,)
    return shapes


def _block_extra_shapes(config: AnyMambaConfig, p: str) -> dict[str, tuple[int, ...]]:
    """A block's GatedMLP keys (``norm2``, ``mlp.fc1``, ``mlp.fc2``) when ``d_intermediate > 0``."""
    if not config.d_intermediate:
        return {}
    D, f = config.d_model, gated_mlp_width(config.d_intermediate)
    return {p + "norm2.weight": (D,), p + "mlp.fc1.weight": (2 * f, D), p + "mlp.fc2.weight": (D, f)}


def expected_shapes(config: AnyMambaConfig) -> dict[str, tuple[int, ...]]:
    """Every key of ``MambaLM(config).state_dict()`` (mamba-ssm names) with its shape."""
    D, V = config.d_model, config.padded_vocab_size
    shapes = {"backbone.embedding.weight": (V, D)}
    for i in range(config.n_layer):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (D,)
        if i in config.attn_layer_idx:
            shapes.update(_attention_shapes(config, p + "mixer."))
        elif isinstance(config, Mamba2Config):
            shapes.update(_mamba2_mixer_shapes(config, p + "mixer."))
        else:
            shapes.update(_mamba1_mixer_shapes(config, p + "mixer."))
        shapes.update(_block_extra_shapes(config, p))
    return {**shapes, "backbone.norm_f.weight": (D,), "lm_head.weight": (V, D)}


def _mamba1_mixer_shapes(config: MambaConfig, p: str) -> dict[str, tuple[int, ...]]:
    """The Mamba-1 mixer's keys (prefix ``p``) with their shapes."""
    D, E, N, R, W = config.d_model, config.d_inner, config.d_state, config.resolved_dt_rank, config.d_conv
    shapes = {p + "A_log": (E, N), p + "D": (E,), p + "in_proj.weight": (2 * E, D)}
    if config.bias:
        shapes[p + "in_proj.bias"] = (2 * E,)
    shapes[p + "conv1d.weight"] = (E, 1, W)
    if config.conv_bias:
        shapes[p + "conv1d.bias"] = (E,)
    shapes[p + "x_proj.weight"] = (R + 2 * N, E)
    shapes[p + "dt_proj.weight"] = (E, R)
    shapes[p + "dt_proj.bias"] = (E,)
    shapes[p + "out_proj.weight"] = (D, E)
    if config.bias:
        shapes[p + "out_proj.bias"] = (D,)
    return shapes


def check_state_dict(
    config: AnyMambaConfig, state_dict: dict[str, Tensor], source: str = "checkpoint"
) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped key (mamba-ssm names)."""
    shapes = {k: (tuple(v.shape), v.is_floating_point()) for k, v in state_dict.items()}
    check_shapes(config, shapes, source)


def check_shapes(
    config: AnyMambaConfig, shapes: dict[str, tuple[tuple[int, ...], bool]], source: str = "checkpoint"
) -> None:
    """``check_state_dict`` on (shape, is floating) per key, so that a file's header is enough."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshaped = [
        f"{k}: expected {expected[k]}, got {shape}"
        for k, (shape, _) in shapes.items()
        if k in expected and shape != expected[k]
    ]
    not_float = [k for k, (_, floating) in shapes.items() if k in expected and not floating]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys [{'; '.join(misshaped)}]")
    if not_float:
        problems.append(f"non-floating keys {not_float}")
    if problems:
        raise ValueError(f"{source} does not match the config: " + "; ".join(problems))


def inspect_checkpoint(path: str | Path) -> tuple[AnyMambaConfig, dict[str, tuple[int, ...]]]:
    """Recognise a safetensors model folder (single file or sharded with an index) and check every
    tensor's shape against its config.json from the files' headers alone — no tensor is read, so a
    7B folder is checked in milliseconds. Returns (config, {mamba-ssm key: shape}); ValueError naming
    the file and every mismatch otherwise."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    config = config_from_file(read_config(folder), str(folder / "config.json"))
    if (folder / "model.safetensors").is_file():
        files, source = [folder / "model.safetensors"], folder / "model.safetensors"
    elif (folder / "model.safetensors.index.json").is_file():
        files, source = (
            read_index(folder, "model.safetensors.index.json"),
            folder / "model.safetensors.index.json",
        )
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{source} names the shard {file.name}, which is not in {folder}")
        try:
            with safe_open(file, "pt") as fh:
                for name in fh.keys():
                    part = fh.get_slice(name)
                    key = "backbone.embedding.weight" if name == "backbone.embeddings.weight" else name
                    shapes[key] = (tuple(part.get_shape()), part.get_dtype().startswith(("F", "BF")))
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file ({err})") from None
    if config.tie_embeddings and "backbone.embedding.weight" in shapes:
        shapes.setdefault("lm_head.weight", shapes["backbone.embedding.weight"])
    check_shapes(config, shapes, str(source))
    return config, {k: shape for k, (shape, _) in shapes.items()}


def load_checkpoint(path: str | Path) -> tuple[AnyMambaConfig, dict[str, Tensor]]:
    """Read a local folder (HF or mamba-ssm format) into (config, state dict with mamba-ssm keys).

    The state dict is complete and validated against the config (tied heads filled in), so it loads into
    ``MambaLM(config)`` with ``strict=True``. Raises FileNotFoundError / ValueError naming what is wrong.
    """
    folder = Path(path)
    raw = read_config(folder)
    config = config_from_file(raw, str(folder / "config.json"))
    scheme = quantization_scheme(raw, str(folder / "config.json"))
    if scheme is not None:
        raise ValueError(
            f"{folder}: the weights are quantized ({scheme}, written by ssmkit.quantize + save_pretrained); "
            "MambaLM.from_pretrained loads them, but they cannot be converted or read as float weights — "
            "convert the float model instead"
        )
    tensors, source = read_weights(folder)
    sd = {
        ("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
        for k, v in tensors.items()
    }
    if config.tie_embeddings and "backbone.embedding.weight" in sd:
        emb = sd["backbone.embedding.weight"]
        head = sd.get("lm_head.weight")
        if head is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise ValueError(
                f"{folder / source}: tie_embeddings is set but lm_head.weight differs from the embedding"
            )
        sd["lm_head.weight"] = emb
    check_state_dict(config, sd, source=str(folder / source))
    return config, sd


# ---------------------------------------------------------------------------- writing
def _config_dict(config: AnyMambaConfig, format: str) -> dict[str, Any]:
    if format == "hf":
        return config_to_hf(config) if isinstance(config, MambaConfig) else config2_to_hf(config)
    return config_to_mamba_ssm(config)


def _json_ready(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists (JSON arrays), as mamba-ssm's own config.json holds them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _write_json(target: Path, data: dict[str, Any]) -> None:
    atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    path: str | Path, config: AnyMambaConfig, state_dict: dict[str, Tensor], format: str = "hf"
) -> None:
    """Write ``config.json`` and weights for ``state_dict`` (mamba-ssm keys) in ``format``.

    ``"hf"``: model.safetensors with ``backbone.embeddings.weight`` and no ``lm_head.weight`` when tied
    (exactly what transformers writes), config.json's ``"dtype"`` the weights' dtype. ``"mamba-ssm"``:
    pytorch_model.bin with mamba-ssm's keys (its config.json has no dtype key; the tensors keep theirs).
    Weights are written before config.json; each file atomically.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    check_state_dict(config, state_dict, source="state_dict")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    config_dict = _config_dict(config, format)  # before any write: it can refuse the config
    if format == "hf":  # the dtype the weights hold (the first parameter's, as transformers' model.dtype)
        from ssmkit.models.folder import dtype_name

        config_dict["dtype"] = dtype_name(state_dict["backbone.embedding.weight"].dtype)
    if format == "hf":
        from safetensors.torch import save_file

        tensors["backbone.embeddings.weight"] = tensors.pop("backbone.embedding.weight")
        if config.tie_embeddings:
            tensors.pop("lm_head.weight")
        atomic_save(
            folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
        )
    else:
        atomic_save(folder / "pytorch_model.bin", lambda tmp: torch.save(tensors, tmp))
    _write_json(folder / "config.json", config_dict)


def save_quantized_checkpoint(path: str | Path, model) -> None:
    """Write a quantized ``MambaLM`` (``ssmkit.quantize``) as a folder: model.int8.safetensors with the int8
    weights and their scales (``ssmkit.engine.save_quantized``), then config.json in Hugging Face format
    with the scheme under ``quantization_config`` (transformers' key for a quantized checkpoint).
    transformers does not know this scheme, so the weights file is not named model.safetensors: there
    ``MambaForCausalLM.from_pretrained`` refuses the folder (no weights file) instead of loading it with
    every matrix missing, which is what it does with an unknown quantization_config and a model.safetensors
    (``ssmkit.models.folder.QUANTIZED_WEIGHTS``)."""
    from ssmkit.engine.quant import SCHEME, save_quantized
    from ssmkit.models.folder import QUANTIZED_WEIGHTS, dtype_name

    config = model.config
    config_dict = _config_dict(config, "hf")  # before any write: it can refuse the config
    config_dict["dtype"] = dtype_name(model.lm_head.scale.dtype)
    config_dict[QUANT_CONFIG_KEY] = {"quant_method": QUANT_METHOD, "scheme": SCHEME}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in weight_files(folder, "mamba-ssm") + weight_files(folder, "hf"):
        stale.unlink()  # an old float save would shadow or contradict the new file
    save_quantized(model, folder / QUANTIZED_WEIGHTS)
    _write_json(folder / "config.json", config_dict)


def convert_checkpoint(
    src: str | Path, dst: str | Path, to: str = "hf", force: bool = False
) -> AnyMambaConfig:
    """Convert a checkpoint folder to ``to`` format without building a model. Returns the config.

    ``dst`` must be empty or missing, unless ``force``: then the weight files of the other format (and
    any stale index and shards) and tokenizer files that ``src`` lacks are removed from ``dst``, so that
    loading ``dst`` can only ever give the converted weights. ``src``'s tokenizer files are copied over.
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"src and dst must differ, both are {src}")
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"destination {dst} is a file, expected a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        held = sorted(p.name for p in dst.iterdir())
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise FileExistsError(
            f"destination {dst} is not empty (it holds {shown}); choose an empty folder, or pass --force "
            "to replace the model files in it"
        )
    config, sd = load_checkpoint(src)  # everything is read and checked before dst is touched
    _config_dict(config, to)  # and the config can be written in this format
    if dst.is_dir():
        other = "mamba-ssm" if to == "hf" else "hf"
        stale = weight_files(dst, other) + [p for p in weight_files(dst, to) if p.name != WEIGHT_FILES[to][0]]
        stale += [
            dst / name for name in TOKENIZER_FILES if (dst / name).is_file() and not (src / name).is_file()
        ]
        for p in stale:
            p.unlink()
    save_checkpoint(dst, config, sd, format=to)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_save(dst / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
    return config
