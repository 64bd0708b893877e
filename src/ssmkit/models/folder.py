"""A model folder on disk, read safely: config.json, the weights (safetensors, sharded, PyTorch pickle).

Every reader raises one FileNotFoundError / NotADirectoryError / ValueError whose one line names the file
and says what was expected — never a raw JSON, safetensors or unpickling error:

    read_config(folder)     config.json as a dict (UTF-8 JSON object; a run folder or a training
                            checkpoint passed instead is recognised and the right path suggested)
    model_type(config)      its "model_type", or for mamba-ssm's config.json (which has none) the type of
                            its ssm_cfg.layer ("Mamba1" -> "mamba", "Mamba2" -> "mamba2")
    read_weights(folder)    model.safetensors | model.safetensors.index.json | pytorch_model.bin.index.json
                            | pytorch_model.bin, whichever comes first
    read_safetensors(file)  a truncated or empty file is named as such
    read_pickle(file)       ``torch.load(weights_only=True)`` of a flat {name: tensor} dict; other objects
                            are refused (unpickling them can run code) and torch's advice to load with
                            weights_only=False is never passed on
    read_index(folder, n)   the shards of an index; shard paths that are absolute or contain ".." are
                            refused (lexically: symlinks inside the folder, as in a Hub cache, still work)
    model_dtype(dtype, cfg) the dtype to build a model in: ``dtype`` (a torch.dtype or its name) when
                            given, else config.json's "dtype" (transformers 5) or "torch_dtype" (4.x),
                            else float32
    build_loaded(build, sd) a model built on the meta device (no memory, no random init) and given the
                            tensors of a state dict, in a dtype, on a device
    generation_defaults(f)  the decoding settings of the folder's generation_config.json, as
                            ``ssmkit.generate`` arguments (transformers' reading: greedy unless do_sample)

Glossary: "model folder" = config.json + weights (+ tokenizer files), as transformers and mamba-ssm
write them; "training checkpoint" = the checkpoint.safetensors that ``ssmkit train`` writes.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor, nn

# mamba-ssm ``ssm_cfg.layer`` -> the model type transformers uses for the same architecture
_MAMBA_SSM_LAYERS = {"Mamba1": "mamba", "Mamba2": "mamba2"}

QUANTIZED_WEIGHTS = "model.int8.safetensors"
"""The weights file of a quantized folder (``ssmkit.quantize`` + ``save_pretrained``). Not model.safetensors
on purpose: transformers skips a quantization_config it does not know and would load that file with every
matrix missing (random weights) — without its file name it refuses the folder instead."""

# The weight files of each format: the single file, the index of a sharded one, its shards.
WEIGHT_FILES = {
    "hf": ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
    "mamba-ssm": ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
}


# The dtypes a model folder may be built in, by the name transformers writes in config.json.
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------------------- reading JSON
def read_json(file: Path, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``file``; one ValueError naming the file when it is empty, not UTF-8, not
    JSON, or not an object."""
    data = file.read_bytes()
    if not data.strip():
        raise ValueError(f"{file} is empty; expected {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text (byte {err.start}); expected {what}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); expected {what}"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file} holds a JSON {type(obj).__name__}; expected {what}")
    return obj


def not_a_model_folder(folder: Path) -> str:
    """Why ``folder`` is not a model folder, and what to pass instead when we can tell."""
    if not folder.exists():
        return f"model folder {folder} does not exist"
    if folder.is_file():
        hint = (
            "; a training checkpoint is read by `ssmkit eval`"
            if folder.suffix == ".safetensors"
            else f"; pass the folder that holds config.json and the weights (e.g. {folder.parent})"
        )
        return f"{folder} is a file, expected a model folder (config.json + weights){hint}"
    msg = f"{folder} is not a model folder: it has no config.json"
    if (folder / "model" / "config.json").is_file():
        return f"{msg}; it looks like a training run folder, pass its model folder {folder / 'model'}"
    if (folder / "checkpoint.safetensors").is_file():
        return (
            f"{msg}; it holds a training checkpoint, which `ssmkit eval "
            f"{folder / 'checkpoint.safetensors'}` evaluates"
        )
    return msg


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a model folder as a dict (FileNotFoundError / ValueError naming the file)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        if folder.is_file():
            raise NotADirectoryError(not_a_model_folder(folder))
        raise FileNotFoundError(not_a_model_folder(folder))
    return read_json(folder / "config.json", "a JSON object (the model's config)")


def model_type(config: dict[str, Any], where: str = "config.json") -> str:
    """The model type a config.json describes: its ``model_type``, or for mamba-ssm's config.json (which
    has none) the type of its ``ssm_cfg.layer`` ("Mamba1" -> "mamba", "Mamba2" -> "mamba2")."""
    found = config.get("model_type")
    if found is not None:
        if not isinstance(found, str):
            raise ValueError(f"{where}: model_type must be a string, got {found!r}")
        return found
    if "d_model" in config:  # mamba-ssm layout
        ssm_cfg = config.get("ssm_cfg") or {}
        if not isinstance(ssm_cfg, dict):
            raise ValueError(f"{where}: ssm_cfg must be a JSON object, got {ssm_cfg!r}")
        layer = ssm_cfg.get("layer", "Mamba1")
        if layer not in _MAMBA_SSM_LAYERS:
            raise ValueError(
                f"{where}: ssm_cfg.layer {layer!r} is not a mamba-ssm layer (expected one of "
                f"{sorted(_MAMBA_SSM_LAYERS)})"
            )
        return _MAMBA_SSM_LAYERS[layer]
    raise ValueError(f"{where} has no 'model_type' (nor mamba-ssm's 'd_model'); cannot tell what model it is")


def dtype_name(dtype: torch.dtype) -> str:
    """The config.json name of a model dtype ("float32", "bfloat16", ...): ``str(torch.float32)`` less
    its ``torch.`` prefix, as transformers writes it."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: Any, where: str = "dtype") -> torch.dtype:
    """``value`` (a torch.dtype or its name, e.g. "bfloat16") as one of the model dtypes
    (:data:`DTYPES`); ValueError naming ``where`` otherwise."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{where} must be one of {list(DTYPES)} (or the torch.dtype), got {value!r}")


def model_dtype(dtype: Any, config: dict[str, Any], where: str = "config.json") -> torch.dtype:
    """The dtype to build a model in: ``dtype`` when not None, else config.json's ``"dtype"`` (what
    transformers 5 writes) or ``"torch_dtype"`` (transformers 4.x), else float32."""
    if dtype is not None:
        return parse_dtype(dtype)
    for key in ("dtype", "torch_dtype"):
        if config.get(key) is not None:
            return parse_dtype(config[key], f"{where}: {key}")
    return torch.float32


# ---------------------------------------------------------------------------- generation_config.json
# transformers' GenerationConfig defaults for a key that generation_config.json leaves out while sampling
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _number(file: Path, data: dict[str, Any], key: str, lo: float, hi: float | None = None, lo_open=False):
    """``data[key]`` checked to be a number in [lo, hi] ((lo, hi] with ``lo_open``); None when absent."""
    value = data.get(key)
    if value is None:
        return None
    in_range = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and (hi is None or value <= hi)
    )
    if not in_range:
        bounds = f"{'(' if lo_open else '['}{lo}, {'∞)' if hi is None else f'{hi}]'}"
        raise ValueError(f"{file}: {key} must be a number in {bounds}, got {value!r}")
    return value


def _count(file: Path, data: dict[str, Any], key: str):
    """``data[key]`` checked to be an int >= 0; None when absent."""
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{file}: {key} must be an int >= 0, got {value!r}")
    return value


def generation_defaults(folder: str | Path) -> dict[str, Any]:
    """The decoding settings that ``folder/generation_config.json`` asks for, as keyword arguments of
    ``ssmkit.generate`` (temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id) plus
    max_new_tokens; ``{}`` when the folder has no such file.

    Read as transformers reads it: greedy (temperature 0) unless ``do_sample`` is true; when sampling, an
    absent temperature / top_k / top_p is transformers' default 1.0 / 50 / 1.0. ``eos_token_id`` may be
    a list (ssmkit stops on one token: the first). Other keys are ignored. Values of the wrong type or
    range are one ValueError naming the file and the key.
    """
    file = Path(folder) / "generation_config.json"
    if not file.is_file():
        return {}
    data = read_json(file, "a JSON object (generation defaults)")
    do_sample = data.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"{file}: do_sample must be true or false, got {do_sample!r}")
    sampling = {
        "temperature": _number(file, data, "temperature", 0.0),
        "top_k": _count(file, data, "top_k"),
        "top_p": _number(file, data, "top_p", 0.0, 1.0, lo_open=True),
        "min_p": _number(file, data, "min_p", 0.0, 1.0),
    }
    out: dict[str, Any] = {"temperature": 0.0}
    if do_sample:
        out = {k: _SAMPLING_DEFAULTS.get(k) if v is None else v for k, v in sampling.items()}
        out = {k: v for k, v in out.items() if v is not None}
    penalty = _number(file, data, "repetition_penalty", 0.0, lo_open=True)
    if penalty is not None:
        out["repetition_penalty"] = penalty
    if _count(file, data, "max_new_tokens") is not None:
        out["max_new_tokens"] = data["max_new_tokens"]
    eos = data.get("eos_token_id")
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if eos is not None:
        _count(file, {"eos_token_id": eos}, "eos_token_id")
        out["eos_token_id"] = eos
    return out


# ---------------------------------------------------------------------------- reading weights
# safetensors dtype names -> torch dtypes (the ones a model checkpoint holds)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; ValueError naming the file when it is empty or not readable
    (e.g. truncated by an interrupted download or copy).

    The file is validated by safetensors, then each tensor is read with ``readinto`` straight into its
    own freshly allocated tensor: the process holds the weights once — no mapping of the file stays
    resident beside the copies (what made a memory-mapped load peak near 1.4–2 × the weights)."""
    import json
    import struct

    from safetensors import SafetensorError, safe_open

    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty (0 bytes); expected safetensors weights")
    try:
        with safe_open(str(file), framework="pt"):
            pass  # the header and the file's size are checked here
    except SafetensorError as err:
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated — copy or save it again"
        ) from None
    out: dict[str, Tensor] = {}
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(
                    f"{file}: tensor {key!r} has dtype {info['dtype']}, which ssmkit does not read"
                )
            t = torch.empty(info["shape"], dtype=dtype)
            start, end = info["data_offsets"]
            if t.numel():
                fh.seek(base + start)
                if fh.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                    raise ValueError(f"{file}: tensor {key!r} is cut short; the file may be truncated")
            out[key] = t
    return out


def check_safetensors(file: Path) -> None:
    """Read only the header of ``file`` (cheap): ValueError naming it when it is missing its data."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; expected safetensors weights")
    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty (0 bytes); expected safetensors weights")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except SafetensorError as err:
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated — copy or save it again"
        ) from None


def read_pickle(file: Path) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` dict from a PyTorch pickle, loaded with ``weights_only=True``.

    Anything else (other objects, nesting, a damaged file) is one ValueError naming the file. Objects
    other than tensors in plain containers are refused, never unpickled: unpickling can run code.
    """
    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty (0 bytes); expected a PyTorch state dict")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it needs {found.group(1)})" if found else ""
        raise ValueError(
            f"{file} is not a plain tensor state dict{what}: ssmkit loads only tensors in plain "
            "containers from pickle files, because unpickling other objects can run arbitrary code; "
            "save the weights as safetensors from code you trust"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{file} is not a readable PyTorch checkpoint ({cause}); it may be truncated"
        ) from None
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{file} is not a plain tensor state dict: it holds a {type(sd).__name__}")
    bad = next(((k, v) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if bad is not None:
        raise ValueError(
            f"{file} is not a plain tensor state dict: key {bad[0]!r} holds a {type(bad[1]).__name__}, "
            "expected {name: tensor}"
        )
    return sd


def _shard_path(folder: Path, index: Path, name: Any) -> Path:
    """``folder / name`` for a shard listed in ``index``; refuses names that leave the folder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: shard names must be non-empty strings, got {name!r}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        raise ValueError(f"{index}: shard path {name!r} is absolute; shards must lie inside {folder}")
    if ".." in parts:
        raise ValueError(
            f"{index}: shard path {name!r} leaves the model folder; shards must lie inside {folder}"
        )
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{index} lists shard {name!r}, which is not in {folder}")
    return path


def read_index(folder: Path, index_name: str) -> list[Path]:
    """The shard files an ``*.index.json`` names (each inside ``folder``), in sorted order."""
    index = folder / index_name
    data = read_json(index, "a JSON object with a 'weight_map'")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"{index} has no 'weight_map' (expected an object mapping tensor names to shard files), "
            f"got keys {sorted(data)}"
        )
    return [_shard_path(folder, index, name) for name in sorted(set(weight_map.values()), key=str)]


def read_weights(folder: Path) -> tuple[dict[str, Tensor], str]:
    """(all tensors, the file they came from) of a model folder: model.safetensors, a sharded
    safetensors or pickle index, or pytorch_model.bin — the first that exists, in that order."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors"), "model.safetensors"
    for index_name, reader in (
        ("model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin.index.json", read_pickle),
    ):
        if (folder / index_name).is_file():
            tensors: dict[str, Tensor] = {}
            for shard in read_index(folder, index_name):
                tensors.update(reader(shard))
            return tensors, index_name
    if (folder / "pytorch_model.bin").is_file():
        return read_pickle(folder / "pytorch_model.bin"), "pytorch_model.bin"
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def weight_files(folder: Path, format: str) -> list[Path]:
    """The weight files of ``format`` in ``folder``: the single file, an index and its shards."""
    found = {p for pattern in WEIGHT_FILES[format] for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


# ---------------------------------------------------------------------------- building the model
def build_loaded(
    build: Callable[[], nn.Module],
    state_dict: dict[str, Tensor],
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> nn.Module:
    """``build()`` run on the meta device (no memory, no random initialisation), then given the tensors
    of ``state_dict`` (strict: every key, none extra), cast to ``dtype`` and moved to ``device``;
    ``state_dict`` is emptied on the way (each tensor leaves it once copied).

    Parameters keep their Python attributes (optimiser metadata such as ``_no_weight_decay``), and a
    parameter that ``build()`` shares between modules (a tied LM head) stays one parameter.
    """
    with torch.device("meta"):
        model = build()
    params = list(model.named_parameters(remove_duplicate=False))
    attrs = {name: dict(p.__dict__) for name, p in params}
    first: dict[int, str] = {}
    for name, p in params:
        first.setdefault(id(p), name)
    shared = {name: first[id(p)] for name, p in params if first[id(p)] != name}
    # every tensor ends in memory of its own, of the model's dtype: one that shares a buffer (a view into
    # a file's or a pickle's storage) is copied — unaligned weights can take other, differently rounded,
    # CPU paths — and one that already owns its memory (read_safetensors' tensors) is kept as it is. The
    # tensors leave ``state_dict`` one by one, so a replaced one is freed at once and the weights are
    # held about once, not twice (benchmarks/bench_load_memory.py).
    tensors = {}
    for k in list(state_dict):
        v = state_dict.pop(k)
        owns = v.storage_offset() == 0 and v.is_contiguous() and v.untyped_storage().nbytes() == v.nbytes
        target = dtype if v.is_floating_point() else v.dtype
        tensors[k] = v.to(device=device, dtype=target, copy=not owns)
        del v
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, p in model.named_parameters(remove_duplicate=False):
        p.__dict__.update(attrs[name])
    for name, owner in shared.items():
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, model.get_parameter(owner))
    return model
