"""Mamba paper Table 1 (Selective Copying: architecture × inner layer) at CPU scale, or the paper's setup.

    python benchmarks/table1.py                          # CPU scale: L=256, M=16, V=16, 2 layers,
                                                         # d_model 64, batch 16, constant lr 1e-3,
                                                         # 12000 steps, 2 cells at a time, 1 thread each
    python benchmarks/table1.py --jobs 6 --threads 2     # more cells in parallel on a bigger machine
    python benchmarks/table1.py --layers s6 --schedule wsd --seeds 0,1,2   # every S6 cell, 3 seeds
    python benchmarks/table1.py --archs mamba2 --layers ssd              # the Mamba-2 mixer's cell
    python benchmarks/table1.py --archs none --layers s6 --schedule wsd --lr 5e-3 --steps 24000 --seeds 0,1,2
                                                         # No-gate/S6 at its best recipe (97.5 % mean)
    python benchmarks/table1.py --paper                  # Appendix E.1: L=4096, 400K steps, constant lr 1e-4,
                                                         # batch 64 (needs a GPU and days)

Each cell is one ``ssmkit train`` run (a subprocess); the script then reads every run's summary.json
and writes ``table1.md`` / ``table1.json`` beside the paper's numbers into --out. Cells already trained
to --steps are skipped; a cell trained for fewer steps is resumed (``--resume --total-steps``), which
with the constant schedule gives exactly the longer run — so a grid can be extended step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ssmkit.utils import atomic_write_text, parse_list

PAPER = {  # Gu & Dao (2023) Table 1, accuracy (%); S4 = the LTI layer (we run S4D and, optionally, S4)
    ("none", "s4"): 18.3,
    ("none", "s6"): 97.0,
    ("h3", "s4"): 57.0,
    ("h3", "s6"): 99.7,
    ("mamba", "s4"): 56.4,
    ("mamba", "s6"): 99.8,
}
ARCH_NAME = {"none": "No gate", "h3": "H3", "mamba": "Mamba", "mamba2": "Mamba-2"}


def run_name(arch: str, layer: str, seed: int) -> str:
    """A cell's run folder; seed 0 keeps the unsuffixed name of single-seed grids."""
    return f"{arch}-{layer}" + (f"-seed{seed}" if seed else "")


def done_steps(out: Path) -> int:
    """Steps a cell's run has finished (0 when it has no summary yet)."""
    s = out / "summary.json"
    return (
        json.loads(s.read_text())["step"] if s.exists() and (out / "checkpoint.safetensors").exists() else 0
    )


def cell_command(args, arch: str, layer: str, seed: int, out: Path) -> list[str]:
    if done_steps(out):  # continue a finished shorter run; with a constant lr that equals the longer run
        cmd = [sys.executable, "-m", "ssmkit", "train", "--resume", str(out / "checkpoint.safetensors")]
        return cmd + ["--total-steps", str(args.steps), "--no-progress"]
    cmd = [
        sys.executable,
        "-m",
        "ssmkit",
        "train",
        "--task",
        "selective-copying",
        "--arch",
        arch,
        "--layer",
        layer,
        "--d-model",
        str(args.d_model),
        "--n-layer",
        str(args.n_layer),
        "--seq-len",
        str(args.seq_len),
        "--n-tokens",
        str(args.n_tokens),
        "--vocab-size",
        str(args.vocab_size),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--schedule",
        args.schedule,
        "--warmup-steps",
        str(args.warmup_steps),
        "--eval-every",
        str(args.eval_every),
        "--eval-examples",
        str(args.eval_examples),
        "--ckpt-every",
        str(args.ckpt_every),
        "--seed",
        str(seed),
        "--device",
        args.device,
        "--out",
        str(out),
        "--no-progress",
    ]
    if args.time_limit:
        cmd += ["--time-limit-s", str(args.time_limit)]
    cmd += ["--dt-min", str(args.dt_min), "--dt-max", str(args.dt_max)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="none,h3,mamba")
    p.add_argument("--layers", default="s4d,s6", help="comma-separated: s4d, s4, s6 (ssd: with mamba2)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-tokens", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="constant")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--seeds", default="0", help="comma-separated seeds: one run per cell and seed")
    p.add_argument("--dt-min", type=float, default=1e-3, help="smallest initial Δ")
    p.add_argument("--dt-max", type=float, default=0.1, help="largest initial Δ")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="cells run at the same time")
    p.add_argument(
        "--time-limit", type=float, default=None, help="stop each cell's training after this many seconds"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's setup: L=4096, 400K steps, constant lr 1e-4, batch 64",
    )
    p.add_argument("--out", type=Path, default=Path("ssmkit-out/table1"))
    p.add_argument("--collect-only", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args()
    if args.paper:
        args.seq_len, args.steps, args.lr, args.schedule, args.batch_size = (
            4096,
            400_000,
            1e-4,
            "constant",
            64,
        )
        args.warmup_steps = 0
    archs, layers = parse_list(args.archs, str, "--archs"), parse_list(args.layers, str, "--layers")
    seeds = parse_list(args.seeds, int, "--seeds")
    cells = [(a, layer) for a in archs for layer in layers if (a == "mamba2") == (layer == "ssd")]
    if not cells:
        raise SystemExit("error: no cell: the mamba2 arch goes with layer ssd and only with it")
    runs = [(a, layer, seed) for a, layer in cells for seed in seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        pending = [r for r in runs if done_steps(args.out / run_name(*r)) < args.steps]
        pending.sort(key=lambda r: r[1] == "s4d")  # the slow S6 / SSD cells first: shorter wall time
        running: list[tuple[subprocess.Popen, tuple, float]] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                a, layer, seed = pending.pop(0)
                run_dir = args.out / run_name(a, layer, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                cmd = cell_command(args, a, layer, seed, run_dir)
                with open(run_dir / "command.txt", "a") as f:
                    f.write(" ".join(cmd) + "\n")
                log = open(run_dir / "train.log", "a")
                env = dict(os.environ)
                if args.threads:
                    env["OMP_NUM_THREADS"] = str(args.threads)
                running.append(
                    (
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                        (a, layer, seed),
                        time.time(),
                    )
                )
                print(f"[table1] started {run_dir.name}", flush=True)
            time.sleep(2)
            for proc, cell, t0 in list(running):
                if proc.poll() is not None:
                    running.remove((proc, cell, t0))
                    dt = time.time() - t0
                    summary = args.out / run_name(*cell) / "summary.json"
                    if proc.returncode == 0 and summary.exists():
                        with open(summary.with_name("calls.jsonl"), "a") as f:  # one line per call
                            f.write(json.dumps(json.loads(summary.read_text())) + "\n")
                    msg = f"[table1] finished {run_name(*cell)} rc={proc.returncode} in {dt:.0f}s"
                    print(msg, flush=True)
    rows = []
    for a, layer, seed in runs:
        s = args.out / run_name(a, layer, seed) / "summary.json"
        if not s.exists():
            rows.append({"arch": a, "layer": layer, "seed": seed, "acc": None})
            continue
        summ = json.loads(s.read_text())
        ev = summ["final_eval"].get(str(args.seq_len)) or next(iter(summ["final_eval"].values()), None)
        calls = s.with_name("calls.jsonl")
        walls = [json.loads(x)["wall_s"] for x in calls.read_text().splitlines()] if calls.exists() else []
        evals = [
            r
            for r in map(json.loads, s.with_name("metrics.jsonl").read_text().splitlines())
            if r.get("event") == "eval"
        ]
        first97 = next((r["step"] for r in evals if r["val_acc"] >= 0.97), None)
        rows.append(
            {
                "arch": a,
                "layer": layer,
                "seed": seed,
                "acc": None if ev is None else 100 * ev["acc"],
                "steps": summ["step"],
                "wall_s": sum(walls) if walls else summ["wall_s"],
                "first_step_97": first97,
                "interrupted": summ["interrupted"],
            }
        )
    lines = [
        "| Arch | Layer | seed | ours acc (%) | steps | first step ≥ 97 % | wall (s) | paper acc (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = PAPER.get((r["arch"], "s4" if r["layer"] in ("s4", "s4d") else r["layer"]), "–")
        acc = "not run" if r["acc"] is None else f"{r['acc']:.1f}"
        paper_txt = f"{paper} (S4)" if r["layer"] in ("s4", "s4d") else f"{paper}"
        lines.append(
            f"| {ARCH_NAME[r['arch']]} | {r['layer'].upper()} | {r['seed']} | {acc} | {r.get('steps', '')} | "
            f"{r.get('first_step_97') or '–'} | {r.get('wall_s', 0):.0f} | {paper_txt} |"
        )
    if len(seeds) > 1:  # one line per cell: mean and the spread (min–max) over the seeds
        lines += [
            "",
            "| Arch | Layer | seeds | mean acc (%) | min–max | paper acc (%) |",
            "|---|---|---|---|---|---|",
        ]
        for a, layer in cells:
            accs = [r["acc"] for r in rows if (r["arch"], r["layer"]) == (a, layer) and r["acc"] is not None]
            if accs:
                paper = PAPER.get((a, "s4" if layer in ("s4", "s4d") else layer), "–")
                lines.append(
                    f"| {ARCH_NAME[a]} | {layer.upper()} | {len(accs)} | {sum(accs) / len(accs):.1f} | "
                    f"{min(accs):.1f}–{max(accs):.1f} | {paper} |"
                )
    table = "\n".join(lines)
    atomic_write_text(args.out / "table1.md", table + "\n")
    atomic_write_text(
        args.out / "table1.json",
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2),
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
