"""Checkpoint I/O for :class:`ssmkit.MambaLM`: Hugging Face format and mamba-ssm format, local folders only.

Two on-disk formats hold the same weights (reference/mamba.md §1.8, §2.1, §2.4):

    Hugging Face (transformers ``MambaForCausalLM``)       mamba-ssm (``MambaLMHeadModel``)
    config.json: hidden_size, num_hidden_layers,           config.json: d_model, n_layer, vocab_size
      state_size, conv_kernel, expand, time_step_*, ...      (unpadded), ssm_cfg {d_state, ...}, ...
      vocab_size (already padded)
    model.safetensors (or sharded, with an index)           pytorch_model.bin (pickle; read with
                                                              weights_only=True) or model.safetensors
    backbone.embeddings.weight                              backbone.embedding.weight
    lm_head.weight omitted when tied                        lm_head.weight always present

Every other key is identical. In memory we use mamba-ssm's keys (``MambaLM.state_dict()``). Loading
checks the whole state dict against the shapes the config implies *before* any model is built, and
reports every missing, unexpected and mis-shaped key by name in one ValueError — nothing is half loaded.
Config keys that neither format defines raise one warning naming them. Writes are atomic (temporary
file in the same folder, then ``os.replace``). Nothing is fetched from the network.

Field mapping (ours = mamba-ssm's names; HF name in brackets): d_model [hidden_size], n_layer
[num_hidden_layers], d_state [state_size], d_conv [conv_kernel], expand [expand, intermediate_size =
expand·hidden_size], dt_rank [time_step_rank], dt_min/dt_max [time_step_min/max], dt_init
[time_step_init_scheme], dt_scale [time_step_scale], dt_init_floor [time_step_floor], conv_bias
[use_conv_bias], bias [use_bias], norm_eps [layer_norm_epsilon], residual_in_fp32 [same],
tie_embeddings [tie_word_embeddings]. HF stores the padded vocabulary only, so a model read from HF
format has vocab_size = the padded size.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssmkit.models.config import MambaConfig

FORMATS = ("hf", "mamba-ssm")

# HF config keys we map to MambaConfig fields.
_HF_MAPPED = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
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
# HF config keys that are checked or irrelevant to the weights (no warning). Includes the legacy
# mamba-ssm keys that the released ``*-hf`` checkpoints carry.
_HF_KNOWN = {
    "vocab_size", "intermediate_size", "hidden_act", "pad_vocab_size_multiple",
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "rescale_prenorm_residual",
    "use_cache", "use_mambapy", "use_associative_scan", "return_dict", "output_hidden_states",
    "output_attentions", "d_model", "d_inner", "n_layer", "rms_norm", "fused_add_norm", "ssm_cfg",
}  # fmt: skip
_SSM_CFG_MAPPED = {
    "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
    "conv_bias", "bias",
}  # fmt: skip
_MAMBA_SSM_KNOWN = {
    "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
    "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings",
}  # fmt: skip


def _warn_unknown(keys, where: str) -> None:
    keys = sorted(keys)
    if keys:
        warnings.warn(f"{where}: ignoring unknown config fields {keys}", UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------- configs
def config_from_hf(d: dict[str, Any]) -> MambaConfig:
    """MambaConfig from a transformers ``MambaConfig`` dict (config.json)."""
    _warn_unknown(set(d) - set(_HF_MAPPED) - _HF_KNOWN, "Hugging Face config.json")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key not in d:
            raise ValueError(f"Hugging Face config.json lacks required field {key!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only hidden_act='silu' is supported, config.json has {d['hidden_act']!r}")
    kwargs = {ours: d[hf] for hf, ours in _HF_MAPPED.items() if hf in d}
    if kwargs.get("dt_rank") == math.ceil(d["hidden_size"] / 16):
        kwargs["dt_rank"] = "auto"  # transformers stores the resolved rank; keep the round trip exact
    kwargs.setdefault("bias", False)  # transformers' default (some 5.x-era versions differed; be explicit)
    kwargs.setdefault("tie_embeddings", True)
    expand = kwargs.get("expand", 2)
    if "intermediate_size" in d and d["intermediate_size"] != int(expand * d["hidden_size"]):
        raise ValueError(
            f"config.json intermediate_size={d['intermediate_size']} must equal expand*hidden_size = "
            f"{int(expand * d['hidden_size'])}"
        )
    vocab = d["vocab_size"]
    pad = d.get("pad_vocab_size_multiple", 1)
    pad = pad if isinstance(pad, int) and pad > 0 and vocab % pad == 0 else 1
    return MambaConfig(vocab_size=vocab, pad_vocab_size_multiple=pad, **kwargs)


def config_to_hf(config: MambaConfig) -> dict[str, Any]:
    """transformers ``MambaConfig`` dict for ``config`` (vocab_size is the padded size)."""
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
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
        "dtype": "float32",
    }


def config_from_mamba_ssm(d: dict[str, Any]) -> MambaConfig:
    """MambaConfig from a mamba-ssm ``MambaConfig`` dict (config.json)."""
    _warn_unknown(set(d) - _MAMBA_SSM_KNOWN, "mamba-ssm config.json")
    for key in ("d_model", "n_layer", "vocab_size"):
        if key not in d:
            raise ValueError(f"mamba-ssm config.json lacks required field {key!r}")
    if d.get("d_intermediate", 0) != 0:
        raise ValueError(f"d_intermediate must be 0 (no MLP; Mamba-1 only), got {d['d_intermediate']!r}")
    if d.get("attn_layer_idx") or d.get("attn_cfg"):
        raise ValueError(
            f"hybrid attention layers are not supported, attn_layer_idx={d.get('attn_layer_idx')!r}"
        )
    if not d.get("rms_norm", True):
        raise ValueError("rms_norm must be true (LayerNorm models are not supported)")
    ssm_cfg = dict(d.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ValueError(f"ssm_cfg.layer must be 'Mamba1', got {layer!r}")
    ssm_cfg.pop("use_fast_path", None)
    _warn_unknown(set(ssm_cfg) - _SSM_CFG_MAPPED, "mamba-ssm config.json ssm_cfg")
    kwargs = {k: v for k, v in ssm_cfg.items() if k in _SSM_CFG_MAPPED}
    for key in ("residual_in_fp32", "pad_vocab_size_multiple", "tie_embeddings"):
        if key in d:
            kwargs[key] = d[key]
    return MambaConfig(d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"], **kwargs)


def config_to_mamba_ssm(config: MambaConfig) -> dict[str, Any]:
    """mamba-ssm ``MambaConfig`` dict for ``config`` (its norm ε is fixed at 1e-5)."""
    if config.norm_eps != 1e-5:
        raise ValueError(f"mamba-ssm format fixes norm_eps at 1e-5, config has norm_eps={config.norm_eps}")
    return {
        "d_model": config.d_model,
        "d_intermediate": 0,
        "n_layer": config.n_layer,
        "vocab_size": config.vocab_size,
        "ssm_cfg": {"layer": "Mamba1", **config.mixer_kwargs()},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }


def detect_format(d: dict[str, Any]) -> str:
    """'hf' when config.json has transformers' names (hidden_size / model_type mamba), else 'mamba-ssm'."""
    if "hidden_size" in d or d.get("model_type") == "mamba":
        return "hf"
    if "d_model" in d:
        return "mamba-ssm"
    raise ValueError("config.json has neither 'hidden_size' (Hugging Face) nor 'd_model' (mamba-ssm)")


# ---------------------------------------------------------------------------- state dicts
def expected_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """Every key of ``MambaLM(config).state_dict()`` (mamba-ssm names) with its shape."""
    D, E, N, R, W, V = (
        config.d_model,
        config.d_inner,
        config.d_state,
        config.resolved_dt_rank,
        config.d_conv,
        config.padded_vocab_size,
    )
    shapes: dict[str, tuple[int, ...]] = {"backbone.embedding.weight": (V, D)}
    for i in range(config.n_layer):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (D,)
        shapes[p + "mixer.A_log"] = (E, N)
        shapes[p + "mixer.D"] = (E,)
        shapes[p + "mixer.in_proj.weight"] = (2 * E, D)
        if config.bias:
            shapes[p + "mixer.in_proj.bias"] = (2 * E,)
        shapes[p + "mixer.conv1d.weight"] = (E, 1, W)
        if config.conv_bias:
            shapes[p + "mixer.conv1d.bias"] = (E,)
        shapes[p + "mixer.x_proj.weight"] = (R + 2 * N, E)
        shapes[p + "mixer.dt_proj.weight"] = (E, R)
        shapes[p + "mixer.dt_proj.bias"] = (E,)
        shapes[p + "mixer.out_proj.weight"] = (D, E)
        if config.bias:
            shapes[p + "mixer.out_proj.bias"] = (D,)
    shapes["backbone.norm_f.weight"] = (D,)
    shapes["lm_head.weight"] = (V, D)
    return shapes


def check_state_dict(config: MambaConfig, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped key (mamba-ssm names)."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: expected {expected[k]}, got {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    not_float = [
        f"{k}: {v.dtype}" for k, v in state_dict.items() if k in expected and not v.is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys [{'; '.join(misshaped)}]")
    if not_float:
        problems.append(f"non-floating keys [{'; '.join(not_float)}]")
    if problems:
        raise ValueError(f"{source} does not match the config: " + "; ".join(problems))


def _read_tensors(folder: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors"), "model.safetensors"
    for index_name, loader in (
        ("model.safetensors.index.json", lambda f: load_file(f)),
        ("pytorch_model.bin.index.json", lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            tensors: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(loader(folder / shard))
            return tensors, index_name
    if (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise ValueError(f"{folder / 'pytorch_model.bin'} is not a flat state dict of tensors")
        return sd, "pytorch_model.bin"
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def load_checkpoint(path: str | Path) -> tuple[MambaConfig, dict[str, Tensor]]:
    """Read a local folder (HF or mamba-ssm format) into (config, state dict with mamba-ssm keys).

    The state dict is complete and validated against the config (tied heads filled in), so it loads into
    ``MambaLM(config)`` with ``strict=True``. Raises FileNotFoundError / ValueError naming what is wrong.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: no config.json")
    raw = json.loads((folder / "config.json").read_text())
    fmt = detect_format(raw)
    config = config_from_hf(raw) if fmt == "hf" else config_from_mamba_ssm(raw)
    tensors, source = _read_tensors(folder)
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
def _atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``target`` (same folder, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(target: Path, data: dict[str, Any]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(target, write)


def save_checkpoint(
    path: str | Path, config: MambaConfig, state_dict: dict[str, Tensor], format: str = "hf"
) -> None:
    """Write ``config.json`` and weights for ``state_dict`` (mamba-ssm keys) in ``format``.

    ``"hf"``: model.safetensors with ``backbone.embeddings.weight`` and no ``lm_head.weight`` when tied
    (exactly what transformers writes). ``"mamba-ssm"``: pytorch_model.bin with mamba-ssm's keys.
    Weights are written before config.json; each file atomically.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    check_state_dict(config, state_dict, source="state_dict")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if format == "hf":
        from safetensors.torch import save_file

        tensors["backbone.embeddings.weight"] = tensors.pop("backbone.embedding.weight")
        if config.tie_embeddings:
            tensors.pop("lm_head.weight")
        _atomic_write(
            folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
        )
        _write_json(folder / "config.json", config_to_hf(config))
    else:
        _atomic_write(folder / "pytorch_model.bin", lambda tmp: torch.save(tensors, tmp))
        _write_json(folder / "config.json", config_to_mamba_ssm(config))


def convert_checkpoint(src: str | Path, dst: str | Path, to: str = "hf") -> MambaConfig:
    """Convert a checkpoint folder to ``to`` format without building a model. Returns the config."""
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"src and dst must differ, both are {src}")
    config, sd = load_checkpoint(src)
    save_checkpoint(dst, config, sd, format=to)
    return config
