"""float32 against bfloat16-autocast training: the same run twice, both loss curves in one figure.

    python benchmarks/bf16_curves.py --task selective-copying --seed 1   # the README's default recipe
    python benchmarks/bf16_curves.py --task lm                           # ssmkit train --task lm's defaults

Each run is one ``ssmkit train`` subprocess with the task's defaults (the selective-copying recipe: Mamba,
2 layers, d_model 64, 12000 steps, wsd; the LM run: LM_DEFAULTS, 400 steps on the stdlib corpus), once
as it is and once with ``--bf16`` (forward and backward under bfloat16 autocast; master weights, AdamW
state and the scan's state in float32). Written into --out: the two run folders, ``curves.png``
(training loss, smoothed, and validation loss against step, float32 and bf16 overlaid) and
``curves.md`` (final validation loss / accuracy and training tokens/s of both). Runs already finished
in --out are reused, so a figure can be redrawn with ``--plot-only``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ssmkit.train.metrics import read_metrics
from ssmkit.utils import atomic_save, atomic_write_text

TASK_ARGS = {
    "selective-copying": ["--task", "selective-copying", "--arch", "mamba", "--layer", "s6"],
    "lm": ["--task", "lm"],
}


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing mean over k points (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_ARGS), default="selective-copying")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the runs go one by one)")
    p.add_argument("--out", type=Path, default=None, help="default: ssmkit-out/bf16-<task>-seed<seed>")
    p.add_argument("--plot-only", action="store_true", help="only redraw from the runs already in --out")
    args = p.parse_args()
    out = args.out or Path(f"ssmkit-out/bf16-{args.task}-seed{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    runs = {"float32": out / "fp32", "bf16 autocast": out / "bf16"}
    for label, run in runs.items():
        if args.plot_only or (run / "summary.json").exists():
            continue
        cmd = [sys.executable, "-m", "ssmkit", "train", *TASK_ARGS[args.task], "--seed", str(args.seed)]
        cmd += ["--out", str(run), "--threads", str(args.threads), "--no-progress"]
        cmd += ["--bf16"] if label.startswith("bf16") else []
        print("+", " ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"error: the {label} run failed (its log: {run})", file=sys.stderr)
            return 1

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = ["| run | steps | final val loss | final val acc (%) | train tokens/s |", "|---|---|---|---|---|"]
    for (label, run), color in zip(runs.items(), ("C0", "C3"), strict=True):
        recs = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        tr = [r for r in recs if r.get("event") == "train"]
        ev = [r for r in recs if r.get("event") == "eval"]
        if not tr:
            continue
        a1.plot([r["step"] for r in tr], smooth([r["loss"] for r in tr], 20), lw=1, color=color, label=label)
        a2.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", ms=3, color=color, label=label)
        last = ev[-1] if ev else {}
        speed = sorted(r["tokens_per_s"] for r in tr)[len(tr) // 2]
        rows.append(
            f"| {label} | {tr[-1]['step']} | {last.get('val_loss', float('nan')):.4f} | "
            f"{100 * last.get('val_acc', float('nan')):.1f} | {speed:.0f} |"
        )
    a1.set(xlabel="step", ylabel="training loss (mean of 20 logged steps)", yscale="log")
    a2.set(xlabel="step", ylabel="validation loss", yscale="log")
    for a in (a1, a2):
        a.legend(fontsize=8)
    fig.suptitle(f"{args.task}, seed {args.seed}: float32 vs bfloat16 autocast")
    fig.tight_layout()
    atomic_save(out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    table = "\n".join(rows) + "\n"
    atomic_write_text(out / "curves.md", table)
    print(table + f"figure: {out / 'curves.png'}")
    summary = {label: json.loads((run / "summary.json").read_text()) for label, run in runs.items()}
    atomic_write_text(out / "summaries.json", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
