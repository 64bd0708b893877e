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

Glossary: "model folder" = config.json + weights (+ tokenizer files), as transformers and mamba-ssm
write them; "training checkpoint" = the checkpoint.safetensors that ``ssmkit train`` writes.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor

# mamba-ssm ``ssm_cfg.layer`` -> the model type transformers uses for the same architecture
_MAMBA_SSM_LAYERS = {"Mamba1": "mamba", "Mamba2": "mamba2"}

# The weight files of each format: the single file, the index of a sharded one, its shards.
WEIGHT_FILES = {
    "hf": ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
    "mamba-ssm": ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
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


def _not_a_model_folder(folder: Path) -> str:
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
            raise NotADirectoryError(_not_a_model_folder(folder))
        raise FileNotFoundError(_not_a_model_folder(folder))
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


# ---------------------------------------------------------------------------- reading weights
def read_safetensors(file: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; ValueError naming the file when it is empty or not readable
    (e.g. truncated by an interrupted download or copy)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty (0 bytes); expected safetensors weights")
    try:
        return load_file(file)
    except SafetensorError as err:
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated — copy or save it again"
        ) from None


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
