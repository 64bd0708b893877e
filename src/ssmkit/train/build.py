"""Rebuild what a checkpoint describes: the model (from its JSON spec) and the task.

Specs are plain JSON stored in every training checkpoint, so ``ssmkit eval CKPT`` needs nothing else:

    model: {"kind": "sequence", "config": {SequenceModelConfig fields}}   (SSM ablation or attention)
           {"kind": "mamba_lm", "config": {MambaConfig fields}}
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

from ssmkit.tasks import make_task
from ssmkit.tasks.base import Task
from ssmkit.train.checkpoint import model_state, read_checkpoint


def sequence_model_spec(**config) -> dict:
    """Spec of a ``SequenceModel``; validates the fields by building the config."""
    from ssmkit.models.sequence import SequenceModelConfig

    return {"kind": "sequence", "config": asdict(SequenceModelConfig(**config))}


def build_model(spec: dict) -> torch.nn.Module:
    """A freshly initialised float32 model from its spec (uses the current torch RNG).

    ``.float()`` makes the training dtype explicit whatever torch's default dtype is.
    """
    kind = spec.get("kind")
    if kind == "sequence":
        from ssmkit.models.sequence import SequenceModel, SequenceModelConfig

        return SequenceModel.from_config(SequenceModelConfig(**spec["config"])).float()
    if kind == "mamba_lm":
        from ssmkit.models.config import MambaConfig
        from ssmkit.models.mamba_lm import MambaLM

        return MambaLM(MambaConfig(**spec["config"])).float()
    if kind == "transformer_lm":
        from ssmkit.models.transformer_lm import TransformerConfig, TransformerLM

        return TransformerLM(TransformerConfig(**spec["config"])).float()
    raise ValueError(f"model spec kind must be 'sequence', 'mamba_lm' or 'transformer_lm', got {kind!r}")


def task_spec(name: str, seq_len: int, vocab_size: int, seed: int = 0, n_tokens: int = 16) -> dict:
    return {"task": name, "seq_len": seq_len, "vocab_size": vocab_size, "seed": seed, "n_tokens": n_tokens}


def build_task(spec: dict, verbose: bool = False) -> Task:
    """The task a spec describes; for ``lm`` the tokenizer and the (cached) token file are rebuilt."""
    if spec["task"] == "lm":
        from ssmkit.train.lm import LMDataConfig, load_lm_tokenizer, make_lm_task

        data = LMDataConfig(
            spec["data"], spec["seq_len"], spec["val_fraction"], spec["max_bytes"], spec["seed"]
        )
        return make_lm_task(load_lm_tokenizer(spec["tokenizer"]), data, spec["token_cache"], verbose)
    return make_task(
        spec["task"], spec["seq_len"], spec["vocab_size"], spec.get("seed", 0), spec.get("n_tokens", 16)
    )


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model with the checkpoint's weights, in eval mode; the checkpoint header)."""
    tensors, header = read_checkpoint(path)
    if "model" not in header:
        raise ValueError(f"{path} has no model spec (was it written by ssmkit train?)")
    model = build_model(header["model"])
    model.load_state_dict(model_state(tensors), strict=True)
    return model.eval(), header
