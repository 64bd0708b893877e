"""`ssmkit demo`: the main job. Each section is a function ``section(out_dir: Path) -> list[Path]`` in a
module of this package that writes its plots/tables into ``out_dir`` and returns the files it wrote."""

from importlib import import_module
from pathlib import Path

# (module, function) of each section, in the order the demo runs them.
SECTIONS = [
    ("ssmkit.demo.lti", "run"),
    ("ssmkit.demo.s4", "run"),
    ("ssmkit.demo.selectivity", "run"),
]


def run_demo(out_dir: Path, sections: list[str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for module_name, func_name in SECTIONS:
        short = module_name.rsplit(".", 1)[-1]
        if sections is not None and short not in sections:
            continue
        print(f"[demo] {short} ...", flush=True)
        written += getattr(import_module(module_name), func_name)(out_dir)
    return written
