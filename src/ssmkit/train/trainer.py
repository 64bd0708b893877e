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

The steps, each a function below: ``setup`` (device, optimiser, resume, validation sets), ``fit`` (the
loop), ``train_step`` (one optimiser step), ``validate`` (every validation set) and ``save_checkpoint``;
``train`` runs them under the output folder's lock (``ssmkit.train.lock``: a second run into the same
folder is refused) after removing the temporary files a killed run left there.

Signals: SIGINT (Ctrl-C) and SIGTERM set a flag; at the end of the current step every rank agrees
(the flag rides on the step's all-reduce), rank 0 saves a checkpoint, and ``train`` returns normally
with ``stop_reason`` SIGNAL (``exit_code`` 128 + the signal number, the shell's convention: 130, 143).

Outputs in ``out_dir``: ``checkpoint.safetensors`` (latest), ``metrics.jsonl`` (one JSON object per log
or eval event, appended), ``learning_curve.png``, ``summary.json`` (these three written atomically). The
settings are a ``TrainConfig`` (``ssmkit.train.config``).

Glossary: B = batch_size (global), W = world size, S = summed loss, N = number of scored positions.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ssmkit.tasks.base import Batch, Task, masked_loss_sums
from ssmkit.train import checkpoint as ckpt
from ssmkit.train import distributed as D
from ssmkit.train.config import TrainConfig
from ssmkit.train.evaluate import evaluate
from ssmkit.train.lock import OutputLocked, output_lock
from ssmkit.train.metrics import MetricsLog, plot_learning_curve
from ssmkit.train.optim import param_groups
from ssmkit.train.schedule import lr_factor
from ssmkit.utils import atomic_write_text, remove_stale_temps


class StopReason(enum.Enum):
    """Why ``train`` returned."""

    FINISHED = "finished"
    """All ``cfg.steps`` steps ran."""
    TIME_LIMIT = "time_limit"
    """``cfg.time_limit_s`` ran out (rank 0's clock decides)."""
    SIGNAL = "signal"
    """SIGINT or SIGTERM arrived on some rank."""


@dataclass
class TrainResult:
    step: int
    """The step reached (= the checkpoint's)."""
    stop_reason: StopReason
    final_eval: dict
    """{length: {"loss", "acc", "n", …}} of the last evaluation ({} when a signal stopped the run)."""
    checkpoint: Path | None
    losses: list[float]
    """Training loss of every step run in this call (global mean over scored positions)."""
    signal: int = 0
    """The signal that stopped the run (stop_reason SIGNAL), else 0."""

    @property
    def interrupted(self) -> bool:
        return self.stop_reason is StopReason.SIGNAL

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number when a signal stopped the run (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signal if self.interrupted else 0


class _StopFlag:
    """Sets ``requested`` (and ``signum``) on SIGINT/SIGTERM while installed (main thread only)."""

    def __init__(self):
        self.requested = False
        self.signum = 0
        self._old: dict = {}

    def _handler(self, signum, frame):
        self.requested = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class _Run:
    """What one call of :func:`train` works on (built by :func:`setup`)."""

    info: D.DistInfo
    cfg: TrainConfig
    task: Task
    model: torch.nn.Module
    net: torch.nn.Module
    """``model``, wrapped in DistributedDataParallel under torchrun."""
    optimizer: torch.optim.AdamW
    out: Path
    meta: dict
    log: MetricsLog
    val_sets: dict[int, Batch]
    """{length: validation set} (rank 0 only; the other ranks hold none)."""
    per_rank: int
    step: int = 0


@dataclass
class _StepResult:
    loss: float
    acc: float
    lr: float
    grad_norm: float | None
    signal: bool
    """Some rank received SIGINT/SIGTERM."""
    time_up: bool
    """Rank 0's time limit ran out."""
    tokens: int
    """Tokens in the global batch."""


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
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
        task: a ``ssmkit.tasks.base.Task``.
        cfg: the TrainConfig.
        out_dir: folder for checkpoint, metrics and plots (locked while training).
        resume: a checkpoint to continue from (model, optimiser, RNG, step).
        meta: JSON-serialisable description stored in checkpoints (e.g. model and task specs for
            ``ssmkit eval``).
    """
    info = D.setup(cfg.device)
    out = Path(out_dir)
    try:
        with _locked(info, out):
            run = setup(info, model, task, cfg, out, resume, meta)
            return fit(run)
    finally:  # a process group left alive at interpreter exit can abort the process (gloo's threads)
        D.teardown(info)


@contextlib.contextmanager
def _locked(info: D.DistInfo, out: Path):
    """Rank 0 holds the output folder's lock and removes orphan temporary files; every rank learns (one
    all-reduce) whether it got the lock, so that a refused run stops on every rank."""
    with contextlib.ExitStack() as stack:
        error: OutputLocked | None = None
        if info.is_main:
            try:
                stack.enter_context(output_lock(out))
            except OutputLocked as e:
                error = e
        flag = torch.tensor([0.0 if error is None else 1.0], device=info.device)
        D.all_reduce_sum(flag, info)
        if flag.item() > 0:
            raise error or OutputLocked(f"--out {out}: rank 0 could not lock this folder")
        if info.is_main:
            remove_orphan_temps(out)
        yield


LEGACY_TEMPS = ("checkpoint.safetensors.*.tmp", "*.json.tmp", "*.jsonl.tmp", "*.png.tmp.png")
"""Temporary files that earlier ssmkit versions' writes left when killed (removed like today's)."""


def remove_orphan_temps(out: Path) -> list[Path]:
    """Delete the temporary files killed writes left in ``out`` and ``out/model``; call under the lock."""
    removed = remove_stale_temps(out) + remove_stale_temps(out / "model")
    for pattern in LEGACY_TEMPS:
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        print(f"[train] removed {len(removed)} temporary file(s) left by a killed run in {out}", flush=True)
    return removed


def setup(info: D.DistInfo, model, task: Task, cfg: TrainConfig, out: Path, resume, meta) -> _Run:
    """Move the model to the device, build the optimiser, restore a checkpoint, open the metrics log and
    draw the validation sets."""
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % info.world_size:
        raise ValueError(
            f"batch_size: expected a multiple of the world size {info.world_size}, got {cfg.batch_size}"
        )
    model.to(info.device)
    optimizer = _build_optimizer(model, cfg)
    step = 0
    if resume is not None:
        tensors, header = ckpt.read_checkpoint(resume)
        step = ckpt.restore(tensors, header, model, optimizer)
        for g in optimizer.param_groups:
            g["base_lr"] = g.get("base_lr", g["lr"])
    lengths = cfg.eval_lengths or [task.seq_len]
    return _Run(
        info=info,
        cfg=cfg,
        task=task,
        model=model,
        net=DistributedDataParallel(model) if info.enabled else model,
        optimizer=optimizer,
        out=out,
        meta={**(meta or {}), "train": asdict(cfg), "world_size": info.world_size},
        log=MetricsLog(out / "metrics.jsonl", enabled=info.is_main, truncate_after=step),
        val_sets={n: task.validation_set(n, cfg.eval_examples) for n in lengths} if info.is_main else {},
        per_rank=cfg.batch_size // info.world_size,
        step=step,
    )


def fit(run: _Run) -> TrainResult:
    """Step until ``cfg.steps``, a signal or the time limit; evaluate and checkpoint on schedule; then save,
    evaluate (unless a signal stopped the run) and write the summary."""
    cfg, info = run.cfg, run.info
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.step, desc=run.task.name, dynamic_ncols=True, mininterval=1.0)
    losses: list[float] = []
    reason, signum, last_eval = StopReason.FINISHED, 0, {}
    t0, tokens = time.perf_counter(), 0
    run.model.train()
    with _StopFlag() as stop:
        while run.step < cfg.steps:
            r = train_step(run, stop, t0)
            losses.append(r.loss)
            tokens += r.tokens
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                _log_step(run, r, tokens / max(time.perf_counter() - t0, 1e-9), time.perf_counter() - t0, bar)
            if bar is not None:
                bar.update(1)
            if r.signal:
                reason, signum = StopReason.SIGNAL, stop.signum or signal.SIGINT
                break
            if r.time_up:
                reason = StopReason.TIME_LIMIT
                break
            if _due(run.step, cfg.eval_every, cfg.steps):
                last_eval = validate(run)
                if info.is_main:
                    plot_learning_curve(run.log.path, run.out / "learning_curve.png")
            if _due(run.step, cfg.ckpt_every, cfg.steps):
                save_checkpoint(run)
    if bar is not None:
        bar.close()
    path = save_checkpoint(run)
    if reason is not StopReason.SIGNAL:
        last_eval = validate(run)
    result = TrainResult(run.step, reason, last_eval, path, losses, signum)
    if info.is_main:
        _write_summary(run, result, time.perf_counter() - t0)
    return result


def _due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (every ``every`` steps, 0: never) falls on ``step`` before the last."""
    return every > 0 and step % every == 0 and step < total


def train_step(run: _Run, stop: _StopFlag, t0: float) -> _StepResult:
    """One optimiser step on the global batch of ``run.step`` (see the module docstring); advances it."""
    cfg, info, optimizer = run.cfg, run.info, run.optimizer
    factor = lr_factor(run.step, cfg.schedule, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    final = cfg.final_seq_len is not None and run.step >= cfg.steps - cfg.final_steps
    length = cfg.final_seq_len if final else None  # None: the task's own length
    batch = run.task.train_batch(run.step, run.per_rank, info.rank, info.world_size, length).to(info.device)
    with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = run.net(batch.inputs)  # (b, l, V)
    loss_sum, n_correct, n_scored = masked_loss_sums(logits, batch.targets)
    time_up = info.is_main and cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s
    flags = [float(stop.requested), float(time_up)]
    stats = torch.tensor([0.0, 0.0, 0.0, *flags], dtype=torch.float64, device=info.device)  # (5,)
    stats[:3] = torch.stack([loss_sum.detach().double(), n_correct.double(), n_scored.double()])
    D.all_reduce_sum(stats, info)  # (5,) S, #correct, N, #ranks signalled, time up
    loss = loss_sum * (info.world_size / stats[2])  # W · S_r / N
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = (
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
    )
    optimizer.step()
    run.step += 1
    g_loss, g_acc = (stats[0] / stats[2]).item(), (stats[1] / stats[2]).item()
    if not math.isfinite(g_loss):
        raise FloatingPointError(f"training loss is {g_loss} at step {run.step}")
    return _StepResult(
        loss=g_loss,
        acc=g_acc,
        lr=cfg.lr * factor,
        grad_norm=None if gnorm is None else float(gnorm),
        signal=stats[3].item() > 0,
        time_up=stats[4].item() > 0,
        tokens=batch.inputs.numel() * info.world_size,
    )


def _log_step(run: _Run, r: _StepResult, tokens_per_s: float, elapsed: float, bar) -> None:
    rec = {
        "event": "train",
        "step": run.step,
        "loss": r.loss,
        "acc": r.acc,
        "lr": r.lr,
        "tokens_per_s": tokens_per_s,
        "time_s": elapsed,
    }
    if r.grad_norm is not None:
        rec["grad_norm"] = r.grad_norm
    run.log.write(rec)
    if bar is not None:
        bar.set_postfix(loss=f"{r.loss:.3f}", acc=f"{r.acc:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)


def validate(run: _Run) -> dict:
    """Evaluate every validation set on rank 0 (streamed in chunks of ``cfg.eval_chunk_size``) and log one
    "eval" record per length, with the task's extra metrics; returns {length: result}."""
    res = {}
    if run.info.is_main:
        for n, data in run.val_sets.items():
            r = evaluate(
                run.model,
                data,
                batch_size=max(run.per_rank, 1),
                chunk_size=run.cfg.eval_chunk_size,
                device=run.info.device,
                autocast_bf16=run.cfg.bf16,
            )
            extra = run.task.eval_metrics(r["loss"])
            res[n] = {**r, **extra}
            record = {
                "event": "eval",
                "step": run.step,
                "length": n,
                "val_loss": r["loss"],
                "val_acc": r["acc"],
            }
            run.log.write({**record, **extra})
    D.barrier(run.info)
    return res


def save_checkpoint(run: _Run) -> Path:
    """Rank 0 writes the checkpoint (atomically); every rank waits for it."""
    path = run.out / "checkpoint.safetensors"
    if run.info.is_main:
        ckpt.save_checkpoint(path, run.model, run.optimizer, run.step, run.meta)
    D.barrier(run.info)
    return path


def _write_summary(run: _Run, result: TrainResult, wall_s: float) -> None:
    summary = {
        "step": result.step,
        "interrupted": result.interrupted,
        "stopped_by_time_limit": result.stop_reason is StopReason.TIME_LIMIT,
        "stop_reason": result.stop_reason.value,
        "wall_s": wall_s,
        "final_eval": {str(k): v for k, v in result.final_eval.items()},
        "checkpoint": str(result.checkpoint),
    }
    plot_learning_curve(run.log.path, run.out / "learning_curve.png")
    atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2))
    if result.interrupted:
        print(
            f"\nInterrupted at step {result.step}; checkpoint saved to {result.checkpoint} "
            "(continue with --resume).",
            flush=True,
        )
