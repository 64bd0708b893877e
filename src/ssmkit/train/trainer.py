"""The training loop: task-agnostic, single process or ``torchrun`` DDP, resumable bit for bit.

One step (global batch B split over W ranks, each rank holding B/W rows of the same global batch):

    logits  = model(inputs)                                   # (B/W, l, V) on this rank
    S_r, N_r = Σ cross-entropy, #scored positions on rank r
    N       = Σ_r N_r                                         # one all-reduce (with S, #correct, stop flag)
    loss_r  = W · S_r / N                                     # DDP averages gradients over W ranks …
    ∇       = (1/W) Σ_r ∇ loss_r = ∇ (Σ_r S_r / N)            # … so this is the global mean loss' gradient
    clip ‖∇‖ to grad_clip; AdamW step with lr = base_lr · lr_factor(step)

— the same losses and updates as one process with batch B (up to float round-off of the reductions).

Determinism: batch ``s`` is a pure function of (task seed, s); the learning rate is a pure function of s;
the checkpoint carries model, AdamW state, RNG states and s. So "N steps, save, resume, N steps" equals
"2N steps" exactly (``tests/test_trainer.py``). The schedule has no state of its own: its settings are
in the stored TrainConfig and its position is the step. Under DDP the checkpoint holds rank 0's RNG
states; the tasks draw nothing from the global RNGs, so this matters only for models with dropout.

Signals: SIGINT (Ctrl-C) and SIGTERM set a flag; at the end of the current step every rank agrees
(the flag rides on the step's all-reduce), rank 0 saves a checkpoint, and ``train`` returns normally.

Outputs in ``out_dir``: ``checkpoint.safetensors`` (latest), ``metrics.jsonl`` (one JSON object per log
or eval event), ``learning_curve.png``, ``summary.json``.

Glossary: B = batch_size (global), W = world size, S = summed loss, N = number of scored positions.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ssmkit.tasks.base import Task, masked_loss_sums
from ssmkit.train import distributed as D
from ssmkit.train.checkpoint import read_checkpoint, restore, save_checkpoint
from ssmkit.train.evaluate import evaluate
from ssmkit.train.metrics import MetricsLog, plot_learning_curve
from ssmkit.train.schedule import SCHEDULES, lr_factor


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings; every field is a ``ssmkit train`` flag.

    The defaults are the synthetic-task recipe measured in docs/results.md (batch 16, lr 1e-3 after 50
    warmup steps, constant until a linear decay over the last 20 % of 12000 steps: Mamba-S6 reaches ≥ 97 %
    on default-size Selective Copying in about 5 minutes on 2 cores); ``--task lm`` has its own defaults
    (``ssmkit.train.lm.LM_DEFAULTS``).
    """

    steps: int = 12000
    """Total optimiser steps."""
    batch_size: int = 16
    """Global batch size (split evenly over DDP ranks)."""
    lr: float = 1e-3
    """Peak learning rate."""
    ssm_lr: float | None = None
    """Learning rate of the SSM parameters (A, Δ, …); None: same as lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to SSM parameters, norms and biases)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: str = "wsd"
    """'wsd' (warmup, constant, then a linear decay to min_lr_ratio·lr over the last 20 % of the steps),
    'constant' (after warmup) or 'cosine' (warmup then cosine decay to min_lr_ratio·lr)."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine and wsd schedules as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    bf16: bool = False
    """Run forward/backward under bfloat16 autocast (state and accumulation stay float32)."""
    eval_every: int = 500
    """Evaluate every this many steps (and at the end); 0: only at the end."""
    eval_lengths: list[int] = field(default_factory=list)
    """Validation lengths (empty: the task's training length)."""
    eval_examples: int = 512
    """Examples per validation set."""
    eval_chunk: int | None = None
    """Stream validation sequences longer than this through the recurrent state (None: never)."""
    log_every: int = 10
    """Write a training-metrics line every this many steps."""
    ckpt_every: int = 500
    """Save the checkpoint every this many steps (and at the end); 0: only at the end."""
    time_limit_s: float | None = None
    """Stop after this many seconds of training in this call (save, evaluate, return), e.g. for a budget."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', …"""
    progress: bool = True
    """Show a tqdm progress bar (rank 0)."""

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.betas = tuple(self.betas)
        self.eval_lengths = [int(x) for x in self.eval_lengths]


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    final_eval: dict
    checkpoint: Path | None
    losses: list[float]
    """Training loss of every step run in this call (global mean over scored positions)."""


class _StopFlag:
    """Sets ``requested`` on SIGINT/SIGTERM while installed (main thread only)."""

    def __init__(self):
        self.requested = False
        self.signum = 0
        self._old: dict = {}

    def _handler(self, signum, frame):
        self.requested = True
        self.signum = signum

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    from ssmkit.train.optim import param_groups

    groups = param_groups(model, weight_decay=cfg.weight_decay, lr=cfg.lr, ssm_lr=cfg.ssm_lr)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=False)


def train(
    model: torch.nn.Module,
    task: Task,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: str | Path | None = None,
    meta: dict | None = None,
) -> TrainResult:
    """Train ``model`` on ``task``; see the module docstring.

    Args:
        model: ``model(ids (b, l)) -> logits (b, l, V)``; built identically on every rank.
        task: yields ``train_batch(step, b, rank, world)`` and ``validation_set(length, n)``.
        cfg: the TrainConfig.
        out_dir: folder for checkpoint, metrics and plots.
        resume: a checkpoint to continue from (model, optimiser, RNG, step).
        meta: JSON-serialisable description stored in checkpoints (e.g. model and task specs for
            ``ssmkit eval``).
    """
    info = D.setup(cfg.device)
    try:
        return _train(info, model, task, cfg, Path(out_dir), resume, meta)
    finally:  # a process group left alive at interpreter exit can abort the process (gloo's threads)
        D.teardown(info)


def _train(info, model, task, cfg, out: Path, resume, meta) -> TrainResult:
    """The body of :func:`train` once the process group (if any) is set up."""
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {info.world_size}")
    per_rank = cfg.batch_size // info.world_size
    model.to(info.device)
    optimizer = _build_optimizer(model, cfg)
    step = 0
    if resume is not None:
        tensors, header = read_checkpoint(resume)
        step = restore(tensors, header, model, optimizer)
        for g in optimizer.param_groups:
            g["base_lr"] = g.get("base_lr", g["lr"])
    net = DistributedDataParallel(model) if info.enabled else model
    meta = {**(meta or {}), "train": asdict(cfg), "world_size": info.world_size}
    ckpt_path = out / "checkpoint.safetensors"
    log = MetricsLog(out / "metrics.jsonl", enabled=info.is_main, truncate_after=step)
    eval_lengths = cfg.eval_lengths or [task.seq_len]
    val_sets = {n: task.validation_set(n, cfg.eval_examples) for n in eval_lengths} if info.is_main else {}
    tokens_per_step = cfg.batch_size * task.train_batch(0, 1).inputs.shape[1]

    def run_eval() -> dict:
        res = {}
        if info.is_main:
            for n, data in val_sets.items():
                r = evaluate(
                    model,
                    data,
                    batch_size=max(per_rank, 1),
                    chunk_size=cfg.eval_chunk,
                    device=info.device,
                    autocast_bf16=cfg.bf16,
                )
                res[n] = r
                log.write(
                    {"event": "eval", "step": step, "length": n, "val_loss": r["loss"], "val_acc": r["acc"]}
                )
        D.barrier(info)
        return res

    def save():
        if info.is_main:
            save_checkpoint(ckpt_path, model, optimizer, step, meta)
        D.barrier(info)

    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=task.name, dynamic_ncols=True, mininterval=1.0)
    losses: list[float] = []
    interrupted = stopped_by_time = False
    last_eval: dict = {}
    t0, tok_done = time.perf_counter(), 0
    model.train()
    with _StopFlag() as stop:
        while step < cfg.steps:
            factor = lr_factor(step, cfg.schedule, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            batch = task.train_batch(step, per_rank, info.rank, info.world_size).to(info.device)
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = net(batch.inputs)  # (b, l, V)
            loss_sum, n_correct, n_scored = masked_loss_sums(logits, batch.targets)
            over_time = cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s
            stop_now = (
                2.0 * stop.requested + 1.0 * over_time
            )  # 2: signal, 1: time limit (rank 0's clock decides)
            if not info.is_main:
                stop_now = 2.0 * stop.requested
            stats = torch.stack(
                [
                    loss_sum.detach().double(),
                    n_correct.double(),
                    n_scored.double(),
                    torch.tensor(stop_now, dtype=torch.float64, device=info.device),
                ]
            )
            D.all_reduce_sum(stats, info)  # (4,)
            loss = loss_sum * (info.world_size / stats[2])  # W · S_r / N
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0
                else None
            )
            optimizer.step()
            step += 1
            g_loss, g_acc = (stats[0] / stats[2]).item(), (stats[1] / stats[2]).item()
            losses.append(g_loss)
            tok_done += tokens_per_step
            if not math.isfinite(g_loss):
                raise FloatingPointError(f"training loss is {g_loss} at step {step}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                tps = tok_done / max(time.perf_counter() - t0, 1e-9)
                rec = {
                    "event": "train",
                    "step": step,
                    "loss": g_loss,
                    "acc": g_acc,
                    "lr": cfg.lr * factor,
                    "tokens_per_s": tps,
                    "time_s": time.perf_counter() - t0,
                }
                if gnorm is not None:
                    rec["grad_norm"] = float(gnorm)
                log.write(rec)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{g_loss:.3f}", acc=f"{g_acc:.3f}", tok_s=f"{tps:,.0f}", refresh=False
                    )
            if bar is not None:
                bar.update(1)
            if stats[3].item() >= 2:
                interrupted = True
                break
            if stats[3].item() >= 1:
                stopped_by_time = True
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                last_eval = run_eval()
                if info.is_main:
                    plot_learning_curve(log.path, out / "learning_curve.png")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save()
    if bar is not None:
        bar.close()
    save()
    if not interrupted:
        last_eval = run_eval()
    summary = {
        "step": step,
        "interrupted": interrupted,
        "stopped_by_time_limit": stopped_by_time,
        "wall_s": time.perf_counter() - t0,
        "final_eval": {str(k): v for k, v in last_eval.items()},
        "checkpoint": str(ckpt_path),
    }
    if info.is_main:
        plot_learning_curve(log.path, out / "learning_curve.png")
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "summary.json")
        if interrupted:
            print(f"\nInterrupted at step {step}; checkpoint saved to {ckpt_path} (continue with --resume).")
    return TrainResult(
        step=step, interrupted=interrupted, final_eval=last_eval, checkpoint=ckpt_path, losses=losses
    )
