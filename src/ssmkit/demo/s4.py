"""Demo section: the convolution kernels of S4D-Lin, S4D-Inv, S4D-LegS and S4 at initialisation.

Reference: Gu et al., S4D (arXiv 2206.11893) Figure 2 (kernels of the diagonal inits) and S4 (arXiv
2111.00396) §3. Nothing is trained: each panel shows K_l = C Ā^l B̄ of a layer as initialised, for three
step sizes Δ (Re A = −½ for the diagonal inits, so their kernels decay by e every 2/Δ steps), with
the same C (one complex normal draw, shared by every panel) so that only A, B and the computation
differ. S4D-LegS uses the diagonal of the normal part of HiPPO-LegS; S4 uses the full DPLR
LegS matrix, whose low-rank term makes the kernels die out faster than the diagonal part alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ssmkit.layers.s4 import S4
from ssmkit.layers.s4d import S4D
from ssmkit.utils import atomic_save

D_STATE = 64
LENGTH = 1024
DTS = (0.002, 0.01, 0.05)


def init_kernels(
    length: int = LENGTH, d_state: int = D_STATE, dts=DTS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """{name: K (len(dts), length)} for the four layers at init, float64, shared C and the given Δs."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(d_state // 2, dtype=torch.complex128, generator=g)  # (N/2,)
    log_dt = torch.log(torch.tensor(dts, dtype=torch.float64))  # (h,)
    layers = {
        "S4D-Lin": S4D(len(dts), d_state, init="lin", dtype=torch.float64),
        "S4D-Inv": S4D(len(dts), d_state, init="inv", dtype=torch.float64),
        "S4D-LegS": S4D(len(dts), d_state, init="legs", dtype=torch.float64),
        "S4 (DPLR LegS)": S4(len(dts), d_state, dtype=torch.float64),
    }
    out = {}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.log_dt.copy_(log_dt)
            layer.C.copy_(torch.view_as_real(C.expand(len(dts), -1)))
            out[name] = layer.kernel(length)  # (h, length)
    return out


def run(out_dir: Path) -> list[Path]:
    """Write ``s4_kernels.png`` into ``out_dir``; return [its path]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = init_kernels()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (name, K) in zip(axes.flat, kernels.items()):
        for dt, k in zip(DTS, K):
            ax.plot(k.numpy(), lw=0.9, label=f"Δ = {dt:g}  (Re A = −½: e-fold in {math.ceil(2 / dt)} steps)")
        ax.set_title(name)
        ax.set_xscale("symlog", linthresh=10)
        ax.axhline(0, color="0.7", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("lag l")
    for ax in axes[:, 0]:
        ax.set_ylabel("K_l")
    fig.suptitle(f"SSM convolution kernels at initialisation (N = {D_STATE}, same C, no training)")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_save(out_dir / "s4_kernels.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return [path]
