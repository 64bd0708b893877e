"""ssmkit's C++ kernels and the one loader that builds and loads them (see ``ssmkit.kernels.loader``).

    SCAN   the fused selective scan (``ssmkit/scan/csrc``), used by ``selective_scan(..., backend="cpu")``
    CONV   the causal depthwise conv1d + SiLU (``ssmkit/layers/csrc``), used by the Mamba mixer

``load(ext)`` returns the module or None (then ``reason(ext)`` says why, ``warn_fallback`` warns once);
``build(ext)`` builds ahead of time (``ssmkit kernels build``); ``status(ext)`` builds nothing.
This package sits below ``ssmkit.scan`` and ``ssmkit.layers``: it names their source files, imports neither.
"""

from __future__ import annotations

from pathlib import Path

from ssmkit.kernels.loader import (
    Extension,
    Status,
    build,
    cache_root,
    isa_flags,
    kernels_dir,
    load,
    reason,
    status,
    warn_fallback,
)

_PKG = Path(__file__).resolve().parent.parent  # src/ssmkit
_SCAN_CSRC = _PKG / "scan" / "csrc"
_CONV_CSRC = _PKG / "layers" / "csrc"

SCAN = Extension(
    name="scan",
    title="fused selective-scan kernel",
    sources=(_SCAN_CSRC / "selective_scan_cpu.cpp",),
    headers=(_SCAN_CSRC / "vec_math.h",),
    cflags=("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17"),
    ldflags=("-fopenmp",),
    expected_build="usually 1-2 minutes",
)

CONV = Extension(
    name="conv",
    title="causal conv1d kernel",
    sources=(_CONV_CSRC / "causal_conv1d_cpu.cpp",),
    cflags=("-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"),
    ldflags=("-fopenmp",),
    expected_build="usually under a minute",
)

EXTENSIONS = (SCAN, CONV)

__all__ = [
    "CONV",
    "EXTENSIONS",
    "SCAN",
    "Extension",
    "Status",
    "build",
    "cache_root",
    "isa_flags",
    "kernels_dir",
    "load",
    "reason",
    "status",
    "warn_fallback",
]
