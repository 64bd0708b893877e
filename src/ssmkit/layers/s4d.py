"""S4D: d independent diagonal state space models, computed as a convolution or as a recurrence.

Reference: Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State Space
Models" (S4D, NeurIPS 2022, arXiv 2206.11893), §3 (kernel by a Vandermonde product) and §4 (inits).

Per channel (one of d), with a complex diagonal A of n/2 entries (one of each conjugate pair):

    x'(t) = A x(t) + B u(t),   y(t) = 2·Re(C x(t)) + D u(t)

    zoh:       Ā = exp(ΔA),                  B̄ = (exp(ΔA) − 1)/A · B
    bilinear:  Ā = (1 + ΔA/2)/(1 − ΔA/2),    B̄ = Δ B/(1 − ΔA/2)
    kernel:    K_k = 2·Re Σ_n C_n B̄_n Ā_n^k      (the Vandermonde product; K_0 = 2·Re C B̄)
    recurrence h_k = Ā h_{k−1} + B̄ u_k,  y_k = 2·Re(C h_k) + D u_k   (so the output sees u_k at once)

The math is ``ssmkit.lti``'s, called directly: ``discretize_diagonal`` (Ā, B̄), ``kernel_vandermonde``
(K, powers by doubling), ``convolve_fft`` (K ∗ u) and ``powers`` (the final state of a chunk). The layer
owns the parameters and the conjugate-pair bookkeeping.

State (ssmkit's one state protocol): ``new_state(batch)`` returns an :class:`LTIState`;
``forward(x, state)`` consumes a chunk of any length and ``step(x_t, state)`` one input, both starting
from ``state.h`` and replacing it (a new tensor, never an in-place change, so gradients flow through it).
Chunked forward == one forward == a loop of steps. Empty inputs (b = 0 or l = 0) give an empty output
and leave the state as it was.

Deviations said out loud: only n/2 states are stored and the output is 2·Re(·) — the conjugate halves
are implied; C is complex and stored as a real view (``torch.view_as_real``); Re A is parameterised as
−exp(A_log_re) so A stays stable; Δ = exp(log_dt) per channel (shared by the n/2 states).

Inits (k = 0 … n/2 − 1): ``lin`` A_k = −½ + iπk; ``inv`` A_k = −½ + i(n/π)(n/(2k+1) − 1);
``real`` A_k = −(k+1); ``legs`` A_k = the eigenvalues of the normal part of HiPPO-LegS (from
``ssmkit.lti.nplr(n, "legs")``), with B = Ṽ*B from the same call. B = 1 for the other inits; C ~ complex
normal (variance 1); D ~ N(0, 1); log Δ ~ U[log dt_min, log dt_max].

Shape letters (one meaning each, as everywhere in ssmkit): b batch, l length, d channels (``d_model``),
n the state size N (``d_state``; n/2 complex entries stored). ``h`` is the recurrent state, never a size.

Glossary (code -> paper): d_model H; d_state N; A_log_re, A_im -> A = −exp(A_log_re) + i·A_im
(d, n/2); B, C (d, n/2) complex; D (d,); log_dt -> log Δ (d,); Ab, Bb -> Ā, B̄; h -> x (b, d, n/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssmkit.lti import convolve_fft, discretize_diagonal, kernel_vandermonde, nplr, powers

INITS = ("lin", "inv", "real", "legs")
DISCS = ("zoh", "bilinear")
SSM_OPTIM = {"weight_decay": 0.0}  # the tag read by ssmkit.train.optim.param_groups


@dataclass
class LTIState:
    """The recurrent state of an S4D or S4 layer; its size does not grow with the sequence.

    Attributes:
        h: (b, d, n/2) complex (complex64, or complex128 for a float64 layer) — the state after the last
            input, one member of each conjugate pair. Replaced (not modified) by ``forward`` and ``step``.
    """

    h: Tensor


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 -> complex64, float64 -> complex128."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def s4d_init(init: str, d_state: int) -> tuple[Tensor, Tensor]:
    """Diagonal A (n/2,) and B (n/2,) as complex128 for one channel; see the module docstring."""
    n2 = d_state // 2
    k = torch.arange(n2, dtype=torch.float64)  # (n/2,)
    ones = torch.ones(n2, dtype=torch.complex128)  # (n/2,)
    half = -0.5 * torch.ones(n2, dtype=torch.float64)  # (n/2,)
    if init == "lin":
        return torch.complex(half, math.pi * k), ones
    if init == "inv":
        return torch.complex(half, (d_state / math.pi) * (d_state / (2 * k + 1) - 1)), ones
    if init == "real":
        return torch.complex(-(k + 1), torch.zeros(n2, dtype=torch.float64)), ones
    if init == "legs":
        Lambda, _P, B, _V = nplr(d_state, "legs")  # (n/2,), (1, n/2), (n/2,), (n, n/2)
        return Lambda.to(torch.complex128), B.to(torch.complex128)
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def check_input(
    x: Tensor, d_model: int, layer_dtype: torch.dtype, name: str = "x", step: bool = False
) -> None:
    """x (b, l, d) — or (b, d) for a step — of a floating dtype (computed in the layer's dtype)."""
    want = f"(b, d={d_model})" if step else f"(b, l, d={d_model})"
    if not isinstance(x, Tensor) or x.dim() != (2 if step else 3) or x.shape[-1] != d_model:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {want}, got {got}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (the layer computes in {layer_dtype}), got {x.dtype}"
        )


def check_state(state: object, b: int, d: int, n2: int, dtype: torch.dtype) -> None:
    """state is an LTIState whose h is (b, d, n/2) of the layer's complex dtype."""
    if not isinstance(state, LTIState):
        raise ValueError(f"state must be an LTIState (from new_state(batch)), got {type(state).__name__}")
    h = state.h
    if not isinstance(h, Tensor) or tuple(h.shape) != (b, d, n2) or h.dtype != dtype:
        got = (tuple(h.shape), h.dtype) if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"state.h must be a {dtype} tensor of shape (b, d, n/2) = {(b, d, n2)}, got {got}")


def new_lti_state(batch: int, d: int, n2: int, like: Tensor) -> LTIState:
    """Zero LTIState (batch, d, n/2) in the complex dtype matching ``like`` (a real parameter)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    return LTIState(torch.zeros(batch, d, n2, device=like.device, dtype=complex_dtype(like.dtype)))


class S4D(nn.Module):
    """Diagonal SSM layer, ``y = K ∗ x + D ⊙ x`` per channel; input and output (b, l, d).

    Args:
        d_model: number of independent channels d.
        d_state: state size n (even); n/2 complex states are stored per channel.
        init: "lin" | "inv" | "real" | "legs" (see the module docstring).
        disc: "zoh" | "bilinear".
        dt_min, dt_max: range of the log-uniform initial Δ.
        device, dtype: of the parameters (the state is the matching complex dtype).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        init: str = "lin",
        disc: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (conjugate pairs), got {d_state!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if disc not in DISCS:
            raise ValueError(f"disc must be one of {DISCS}, got {disc!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.init, self.disc = d_model, d_state, init, disc
        d, n2 = d_model, d_state // 2
        f = {"device": device, "dtype": dtype or torch.get_default_dtype()}

        A, B = s4d_init(init, d_state)  # (n/2,) complex128 each
        log_dt = torch.rand(d, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(d, n2, dtype=torch.complex128)  # (d, n/2), E|C|² = 1
        self.log_dt = nn.Parameter(log_dt.to(**f))  # (d,)
        self.A_log_re = nn.Parameter(torch.log(-A.real).repeat(d, 1).to(**f))  # (d, n/2)
        self.A_im = nn.Parameter(A.imag.repeat(d, 1).to(**f))  # (d, n/2)
        self.B = nn.Parameter(torch.view_as_real(B.repeat(d, 1)).to(**f))  # (d, n/2, 2)
        self.C = nn.Parameter(torch.view_as_real(C).to(**f))  # (d, n/2, 2)
        self.D = nn.Parameter(torch.randn(d, dtype=torch.float64).to(**f))  # (d,)
        for p in (self.log_dt, self.A_log_re, self.A_im, self.B):
            p._ssm_optim = dict(SSM_OPTIM)

    # --- the SSM in closed form -------------------------------------------------------------------
    def ssm(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, B, C) complex (d, n/2) and Δ (d,) from the parameters."""
        A = torch.complex(-torch.exp(self.A_log_re), self.A_im)  # (d, n/2)
        return A, torch.view_as_complex(self.B), torch.view_as_complex(self.C), torch.exp(self.log_dt)

    def discrete(self) -> tuple[Tensor, Tensor, Tensor]:
        """(Ā, B̄, C), each (d, n/2) complex, by ``lti.discretize_diagonal``."""
        A, B, C, dt = self.ssm()
        Ab, Bb = discretize_diagonal(A, B, dt, self.disc)  # (d, n/2) each
        return Ab, Bb, C

    def kernel(self, length: int) -> Tensor:
        """The convolution kernel K (d, length) real, without the D skip."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        Ab, Bb, C = self.discrete()  # (d, n/2) each
        return 2 * kernel_vandermonde(Ab, Bb, C, length).real  # (d, length)

    # --- the state protocol -----------------------------------------------------------------------
    def new_state(self, batch: int) -> LTIState:
        """Zero state h (batch, d, n/2), complex64 (complex128 for a float64 layer)."""
        return new_lti_state(batch, self.d_model, self.d_state // 2, self.D)

    def step(self, x_t: Tensor, state: LTIState) -> Tensor:
        """One input per sequence: h_k = Ā h_{k−1} + B̄ u_k, y_k = 2·Re(C h_k) + D u_k; replaces state.h.

        Args:
            x_t: (b, d) floating.  state: LTIState with h (b, d, n/2).
        Returns:
            y_t (b, d) in x_t's dtype.
        """
        check_input(x_t, self.d_model, self.D.dtype, "x_t", step=True)
        check_state(state, x_t.shape[0], self.d_model, self.d_state // 2, complex_dtype(self.D.dtype))
        u = x_t.to(self.D.dtype)  # (b, d)
        Ab, Bb, C = self.discrete()  # (d, n/2) each
        h = Ab * state.h + Bb * u[..., None]  # (b, d, n/2)
        y = 2 * (C * h).sum(-1).real + self.D * u  # (b, d)
        state.h = h
        return y.to(x_t.dtype)

    def forward(self, x: Tensor, state: LTIState | None = None) -> Tensor:
        """Convolution mode: y = K ∗ x + D ⊙ x, from state.h when a state is given (then replaced).

        Args:
            x: (b, l, d) floating.  state: optional LTIState with h (b, d, n/2); None starts from zeros.
        Returns:
            y (b, l, d) in x's dtype.
        """
        check_input(x, self.d_model, self.D.dtype)
        b, l, d = x.shape
        n2 = self.d_state // 2
        if state is not None:
            check_state(state, b, d, n2, complex_dtype(self.D.dtype))
        if b == 0 or l == 0:
            return x.new_zeros(b, l, d)  # nothing to do; the state is left as it was
        u = x.transpose(1, 2).to(self.D.dtype)  # (b, d, l)
        Ab, Bb, C = self.discrete()  # (d, n/2) each
        if state is None:
            K = 2 * kernel_vandermonde(Ab, Bb, C, l).real  # (d, l)
            y = convolve_fft(u, K, self.D, siso=True)  # (b, d, l)
            return y.transpose(1, 2).to(x.dtype)  # (b, l, d)
        K = 2 * kernel_vandermonde(Ab, Bb, C, l).real  # (d, l)
        V = powers(Ab, l)  # (d, l, n/2)   Ā^k
        # From h: y_k += 2·Re Σ_n C_n Ā_n^{k+1} h_n, the kernel of (Ā, Ā h, C) (as a product with V: the
        # batch of initial states must not multiply V's memory)
        y_h = 2 * torch.einsum("bdn,dln->bdl", (C * Ab) * state.h, V).real  # (b, d, l)
        y = convolve_fft(u, K, self.D, siso=True) + y_h  # (b, d, l)
        # h_{l−1} = Ā^l h + Σ_k Ā^{l−1−k} B̄ u_k  (a transposed Vandermonde product)
        h_last = Bb * torch.einsum("bdl,dln->bdn", u.flip(-1).to(V.dtype), V)  # (b, d, n/2)
        state.h = h_last + (V[:, -1] * Ab) * state.h  # (b, d, n/2)
        return y.transpose(1, 2).to(x.dtype)  # (b, l, d)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, disc={self.disc!r}"
