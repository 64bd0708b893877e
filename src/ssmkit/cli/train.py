"""`ssmkit train`: train a model on a task (single process, or under torchrun for DDP).

    ssmkit train --task selective-copying --arch mamba --layer s6 --d-model 64 --n-layer 2 --seq-len 256
    ssmkit train --task lm --data notes.txt                 (language modelling: MambaLM on bytes)
    torchrun --nproc_per_node=2 -m ssmkit train …          (DDP: gloo on CPU, nccl on GPU)
    ssmkit train --resume OUT/checkpoint.safetensors       (continues bit-identically)

Argument parsing only: the flags become typed configs (``TrainConfig``, a task config, ``ModelChoice``)
and the work is ``ssmkit.train.run.run`` / ``resume``. Optimisation flags are generated from
``TrainConfig`` and the language-modelling flags from ``LMTaskConfig`` (their field docstrings are the
help). The size and optimisation flags whose defaults differ between the synthetic tasks and ``--task
lm`` default to None here and are filled in from ``SYNTHETIC_DEFAULTS`` or ``LM_DEFAULTS`` once the task
is known.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ssmkit.cli._dataclass_args import add_dataclass_args, dataclass_from_args, flag_error

LM_DEFAULTS = {
    "d_model": 256,
    "n_layer": 4,
    "steps": 400,
    "batch_size": 16,
    "lr": 2e-3,
    "schedule": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "eval_every": 50,
    "eval_examples": 32,
    "ckpt_every": 100,
}
"""Defaults of ``ssmkit train --task lm`` (Mamba, byte tokens, stdlib corpus): 1.8 M parameters,
400 steps × 16 × 256 = 1.6 M tokens — about 2 min 40 s (≈ 10,000 tokens/s) on a quiet 2-core machine
(docs/lm.md)."""

MODEL_DEFAULTS = {"d_model": 64, "n_layer": 2, "vocab_size": 16}
"""Defaults of the synthetic tasks' model flags (TrainConfig's own defaults cover the rest)."""

LM_MODELS = {"mamba": "mamba_lm", "mamba2": "mamba2_lm", "transformer": "transformer_lm"}


def synthetic_defaults() -> dict:
    """The synthetic tasks' value of every flag in ``LM_DEFAULTS`` (and of --vocab-size)."""
    from ssmkit.train.config import TrainConfig

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in LM_DEFAULTS}
    return {**train, **MODEL_DEFAULTS}


def add_parser(sub) -> None:
    from ssmkit.tasks import TASKS
    from ssmkit.tasks.lm import LMTaskConfig
    from ssmkit.train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model on a task (selective copying, induction heads, copying, language modelling)",
        description="Train SequenceModel(arch, layer) on a synthetic task, or a language model on text "
        "(--task lm); writes checkpoint.safetensors, metrics.jsonl, learning_curve.png and summary.json "
        "into OUT (printed). One run per OUT at a time.",
    )
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        choices=[*sorted(TASKS), "lm"],
        default="selective-copying",
        help="the task (lm: language modelling on text, see its group below)",
    )
    g.add_argument("--seq-len", type=int, default=256, help="training length L (default: 256)")
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size V of a synthetic task (default: 16; --task lm: the tokenizer's)",
    )
    g.add_argument(
        "--n-tokens", type=int, default=16, help="data tokens M of the copying tasks (default: 16)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the data stream and the initialisation")
    m = p.add_argument_group("model")
    m.add_argument(
        "--arch",
        choices=["none", "h3", "mamba", "mamba2", "attention", "hybrid"],
        default="mamba",
        help="block architecture of a synthetic task's model; hybrid: Mamba blocks with attention blocks "
        "at odd indices (default: mamba)",
    )
    m.add_argument(
        "--layer",
        default="s6",
        help="inner layer: s4d | s4 | s6 (ssd with --arch mamba2); with --arch attention the positions: "
        "abs | rope | none, with --arch hybrid rope | none (default: s6)",
    )
    m.add_argument(
        "--headdim",
        type=int,
        default=None,
        help="Mamba-2 head size (--arch mamba2, --model mamba2; default: 16, --task lm: 64)",
    )
    m.add_argument("--d-model", type=int, default=None, help="model width (default: 64; --task lm: 256)")
    m.add_argument("--n-layer", type=int, default=None, help="number of blocks (default: 2; --task lm: 4)")
    m.add_argument("--d-state", type=int, default=16, help="SSM state size N (default: 16)")
    m.add_argument("--dt-min", type=float, default=1e-3, help="smallest initial Δ (default: 1e-3)")
    m.add_argument("--dt-max", type=float, default=0.1, help="largest initial Δ (default: 0.1)")
    o = p.add_argument_group("optimisation and bookkeeping")
    add_dataclass_args(
        o,
        TrainConfig,
        task_defaults={k: f"--task lm: {v}" for k, v in LM_DEFAULTS.items() if k not in MODEL_DEFAULTS},
    )
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
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="start a new run from this checkpoint's weights (fine-tuning: give the same model flags; the "
        "task and training flags are this run's, the optimiser and step start afresh)",
    )
    lm = p.add_argument_group(
        "language modelling (--task lm)",
        "The vocabulary comes from the tokenizer. The trained model is saved with save_pretrained, with "
        "its tokenizer, in OUT/model.",
    )
    lm.add_argument("--model", choices=sorted(LM_MODELS), default="mamba", help="LM kind (default: mamba)")
    add_dataclass_args(lm, LMTaskConfig, skip=("seq_len", "seed"))
    for action in lm._group_actions:  # --tokenizer also takes a Hub id here (resolved by _hub_tokenizer)
        if action.dest == "tokenizer":
            action.help = (
                "tokenizer.json file, a folder holding one, or a Hub id (org/name, fetched into or read "
                "from the Hugging Face cache; offline with HF_HUB_OFFLINE=1) (default: bytes, vocabulary 256)"
            )
    lm.add_argument("--n-head", type=int, default=4, help="transformer attention heads (default: 4)")
    lm.add_argument("--d-mlp", type=int, default=None, help="transformer MLP width (default: 4·d_model)")
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
    """Hand the configs to the one training driver."""
    from ssmkit.train.run import RunConfig, resume, run

    config = configs_from_args(args)
    if isinstance(config, RunConfig) and getattr(config.task, "tokenizer", None) is not None:
        config = dataclasses.replace(config, task=_hub_tokenizer(config.task))
    with flag_error(vars(args)):
        return run(config) if isinstance(config, RunConfig) else resume(config)


def _hub_tokenizer(task):
    """``task`` (an ``LMTaskConfig``) with its --tokenizer resolved to a local path: a file or folder as
    it is, a Hub id ("org/name") to the tokenizer files of its snapshot in the Hugging Face cache (fetched
    first unless offline), so the run and its checkpoint name a folder that exists."""
    from ssmkit.models.hub import resolve_tokenizer

    try:
        path = resolve_tokenizer(task.tokenizer)
    except (ValueError, FileNotFoundError, PermissionError, ImportError) as e:
        raise type(e)(f"--tokenizer: {e}") from None
    return dataclasses.replace(task, tokenizer=str(path))


def configs_from_args(args):
    """The parsed flags as the driver's typed config: a ``RunConfig``, or a ``ResumeConfig`` with --resume.

    The flags that default to None are filled in here from the defaults of the task asked for. Does no
    work beyond building (and so validating) the configs.
    """
    from ssmkit.tasks import TASKS
    from ssmkit.tasks.lm import LMTaskConfig
    from ssmkit.train.config import TrainConfig
    from ssmkit.train.run import ModelChoice, ResumeConfig, RunConfig

    args = argparse.Namespace(**vars(args))  # the caller's namespace stays as parsed
    with flag_error(vars(args)):
        if args.resume is not None and args.init_from is not None:
            raise ValueError("--init-from: starts a new run; --resume continues one: give one of them")
        if args.resume is not None:
            return ResumeConfig(
                checkpoint=args.resume,
                out=args.out,
                total_steps=args.total_steps,
                no_time_limit=args.no_time_limit,
                progress=args.progress,
                threads=args.threads,
            )
        if args.total_steps is not None or args.no_time_limit:
            raise ValueError("--total-steps and --no-time-limit only apply with --resume")
        is_lm = args.task == "lm"
        if is_lm and args.vocab_size is not None:
            raise ValueError(
                "--vocab-size: does not apply to --task lm (the tokenizer sets the vocabulary), "
                f"got {args.vocab_size}"
            )
        for name, value in (LM_DEFAULTS if is_lm else synthetic_defaults()).items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        if is_lm:
            task = dataclass_from_args(LMTaskConfig, args)
            kind = LM_MODELS[args.model]
        else:
            task = dataclass_from_args(TASKS[args.task][1], args)
            kind = "sequence"
        model = dataclass_from_args(ModelChoice, args, kind=kind)
        train = dataclass_from_args(TrainConfig, args)
        out = args.out or Path("ssmkit-out") / time.strftime(f"train-{args.task}-%Y%m%d-%H%M%S")
        return RunConfig(
            task=task, model=model, train=train, out=out, threads=args.threads, init_from=args.init_from
        )
