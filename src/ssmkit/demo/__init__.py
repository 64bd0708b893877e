"""`ssmkit demo`: the main job. Each section is a function ``run(out_dir: Path) -> list[Path]`` in a module of
this package that writes its plots/tables into ``out_dir`` (atomically) and returns the files it wrote.

Sections, in the order the demo runs them (``SECTIONS``; ``--only`` takes these names):
    lti          linear SSM kernels (HiPPO-LegS vs random), HiPPO memory, discretisation error table
    s4           convolution kernels of S4D-Lin/Inv/LegS and S4 at initialisation
    selectivity  Selective Copying: a selective SSM (S6) learns it, a time-invariant one (S4D) cannot
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

SECTIONS: dict[str, tuple[str, str]] = {
    "lti": ("ssmkit.demo.lti", "linear SSM kernels, HiPPO memory, discretisation error"),
    "s4": ("ssmkit.demo.s4", "S4D/S4 convolution kernels at initialisation"),
    "selectivity": ("ssmkit.demo.selectivity", "Selective Copying: S6 vs S4D (trains two small models)"),
}
"""name -> (module with ``run(out_dir)``, what it shows)."""


def check_sections(sections: list[str] | None) -> list[str]:
    """The sections to run, in demo order; ValueError naming the unknown ones and the valid names."""
    if sections is None:
        return list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(
            f"--only: unknown demo section {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"valid sections: {', '.join(SECTIONS)}"
        )
    return [s for s in SECTIONS if s in sections]


def run_demo(out_dir: Path, sections: list[str] | None = None) -> list[Path]:
    """Run ``sections`` (default: all) into ``out_dir``; returns every file written."""
    names = check_sections(sections)  # before anything is created or run
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in names:
        print(f"[demo] {name} ...", flush=True)
        written += import_module(SECTIONS[name][0]).run(out_dir)
    return written
