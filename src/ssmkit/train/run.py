"""The one training driver behind ``ssmkit train``: typed configs in, a trained run folder out.

    run(RunConfig(task=SelectiveCopyingConfig(...), model=ModelChoice(...), train=TrainConfig(...), out=...))
    run(RunConfig(task=LMTaskConfig(data="notes.txt"), model=ModelChoice(kind="mamba_lm", ...), ...))
    resume(ResumeConfig(checkpoint=Path("OUT/checkpoint.safetensors"), total_steps=24000))

Both build the task (``ssmkit.tasks``), then the model for the task's vocabulary (``ssmkit.train.build``),
then call ``ssmkit.train.trainer.train`` under the output folder's lock, and finish with what the task
leaves for users (a language model: ``OUT/model`` via ``save_pretrained`` with its tokenizer, and the
validation curve in bits per byte, ``OUT/val_bpb.json``). A resumed run takes its model, task and
training settings from the checkpoint; ``total_steps`` and ``no_time_limit`` are the two settings it
may change, for every task alike. Both return the process exit code: 0, or 128 + the signal number when
SIGINT (130) or SIGTERM (143) stopped the run after saving a checkpoint.

Under ``torchrun`` every rank runs the same driver; only rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ssmkit.models.config import Mamba2Config, MambaConfig
from ssmkit.models.sequence import SequenceModelConfig
from ssmkit.models.transformer_lm import TransformerConfig
from ssmkit.tasks import (
    CopyingConfig,
    InductionHeadsConfig,
    LMTask,
    LMTaskConfig,
    SelectiveCopyingConfig,
    build_task,
    task_from_config,
)
from ssmkit.tasks.base import Task
from ssmkit.train.build import ModelConfig, build_model, model_spec
from ssmkit.train.checkpoint import model_state, read_checkpoint
from ssmkit.train.config import TrainConfig
from ssmkit.train.distributed import resolve_device
from ssmkit.train.lock import output_lock
from ssmkit.train.metrics import read_metrics
from ssmkit.train.trainer import TrainResult, train
from ssmkit.utils import atomic_write_text, count_parameters

MODEL_KINDS = ("sequence", "mamba_lm", "mamba2_lm", "transformer_lm")
TaskConfig = SelectiveCopyingConfig | InductionHeadsConfig | CopyingConfig | LMTaskConfig


@dataclass
class ModelChoice:
    """The model ``ssmkit train`` builds; its vocabulary is the task's (set by the driver)."""

    kind: str = "sequence"
    """'sequence' (SequenceModel: ablation blocks), 'mamba_lm' (MambaLM), 'mamba2_lm' (MambaLM with
    Mamba-2 mixers) or 'transformer_lm'."""
    d_model: int = 64
    """Model width."""
    n_layer: int = 2
    """Number of blocks."""
    d_state: int = 16
    """SSM state size N (sequence, mamba_lm)."""
    dt_min: float = 1e-3
    """Smallest initial Δ (sequence, mamba_lm)."""
    dt_max: float = 0.1
    """Largest initial Δ (sequence, mamba_lm)."""
    arch: str = "mamba"
    """Block architecture of a sequence model: none | h3 | mamba | mamba2 | attention."""
    layer: str = "s6"
    """Inner layer of a sequence model: s4d | s4 | s6 (ssd with arch mamba2); with arch attention the
    positions: abs | rope."""
    headdim: int | None = None
    """Mamba-2 head size (arch mamba2, mamba2_lm); None: 16 for a sequence model, 64 for an LM."""
    n_head: int = 4
    """Attention heads (transformer_lm)."""
    d_mlp: int | None = None
    """MLP width (transformer_lm; None: 4·d_model)."""

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind: expected one of {MODEL_KINDS}, got {self.kind!r}")

    def config(self, vocab_size: int) -> ModelConfig:
        """The model config for a vocabulary of ``vocab_size`` tokens."""
        if self.kind == "sequence":
            return SequenceModelConfig(
                vocab_size=vocab_size,
                d_model=self.d_model,
                n_layer=self.n_layer,
                arch=self.arch,
                layer=self.layer,
                d_state=self.d_state,
                dt_min=self.dt_min,
                dt_max=self.dt_max,
                headdim=16 if self.headdim is None else self.headdim,
            )
        if self.kind == "mamba2_lm":
            return Mamba2Config(
                d_model=self.d_model,
                n_layer=self.n_layer,
                vocab_size=vocab_size,
                d_state=self.d_state,
                headdim=64 if self.headdim is None else self.headdim,
                dt_min=self.dt_min,
                dt_max=self.dt_max,
            )
        if self.kind == "mamba_lm":
            return MambaConfig(
                d_model=self.d_model,
                n_layer=self.n_layer,
                vocab_size=vocab_size,
                d_state=self.d_state,
                dt_min=self.dt_min,
                dt_max=self.dt_max,
            )
        return TransformerConfig(
            d_model=self.d_model,
            n_layer=self.n_layer,
            vocab_size=vocab_size,
            n_head=self.n_head,
            d_mlp=self.d_mlp,
        )


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected >= 1 (or unset: torch's choice), got {threads}")


@dataclass
class RunConfig:
    """A new training run."""

    task: TaskConfig
    """Which task, with its settings."""
    model: ModelChoice
    train: TrainConfig
    out: Path
    """Output folder (checkpoint, metrics, plots, summary; for a language model also model/)."""
    threads: int | None = None
    """torch CPU threads (None: torch's choice)."""
    init_from: Path | None = None
    """Start from the weights of this ``ssmkit train`` checkpoint (the same model; fine-tuning: the
    optimiser, step, schedule and data stream start afresh with this run's settings)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        _check_threads(self.threads)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
            if not self.init_from.is_file():
                raise FileNotFoundError(f"init_from: no such checkpoint {self.init_from}")


@dataclass
class ResumeConfig:
    """Continue a run from its checkpoint (model, task and training settings come from it)."""

    checkpoint: Path
    out: Path | None = None
    """Output folder (None: the checkpoint's folder)."""
    total_steps: int | None = None
    """Train until this many steps in total (None: the stored steps)."""
    no_time_limit: bool = False
    """Drop the stored time limit."""
    progress: bool = True
    """Show a progress bar."""
    threads: int | None = None
    """torch CPU threads (None: torch's choice)."""

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        _check_threads(self.threads)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints and writes


def run(config: RunConfig) -> int:
    """Train a new model on a new task; returns the exit code (see the module docstring)."""
    resolve_device(config.train.device)  # a bad --device fails before anything is written
    if config.threads:
        torch.set_num_threads(config.threads)
    task_cfg = config.task
    if isinstance(task_cfg, LMTaskConfig):
        task_cfg = task_cfg.resolved(config.out)
    with _lock(config.out):
        task = task_from_config(task_cfg, verbose=_is_main())
        spec = model_spec(config.model.config(task.vocab_size))
        weights = None
        if config.init_from is not None:
            tensors, header = read_checkpoint(config.init_from)
            if header.get("model") != spec:
                raise ValueError(
                    f"init_from: {config.init_from} holds the model {header.get('model')}, this run builds "
                    f"{spec}; give the same model flags"
                )
            weights = model_state(tensors)
        return _execute(spec, task, config.train, config.out, None, weights)


def resume(config: ResumeConfig) -> int:
    """Continue the run a checkpoint describes; returns the exit code."""
    if config.threads:
        torch.set_num_threads(config.threads)
    header = read_checkpoint(config.checkpoint)[1]
    cfg = TrainConfig.from_dict(header["train"])
    cfg = replace(cfg, progress=config.progress)
    if config.total_steps is not None:
        if config.total_steps < header["step"]:
            raise ValueError(
                f"total_steps: {config.total_steps} is below the checkpoint's step {header['step']}"
            )
        cfg = replace(cfg, steps=config.total_steps)
    if config.no_time_limit:
        cfg = replace(cfg, time_limit_s=None)
    resolve_device(cfg.device)
    out = Path(config.out or config.checkpoint.parent)
    with _lock(out):
        task = build_task(header["task"], verbose=_is_main())
        return _execute(header["model"], task, cfg, out, config.checkpoint)


def _lock(out: Path):
    """The output folder's lock on rank 0 (the trainer makes every rank agree on it)."""
    return output_lock(out) if _is_main() else contextlib.nullcontext()


def _execute(
    spec: dict, task: Task, cfg: TrainConfig, out: Path, checkpoint: Path | None, weights: dict | None = None
) -> int:
    torch.manual_seed(task.spec()["seed"])
    model = build_model(spec)
    if weights is not None:  # --init-from: the initialisation above is replaced, every tensor
        model.load_state_dict(weights, strict=True)
    say = print if _is_main() else (lambda *a, **k: None)
    say(f"[train] {_describe(task, spec, count_parameters(model))} · out {out.resolve()}", flush=True)
    res = train(model, task, cfg, out, resume=checkpoint, meta={"model": spec, "task": task.spec()})
    if _is_main():
        _report(task, model, res, out)
    return res.exit_code


def _describe(task: Task, spec: dict, n_params: int) -> str:
    if isinstance(task, LMTask):
        return (
            f"lm · {spec['kind']} · {n_params:,} parameters · {task.vocab_size} tokens · "
            f"{task.corpus.meta.n_train:,} training tokens"
        )
    c = spec["config"]
    return f"{task.name} · {c.get('arch')}/{c.get('layer')} · {n_params:,} parameters"


def _report(task: Task, model: torch.nn.Module, res: TrainResult, out: Path) -> None:
    """Print the validation results and write what the task leaves for users (rank 0)."""
    if isinstance(task, LMTask):
        curve = [
            {"step": r["step"], "val_loss": r["val_loss"], **task.eval_metrics(r["val_loss"])}
            for r in read_metrics(out / "metrics.jsonl")
            if r.get("event") == "eval"
        ]
        for c in curve:
            print(
                f"[train] step {c['step']:>6}: val loss {c['val_loss']:.4f} nats/token, "
                f"{c['val_bpb']:.4f} bits/byte"
            )
        atomic_write_text(out / "val_bpb.json", json.dumps(curve, indent=1))
    else:
        for length, r in sorted(res.final_eval.items()):
            print(f"[train] step {res.step}: val L={length}: loss {r['loss']:.4f}  acc {100 * r['acc']:.2f}%")
    if not res.interrupted:
        folder = task.export(model, out / "model")
        if folder is not None:
            print(
                f"[train] saved model + tokenizer to {folder.resolve()} (ssmkit generate {folder} --prompt …)"
            )
    print(f"[train] wrote {out.resolve()}")
