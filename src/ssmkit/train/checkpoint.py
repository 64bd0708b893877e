"""Training checkpoints: one safetensors file, written atomically (temporary file, fsync, rename; mode
0644 like every other output, through ``ssmkit.utils.atomic_save``).

Contents (tensor names → what they hold; ``__metadata__`` holds JSON strings):
    model.<name>              the model's state dict (tied weights stored once per name, as copies)
    optim.<group>.<i>.<key>   optimiser state tensors (AdamW: step, exp_avg, exp_avg_sq) of parameter i
    rng.torch / rng.cuda.<k>  torch CPU / CUDA generator states (uint8)
    rng.numpy                 numpy's MT19937 key (uint32)
    metadata["ssmkit"]        JSON: step, model spec, task spec, train config, optimiser param_groups
                              (hyper-parameters), numpy/python RNG scalars, anything the caller adds

Nothing here unpickles: loading is ``safetensors.torch.load_file`` plus ``json.loads``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ssmkit.utils import atomic_save

FORMAT = "ssmkit-train-checkpoint/1"


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def rng_state() -> tuple[dict, dict]:
    """Tensors and JSON scalars capturing the torch, CUDA, numpy and Python RNGs."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{k}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    py = random.getstate()
    return tensors, {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(tensors: dict, scalars: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, gauss = scalars["python"]
    random.setstate((v, tuple(state), gauss))


def save_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, meta: dict
) -> Path:
    """Write model + optimiser + RNG states + ``meta`` (JSON-serialisable) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
    rng_tensors, rng_meta = rng_state()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    header = {"format": FORMAT, "step": int(step), "optimizer": opt_meta, "rng": rng_meta, **meta}
    return atomic_save(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={"ssmkit": json.dumps(header)})
    )


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(tensors, header) of a checkpoint; raises ValueError if the file is not an ssmkit checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "ssmkit" not in meta:
        raise ValueError(f"{path} is not an ssmkit training checkpoint (no 'ssmkit' metadata)")
    header = json.loads(meta["ssmkit"])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format must be {FORMAT!r}, got {header.get('format')!r}")
    return load_file(str(path)), header


def model_state(tensors: dict) -> dict:
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def restore(
    tensors: dict, header: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> int:
    """Load model (strict), optimiser and RNG states from a read checkpoint; returns its step."""
    model.load_state_dict(model_state(tensors), strict=True)
    if optimizer is not None:
        om = header["optimizer"]
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        for k, v in om["scalars"].items():
            idx, key = k.split(".", 1)
            state.setdefault(int(idx), {})[key] = v
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in om["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    set_rng_state(tensors, header["rng"])
    return int(header["step"])
