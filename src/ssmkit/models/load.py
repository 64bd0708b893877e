"""Load any ssmkit language model, from a folder or a Hub id: read config.json, dispatch on its model type.

    load_model(name_or_path, revision=None, dtype=None, device=None, cache_dir=None,
               local_files_only=None) -> MambaLM | TransformerLM

A Hub id ("org/name") is resolved to a snapshot folder in the Hugging Face cache first
(``ssmkit.models.hub.resolve``: offline, the cache only; ``pip install 'ssmkit[hub]'``).

The model type is checked first, so a folder of another architecture (a transformers Llama, a Mamba-2
model) is one line naming the type found and the types supported — not a long list of missing and
unexpected weights. Types (``model_type`` in config.json; mamba-ssm's config.json has none and is typed
by its ``ssm_cfg.layer``, see ``ssmkit.models.folder.model_type``):

    "mamba"               Mamba-1: transformers' MambaForCausalLM or mamba-ssm's MambaLMHeadModel folder
                          -> MambaLM.from_pretrained
    "mamba2"              Mamba-2: transformers' Mamba2ForCausalLM or mamba-ssm's MambaLMHeadModel with
                          ssm_cfg.layer "Mamba2" -> MambaLM.from_pretrained (Mamba-2 mixers)
    "ssmkit-transformer"  written by TransformerLM.save_pretrained -> TransformerLM.from_pretrained

This is the only module that imports both model classes (``checkpoint`` and ``folder`` import neither:
``mamba_lm`` imports ``checkpoint``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssmkit.models import checkpoint, folder
from ssmkit.models.folder import parse_dtype
from ssmkit.models.hub import resolve
from ssmkit.models.mamba_lm import MambaLM
from ssmkit.models.transformer_lm import MODEL_TYPE as TRANSFORMER_TYPE
from ssmkit.models.transformer_lm import TransformerLM

# model_type -> (what it is, in words; the class that loads it)
MODEL_TYPES: dict[str, tuple[str, type[nn.Module]]] = {
    checkpoint.MODEL_TYPE: ("Mamba-1, Hugging Face or mamba-ssm folder", MambaLM),
    checkpoint.MODEL_TYPE_2: ("Mamba-2, Hugging Face or mamba-ssm folder", MambaLM),
    checkpoint.MODEL_TYPE_FALCON: ("Falcon-Mamba, Hugging Face folder", MambaLM),
    TRANSFORMER_TYPE: ("ssmkit's Transformer baseline", TransformerLM),
}


def supported_types() -> str:
    """The supported model types in words, for error messages."""
    return ", ".join(f"{name!r} ({what})" for name, (what, _) in MODEL_TYPES.items())


def model_type_of(path: str | Path) -> str:
    """The model type of the model folder ``path``, checked to be one ssmkit loads (ValueError if not)."""
    where = Path(path) / "config.json"
    found = folder.model_type(folder.read_config(path), str(where))
    if found not in MODEL_TYPES:
        raise ValueError(f"{where}: model type {found!r} is not supported; ssmkit loads {supported_types()}")
    return found


def load_model(
    name_or_path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> nn.Module:
    """The model saved in the folder or Hub id ``name_or_path`` (in training mode, as ``from_pretrained``
    returns it). The id is resolved once (``ssmkit.models.hub.resolve``), the model type read from its
    config.json, and the class of that type loads the folder; arguments as ``MambaLM.from_pretrained``.

    Raises FileNotFoundError / NotADirectoryError / ValueError with one line naming the file and the cause.
    """
    if dtype is not None:
        parse_dtype(dtype)  # a bad argument is refused before anything is read or fetched
    path = resolve(name_or_path, revision, cache_dir, local_files_only)
    return MODEL_TYPES[model_type_of(path)][1].from_pretrained(path, dtype=dtype, device=device)
