"""Residual blocks for the Mamba paper's ablation: architecture × inner sequence layer.

Reference: Gu & Dao, "Mamba" (arXiv 2312.00752), §4.1.1 and Table 1 (Selective Copying with arch ∈
{no gate, H3, Mamba} × layer ∈ {S4, S6}); Fu, Dao et al., "Hungry Hungry Hippos" (H3, ICLR 2023, §3.1);
reference/mamba.md §1.2, §6.1.

Every block is pre-norm residual, ``out = x + mixer(RMSNorm(x))``, and the mixer is one of:

    none   y = out_proj(GELU(SSM(x)))                      no gate (S4's own block without its GLU)
    h3     q, k, v = q_proj(x), k_proj(x), v_proj(x)
           y = out_proj(q ⊙ SSM(shift(k) ⊙ v))             H3 with head dimension 1
    mamba  x, z = in_proj(x);  x = SiLU(conv1d(x))
           y = out_proj(SSM(x) ⊙ SiLU(z))                  the Mamba block, SSM swapped

and ``SSM`` ∈ {s4d (``S4D``), s4 (``S4``), s6 (``S6``, the selective scan with its own x_proj/dt_proj)}.
With an LTI layer (s4d, s4) Δ, B, C are parameters; with s6 they are functions of the input. The mamba
arch with s6 *is* the Mamba mixer (``ssmkit.layers.mamba.Mamba``, used as is).

Deviations said out loud:
* ``none`` keeps a position-wise GELU + Linear after the SSM (as in the S4 block); without it S4D/S4
  channels would never mix.
* H3's shift SSM on k is implemented as what it computes: a causal depthwise FIR filter of width
  ``d_conv`` (a shift matrix A of size d_conv with learned C is exactly that filter). H3 uses heads of
  size 1 here (elementwise products), not its multi-head outer products.

Every mixer has ``forward(x, state=None, return_state=False)``, ``new_state(batch)`` and
``step(x_t, state) -> (y_t, state)``; step runs each part's own recurrence (``S4D.step``, ``S4.step``,
``S6.step``, ``CausalConv.step``), so it checks forward rather than repeating it. States are tuples of
tensors (the Mamba mixer's ``MambaState``) and are replaced, never modified in place.

Glossary (code -> paper): d_model D; d_inner E·D; d_state N; d_conv the conv/shift width; x_proj,
dt_proj, A_log, D as in Mamba; q/k/v_proj H3's projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.layers.mamba import Mamba, MambaState, inverse_softplus
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.s4 import S4
from ssmkit.layers.s4d import S4D, SSM_OPTIM
from ssmkit.scan import selective_scan

ARCHS = ("none", "h3", "mamba")
LAYERS = ("s4d", "s4", "s6")


class S6(nn.Module):
    """The selective SSM on d channels (Mamba's x_proj, dt_proj, A_log, D; no conv, no gate).

    h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t,  y_t = C_t h_t + D x_t, with (δ, B, C) = x_proj(x_t) and
    Δ_t = softplus(dt_proj(δ)). Initialised as mamba-ssm (A = −(1 … N) per channel, D = 1,
    softplus(dt_proj.bias) log-uniform in [dt_min, dt_max]). Input/output (b, l, d); state (b, d, N).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
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
        f = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.dt_rank = d_model, d_state, dt_rank
        self.x_proj = nn.Linear(d_model, dt_rank + 2 * d_state, bias=False, **f)
        self.dt_proj = nn.Linear(dt_rank, d_model, bias=True, **f)
        with torch.no_grad():
            std = dt_rank**-0.5
            self.dt_proj.weight.uniform_(-std, std)
            u01 = torch.rand(d_model, dtype=torch.float64)  # (d,)
            dt = torch.exp(u01 * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
                min=dt_init_floor
            )
            self.dt_proj.bias.copy_(inverse_softplus(dt))
        A = torch.arange(1, d_state + 1, dtype=torch.float64).repeat(d_model, 1)  # (d, N)
        self.A_log = nn.Parameter(torch.log(A).to(device, dtype or torch.get_default_dtype()))  # (d, N)
        self.D = nn.Parameter(torch.ones(d_model, **f))  # (d,)
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._ssm_optim = dict(SSM_OPTIM)

    def new_state(self, batch: int) -> Tensor:
        """Zero state h (batch, d, N) in float32 (float64 for a float64 layer)."""
        dtype = torch.float64 if self.D.dtype == torch.float64 else torch.float32
        return torch.zeros(batch, self.d_model, self.d_state, device=self.D.device, dtype=dtype)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(δ, B, C) = x_proj(x): x (..., d) -> δ (..., R), B (..., N), C (..., N)."""
        return torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)

    def forward(self, x: Tensor, state: Tensor | None = None, return_state: bool = False):
        """x (b, l, d) -> y (b, l, d) [, state (b, d, N)] by ``ssmkit.selective_scan``."""
        delta, B, C = self._project(x)  # (b, l, R), (b, l, N), (b, l, N)
        delta = (delta @ self.dt_proj.weight.t()).transpose(1, 2)  # (b, d, l)
        A = -torch.exp(self.A_log)  # (d, N)
        y, last = selective_scan(
            x.transpose(1, 2),
            delta,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            return_last_state=True,
            initial_state=state,
        )  # (b, d, l), (b, d, N)
        y = y.transpose(1, 2)  # (b, l, d)
        return (y, last) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the recurrence (Mamba's decode step). x_t (b, d) -> (y_t (b, d), state)."""
        delta, B, C = self._project(x_t)  # (b, R), (b, N), (b, N)
        dt = F.softplus(self.dt_proj(delta)).to(state.dtype)  # (b, d)
        A = -torch.exp(self.A_log.to(state.dtype))  # (d, N)
        xs = x_t.to(state.dtype)  # (b, d)
        state = (
            torch.exp(dt[..., None] * A) * state + (dt * xs)[..., None] * B.to(state.dtype)[:, None]
        )  # (b, d, N)
        y = (state * C.to(state.dtype)[:, None]).sum(-1) + self.D * xs  # (b, d)
        return y.to(x_t.dtype), state


class CausalConv(nn.Module):
    """Causal depthwise convolution of width w; its state is the last w − 1 inputs (b, d, w − 1)."""

    def __init__(self, d_model: int, width: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"d_conv must be a positive int, got {width!r}")
        self.d_model, self.width = d_model, width
        conv = nn.Conv1d(d_model, d_model, width, groups=d_model, bias=bias, device=device, dtype=dtype)
        self.weight = conv.weight  # (d, 1, w)
        self.bias = conv.bias  # (d,) or None

    def new_state(self, batch: int) -> Tensor:
        return self.weight.new_zeros(batch, self.d_model, self.width - 1)  # (b, d, w − 1)

    def forward(self, x: Tensor, state: Tensor | None = None, return_state: bool = False):
        """x (b, l, d) -> (b, l, d) [, state (b, d, w − 1)]."""
        xt = x.transpose(1, 2)  # (b, d, l)
        hist = self.new_state(x.shape[0]).to(xt.dtype) if state is None else state.to(xt.dtype)
        full = torch.cat([hist, xt], dim=-1)  # (b, d, w − 1 + l)
        y = F.conv1d(full, self.weight, self.bias, groups=self.d_model).transpose(1, 2)  # (b, l, d)
        return (y, full[..., full.shape[-1] - (self.width - 1) :]) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x_t (b, d) -> (y_t (b, d), state): a dot product with the window [state, x_t]."""
        window = torch.cat([state.to(x_t.dtype), x_t[..., None]], dim=-1)  # (b, d, w)
        y = (window * self.weight[:, 0]).sum(-1)  # (b, d)
        if self.bias is not None:
            y = y + self.bias
        return y, window[..., 1:]


def run(module: nn.Module, x: Tensor, state, return_state: bool):
    """(y, state after x) if ``return_state`` else (y, None): skips the final-state work when unused."""
    if return_state:
        return module(x, state, return_state=True)
    return module(x, state), None


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

    def forward(self, x: Tensor, state=None, return_state: bool = False):
        y, s = run(self.ssm, x, state, return_state)  # (b, l, d)
        y = self.out_proj(F.gelu(y))  # (b, l, d)
        return (y, s) if return_state else y

    def step(self, x_t: Tensor, state):
        y, state = self.ssm.step(x_t, state)  # (b, d)
        return self.out_proj(F.gelu(y)), state


class H3Mixer(nn.Module):
    """``h3``: y = out_proj(q ⊙ SSM(shift(k) ⊙ v)), the shift SSM as a causal FIR filter."""

    def __init__(self, d_model: int, ssm: nn.Module, d_conv: int, f: dict):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model, **f)
        self.k_proj = nn.Linear(d_model, d_model, **f)
        self.v_proj = nn.Linear(d_model, d_model, **f)
        self.shift = CausalConv(d_model, d_conv, bias=False, **f)
        self.ssm = ssm
        self.out_proj = nn.Linear(d_model, d_model, **f)

    def new_state(self, batch: int):
        return (self.shift.new_state(batch), self.ssm.new_state(batch))

    def forward(self, x: Tensor, state=None, return_state: bool = False):
        s_shift, s_ssm = (None, None) if state is None else state
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (b, l, d) each
        k, s_shift = run(self.shift, k, s_shift, return_state)  # (b, l, d)
        y, s_ssm = run(self.ssm, k * v, s_ssm, return_state)  # (b, l, d)
        y = self.out_proj(q * y)  # (b, l, d)
        return (y, (s_shift, s_ssm)) if return_state else y

    def step(self, x_t: Tensor, state):
        s_shift, s_ssm = state
        q, k, v = self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)  # (b, d) each
        k, s_shift = self.shift.step(k, s_shift)  # (b, d)
        y, s_ssm = self.ssm.step(k * v, s_ssm)  # (b, d)
        return self.out_proj(q * y), (s_shift, s_ssm)


class MambaArchMixer(nn.Module):
    """``mamba`` with an LTI layer: y = out_proj(SSM(SiLU(conv1d(x))) ⊙ SiLU(z)), (x, z) = in_proj(u)."""

    def __init__(self, d_model: int, ssm: nn.Module, d_inner: int, d_conv: int, f: dict):
        super().__init__()
        self.d_inner = d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False, **f)
        self.conv1d = CausalConv(d_inner, d_conv, bias=True, **f)
        self.ssm = ssm
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **f)

    def new_state(self, batch: int):
        return (self.conv1d.new_state(batch), self.ssm.new_state(batch))

    def forward(self, u: Tensor, state=None, return_state: bool = False):
        s_conv, s_ssm = (None, None) if state is None else state
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, l, d_inner) each
        x, s_conv = run(self.conv1d, x, s_conv, return_state)  # (b, l, d_inner)
        y, s_ssm = run(self.ssm, F.silu(x), s_ssm, return_state)  # (b, l, d_inner)
        y = self.out_proj(y * F.silu(z))  # (b, l, d)
        return (y, (s_conv, s_ssm)) if return_state else y

    def step(self, u_t: Tensor, state):
        s_conv, s_ssm = state
        x, z = self.in_proj(u_t).chunk(2, dim=-1)  # (b, d_inner) each
        x, s_conv = self.conv1d.step(x, s_conv)  # (b, d_inner)
        y, s_ssm = self.ssm.step(F.silu(x), s_ssm)  # (b, d_inner)
        return self.out_proj(y * F.silu(z)), (s_conv, s_ssm)


class MambaMixer(nn.Module):
    """``mamba`` with s6: the Mamba mixer itself, behind the common state interface."""

    def __init__(self, mamba: Mamba):
        super().__init__()
        self.mamba = mamba

    def new_state(self, batch: int) -> MambaState:
        return self.mamba.new_state(batch)

    def forward(self, x: Tensor, state: MambaState | None = None, return_state: bool = False):
        if state is None and not return_state:
            return self.mamba(x)
        st = self.new_state(x.shape[0]) if state is None else MambaState(state.conv_state, state.ssm_state)
        y = self.mamba(x, st)  # replaces st's tensors
        return (y, st) if return_state else y

    def step(self, x_t: Tensor, state: MambaState):
        st = MambaState(state.conv_state, state.ssm_state)
        return self.mamba(x_t[:, None], st)[:, 0], st  # decode: one token through the same code path


class Block(nn.Module):
    """Pre-norm residual block ``x + mixer(RMSNorm(x))`` for one (arch, layer) of the ablation.

    Args:
        d_model: model width D.
        arch: "none" | "h3" | "mamba".
        layer: "s4d" | "s4" | "s6".
        d_state: SSM state size N (even for s4d/s4: N/2 complex pairs).
        d_conv: width of the mamba conv1d and of H3's shift filter.
        expand: d_inner = expand · d_model in the mamba arch.
        s4d_init: S4D initialisation ("lin" | "inv" | "real" | "legs").
        dt_min, dt_max: range of the initial Δ.
        norm_eps: RMSNorm ε.
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
        device=None,
        dtype=None,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        f = {"device": device, "dtype": dtype}
        self.d_model, self.arch, self.layer = d_model, arch, layer
        self.norm = RMSNorm(d_model, eps=norm_eps, **f)
        if arch == "mamba" and layer == "s6":
            m = Mamba(d_model, d_state, d_conv, expand, dt_min=dt_min, dt_max=dt_max, **f)
            self.mixer = MambaMixer(m)  # Mamba tags its own SSM parameters (_ssm_optim)
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

    def forward(self, x: Tensor, state=None, return_state: bool = False):
        """x (b, l, d) -> (b, l, d) [, state]; continues from ``state`` when given."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")
        out = self.mixer(self.norm(x), state=state, return_state=return_state)
        if return_state:
            return x + out[0], out[1]
        return x + out

    def step(self, x_t: Tensor, state):
        """Recurrent mode: x_t (b, d) -> (y_t (b, d), state)."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must have shape (b, d_model={self.d_model}), got {tuple(x_t.shape)}")
        y, state = self.mixer.step(self.norm(x_t), state)
        return x_t + y, state

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, layer={self.layer!r}"
