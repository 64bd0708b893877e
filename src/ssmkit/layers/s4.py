"""S4: the structured state space layer with a diagonal-plus-low-rank (DPLR) HiPPO-LegS matrix.

Reference: Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces" (ICLR 2022,
arXiv 2111.00396), §3 and Algorithm 1 (Cauchy kernel + Woodbury identity at the roots of unity),
Appendix C.2 (the bilinear discretisation of a DPLR matrix is DPLR-structured: the recurrent step) and
C.3 (the generating function and the C̃ trick). A walkthrough of the kernel is in docs/s4-kernel.md.

Per channel, with n states and the DPLR matrix from ``ssmkit.lti.nplr(n, "legs")``:

    A = diag(Λ) − P P*          (in the basis that diagonalises the normal part of HiPPO-LegS)
    Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A),   B̄ = Δ (I − Δ/2·A)⁻¹ B                       (bilinear)
    h_k = Ā h_{k−1} + B̄ u_k,   y_k = Cᵀ h_k + D u_k,   K_k = Cᵀ Ā^k B̄

Kernel (fast path, ``kernel_cauchy``): the truncated generating function at the L-th roots of unity
z = ω_k is  K̂(z) = Σ_{k<L} K_k z^k = C̃ᵀ (I − Ā z)⁻¹ B̄  with  C̃ = (I − Ā^L)ᵀ C, and

    K̂(z) = 2 C̃ᵀ M(z)⁻¹ Δ B,   M(z) = 2(1 − z) I − (1 + z) Δ A
         = 2 [ k(C̃, ΔB) − (1+z) k(C̃, ΔP) k(P̄, ΔB) / (1 + (1+z) k(P̄, ΔP)) ]   (Woodbury)
    k(a, b)(z) = Σ_n a_n b_n / (2(1 − z) − (1 + z) ΔΛ_n)                         (Cauchy sums)

then K = irfft(K̂). Deviation said out loud: the paper writes this with g(z) = (2/Δ)(1 − z)/(1 + z)
and a factor 2/(1 + z); we multiply both through by (1 + z), which removes the pole at z = −1 (the
Nyquist node for even L) and changes nothing else. Its slow twin is ``ssmkit.lti.kernel`` on the dense
Ā, B̄ (``S4.dense``), which the tests compare it with.

Recurrent step (fast path, ``dplr_step``, O(n) per channel — App. C.2): with q = 2/Δ,

    I − Δ/2·A = Δ/2 (diag(q − Λ) + P P*)  ⇒  Ā = A₁ A₀,  B̄ = 2 A₁ B,
    A₀ = q I + A = diag(q + Λ) − P P*,     A₁ = (diag(q − Λ) + P P*)⁻¹ = R − R P (1 + P* R P)⁻¹ P* R
    (Woodbury, R = diag(q − Λ)⁻¹), so  h_k = A₁ (A₀ h_{k−1} + 2 B u_k)

— a diagonal scaling plus a rank-one correction for each of A₀ and A₁. Its slow twin is
``ssmkit.lti.recurrent`` on the dense Ā, B̄ (tested at 1e-12 in float64).

The layer trains C̃ (not C) for the length ``l_kernel`` it is tuned to. ``C`` holds the true C until the
first kernel call, which converts it; a longer request doubles the length, C̃ ← (I + Ā^L)ᵀ C̃, because
I − Ā^{2L} = (I − Ā^L)(I + Ā^L). ``step`` needs the true C: one solve with (I − Ā^L)ᵀ, cached while
gradients are off and the parameters unchanged.

State (ssmkit's one state protocol, shared with S4D): ``new_state(batch)`` returns an ``LTIState``
whose h holds the first halves of the conjugate pairs; ``forward(x, state)`` and ``step(x_t, state)``
start from ``state.h`` and replace it (a new tensor, so gradients flow). ``forward`` of a single token
with a state runs ``step``, so decoding through ``forward`` costs O(n) per token too. Empty inputs
(b = 0 or l = 0) give an empty output and leave the state as it was.

Deviations said out loud: n/2 entries of each conjugate pair are stored and completed on use
(``conj_complete``): the dense system is n-dimensional complex with a real output, and a sum over the
completed n entries of conj(p)·h is 2·Re of the sum over the stored half; complex tensors are stored as
real views; Re Λ = −exp(Lambda_log_re); each channel owns its Λ, P, B (not tied).

Shape letters: b batch, l length, d channels (``d_model``), n the state size N (``d_state``; n/2 stored),
m the number of roots of unity. ``h`` is the recurrent state, never a size.

Glossary (code -> paper): d_model H; d_state N; Lambda Λ; P P (Q = P̄); B B; C C̃ (or C while
l_kernel = 0); log_dt log Δ; Ab, Bb Ā, B̄; h x (b, d, n/2), the first half of the conjugate pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssmkit.layers.s4d import (
    SSM_OPTIM,
    LTIState,
    check_input,
    check_state,
    complex_dtype,
    new_lti_state,
)
from ssmkit.lti import convolve_fft, discretize_dense, nplr


def conj_complete(v: Tensor) -> Tensor:
    """(..., n/2) -> (..., n): append the conjugate halves."""
    return torch.cat([v, v.conj()], dim=-1)


def dplr_dense(Lambda: Tensor, P: Tensor) -> Tensor:
    """Dense A = diag(Λ) − P P* over the completed n states. (d, n/2) ×2 -> (d, n, n) complex."""
    lam, p = conj_complete(Lambda), conj_complete(P)  # (d, n)
    return torch.diag_embed(lam) - p[:, :, None] * p.conj()[:, None, :]  # (d, n, n)


def matrix_power(M: Tensor, k: int) -> Tensor:
    """M^k for (d, n, n) by repeated squaring (log₂ k products)."""
    out = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)  # (d, n, n)
    while k > 0:
        if k & 1:
            out = out @ M
        k >>= 1
        if k:
            M = M @ M
    return out


def dplr_step(h: Tensor, u: Tensor, Lambda: Tensor, P: Tensor, B: Tensor, dt: Tensor) -> Tensor:
    """One bilinear step h_k = Ā h_{k−1} + B̄ u_k of the DPLR system in O(n) per channel (App. C.2).

    Args:
        h: (b, d, n/2) complex, the stored halves of h_{k−1}.  u: (b, d) real input u_k.
        Lambda, P, B: (d, n/2) complex.  dt: (d,) Δ.
    Returns:
        h_k (b, d, n/2), equal to the dense ``Ā @ conj_complete(h) + B̄ u`` (first half).
    """
    q = (2 / dt)[:, None]  # (d, 1)
    Pc = P.conj()  # (d, n/2)
    Ph = 2 * (Pc * h).sum(-1, keepdim=True).real  # (b, d, 1)   P* h over the completed state
    v = (q + Lambda) * h - P * Ph + 2 * B * u[..., None]  # (b, d, n/2)   A₀ h + 2 B u
    R = 1 / (q - Lambda)  # (d, n/2)   diag(q − Λ)⁻¹
    RP = R * P  # (d, n/2)
    PRP = 2 * (Pc * RP).sum(-1, keepdim=True).real  # (d, 1)   P* R P, real
    Rv = R * v  # (b, d, n/2)
    PRv = 2 * (Pc * Rv).sum(-1, keepdim=True).real  # (b, d, 1)   P* R v
    return Rv - RP * (PRv / (1 + PRP))  # (b, d, n/2)   A₁ v by Woodbury


def roots_of_unity(length: int, half: bool, dtype: torch.dtype, device) -> Tensor:
    """z_k = exp(−2πi k/L): k = 0 … L//2 (rfft nodes) when ``half``, else k = 0 … L−1. -> (m,)."""
    m = length // 2 + 1 if half else length
    k = torch.arange(m, device=device, dtype=torch.float64)  # (m,)
    return torch.exp(-2j * math.pi * k / length).to(dtype)  # (m,)


def cauchy_woodbury(c: Tensor, w: Tensor, lam: Tensor, p: Tensor, dt: Tensor, z: Tensor) -> Tensor:
    """cᵀ M(z)⁻¹ w, M(z) = 2(1 − z) I − (1 + z) Δ(diag(Λ) − p p*), by Cauchy sums and Woodbury.

    Args:
        c: (d, n) left vector (C̃).  w: (..., d, n) right vector(s) (ΔB, or a state).
        lam, p: (d, n) conjugate-completed Λ and P.  dt: (d,) Δ.  z: (m,) nodes on the unit circle.
    Returns:
        (..., d, m) complex.
    """
    zp = 1 + z  # (m,)
    r = 1 / (2 * (1 - z) - zp * (dt[:, None] * lam)[..., None])  # (d, n, m)  Cauchy denominators
    dp = dt[:, None] * p  # (d, n)
    k_cw = torch.einsum("dn,...dn,dnm->...dm", c, w, r)  # (..., d, m)
    k_cp = torch.einsum("dn,dn,dnm->dm", c, dp, r)  # (d, m)
    k_pw = torch.einsum("dn,...dn,dnm->...dm", p.conj(), w, r)  # (..., d, m)
    k_pp = torch.einsum("dn,dn,dnm->dm", p.conj(), dp, r)  # (d, m)
    return k_cw - zp * k_cp * k_pw / (1 + zp * k_pp)  # (..., d, m)


def kernel_cauchy(Lambda: Tensor, P: Tensor, B: Tensor, Ct: Tensor, dt: Tensor, length: int) -> Tensor:
    """K (d, length) for C̃ tuned to ``length``: irfft of 2·C̃ᵀ M(z)⁻¹ ΔB at the rfft nodes.

    Args: Lambda, P, B, Ct: (d, n/2) complex (Ct = C̃ = (I − Ā^length)ᵀ C).  dt: (d,).
    """
    lam, p, b, c = (conj_complete(t) for t in (Lambda, P, B, Ct))  # (d, n) each
    z = roots_of_unity(length, True, lam.dtype, lam.device)  # (m,)
    Khat = 2 * cauchy_woodbury(c, dt[:, None] * b, lam, p, dt, z)  # (d, m)
    return torch.fft.irfft(Khat, n=length)  # (d, length)


class S4(nn.Module):
    """S4 layer (DPLR HiPPO-LegS, bilinear), ``y = K ∗ x + D ⊙ x`` per channel; input/output (b, l, d).

    Args:
        d_model: number of independent channels d.
        d_state: state size n (even); n/2 conjugate-pair entries are stored.
        dt_min, dt_max: range of the log-uniform initial Δ.
        device, dtype: of the parameters (the state is the matching complex dtype).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
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
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state = d_model, d_state
        d, n2 = d_model, d_state // 2
        f = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        Lambda, P, B, _V = nplr(d_state, "legs")  # (n/2,), (1, n/2), (n/2,), (n, n/2) complex128
        P = P[0]  # (n/2,) rank one
        log_dt = torch.rand(d, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(d, n2, dtype=torch.complex128)  # (d, n/2)
        self.log_dt = nn.Parameter(log_dt.to(**f))  # (d,)
        self.Lambda_log_re = nn.Parameter(torch.log(-Lambda.real).repeat(d, 1).to(**f))  # (d, n/2)
        self.Lambda_im = nn.Parameter(Lambda.imag.repeat(d, 1).to(**f))  # (d, n/2)
        self.P = nn.Parameter(torch.view_as_real(P.repeat(d, 1)).to(**f))  # (d, n/2, 2)
        self.B = nn.Parameter(torch.view_as_real(B.repeat(d, 1)).to(**f))  # (d, n/2, 2)
        self.C = nn.Parameter(torch.view_as_real(C).to(**f))  # (d, n/2, 2)  C, then C̃
        self.D = nn.Parameter(torch.randn(d, dtype=torch.float64).to(**f))  # (d,)
        self.register_buffer("l_kernel", torch.zeros((), dtype=torch.long, device=device))
        for p in (self.log_dt, self.Lambda_log_re, self.Lambda_im, self.P, self.B):
            p._ssm_optim = dict(SSM_OPTIM)
        self._C_cache: tuple | None = None

    # --- parameters and dense matrices ------------------------------------------------------------
    def ssm(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(Λ, P, B, C-or-C̃) complex (d, n/2) and Δ (d,)."""
        Lambda = torch.complex(-torch.exp(self.Lambda_log_re), self.Lambda_im)  # (d, n/2)
        as_c = torch.view_as_complex
        return Lambda, as_c(self.P), as_c(self.B), as_c(self.C), torch.exp(self.log_dt)

    def dense(self) -> tuple[Tensor, Tensor]:
        """Dense bilinear Ā (d, n, n) and B̄ (d, n) over the completed n states (``lti.discretize_dense``)."""
        Lambda, P, B, _, dt = self.ssm()
        Ab, Bb = discretize_dense(dplr_dense(Lambda, P), conj_complete(B)[..., None], dt, "bilinear")
        return Ab, Bb[..., 0]  # (d, n, n), (d, n)

    @torch.no_grad()
    def _tune_C(self, length: int) -> None:
        """Make ``C`` hold C̃ for a length >= ``length``: convert C on first use, then double."""
        L = int(self.l_kernel)
        if L >= length:
            return
        Ab, _ = self.dense()  # (d, n, n)
        eye = torch.eye(Ab.shape[-1], dtype=Ab.dtype, device=Ab.device)  # (n, n)
        c = conj_complete(torch.view_as_complex(self.C))  # (d, n)
        if L == 0:  # C̃ = (I − Ā^L)ᵀ C
            L = length
            c = torch.einsum("dji,dj->di", eye - matrix_power(Ab, L), c)  # (d, n)
        while L < length:  # C̃_{2L} = (I + Ā^L)ᵀ C̃_L
            c = torch.einsum("dji,dj->di", eye + matrix_power(Ab, L), c)  # (d, n)
            L *= 2
        self.C.copy_(torch.view_as_real(c[:, : self.d_state // 2]))
        self.l_kernel.fill_(L)

    def true_C(self) -> Tensor:
        """The C of y = Cᵀh, first halves (d, n/2): C itself while l_kernel = 0, else solve((I − Ā^L)ᵀ, C̃).

        Cached while gradients are off and no parameter changed (``step`` calls it once per token).
        """
        params = (self.log_dt, self.Lambda_log_re, self.Lambda_im, self.P, self.C, self.l_kernel)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)  # no device sync
        if not torch.is_grad_enabled() and self._C_cache is not None and self._C_cache[0] == key:
            return self._C_cache[1]
        L = int(self.l_kernel)
        Ct = torch.view_as_complex(self.C)  # (d, n/2)
        if L == 0:
            C = Ct
        else:
            Ab, _ = self.dense()  # (d, n, n)
            eye = torch.eye(Ab.shape[-1], dtype=Ab.dtype, device=Ab.device)  # (n, n)
            M = (eye - matrix_power(Ab, L)).transpose(-1, -2)  # (d, n, n)
            C = torch.linalg.solve(M, conj_complete(Ct)[..., None])[:, : self.d_state // 2, 0]  # (d, n/2)
        if not torch.is_grad_enabled():
            self._C_cache = (key, C)
        return C

    def kernel(self, length: int) -> Tensor:
        """The convolution kernel K (d, length), without the D skip (tunes C̃ to >= length first)."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        if length == 0:
            return self.D.new_zeros(self.d_model, 0)
        self._tune_C(length)
        Lambda, P, B, Ct, dt = self.ssm()
        return kernel_cauchy(Lambda, P, B, Ct, dt, int(self.l_kernel))[:, :length]  # (d, length)

    # --- the state protocol -----------------------------------------------------------------------
    def new_state(self, batch: int) -> LTIState:
        """Zero state h (batch, d, n/2) complex (the first halves of the conjugate pairs)."""
        return new_lti_state(batch, self.d_model, self.d_state // 2, self.D)

    def step(self, x_t: Tensor, state: LTIState) -> Tensor:
        """One input per sequence, O(n) per channel (``dplr_step``); y_k = Cᵀh_k + D u_k; replaces state.h.

        Args:
            x_t: (b, d) floating.  state: LTIState with h (b, d, n/2).
        Returns:
            y_t (b, d) in x_t's dtype.
        """
        check_input(x_t, self.d_model, self.D.dtype, "x_t", step=True)
        check_state(state, x_t.shape[0], self.d_model, self.d_state // 2, complex_dtype(self.D.dtype))
        u = x_t.to(self.D.dtype)  # (b, d)
        Lambda, P, B, _, dt = self.ssm()
        h = dplr_step(state.h, u, Lambda, P, B, dt)  # (b, d, n/2)
        y = 2 * (self.true_C() * h).sum(-1).real + self.D * u  # (b, d)
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
        if state is not None and l == 1:  # one-token decode: the O(n) step, not the dense Ā^l of a chunk
            return self.step(x[:, 0], state)[:, None]  # (b, 1, d)
        u = x.transpose(1, 2).to(self.D.dtype)  # (b, d, l)
        K = self.kernel(l)  # (d, l)
        y = convolve_fft(u, K, self.D, siso=True)  # (b, d, l)
        if state is None:
            return y.transpose(1, 2).to(x.dtype)  # (b, l, d)
        Lambda, P, B, Ct, dt = self.ssm()
        lam, p, bf, c = (conj_complete(t) for t in (Lambda, P, B, Ct))  # (d, n) each
        s = conj_complete(state.h)  # (b, d, n)
        # y_k += Cᵀ Ā^{k+1} s: the same resolvent with ΔB replaced by (I + ΔA/2) s.
        As = lam * s - p * (p.conj() * s).sum(-1, keepdim=True)  # (b, d, n)   A s
        w = s + (dt / 2)[:, None] * As  # (b, d, n)
        L = int(self.l_kernel)
        z = roots_of_unity(L, True, lam.dtype, lam.device)  # (m,)
        y = y + torch.fft.irfft(2 * cauchy_woodbury(c, w, lam, p, dt, z), n=L)[..., :l]  # (b, d, l)
        # h_{l−1} = Σ_k Ā^k B̄ u_{l−1−k} + Ā^l s. With a_k = Ā^k B̄ and c_k = u_{l−1−k} (real), Parseval
        # gives Σ_k a_k c_k = (1/l) Σ_j â_j conj(ĉ_j), and â_j = (I − Ā^l) · 2 M(z_j)⁻¹ ΔB.
        z = roots_of_unity(l, False, lam.dtype, lam.device)  # (l,)
        zp = 1 + z  # (l,)
        r = 1 / (2 * (1 - z) - zp * (dt[:, None] * lam)[..., None])  # (d, n, l)
        db, dp = dt[:, None] * bf, dt[:, None] * p  # (d, n)
        k_pb = torch.einsum("dn,dn,dnm->dm", p.conj(), db, r)  # (d, l)
        k_pp = torch.einsum("dn,dn,dnm->dm", p.conj(), dp, r)  # (d, l)
        Minv_b = (
            r * db[..., None] - r * dp[..., None] * (zp * k_pb / (1 + zp * k_pp))[:, None, :]
        )  # (d, n, l)
        chat = torch.fft.fft(u.flip(-1).to(lam.dtype), dim=-1)  # (b, d, l)
        v = (2 / l) * torch.einsum("dnm,bdm->bdn", Minv_b, chat.conj())  # (b, d, n)
        Ab, _ = self.dense()  # (d, n, n)
        Abl = matrix_power(Ab, l)  # (d, n, n)
        eye = torch.eye(Ab.shape[-1], dtype=Ab.dtype, device=Ab.device)  # (n, n)
        h_last = torch.einsum("dij,bdj->bdi", eye - Abl, v) + torch.einsum(
            "dij,bdj->bdi", Abl, s
        )  # (b, d, n)
        state.h = h_last[..., :n2]  # (b, d, n/2)
        return y.transpose(1, 2).to(x.dtype)  # (b, l, d)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, l_kernel={int(self.l_kernel)}"
