"""`ssmkit demo`: run the demonstration sections and write plots + tables to an output folder."""

import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: plots and tables that show the theory at work",
        description="Runs every demo section (linear SSM kernels, HiPPO memory, discretisation error, "
        "S4/S4D kernels, selectivity) and writes PNG plots and tables into OUT (printed at the end).",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: ./ssmkit-out/demo-<time>)")
    p.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ssmkit.demo import run_demo

    out = args.out or Path("ssmkit-out") / time.strftime("demo-%Y%m%d-%H%M%S")
    sections = args.only.split(",") if args.only else None
    files = run_demo(out, sections)
    print(f"\nWrote {len(files)} files to {out.resolve()}:")
    for f in files:
        print(f"  {f}")
    return 0
