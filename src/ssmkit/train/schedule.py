"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler object).

    constant:  f(s) = min(1, (s+1)/W)
    wsd:       f(s) = min(1, (s+1)/W)                            for s < S − D   (warmup, stable)
               f(s) = 1 − (1-r)·(s − (S − D) + 1)/D              for s ≥ S − D   (linear decay to r),
               D = max(1, ⌊S/5⌋): the last 20 % of the steps
    cosine:    f(s) = (s+1)/W                                    for s < W   (linear warmup)
               f(s) = r + (1-r)·½(1 + cos(π·(s-W)/(S-W)))        for s ≥ W   (decay to r at s = S)

Glossary: s = step (0-based), W = warmup_steps, S = total_steps, r = min_ratio, D = decay steps.

The learning rate of a parameter group at step s is its base rate times f(s).

"wsd" (warmup–stable–decay) is the default of ``ssmkit train``: the constant phase learns as fast as
"constant", and the final decay removes the few-point swings a constant lr leaves in the last
evaluations (docs/results.md).
"""

from __future__ import annotations

import math

SCHEDULES = ("wsd", "constant", "cosine")


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step`` (see the module docstring)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay = max(1, total_steps // 5)
        start = total_steps - decay
        if step < start:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * min((step - start + 1) / decay, 1.0)
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
