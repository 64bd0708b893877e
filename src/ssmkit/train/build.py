"""Rebuild what a checkpoint describes: the model (from its JSON spec) and the task.

Specs are plain JSON stored in every training checkpoint, so ``ssmkit eval CKPT`` needs nothing else
(the task half is each task's ``spec()``, rebuilt by ``ssmkit.tasks.build_task``):

    model: {"kind": "sequence", "config": {SequenceModelConfig fields}}   (SSM ablation or attention)
           {"kind": "mamba_lm", "config": {MambaConfig fields}}
           {"kind": "mamba2_lm", "config": {Mamba2Config fields}}
           {"kind": "transformer_lm", "config": {TransformerConfig fields}}
    task:  {"task": "selective-copying" | "induction-heads" | "copying", "seq_len", "vocab_size",
            "seed", "n_tokens"}
           {"task": "lm", "data", "tokenizer", "seq_len", "val_fraction", "max_bytes", "seed",
            "token_cache"}                                                   (``ssmkit train --task lm``)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ssmkit.models.config import Mamba2Config, MambaConfig
from ssmkit.models.mamba_lm import MambaLM
from ssmkit.models.sequence import SequenceModel, SequenceModelConfig
from ssmkit.models.transformer_lm import TransformerConfig, TransformerLM
from ssmkit.tasks import build_task
from ssmkit.train.checkpoint import model_state, read_checkpoint
from ssmkit.utils import config_from_dict

__all__ = ["build_model", "build_task", "load_trained", "model_spec", "sequence_model_spec", "task_spec"]

ModelConfig = SequenceModelConfig | MambaConfig | Mamba2Config | TransformerConfig


def sequence_model_spec(**config) -> dict:
    """Spec of a ``SequenceModel``; validates the fields by building the config."""
    return model_spec(SequenceModelConfig(**config))


def model_spec(config: ModelConfig) -> dict:
    """The JSON spec ({"kind", "config"}) of a model config."""
    if isinstance(config, SequenceModelConfig):
        return {"kind": "sequence", "config": asdict(config)}
    if isinstance(config, MambaConfig):
        return {"kind": "mamba_lm", "config": config.to_dict()}
    if isinstance(config, Mamba2Config):
        return {"kind": "mamba2_lm", "config": config.to_dict()}
    if isinstance(config, TransformerConfig):
        return {"kind": "transformer_lm", "config": config.to_dict()}
    raise ValueError(
        "model config: expected a SequenceModelConfig, MambaConfig, Mamba2Config or TransformerConfig, "
        f"got {config!r}"
    )


def build_model(spec: dict, where: str = "model spec") -> torch.nn.Module:
    """A freshly initialised float32 model from its spec (uses the current torch RNG).

    The config is read strictly: an unknown key or a wrong type is one ValueError naming ``where`` (e.g.
    the checkpoint). ``.float()`` makes the training dtype explicit whatever torch's default dtype is.
    """
    kind, config = spec.get("kind"), spec.get("config")
    where = f"{where} ({kind})"
    if kind == "sequence":
        return SequenceModel(config_from_dict(SequenceModelConfig, config, where)).float()
    if kind == "mamba_lm":
        return MambaLM(MambaConfig.from_dict(config, where)).float()
    if kind == "mamba2_lm":
        return MambaLM(Mamba2Config.from_dict(config, where)).float()
    if kind == "transformer_lm":
        return TransformerLM(TransformerConfig.from_dict(config, where)).float()
    raise ValueError(
        f"{where}: kind must be 'sequence', 'mamba_lm', 'mamba2_lm' or 'transformer_lm', got {kind!r}"
    )


def task_spec(name: str, seq_len: int, vocab_size: int, seed: int = 0, n_tokens: int = 16) -> dict:
    """Spec of a synthetic task (what its ``spec()`` returns)."""
    return {"task": name, "seq_len": seq_len, "vocab_size": vocab_size, "seed": seed, "n_tokens": n_tokens}


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model with the checkpoint's weights, in eval mode; the checkpoint header)."""
    tensors, header = read_checkpoint(path)
    if "model" not in header:
        raise ValueError(f"{path} has no model spec (was it written by ssmkit train?)")
    model = build_model(header["model"], where=f"{path}: model spec")
    model.load_state_dict(model_state(tensors), strict=True)
    return model.eval(), header
