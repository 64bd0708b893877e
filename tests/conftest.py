"""pytest configuration shared by the whole suite.

Puts this folder on ``sys.path`` so test modules can import shared helpers that live beside them
(e.g. ``from scan_cases import ScanCase`` — the selective-scan test inputs and comparisons), whatever
pytest's import mode.

Builds (or loads) ssmkit's C++ kernels once, before the first test, so that no single test pays the
one-time compile (a minute or two on a fresh cache) and timing-sensitive tests are not charged for it.
Without a compiler (or with ``SSMKIT_NO_CPU_EXT=1``) nothing is built and the pure-PyTorch paths run.
"""

import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def pytest_sessionstart(session) -> None:
    from ssmkit import kernels

    for ext in kernels.EXTENSIONS:  # the scan and the conv
        kernels.load(ext)  # never raises; a failure is the reason the fallback warning will give
    try:  # the engine's decode step (its module failing to import is its own tests' business)
        from ssmkit.engine.decode import DECODE
    except Exception as e:  # noqa: BLE001
        print(f"conftest: not building the decode kernel ahead: {type(e).__name__}: {e}", file=sys.stderr)
    else:
        kernels.load(DECODE)
