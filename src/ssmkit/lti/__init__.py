"""ssmkit.lti: the mathematics of linear time-invariant state space models, as pure functions on tensors.

    x'(t) = A x(t) + B u(t),  y = C x + D u        (continuous; ``continuous_response`` is its exact solution)
    x_k = Ā x_{k-1} + B̄ u_k,  y_k = C x_k + D u_k   (discrete; ``discretize`` maps (A, B, Δ) to (Ā, B̄))

Three equivalent ways to compute the discrete system — the theorem the tests check:
    ``recurrent`` (a loop), ``kernel`` + ``convolve`` (FFT convolution with K_k = C Ā^k B̄), and ``scan``
    (a parallel associative scan in O(log l) sequential steps; ``scan_system`` applies it to (Ā, B̄, C, D)).
HiPPO: ``hippo(n, measure)`` gives (A, B) for legs / legt / lagt / fout; ``nplr(n, measure)`` their
normal-plus-low-rank form A = V (diag(Λ) − P̃ P̃*) V* used by S4. ``expm`` is the matrix exponential behind ZOH.

Each validating function has an unchecked fast path that the layers call on their own tensors:
``discretize`` -> ``discretize_dense`` / ``discretize_diagonal``, ``kernel`` -> ``kernel_dense`` /
``kernel_vandermonde``, ``convolve`` -> ``convolve_fft``.

Shapes: state n, input p, output q, length l, leading batch dims ``...``. A is dense (..., n, n) or diagonal
(..., n); a diagonal system with B (..., n) is single-input single-output (SISO) and drops the p, q axes.
"""

from ssmkit.lti.continuous import continuous_response
from ssmkit.lti.discretize import METHODS, discretize, discretize_dense, discretize_diagonal
from ssmkit.lti.expm import expm
from ssmkit.lti.hippo import MEASURES, hippo, nplr, nplr_to_dense, rank_correction
from ssmkit.lti.kernels import kernel, kernel_dense, kernel_sequential, kernel_vandermonde, krylov, powers
from ssmkit.lti.modes import (
    convolve,
    convolve_fft,
    recurrent,
    scan,
    scan_parallel,
    scan_sequential,
    scan_system,
)

__all__ = [
    "METHODS",
    "MEASURES",
    "continuous_response",
    "convolve",
    "convolve_fft",
    "discretize",
    "discretize_dense",
    "discretize_diagonal",
    "expm",
    "hippo",
    "kernel",
    "kernel_dense",
    "kernel_sequential",
    "kernel_vandermonde",
    "krylov",
    "nplr",
    "nplr_to_dense",
    "powers",
    "rank_correction",
    "recurrent",
    "scan",
    "scan_parallel",
    "scan_sequential",
    "scan_system",
]
