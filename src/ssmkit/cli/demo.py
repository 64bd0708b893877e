"""`ssmkit demo`: run the demonstration sections and write plots + tables to an output folder."""

import time
from pathlib import Path

from ssmkit.demo import SECTIONS


def add_parser(sub) -> None:
    sections = "; ".join(f"{name}: {what}" for name, (_, what) in SECTIONS.items())
    p = sub.add_parser(
        "demo",
        help="the main job: plots and tables that show the theory at work",
        description="Runs the demo sections and writes PNG plots and tables into OUT (printed at the end). "
        f"Sections: {sections}.",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: ./ssmkit-out/demo-<time>)")
    p.add_argument(
        "--only",
        default=None,
        metavar="SECTIONS",
        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)} (default: all)",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ssmkit.demo import check_sections, run_demo
    from ssmkit.utils import parse_list

    sections = check_sections(parse_list(args.only, str, "--only") if args.only is not None else None)
    out = args.out or Path("ssmkit-out") / time.strftime("demo-%Y%m%d-%H%M%S")
    files = run_demo(out, sections)
    print(f"\nWrote {len(files)} files to {out.resolve()}:")
    for f in files:
        print(f"  {f}")
    return 0
