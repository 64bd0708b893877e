"""Optimiser parameter groups: weight decay and learning rate per parameter, read from visible tags.

Reference: the S4 training recipe (Gu, Goel, Ré 2022, Table 11: "SSM-parameter lr at most 0.001", no
weight decay on A, B, Δ; reference/s4.md §1.5) and mamba-ssm (``_no_weight_decay`` on A_log and D).

Rules, first match wins, for every parameter with ``requires_grad``:

    1. ``param._ssm_optim`` (a dict set by S4D, S4, S6 and the blocks on Δ, A, B, A_log, D, dt bias):
       weight decay = its "weight_decay" (default 0), lr = its "lr", else ``ssm_lr``, else ``lr``
    2. ``param._no_weight_decay`` is True (mamba-ssm's tag): no weight decay, lr
    3. a tensor with fewer than 2 dimensions (biases, norm gains, D): no weight decay, lr
    4. everything else (Linear, Conv, Embedding weights): ``weight_decay``, lr

Shared (tied) parameters are counted once. The result goes straight to ``torch.optim.AdamW``.
"""

from __future__ import annotations

from torch import nn

TAG = "_ssm_optim"


def param_groups(model: nn.Module, weight_decay: float, lr: float, ssm_lr: float | None = None) -> list[dict]:
    """Split ``model``'s trainable parameters into optimiser groups.

    Args:
        model: any module (tags are read from its parameters).
        weight_decay: decay of the ordinary weights (rule 4).
        lr: the base learning rate.
        ssm_lr: learning rate for tagged SSM parameters without their own "lr" (default: ``lr``).
    Returns:
        list of ``{"params", "lr", "weight_decay", "names"}`` dicts, one per distinct (lr, weight_decay).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if ssm_lr is not None and ssm_lr <= 0:
        raise ValueError(f"ssm_lr must be > 0 or None, got {ssm_lr}")
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        tag = getattr(p, TAG, None)
        if tag is not None:
            if not isinstance(tag, dict) or not set(tag) <= {"lr", "weight_decay"}:
                raise ValueError(f"{name}.{TAG} must be a dict with keys 'lr'/'weight_decay', got {tag!r}")
            key = (
                float(tag.get("lr", ssm_lr if ssm_lr is not None else lr)),
                float(tag.get("weight_decay", 0.0)),
            )
        elif getattr(p, "_no_weight_decay", False) or p.dim() < 2:
            key = (float(lr), 0.0)
        else:
            key = (float(lr), float(weight_decay))
        g = groups.setdefault(key, {"params": [], "lr": key[0], "weight_decay": key[1], "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())
