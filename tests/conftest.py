"""pytest configuration shared by the whole suite.

Puts this folder on ``sys.path`` so test modules can import shared helpers that live beside them
(e.g. ``from scan_cases import ScanCase`` — the selective-scan test inputs and comparisons), whatever
pytest's import mode.
"""

import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
