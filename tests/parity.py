"""Helpers of the parity tests against transformers (import as ``from parity import perturb, rel_diff``)."""

import torch


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move every parameter off its structured init (zero biases, unit norms, A_log, Δ bias, D = 1) by
    seeded Gaussian noise, so that no initialisation convention can hide a mismatch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    return float((actual - expected).abs().max() / expected.abs().max())
