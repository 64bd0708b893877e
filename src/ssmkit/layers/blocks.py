"""Residual blocks for the Mamba paper's ablation: architecture × inner sequence layer.

Reference: Gu & Dao, "Mamba" (arXiv 2312.00752), §4.1.1 and Table 1 (Selective Copying with arch ∈
{no gate, H3, Mamba} × layer ∈ {S4, S6}); Fu, Dao et al., "Hungry Hungry Hippos" (H3, ICLR 2023, §3.1).

Every block is pre-norm residual, ``out = x + mixer(RMSNorm(x))``, and the mixer is one of:

    none   y = out_proj(GELU(SSM(x)))                      no gate (S4's own block without its GLU)
    h3     q, k, v = q_proj(x), k_proj(x), v_proj(x)
           y = out_proj(q ⊙ SSM(shift(k) ⊙ v))             H3 with head dimension 1
    mamba  x, z = in_proj(x);  x = SiLU(conv1d(x))
           y = out_proj(SSM(x) ⊙ SiLU(z))                  the Mamba block, SSM swapped

and ``SSM`` ∈ {s4d (``S4D``), s4 (``S4``), s6 (``S6``, the selective scan with its own x_proj/dt_proj)}.
A fourth arch, ``mamba2`` with layer ``ssd``, is the Mamba-2 mixer (``ssmkit.layers.mamba2.Mamba2``, with
head size ``headdim``) — the same comparison one generation on (Dao & Gu 2024, arXiv 2405.21060).
With an LTI layer (s4d, s4) Δ, B, C are parameters; with s6 they are functions of the input. The mamba
arch with s6 *is* the Mamba mixer (``ssmkit.layers.mamba.Mamba``, used as is).

Deviations said out loud:
* ``none`` keeps a position-wise GELU + Linear after the SSM (as in the S4 block); without it S4D/S4
  channels would never mix.
* H3's shift SSM on k is implemented as what it computes: a causal depthwise FIR filter of width
  ``d_conv`` (a shift matrix A of size d_conv with learned C is exactly that filter). H3 uses heads of
  size 1 here (elementwise products), not its multi-head outer products.

Every mixer and block speaks ssmkit's one state protocol: ``new_state(batch)`` returns a state object
and ``forward(x, state=None)`` consumes any number of new tokens and updates that state (its fields are
replaced, never modified in place, so gradients flow through them). The h3 and mamba mixers' state is a
:class:`GatedState` (their conv's last inputs and the inner layer's own state); the s6 layer's is an
:class:`S6State`; s4d / s4 use theirs (``LTIState``). The mamba arch with s6 is the Mamba mixer itself.

Glossary (code -> paper): d_model D; d_inner E·D; d_state N; d_conv the conv/shift width; x_proj,
dt_proj, A_log, D as in Mamba; q/k/v_proj H3's projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.layers.mamba import Mamba, conv1d_silu, init_selective_ssm, selective_ssm
from ssmkit.layers.mamba2 import Mamba2
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.s4 import S4
from ssmkit.layers.s4d import S4D

ARCHS = ("none", "h3", "mamba", "mamba2")
LAYERS = ("s4d", "s4", "s6", "ssd")  # ssd: the Mamba-2 SSM, only inside the mamba2 arch (its mixer)


@dataclass
class S6State:
    """State of the bare S6 layer: h (b, d, N), float32 (float64 for a float64 layer)."""

    h: Tensor


@dataclass
class GatedState:
    """State of the h3 and mamba mixers.

    Attributes:
        conv_state: (b, d, w) the last w inputs of the conv (mamba) or shift filter (h3), oldest first.
        ssm_state: the inner sequence layer's state (``LTIState`` or :class:`S6State`), updated by it.
    """

    conv_state: Tensor
    ssm_state: object


class S6(nn.Module):
    """The selective SSM on d channels: the Mamba mixer's own x_proj, dt_proj, A_log, D (no conv, no gate).

    h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t,  y_t = C_t h_t + D x_t, with (δ, B, C) = x_proj(x_t) and
    Δ_t = softplus(dt_proj(δ)); parameters and initialisation from ``layers.mamba.init_selective_ssm``,
    the computation ``layers.mamba.selective_ssm`` (exactly the Mamba mixer's). Input/output (b, l, d).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank <= 0:
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model = d_model
        init_selective_ssm(
            self, d_model, d_state, dt_rank, dt_min, dt_max, factory={"device": device, "dtype": dtype}
        )
        if dtype is not None:  # A_log and D are created in float32, as in mamba-ssm
            self.to(dtype)

    def new_state(self, batch: int) -> S6State:
        """Zero state h (batch, d, N) in float32 (float64 for a float64 layer)."""
        dtype = torch.float64 if self.D.dtype == torch.float64 else torch.float32
        return S6State(torch.zeros(batch, self.d_model, self.d_state, device=self.D.device, dtype=dtype))

    def forward(self, x: Tensor, state: S6State | None = None) -> Tensor:
        """x (b, l, d) -> y (b, l, d); with ``state``, start from ``state.h`` and replace it by the last."""
        y, last = selective_ssm(
            self, x.transpose(1, 2), None, None if state is None else state.h
        )  # (b, d, l)
        if state is not None:
            state.h = last  # (b, d, N)
        return y.transpose(1, 2)  # (b, l, d)


class CausalConv(nn.Module):
    """Causal depthwise convolution of width w (H3's shift filter, no bias): y_t = Σ_k w_k x_{t−w+1+k}."""

    def __init__(self, d_model: int, width: int, device=None, dtype=None):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"d_conv must be a positive int, got {width!r}")
        self.d_model, self.width = d_model, width
        conv = nn.Conv1d(d_model, d_model, width, groups=d_model, bias=False, device=device, dtype=dtype)
        self.weight = conv.weight  # (d, 1, w)

    def new_state(self, batch: int) -> Tensor:
        return self.weight.new_zeros(batch, self.d_model, self.width)  # (b, d, w) the last w inputs

    def forward(self, x: Tensor, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (b, l, d) -> (y (b, l, d), conv state (b, d, w) after the last input, or None without one)."""
        xt = x.transpose(1, 2)  # (b, d, l)
        hist = xt.new_zeros(x.shape[0], self.d_model, self.width) if conv_state is None else conv_state
        full = torch.cat([hist[:, :, 1:].to(xt.dtype), xt], dim=-1)  # (b, d, w − 1 + l)
        y = F.conv1d(full, self.weight, None, groups=self.d_model).transpose(1, 2)  # (b, l, d)
        if conv_state is None:
            return y, None
        return y, torch.cat([hist.to(xt.dtype), xt], dim=-1)[:, :, -self.width :]  # (b, d, w)


def make_ssm(layer: str, d: int, d_state: int, s4d_init: str, dt_min: float, dt_max: float, f: dict):
    """The inner sequence layer on d channels: S4D, S4 or S6."""
    if layer == "s4d":
        return S4D(d, d_state, init=s4d_init, disc="zoh", dt_min=dt_min, dt_max=dt_max, **f)
    if layer == "s4":
        return S4(d, d_state, dt_min=dt_min, dt_max=dt_max, **f)
    if layer == "s6":
        return S6(d, d_state, dt_min=dt_min, dt_max=dt_max, **f)
    raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")


class NoGateMixer(nn.Module):
    """``none``: y = out_proj(GELU(SSM(x)))."""

    def __init__(self, d_model: int, ssm: nn.Module, f: dict):
        super().__init__()
        self.ssm = ssm
        self.out_proj = nn.Linear(d_model, d_model, **f)

    def new_state(self, batch: int):
        return self.ssm.new_state(batch)

    def forward(self, x: Tensor, state=None) -> Tensor:
        return self.out_proj(F.gelu(self.ssm(x, state)))  # (b, l, d)


class H3Mixer(nn.Module):
    """``h3``: y = out_proj(q ⊙ SSM(shift(k) ⊙ v)), the shift SSM as a causal FIR filter."""

    def __init__(self, d_model: int, ssm: nn.Module, d_conv: int, f: dict):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model, **f)
        self.k_proj = nn.Linear(d_model, d_model, **f)
        self.v_proj = nn.Linear(d_model, d_model, **f)
        self.shift = CausalConv(d_model, d_conv, **f)
        self.ssm = ssm
        self.out_proj = nn.Linear(d_model, d_model, **f)

    def new_state(self, batch: int) -> GatedState:
        return GatedState(self.shift.new_state(batch), self.ssm.new_state(batch))

    def forward(self, x: Tensor, state: GatedState | None = None) -> Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (b, l, d) each
        k, conv_state = self.shift(k, None if state is None else state.conv_state)  # (b, l, d)
        y = self.ssm(k * v, None if state is None else state.ssm_state)  # (b, l, d)
        if state is not None:
            state.conv_state = conv_state
        return self.out_proj(q * y)  # (b, l, d)


class MambaArchMixer(nn.Module):
    """``mamba`` with an LTI layer: y = out_proj(SSM(SiLU(conv1d(x))) ⊙ SiLU(z)), (x, z) = in_proj(u).

    The in_proj / conv1d / out_proj and the conv computation are the Mamba mixer's (``conv1d_silu``)."""

    def __init__(self, d_model: int, ssm: nn.Module, d_inner: int, d_conv: int, f: dict):
        super().__init__()
        self.d_inner = d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False, **f)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, **f)
        self.ssm = ssm
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **f)

    def new_state(self, batch: int) -> GatedState:
        w = self.conv1d.weight  # (d_inner, 1, w)
        conv = w.new_zeros(batch, self.d_inner, w.shape[-1])  # (b, d_inner, w)
        return GatedState(conv, self.ssm.new_state(batch))

    def forward(self, u: Tensor, state: GatedState | None = None) -> Tensor:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, l, d_inner) each
        x, conv_state = conv1d_silu(
            self.conv1d, x.transpose(1, 2), None if state is None else state.conv_state
        )  # (b, d_inner, l)
        if state is not None:
            state.conv_state = conv_state
        y = self.ssm(x.transpose(1, 2), None if state is None else state.ssm_state)  # (b, l, d_inner)
        return self.out_proj(y * F.silu(z))  # (b, l, d)


class Block(nn.Module):
    """Pre-norm residual block ``x + mixer(RMSNorm(x))`` for one (arch, layer) of the ablation.

    Args:
        d_model: model width D.
        arch: "none" | "h3" | "mamba" | "mamba2".
        layer: "s4d" | "s4" | "s6" | "ssd" (ssd only, and always, with mamba2).
        d_state: SSM state size N (even for s4d/s4: N/2 complex pairs).
        d_conv: width of the mamba conv1d and of H3's shift filter.
        expand: d_inner = expand · d_model in the mamba arch.
        s4d_init: S4D initialisation ("lin" | "inv" | "real" | "legs").
        dt_min, dt_max: range of the initial Δ.
        norm_eps: RMSNorm ε.
        headdim: head size of the mamba2 arch (nheads = expand · d_model / headdim).
    """

    def __init__(
        self,
        d_model: int,
        arch: str,
        layer: str,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        s4d_init: str = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        norm_eps: float = 1e-5,
        headdim: int = 16,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if (arch == "mamba2") != (layer == "ssd"):
            raise ValueError(
                f"layer 'ssd' goes with arch 'mamba2' and only with it, got {arch!r} × {layer!r}"
            )
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        f = {"device": device, "dtype": dtype}
        self.d_model, self.arch, self.layer = d_model, arch, layer
        self.norm = RMSNorm(d_model, eps=norm_eps, **f)
        if arch == "mamba2":  # the Mamba-2 mixer itself (it tags its own SSM parameters)
            self.mixer = Mamba2(
                d_model, d_state, d_conv, expand=expand, headdim=headdim, dt_min=dt_min, dt_max=dt_max, **f
            )
        elif arch == "mamba" and layer == "s6":
            # the Mamba mixer itself (it tags its own SSM parameters, _ssm_optim)
            self.mixer = Mamba(d_model, d_state, d_conv, expand, dt_min=dt_min, dt_max=dt_max, **f)
        elif arch == "mamba":
            d_inner = int(expand * d_model)
            ssm = make_ssm(layer, d_inner, d_state, s4d_init, dt_min, dt_max, f)
            self.mixer = MambaArchMixer(d_model, ssm, d_inner, d_conv, f)
        elif arch == "h3":
            self.mixer = H3Mixer(
                d_model, make_ssm(layer, d_model, d_state, s4d_init, dt_min, dt_max, f), d_conv, f
            )
        else:
            self.mixer = NoGateMixer(
                d_model, make_ssm(layer, d_model, d_state, s4d_init, dt_min, dt_max, f), f
            )

    def new_state(self, batch: int):
        """The mixer's zero state for ``batch`` sequences."""
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return self.mixer.new_state(batch)

    def forward(self, x: Tensor, state=None) -> Tensor:
        """x (b, l, d) -> (b, l, d); continues from ``state`` and updates it when given."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")
        return x + self.mixer(self.norm(x), state)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, layer={self.layer!r}"
