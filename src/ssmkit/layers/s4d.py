"""S4D: H independent diagonal state space models, computed as a convolution or as a recurrence.

Reference: Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State Space
Models" (S4D, NeurIPS 2022, arXiv 2206.11893), §3 (kernel by a Vandermonde product) and §4 (inits);
reference/s4.md §1.4–1.6.

Per channel h (one of d_model), with a complex diagonal A of N/2 entries (one of each conjugate pair):

    x'(t) = A x(t) + B u(t),   y(t) = 2·Re(C x(t)) + D u(t)

    zoh:       Ā = exp(ΔA),                  B̄ = (exp(ΔA) − 1)/A · B
    bilinear:  Ā = (1 + ΔA/2)/(1 − ΔA/2),    B̄ = Δ B/(1 − ΔA/2)
    kernel:    K_l = 2·Re Σ_n C_n B̄_n Ā_n^l      (the Vandermonde product; K_0 = 2·Re C B̄)
    recurrence x_k = Ā x_{k−1} + B̄ u_k,  y_k = 2·Re(C x_k) + D u_k   (so the output sees u_k at once)

Deviations said out loud: only N/2 states are stored and the output is 2·Re(·) — the conjugate halves
are implied; C is complex and stored as a real view (``torch.view_as_real``); Re A is parameterised as
−exp(A_log_re) so A stays stable; Δ = exp(log_dt) per channel (shared by the N/2 states).

Inits (n = 0 … N/2 − 1): ``lin`` A_n = −½ + iπn; ``inv`` A_n = −½ + i(N/π)(N/(2n+1) − 1);
``real`` A_n = −(n+1); ``legs`` A_n = the eigenvalues of the normal part of HiPPO-LegS (from
``ssmkit.lti.nplr("legs", N)``), with B = Ṽ*B from the same call. B = 1 for the other inits; C ~ complex
normal (variance 1); D ~ N(0, 1); log Δ ~ U[log dt_min, log dt_max].

Glossary (code -> paper): d_model H; d_state N; A_log_re, A_im -> A = −exp(A_log_re) + i·A_im
(h, N/2); B, C (h, N/2) complex; D (h,); log_dt -> log Δ (h,); dA, dB -> Ā, B̄; state -> x (b, h, N/2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

INITS = ("lin", "inv", "real", "legs")
DISCS = ("zoh", "bilinear")
SSM_OPTIM = {"weight_decay": 0.0}  # the tag read by ssmkit.train.optim.param_groups


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 -> complex64, float64 -> complex128."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def s4d_init(init: str, d_state: int) -> tuple[Tensor, Tensor]:
    """Diagonal A (N/2,) and B (N/2,) as complex128 for one channel; see the module docstring."""
    n2 = d_state // 2
    n = torch.arange(n2, dtype=torch.float64)  # (n2,)
    ones = torch.ones(n2, dtype=torch.complex128)  # (n2,)
    if init == "lin":
        return torch.complex(-0.5 * torch.ones(n2, dtype=torch.float64), math.pi * n), ones
    if init == "inv":
        imag = (d_state / math.pi) * (d_state / (2 * n + 1) - 1)  # (n2,)
        return torch.complex(-0.5 * torch.ones(n2, dtype=torch.float64), imag), ones
    if init == "real":
        return torch.complex(-(n + 1), torch.zeros(n2, dtype=torch.float64)), ones
    if init == "legs":
        from ssmkit.lti import nplr

        Lambda, _P, B, _V = nplr(d_state, "legs")
        Lambda = torch.as_tensor(Lambda).to(torch.complex128).reshape(-1)  # (n2,)
        B = torch.as_tensor(B).to(torch.complex128).reshape(-1)  # (n2,)
        if Lambda.numel() != n2 or B.numel() != n2:
            raise ValueError(f"nplr({d_state}, 'legs') must return N/2 = {n2} eigenvalues and B entries")
        return Lambda, B
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def s4d_discretize(A: Tensor, B: Tensor, dt: Tensor, disc: str) -> tuple[Tensor, Tensor]:
    """Discretise diagonal (A, B) with step Δ.

    Args:
        A, B: (h, n) complex.  dt: (h,) real Δ.  disc: "zoh" or "bilinear".
    Returns:
        dA, dB: (h, n) complex — Ā and B̄ of the module docstring.
    """
    dtA = dt[:, None] * A  # (h, n)
    if disc == "zoh":
        dA = torch.exp(dtA)  # (h, n)
        return dA, (dA - 1) / A * B  # (h, n)
    if disc == "bilinear":
        half = dtA / 2  # (h, n)
        return (1 + half) / (1 - half), dt[:, None] * B / (1 - half)  # (h, n) each
    raise ValueError(f"disc must be one of {DISCS}, got {disc!r}")


def log_dA(dA: Tensor, A: Tensor, dt: Tensor, disc: str) -> Tensor:
    """log Ā (h, n): exactly ΔA for zoh (no round trip through exp/log), the complex log for bilinear."""
    return dt[:, None] * A if disc == "zoh" else torch.log(dA)


def vandermonde(log_a: Tensor, length: int) -> Tensor:
    """Powers Ā^l = exp(l · log Ā) for l = 0 … length − 1: (h, n) -> (h, n, length)."""
    l = torch.arange(length, device=log_a.device, dtype=log_a.real.dtype)  # (length,)
    return torch.exp(log_a[..., None] * l)  # (h, n, length)


def kernel_vandermonde(dA_log: Tensor, dB: Tensor, C: Tensor, length: int) -> Tensor:
    """K_l = 2·Re Σ_n C_n B̄_n Ā_n^l by one Vandermonde product: (h, n) ×3 -> (h, length) real."""
    V = vandermonde(dA_log, length)  # (h, n, length)
    return 2 * torch.einsum("hn,hnl->hl", C * dB, V).real  # (h, length)


def kernel_powers(dA: Tensor, dB: Tensor, C: Tensor, length: int) -> Tensor:
    """Slow twin of ``kernel_vandermonde``: Ā^l by repeated multiplication. (h, n) ×3 -> (h, length)."""
    out, x = [], dB  # x = Ā^l B̄, (h, n)
    for _ in range(length):
        out.append(2 * (C * x).sum(-1).real)  # (h,)
        x = dA * x
    return torch.stack(out, -1) if out else dB.real.new_zeros(dB.shape[0], 0)  # (h, length)


def fft_conv(u: Tensor, K: Tensor) -> Tensor:
    """Causal convolution y_t = Σ_{j<=t} K_j u_{t−j} by FFT (zero-padded to 2L). u (b, h, l), K (h, l)."""
    l = u.shape[-1]
    n = 2 * l
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)  # (b, h, 2l)
    return y[..., :l]  # (b, h, l)


def check_input(x: Tensor, d_model: int, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != d_model:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (b, l, h={d_model}), got {shape}")


def check_state(state: Tensor, b: int, h: int, n2: int) -> None:
    if not isinstance(state, Tensor) or tuple(state.shape) != (b, h, n2) or not state.is_complex():
        shape = (tuple(state.shape), state.dtype) if isinstance(state, Tensor) else type(state).__name__
        raise ValueError(f"state must be a complex tensor of shape (b, h, N/2) = {(b, h, n2)}, got {shape}")


class S4D(nn.Module):
    """Diagonal SSM layer, ``y = K ∗ x + D ⊙ x`` per channel; input and output (b, l, h).

    Args:
        d_model: number of independent channels H.
        d_state: state size N (even); N/2 complex states are stored per channel.
        init: "lin" | "inv" | "real" | "legs" (see the module docstring).
        disc: "zoh" | "bilinear".
        dt_min, dt_max: range of the log-uniform initial Δ.
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
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(d_state, int) or d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (conjugate pairs), got {d_state!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if disc not in DISCS:
            raise ValueError(f"disc must be one of {DISCS}, got {disc!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.init, self.disc = d_model, d_state, init, disc
        h, n2 = d_model, d_state // 2
        dtype = dtype or torch.get_default_dtype()
        f = {"device": device, "dtype": dtype}

        A, B = s4d_init(init, d_state)  # (n2,) complex128 each
        log_dt = torch.rand(h, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(h, n2, dtype=torch.complex128)  # (h, n2), E|C|² = 1
        self.log_dt = nn.Parameter(log_dt.to(**f))  # (h,)
        self.A_log_re = nn.Parameter(torch.log(-A.real).repeat(h, 1).to(**f))  # (h, n2)
        self.A_im = nn.Parameter(A.imag.repeat(h, 1).to(**f))  # (h, n2)
        self.B = nn.Parameter(torch.view_as_real(B.repeat(h, 1)).to(**f))  # (h, n2, 2)
        self.C = nn.Parameter(torch.view_as_real(C).to(**f))  # (h, n2, 2)
        self.D = nn.Parameter(torch.randn(h, dtype=torch.float64).to(**f))  # (h,)
        for p in (self.log_dt, self.A_log_re, self.A_im, self.B):
            p._ssm_optim = dict(SSM_OPTIM)

    # --- the SSM in closed form -------------------------------------------------------------------
    def ssm(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, B, C) complex (h, n2) and Δ (h,) from the parameters."""
        A = torch.complex(-torch.exp(self.A_log_re), self.A_im)  # (h, n2)
        return A, torch.view_as_complex(self.B), torch.view_as_complex(self.C), torch.exp(self.log_dt)

    def discrete(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(Ā, B̄, C, log Ā), each (h, n2) complex."""
        A, B, C, dt = self.ssm()
        dA, dB = s4d_discretize(A, B, dt, self.disc)  # (h, n2) each
        return dA, dB, C, log_dA(dA, A, dt, self.disc)

    def kernel(self, length: int) -> Tensor:
        """The convolution kernel K (h, length), without the D skip."""
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        dA, dB, C, dA_log = self.discrete()
        return kernel_vandermonde(dA_log, dB, C, length)  # (h, length)

    # --- recurrent mode ---------------------------------------------------------------------------
    def new_state(self, batch: int) -> Tensor:
        """Zero state x (batch, h, N/2), complex64 (complex128 for a float64 layer)."""
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return torch.zeros(
            batch, self.d_model, self.d_state // 2, device=self.D.device, dtype=complex_dtype(self.D.dtype)
        )

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step: x_k = Ā x_{k−1} + B̄ u_k, y_k = 2·Re(C x_k) + D u_k. x_t (b, h) -> (y_t (b, h), state)."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must have shape (b, h={self.d_model}), got {tuple(x_t.shape)}")
        check_state(state, x_t.shape[0], self.d_model, self.d_state // 2)
        dA, dB, C, _ = self.discrete()  # (h, n2) each
        state = dA * state + dB * x_t[..., None]  # (b, h, n2)
        y = 2 * (C * state).sum(-1).real + self.D * x_t  # (b, h)
        return y.to(x_t.dtype), state

    # --- convolution mode -------------------------------------------------------------------------
    def forward(self, x: Tensor, state: Tensor | None = None, return_state: bool = False):
        """Convolution mode with optional state passing.

        Args:
            x: (b, l, h) input.
            state: optional (b, h, N/2) complex state x_{−1} to start from (default zeros).
            return_state: also return the state after the last input.
        Returns:
            y (b, l, h), or (y, state (b, h, N/2)) when ``return_state``.
        """
        check_input(x, self.d_model)
        b, l, h = x.shape
        if state is not None:
            check_state(state, b, h, self.d_state // 2)
        u = x.transpose(1, 2)  # (b, h, l)
        dA, dB, C, dA_log = self.discrete()  # (h, n2) each
        V = vandermonde(dA_log, l)  # (h, n2, l)   Ā^j
        K = 2 * torch.einsum("hn,hnl->hl", C * dB, V).real  # (h, l)
        y = fft_conv(u.to(K.dtype), K) + self.D[:, None] * u  # (b, h, l)
        if state is not None:  # y_j += 2·Re Σ_n C_n Ā_n^{j+1} x_{−1,n}
            y = y + 2 * torch.einsum("bhn,hnl->bhl", state * (C * dA), V).real  # (b, h, l)
        y = y.transpose(1, 2).to(x.dtype)  # (b, l, h)
        if not return_state:
            return y
        # x_{l−1} = Ā^l x_{−1} + Σ_j Ā^{l−1−j} B̄ u_j  (a transposed Vandermonde product)
        last = dB * torch.einsum("bhl,hnl->bhn", u.flip(-1).to(V.dtype), V)  # (b, h, n2)
        if state is not None:
            last = last + torch.exp(dA_log * l) * state  # (b, h, n2)
        return y, last

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, disc={self.disc!r}"
