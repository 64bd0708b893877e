"""S4: the structured state space layer with a diagonal-plus-low-rank (DPLR) HiPPO-LegS matrix.

Reference: Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces" (ICLR 2022,
arXiv 2111.00396), §3 and Algorithm 1 (Cauchy kernel + Woodbury identity at the roots of unity),
Appendix C (the generating function and the C̃ trick); reference/s4.md §1.3, §1.7–1.9. A walkthrough of
the kernel is in docs/s4-kernel.md.

Per channel, with N states and the DPLR matrix from ``ssmkit.lti.nplr("legs", N)``:

    A = diag(Λ) − P P*          (in the basis that diagonalises the normal part of HiPPO-LegS)
    Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A),   B̄ = Δ (I − Δ/2·A)⁻¹ B                       (bilinear)
    x_k = Ā x_{k−1} + B̄ u_k,   y_k = Cᵀ x_k + D u_k,   K_l = Cᵀ Ā^l B̄

Kernel (fast path, ``kernel_cauchy``): the truncated generating function at the L-th roots of unity
z = ω_k is  K̂(z) = Σ_{l<L} K_l z^l = C̃ᵀ (I − Ā z)⁻¹ B̄  with  C̃ = (I − Ā^L)ᵀ C, and

    K̂(z) = 2 C̃ᵀ M(z)⁻¹ Δ B,   M(z) = 2(1 − z) I − (1 + z) Δ A
         = 2 [ k(C̃, ΔB) − (1+z) k(C̃, ΔP) k(P̄, ΔB) / (1 + (1+z) k(P̄, ΔP)) ]   (Woodbury)
    k(a, b)(z) = Σ_n a_n b_n / (2(1 − z) − (1 + z) ΔΛ_n)                         (Cauchy sums)

then K = irfft(K̂). Deviation said out loud: the paper writes this with g(z) = (2/Δ)(1 − z)/(1 + z)
and a factor 2/(1 + z); we multiply both through by (1 + z), which removes the pole at z = −1 (the
Nyquist node for even L) and changes nothing else.

The layer trains C̃ (not C) for the length ``l_kernel`` it is tuned to. ``C`` holds the true C until the
first kernel call, which converts it; a longer request doubles the length, C̃ ← (I + Ā^L)ᵀ C̃, because
I − Ā^{2L} = (I − Ā^L)(I + Ā^L). The recurrent ``step`` uses dense Ā, B̄ and the true C recovered by
a solve with (I − Ā^L)ᵀ (``kernel_dense`` is the slow twin of ``kernel_cauchy``).

Deviations said out loud: N/2 entries of each conjugate pair are stored and completed on use
(``conj_complete``), so the dense system is N-dimensional complex with a real output; complex tensors
are stored as real views; Re Λ = −exp(Lambda_log_re); each channel owns its Λ, P, B (not tied).

Glossary (code -> paper): d_model H; d_state N; Lambda Λ; P P (Q = P̄); B B; C C̃ (or C while
l_kernel = 0); log_dt log Δ; dA, dB Ā, B̄; state x (b, h, N/2), the first half of the conjugate pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssmkit.layers.s4d import SSM_OPTIM, check_input, check_state, complex_dtype, fft_conv


def conj_complete(v: Tensor) -> Tensor:
    """(..., N/2) -> (..., N): append the conjugate halves."""
    return torch.cat([v, v.conj()], dim=-1)


def dplr_dense(Lambda: Tensor, P: Tensor) -> Tensor:
    """Dense A = diag(Λ) − P P* over the completed N states. (h, N/2) ×2 -> (h, N, N) complex."""
    lam, p = conj_complete(Lambda), conj_complete(P)  # (h, N)
    return torch.diag_embed(lam) - p[:, :, None] * p.conj()[:, None, :]  # (h, N, N)


def bilinear_dense(A: Tensor, B: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A), B̄ = Δ (I − Δ/2·A)⁻¹ B. A (h, N, N), B (h, N), dt (h,)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)  # (N, N)
    half = (dt / 2)[:, None, None] * A  # (h, N, N)
    left = eye - half  # (h, N, N)
    dA = torch.linalg.solve(left, eye + half)  # (h, N, N)
    dB = torch.linalg.solve(left, (dt[:, None] * B)[..., None])[..., 0]  # (h, N)
    return dA, dB


def matrix_power(M: Tensor, k: int) -> Tensor:
    """M^k for (h, N, N) by repeated squaring (log₂ k products)."""
    out = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)  # (h, N, N)
    while k > 0:
        if k & 1:
            out = out @ M
        k >>= 1
        if k:
            M = M @ M
    return out


def kernel_dense(dA: Tensor, dB: Tensor, C: Tensor, length: int) -> Tensor:
    """Slow twin of ``kernel_cauchy``: K_l = Re Cᵀ Ā^l B̄ by repeated mat-vec. -> (h, length) real."""
    out, x = [], dB  # x = Ā^l B̄, (h, N)
    for _ in range(length):
        out.append((C * x).sum(-1).real)  # (h,)
        x = torch.einsum("hij,hj->hi", dA, x)  # (h, N)
    return torch.stack(out, -1) if out else dB.real.new_zeros(dB.shape[0], 0)  # (h, length)


def roots_of_unity(length: int, half: bool, dtype: torch.dtype, device) -> Tensor:
    """z_k = exp(−2πi k/L): k = 0 … L//2 (rfft nodes) when ``half``, else k = 0 … L−1. -> (m,)."""
    m = length // 2 + 1 if half else length
    k = torch.arange(m, device=device, dtype=torch.float64)  # (m,)
    return torch.exp(-2j * math.pi * k / length).to(dtype)  # (m,)


def cauchy_woodbury(c: Tensor, w: Tensor, lam: Tensor, p: Tensor, dt: Tensor, z: Tensor) -> Tensor:
    """cᵀ M(z)⁻¹ w, M(z) = 2(1 − z) I − (1 + z) Δ(diag(Λ) − p p*), by Cauchy sums and Woodbury.

    Args:
        c: (h, N) left vector (C̃).  w: (..., h, N) right vector(s) (ΔB, or a state).
        lam, p: (h, N) conjugate-completed Λ and P.  dt: (h,) Δ.  z: (m,) nodes on the unit circle.
    Returns:
        (..., h, m) complex.
    """
    zp = 1 + z  # (m,)
    r = 1 / (2 * (1 - z) - zp * (dt[:, None] * lam)[..., None])  # (h, N, m)  Cauchy denominators
    dp = dt[:, None] * p  # (h, N)
    k_cw = torch.einsum("hn,...hn,hnm->...hm", c, w, r)  # (..., h, m)
    k_cp = torch.einsum("hn,hn,hnm->hm", c, dp, r)  # (h, m)
    k_pw = torch.einsum("hn,...hn,hnm->...hm", p.conj(), w, r)  # (..., h, m)
    k_pp = torch.einsum("hn,hn,hnm->hm", p.conj(), dp, r)  # (h, m)
    return k_cw - zp * k_cp * k_pw / (1 + zp * k_pp)  # (..., h, m)


def kernel_cauchy(Lambda: Tensor, P: Tensor, B: Tensor, Ct: Tensor, dt: Tensor, length: int) -> Tensor:
    """K (h, length) for C̃ tuned to ``length``: irfft of 2·C̃ᵀ M(z)⁻¹ ΔB at the rfft nodes.

    Args: Lambda, P, B, Ct: (h, N/2) complex (Ct = C̃ = (I − Ā^length)ᵀ C).  dt: (h,).
    """
    lam, p, b, c = (conj_complete(t) for t in (Lambda, P, B, Ct))  # (h, N) each
    z = roots_of_unity(length, True, lam.dtype, lam.device)  # (m,)
    Khat = 2 * cauchy_woodbury(c, dt[:, None] * b, lam, p, dt, z)  # (h, m)
    return torch.fft.irfft(Khat, n=length)  # (h, length)


class S4(nn.Module):
    """S4 layer (DPLR HiPPO-LegS, bilinear), ``y = K ∗ x + D ⊙ x`` per channel; input/output (b, l, h).

    Args:
        d_model: number of independent channels H.
        d_state: state size N (even); N/2 conjugate-pair entries are stored.
        dt_min, dt_max: range of the log-uniform initial Δ.
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
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(d_state, int) or d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (conjugate pairs), got {d_state!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        from ssmkit.lti import nplr

        self.d_model, self.d_state = d_model, d_state
        h, n2 = d_model, d_state // 2
        dtype = dtype or torch.get_default_dtype()
        f = {"device": device, "dtype": dtype}
        Lambda, P, B, _V = nplr(d_state, "legs")
        Lambda, P, B = (torch.as_tensor(t).to(torch.complex128).reshape(-1) for t in (Lambda, P, B))
        if not Lambda.numel() == P.numel() == B.numel() == n2:
            raise ValueError(f"nplr({d_state}, 'legs') must return rank-1 P and N/2 = {n2} entries")
        log_dt = torch.rand(h, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(h, n2, dtype=torch.complex128)  # (h, n2)
        self.log_dt = nn.Parameter(log_dt.to(**f))  # (h,)
        self.Lambda_log_re = nn.Parameter(torch.log(-Lambda.real).repeat(h, 1).to(**f))  # (h, n2)
        self.Lambda_im = nn.Parameter(Lambda.imag.repeat(h, 1).to(**f))  # (h, n2)
        self.P = nn.Parameter(torch.view_as_real(P.repeat(h, 1)).to(**f))  # (h, n2, 2)
        self.B = nn.Parameter(torch.view_as_real(B.repeat(h, 1)).to(**f))  # (h, n2, 2)
        self.C = nn.Parameter(torch.view_as_real(C).to(**f))  # (h, n2, 2)  C, then C̃
        self.D = nn.Parameter(torch.randn(h, dtype=torch.float64).to(**f))  # (h,)
        self.register_buffer("l_kernel", torch.zeros((), dtype=torch.long, device=device))
        for p in (self.log_dt, self.Lambda_log_re, self.Lambda_im, self.P, self.B):
            p._ssm_optim = dict(SSM_OPTIM)
        self._step_cache: tuple | None = None

    # --- parameters and dense matrices ------------------------------------------------------------
    def ssm(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(Λ, P, B, C-or-C̃) complex (h, N/2) and Δ (h,)."""
        Lambda = torch.complex(-torch.exp(self.Lambda_log_re), self.Lambda_im)  # (h, n2)
        as_c = torch.view_as_complex
        return Lambda, as_c(self.P), as_c(self.B), as_c(self.C), torch.exp(self.log_dt)

    def dense(self) -> tuple[Tensor, Tensor]:
        """Dense bilinear Ā (h, N, N) and B̄ (h, N) over the completed N states."""
        Lambda, P, B, _, dt = self.ssm()
        return bilinear_dense(dplr_dense(Lambda, P), conj_complete(B), dt)

    @torch.no_grad()
    def _tune_C(self, length: int) -> None:
        """Make ``C`` hold C̃ for a length >= ``length``: convert C on first use, then double."""
        L = int(self.l_kernel)
        if L >= length:
            return
        dA, _ = self.dense()  # (h, N, N)
        eye = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device)
        c = conj_complete(torch.view_as_complex(self.C))  # (h, N)
        n2 = self.d_state // 2
        if L == 0:  # C̃ = (I − Ā^L)ᵀ C
            L = length
            c = torch.einsum("hji,hj->hi", eye - matrix_power(dA, L), c)  # (h, N)
        while L < length:  # C̃_{2L} = (I + Ā^L)ᵀ C̃_L
            c = torch.einsum("hji,hj->hi", eye + matrix_power(dA, L), c)  # (h, N)
            L *= 2
        self.C.copy_(torch.view_as_real(c[:, :n2]))
        self.l_kernel.fill_(L)
        self._step_cache = None

    def true_C(self, dA: Tensor) -> Tensor:
        """The C of y = Cᵀx (h, N): C itself while l_kernel = 0, else solve((I − Ā^L)ᵀ, C̃)."""
        c = conj_complete(torch.view_as_complex(self.C))  # (h, N)
        L = int(self.l_kernel)
        if L == 0:
            return c
        eye = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device)
        M = (eye - matrix_power(dA, L)).transpose(-1, -2)  # (h, N, N)
        return torch.linalg.solve(M, c[..., None])[..., 0]  # (h, N)

    def kernel(self, length: int) -> Tensor:
        """The convolution kernel K (h, length), without the D skip (tunes C̃ to >= length first)."""
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if length == 0:
            return self.D.new_zeros(self.d_model, 0)
        self._tune_C(length)
        Lambda, P, B, Ct, dt = self.ssm()
        return kernel_cauchy(Lambda, P, B, Ct, dt, int(self.l_kernel))[:, :length]  # (h, length)

    # --- recurrent mode ---------------------------------------------------------------------------
    def new_state(self, batch: int) -> Tensor:
        """Zero state x (batch, h, N/2) complex (the first halves of the conjugate pairs)."""
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return torch.zeros(
            batch, self.d_model, self.d_state // 2, device=self.D.device, dtype=complex_dtype(self.D.dtype)
        )

    def step_matrices(self) -> tuple[Tensor, Tensor, Tensor]:
        """Dense Ā (h, N, N), B̄ (h, N) and true C (h, N); cached while gradients are off."""
        params = (self.log_dt, self.Lambda_log_re, self.Lambda_im, self.P, self.B, self.C)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params) + (int(self.l_kernel),)
        if not torch.is_grad_enabled() and self._step_cache is not None and self._step_cache[0] == key:
            return self._step_cache[1]
        dA, dB = self.dense()
        out = (dA, dB, self.true_C(dA))
        if not torch.is_grad_enabled():
            self._step_cache = (key, out)
        return out

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step x_k = Ā x_{k−1} + B̄ u_k, y_k = Cᵀx_k + D u_k (dense). x_t (b, h) -> (y_t, state)."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must have shape (b, h={self.d_model}), got {tuple(x_t.shape)}")
        n2 = self.d_state // 2
        check_state(state, x_t.shape[0], self.d_model, n2)
        dA, dB, C = self.step_matrices()
        x = torch.einsum("hij,bhj->bhi", dA, conj_complete(state)) + dB * x_t[..., None]  # (b, h, N)
        y = (C * x).sum(-1).real + self.D * x_t  # (b, h)
        return y.to(x_t.dtype), x[..., :n2]

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
        n2 = self.d_state // 2
        if state is not None:
            check_state(state, b, h, n2)
        u = x.transpose(1, 2)  # (b, h, l)
        K = self.kernel(l)  # (h, l)
        y = fft_conv(u.to(K.dtype), K) + self.D[:, None] * u  # (b, h, l)
        Lambda, P, B, Ct, dt = self.ssm()
        lam, p, bf, c = (conj_complete(t) for t in (Lambda, P, B, Ct))  # (h, N) each
        s = None if state is None else conj_complete(state.to(lam.dtype))  # (b, h, N)
        if s is not None and l > 0:
            # y_j += Cᵀ Ā^{j+1} s: the same resolvent with ΔB replaced by (I + ΔA/2) s.
            As = lam * s - p * (p.conj() * s).sum(-1, keepdim=True)  # (b, h, N)   A s
            w = s + (dt / 2)[:, None] * As  # (b, h, N)
            L = int(self.l_kernel)
            z = roots_of_unity(L, True, lam.dtype, lam.device)  # (m,)
            ys = torch.fft.irfft(2 * cauchy_woodbury(c, w, lam, p, dt, z), n=L)[..., :l]  # (b, h, l)
            y = y + ys
        y = y.transpose(1, 2).to(x.dtype)  # (b, l, h)
        if not return_state:
            return y
        if l == 0:
            return y, (self.new_state(b) if state is None else state)
        # x_{l−1} = Σ_j Ā^j B̄ u_{l−1−j} + Ā^l s. With a_j = Ā^j B̄ and c_j = u_{l−1−j} (real), Parseval
        # gives Σ_j a_j c_j = (1/l) Σ_k â_k conj(ĉ_k), and â_k = (I − Ā^l) · 2 M(z_k)⁻¹ ΔB.
        z = roots_of_unity(l, False, lam.dtype, lam.device)  # (l,)
        zp = 1 + z  # (l,)
        r = 1 / (2 * (1 - z) - zp * (dt[:, None] * lam)[..., None])  # (h, N, l)
        db, dp = dt[:, None] * bf, dt[:, None] * p  # (h, N)
        k_pb = torch.einsum("hn,hn,hnm->hm", p.conj(), db, r)  # (h, l)
        k_pp = torch.einsum("hn,hn,hnm->hm", p.conj(), dp, r)  # (h, l)
        Minv_b = (
            r * db[..., None] - r * dp[..., None] * (zp * k_pb / (1 + zp * k_pp))[:, None, :]
        )  # (h, N, l)
        chat = torch.fft.fft(u.flip(-1).to(lam.dtype), dim=-1)  # (b, h, l)
        v = (2 / l) * torch.einsum("hnm,bhm->bhn", Minv_b, chat.conj())  # (b, h, N)
        dA, _ = self.dense()  # (h, N, N)
        dAl = matrix_power(dA, l)  # (h, N, N)
        eye = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device)
        last = torch.einsum("hij,bhj->bhi", eye - dAl, v)  # (b, h, N)
        if s is not None:
            last = last + torch.einsum("hij,bhj->bhi", dAl, s)  # (b, h, N)
        return y, last[..., :n2]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, l_kernel={int(self.l_kernel)}"
