"""`ssmkit train`: train a model on a synthetic task (single process, or under torchrun for DDP).

    ssmkit train --task selective-copying --arch mamba --layer s6 --d-model 64 --n-layer 2 --seq-len 256
    torchrun --nproc_per_node=2 -m ssmkit train …          (DDP: gloo on CPU, nccl on GPU)
    ssmkit train --resume OUT/checkpoint.safetensors       (continues bit-identically)

Argument parsing only; the work is ``ssmkit.train.trainer.train``. Optimisation flags are generated
from ``TrainConfig`` (its field docstrings are the help).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ssmkit.cli._dataclass_args import add_dataclass_args, dataclass_from_args


def add_parser(sub) -> None:
    from ssmkit.tasks import TASKS
    from ssmkit.train.trainer import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model on a synthetic task (selective copying, induction heads, copying)",
        description="Train SequenceModel(arch, layer) on a task; writes checkpoint.safetensors, "
        "metrics.jsonl, learning_curve.png and summary.json into OUT (printed).",
    )
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        choices=[*sorted(TASKS), "lm"],
        default="selective-copying",
        help="the task (lm: language modelling on text, see its group below)",
    )
    g.add_argument("--seq-len", type=int, default=256, help="training length L (default: 256)")
    g.add_argument("--vocab-size", type=int, default=16, help="vocabulary size V (default: 16)")
    g.add_argument(
        "--n-tokens", type=int, default=16, help="data tokens M of the copying tasks (default: 16)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the data stream and the initialisation")
    m = p.add_argument_group("model")
    m.add_argument(
        "--arch",
        choices=["none", "h3", "mamba", "attention"],
        default="mamba",
        help="block architecture (default: mamba)",
    )
    m.add_argument(
        "--layer",
        default="s6",
        help="inner layer: s4d | s4 | s6; with --arch attention the positions: abs | rope (default: s6)",
    )
    m.add_argument("--d-model", type=int, default=64, help="model width (default: 64)")
    m.add_argument("--n-layer", type=int, default=2, help="number of blocks (default: 2)")
    m.add_argument("--d-state", type=int, default=16, help="SSM state size N (default: 16)")
    m.add_argument("--dt-min", type=float, default=1e-3, help="smallest initial Δ (default: 1e-3)")
    m.add_argument("--dt-max", type=float, default=0.1, help="largest initial Δ (default: 0.1)")
    o = p.add_argument_group("optimisation and bookkeeping")
    add_dataclass_args(o, TrainConfig)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: ./ssmkit-out/train-<task>-<time>)"
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="checkpoint to continue from; its model, task and training settings are used",
    )
    from ssmkit.train.lm import add_lm_args

    add_lm_args(p)  # --task lm: its flags and defaults (ssmkit.train.lm)
    p.add_argument(
        "--total-steps",
        type=int,
        default=None,
        help="with --resume: train until this many steps in total (exactly the longer run only for a "
        "constant schedule; cosine and wsd are stretched over the new total, so a finished wsd run goes "
        "back to the full lr before decaying again)",
    )
    p.add_argument(
        "--no-time-limit", action="store_true", help="with --resume: drop the stored --time-limit-s"
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from ssmkit.train.build import build_model, build_task, sequence_model_spec, task_spec
    from ssmkit.train.checkpoint import read_checkpoint
    from ssmkit.train.lm import is_lm_run, run_lm
    from ssmkit.train.trainer import TrainConfig, train

    if is_lm_run(args):
        return run_lm(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume is not None:
        _, header = read_checkpoint(args.resume)
        model_spec, tspec = header["model"], header["task"]
        cfg = TrainConfig(**header["train"])
        cfg.progress = args.progress
        if args.total_steps is not None:
            if args.total_steps < header["step"]:
                raise ValueError(
                    f"--total-steps {args.total_steps} is below the checkpoint's step {header['step']}"
                )
            cfg.steps = args.total_steps
        if args.no_time_limit:
            cfg.time_limit_s = None
        out = args.out or args.resume.parent
    elif args.total_steps is not None or args.no_time_limit:
        raise ValueError("--total-steps and --no-time-limit only apply with --resume")
    else:
        model_spec = sequence_model_spec(
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            n_layer=args.n_layer,
            arch=args.arch,
            layer=args.layer,
            d_state=args.d_state,
            dt_min=args.dt_min,
            dt_max=args.dt_max,
        )
        tspec = task_spec(args.task, args.seq_len, args.vocab_size, args.seed, args.n_tokens)
        cfg = dataclass_from_args(TrainConfig, args)
        out = args.out or Path("ssmkit-out") / time.strftime(f"train-{args.task}-%Y%m%d-%H%M%S")
    task = build_task(tspec)
    torch.manual_seed(tspec["seed"])
    model = build_model(model_spec)
    n_params = sum(p.numel() for p in model.parameters())
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    say(
        f"[train] {tspec['task']} · {model_spec['config'].get('arch')}/{model_spec['config'].get('layer')} "
        f"· {n_params:,} parameters · out {Path(out).resolve()}",
        flush=True,
    )
    res = train(model, task, cfg, out, resume=args.resume, meta={"model": model_spec, "task": tspec})
    for length, r in sorted(res.final_eval.items()):
        say(f"[train] step {res.step}: val L={length}: loss {r['loss']:.4f}  acc {100 * r['acc']:.2f}%")
    say(f"[train] wrote {Path(out).resolve()}")
    return 130 if res.interrupted else 0
