"""Mamba paper Table 11 (Induction Heads length extrapolation) at CPU scale.

    python benchmarks/table11.py                  # Mamba (2 layers, d_model 64) and MHA-RoPE (2 layers,
                                                  # d_model 128, 8 heads) trained at L=256, V=16 (Mamba
                                                  # then fine-tuned 100 steps at L=65536, batch 2,
                                                  # lr 2e-3), then evaluated at 2^6 … 2^20 (attention:
                                                  # --attn-max-length)
    python benchmarks/table11.py --models mamba --steps 4000
    python benchmarks/table11.py --paper --device cuda   # Appendix E.1 step counts, batch 8
    python benchmarks/table11.py --models mamba,mamba2,hybrid --seeds 0,1,2   # one run per model × seed

Each model is one ``ssmkit train`` run and one ``ssmkit eval`` run (subprocesses); long sequences are
streamed through the recurrent state in chunks. Before they are scored, the SSM models are fine-tuned on
long sequences in the ``--finetune`` phases, each a further ``ssmkit train --init-from`` run; the paper
has no such phase (``--finetune none``).
Results: ``table11.md`` / ``table11.json`` in --out.
Paper setup (Appendix E.1): batch 8, 25–50 epochs of 8192 steps, Adam, constant lr 1e-3 (Mamba) or 2e-4.
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

PAPER = {  # Gu & Dao (2023) Table 11, test accuracy (%) at 2^6 … 2^20; "✓" = 100, None = out of memory
    "mha-abs": [100, 99.6, 100.0, 58.6, 26.6, 18.8, 9.8, 10.9, 7.8] + [None] * 6,
    "mha-rope": [100, 100, 100.0, 83.6, 31.3, 18.4, 8.6, 9.0, 5.5] + [None] * 6,
    "mamba": [100] * 15,
}
# name -> (arch, layer, d_model, lr, paper steps: 25 or 50 epochs of 8192 steps); the paper's lr per model
MODELS = {
    "mamba": ("mamba", "s6", 64, 1e-3, 25 * 8192),
    "mamba2": ("mamba2", "ssd", 64, 1e-3, 25 * 8192),  # not in the paper's table: Mamba-2's mixer
    "hybrid": ("hybrid", "none", 64, 1e-3, 25 * 8192),  # Mamba block, then attention without positions
    "mha-rope": ("attention", "rope", 128, 2e-4, 50 * 8192),
    "mha-abs": ("attention", "abs", 128, 2e-4, 25 * 8192),
}
# the fine-tuning of the default recipe: 100 steps of 2 × 65 536 tokens at lr 2e-3 (docs/results.md,
# "Table 11"; a second phase of 30 steps at 262 144 tokens, 262144:1:30:5e-4:wsd, fixed one seed and damaged
# another)
DEFAULT_FINETUNE = "65536:2:100:2e-3"


def parse_finetune(spec: str) -> list[tuple[int, int, int, float, str]]:
    """``--finetune`` as (length, batch, steps, lr, schedule) per phase; [] for 'none'."""
    if spec.strip() in ("", "none"):
        return []
    phases = []
    for item in spec.split(","):
        fields = item.strip().split(":")
        try:
            if len(fields) not in (4, 5):
                raise ValueError
            length, batch, steps, lr = int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])
            schedule = fields[4] if len(fields) == 5 else "constant"
            if min(length, batch, steps) < 1 or lr <= 0 or schedule not in ("constant", "wsd"):
                raise ValueError
        except ValueError:
            raise SystemExit(
                f"error: --finetune: expected LENGTH:BATCH:STEPS:LR[:constant|wsd] phases or 'none', "
                f"got {item.strip()!r}"
            ) from None
        phases.append((length, batch, steps, lr, schedule))
    return phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", default="mamba,mha-rope", help="comma-separated: mamba, mamba2, hybrid, mha-rope, mha-abs"
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds: one run per model and seed")
    p.add_argument("--dt-min", type=float, default=None, help="ssmkit train --dt-min (smallest initial Δ)")
    p.add_argument("--dt-max", type=float, default=None, help="ssmkit train --dt-max (largest initial Δ)")
    p.add_argument("--schedule", default="constant", help="ssmkit train --schedule (constant | wsd | cosine)")
    p.add_argument(
        "--ssm-lr-scale",
        type=float,
        default=1.0,
        help="learning rate of the SSM parameters (A_log, D, Δ bias) as a multiple of the model's lr",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=12000,
        help="training steps (12000: about 16 min on one thread beside another run, 2-core VM)",
    )
    p.add_argument(
        "--final-seq-len",
        type=int,
        default=0,
        help="train the recurrent models' last --final-steps steps at this length (0: off)",
    )
    p.add_argument("--final-steps", type=int, default=0, help="steps at --final-seq-len at the end")
    p.add_argument(
        "--finetune",
        default=DEFAULT_FINETUNE,
        help="after training, fine-tune the SSM models (mamba, mamba2) in phases, each a further ssmkit "
        "train --init-from run (fresh AdamW, no warm-up, no evaluation): comma-separated "
        "LENGTH:BATCH:STEPS:LR[:SCHEDULE] (SCHEDULE constant or wsd; default constant); 'none': no "
        f"fine-tuning, the paper's protocol (default: {DEFAULT_FINETUNE})",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply each model's learning rate")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--min-log2", type=int, default=6)
    p.add_argument("--max-log2", type=int, default=20)
    p.add_argument("--eval-log2", default="", help="evaluate only these log2 lengths, e.g. 8,12,16,18,20")
    p.add_argument("--attn-max-length", type=int, default=2**14, help="the paper's attention limit: 2^14")
    p.add_argument("--examples", type=int, default=256, help="validation examples per length")
    p.add_argument("--max-tokens", type=int, default=2**23, help="cap examples at MAX_TOKENS // length")
    p.add_argument("--chunk-size", type=int, default=8192, help="ssmkit eval --chunk-size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="models trained at the same time")
    p.add_argument(
        "--time-limit", type=float, default=None, help="stop each training after this many seconds"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per model")
    p.add_argument("--out", type=Path, default=Path("ssmkit-out/table11"))
    p.add_argument("--collect-only", action="store_true")
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's setup (Appendix E.1): batch 8, 25 epochs of 8192 steps (MHA-RoPE: 50), "
        "no fine-tuning, no time limit (needs a GPU and days)",
    )
    args = p.parse_args()
    if args.paper:
        args.batch_size, args.time_limit, args.finetune = 8, None, "none"
    phases = parse_finetune(args.finetune)
    models = parse_list(args.models, str, "--models")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"error: --models: {m!r} is not one of {', '.join(MODELS)}")
    seeds = parse_list(args.seeds, int, "--seeds")
    names = [f"{m}-seed{s}" for m in models for s in seeds]
    ks = (
        parse_list(args.eval_log2, int, "--eval-log2")
        if args.eval_log2
        else list(range(args.min_log2, args.max_log2 + 1))
    )
    lengths = [2**k for k in ks]
    args.out.mkdir(parents=True, exist_ok=True)

    def phase_runs(name: str) -> list[Path]:
        """The fine-tuning phases' folders (none for attention and hybrid models)."""
        arch = MODELS[name.rsplit("-seed", 1)[0]][0]
        if arch not in ("mamba", "mamba2"):
            return []
        return [args.out / name / ("finetune" if i == 0 else f"finetune{i + 1}") for i in range(len(phases))]

    def final_run(name: str) -> Path:
        """The folder whose checkpoint is scored: the last fine-tuning phase's when there is one."""
        return ([args.out / name] + phase_runs(name))[-1]

    def commands(name: str) -> list[list[str]]:
        model, seed = name.rsplit("-seed", 1)
        arch, layer, d, lr, paper_steps = MODELS[model]
        run = args.out / name
        th = ["--threads", str(args.threads)] if args.threads else []
        ssmkit = [sys.executable, "-m", "ssmkit"]
        task_and_model = [
            "--task",
            "induction-heads",
            "--arch",
            arch,
            "--layer",
            layer,
            "--d-model",
            str(d),
            "--n-layer",
            "2",
            "--vocab-size",
            "16",
            "--seed",
            seed,
            "--device",
            args.device,
            "--no-progress",
            *th,
        ]
        train = [
            *ssmkit,
            "train",
            *task_and_model,
            "--seq-len",
            str(args.seq_len),
            "--steps",
            str(paper_steps if args.paper else args.steps),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(lr * args.lr_scale),
            "--schedule",
            args.schedule,
            "--warmup-steps",
            "100",
            *(
                ["--final-seq-len", str(args.final_seq_len), "--final-steps", str(args.final_steps)]
                if args.final_seq_len and arch != "attention"
                else []
            ),
            *(["--dt-min", str(args.dt_min)] if args.dt_min is not None else []),
            *(["--dt-max", str(args.dt_max)] if args.dt_max is not None else []),
            *(["--ssm-lr", str(lr * args.lr_scale * args.ssm_lr_scale)] if args.ssm_lr_scale != 1 else []),
            "--eval-every",
            "500",
            "--eval-examples",
            "512",
            "--out",
            str(run),
            *(["--time-limit-s", str(args.time_limit)] if args.time_limit else []),
        ]
        stages, previous = [train], run
        for (length, batch, steps, ft_lr, schedule), folder in zip(phases, phase_runs(name)):
            stages.append(
                [
                    *ssmkit,
                    "train",
                    "--init-from",
                    str(previous / "checkpoint.safetensors"),
                    *task_and_model,
                    "--seq-len",
                    str(length),
                    "--steps",
                    str(steps),
                    "--batch-size",
                    str(batch),
                    "--lr",
                    str(ft_lr),
                    "--schedule",
                    schedule,
                    "--warmup-steps",
                    "0",
                    "--eval-every",
                    "0",
                    "--eval-examples",
                    "16",
                    "--out",
                    str(folder),
                ]
            )
            previous = folder
        max_len = args.attn_max_length if arch in ("attention", "hybrid") else lengths[-1]
        ev = [
            *ssmkit,
            "eval",
            str(final_run(name) / "checkpoint.safetensors"),
            "--lengths",
            ",".join(map(str, lengths)),
            "--examples",
            str(args.examples),
            "--max-tokens",
            str(args.max_tokens),
            "--max-length",
            str(max_len),
            "--chunk-size",
            str(args.chunk_size),
            "--device",
            args.device,
            *th,
        ]
        return [*stages, ev]

    if not args.collect_only:
        pending, running = list(names), []
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                (args.out / name).mkdir(parents=True, exist_ok=True)
                cmds = commands(name)
                atomic_write_text(
                    args.out / name / "command.txt", "\n".join(" ".join(c) for c in cmds) + "\n"
                )
                script = " && ".join(" ".join(f"'{x}'" for x in c) for c in cmds)
                env = dict(os.environ)
                if args.threads:
                    env["OMP_NUM_THREADS"] = str(args.threads)
                log = open(args.out / name / "run.log", "w")
                running.append(
                    (
                        subprocess.Popen(
                            ["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env
                        ),
                        name,
                        time.time(),
                    )
                )
                print(f"[table11] started {name}", flush=True)
            time.sleep(2)
            for item in list(running):
                if item[0].poll() is not None:
                    running.remove(item)
                    dt = time.time() - item[2]
                    print(f"[table11] finished {item[1]} rc={item[0].returncode} in {dt:.0f}s", flush=True)
    header = "| Model | steps | train wall (s) | " + " | ".join(f"2^{k}" for k in ks) + " |"
    lines = [header, "|" + "---|" * (3 + len(lengths))]
    result = {}
    for name in names:
        run, last = args.out / name, final_run(name)
        ev = last / "eval.json"
        summaries = [run / "summary.json"] + [f / "summary.json" for f in phase_runs(name)]
        if not ev.exists() or not all(f.exists() for f in summaries):
            lines.append(f"| {name} (ours) | not run | | " + " | ".join("" for _ in lengths) + " |")
            continue
        rows = {r["length"]: r for r in json.loads(ev.read_text())["rows"]}
        stages = [json.loads(f.read_text()) for f in summaries]
        cells = [
            "✗ (not run)" if rows.get(n, {}).get("skipped", True) else f"{100 * rows[n]['acc']:.1f}"
            for n in lengths
        ]
        steps = " + ".join(str(s["step"]) for s in stages)
        wall = sum(s["wall_s"] for s in stages)
        lines.append(f"| {name} (ours) | {steps} | {wall:.0f} | " + " | ".join(cells) + " |")
        result[name] = {"summary": stages[0], "finetune": stages[1:], "rows": list(rows.values())}
    for name in [m for m in models if m in PAPER]:
        paper = [PAPER[name][k - 6] for k in ks]
        lines.append(
            f"| {name} (paper) | | | " + " | ".join("✗" if v is None else f"{v:.1f}" for v in paper) + " |"
        )
    table = "\n".join(lines)
    atomic_write_text(args.out / "table11.md", table + "\n")
    atomic_write_text(
        args.out / "table11.json",
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "models": result}, indent=2),
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
