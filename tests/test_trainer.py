"""Trainer: schedules against closed forms, atomic checkpoint round trip, resume bit for bit
(2N steps == N steps, interrupt by SIGINT, save, resume, N steps), metrics/plot outputs."""

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from ssmkit.tasks import Copying, CopyingConfig, SelectiveCopying, SelectiveCopyingConfig
from ssmkit.train.checkpoint import read_checkpoint
from ssmkit.train.schedule import lr_factor
from ssmkit.train.trainer import StopReason, TrainConfig, train


class ToyLM(nn.Module):
    """Embedding -> causal running mean + causal conv -> linear head: tiny, deterministic, causal."""

    def __init__(self, vocab: int, d: int = 16, interrupt_at_call: int | None = None, sig=signal.SIGINT):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 4, padding=3)
        self.head = nn.Linear(2 * d, vocab)
        self.calls = 0
        self.interrupt_at_call = interrupt_at_call
        self.sig = sig

    def forward(self, ids, cache=None):  # cache: the state protocol (no state here)
        self.calls += 1
        if self.training and self.calls == self.interrupt_at_call:
            os.kill(os.getpid(), self.sig)  # as if the user pressed Ctrl-C (or kill) during this step
        h = self.emb(ids)  # (b, l, d)
        l = ids.shape[1]
        mean = h.cumsum(1) / torch.arange(1, l + 1).view(1, l, 1)  # (b, l, d)
        c = self.conv(h.transpose(1, 2))[..., :l].transpose(1, 2)  # (b, l, d)
        return self.head(torch.cat([mean, torch.tanh(c)], -1))  # (b, l, V)


def test_lr_factor_closed_forms():
    assert lr_factor(0, "constant", 4, 100) == pytest.approx(0.25)
    assert lr_factor(3, "constant", 4, 100) == pytest.approx(1.0)
    assert lr_factor(50, "constant", 0, 100) == 1.0
    assert lr_factor(0, "cosine", 0, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(50, "cosine", 0, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, "cosine", 0, 100, 0.1) == pytest.approx(0.1)
    w, s, r, t = 10, 110, 0.2, 35
    assert lr_factor(t, "cosine", w, s, r) == pytest.approx(
        r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 25 / 100))
    )
    # wsd over S = 100: warmup 4, flat until step 79, then (1 - 0.9·k/20) for the k-th of the last 20 steps
    assert lr_factor(0, "wsd", 4, 100, 0.1) == pytest.approx(0.25)
    assert [lr_factor(s, "wsd", 4, 100, 0.1) for s in (4, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(80, "wsd", 4, 100, 0.1) == pytest.approx(1 - 0.9 / 20)
    assert lr_factor(89, "wsd", 4, 100, 0.1) == pytest.approx(1 - 0.9 * 10 / 20)
    assert lr_factor(99, "wsd", 4, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(150, "wsd", 4, 100, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, "linear", 0, 10)


def _cfg(steps, **kw):
    base = dict(
        steps=steps,
        batch_size=8,
        lr=3e-3,
        schedule="cosine",
        warmup_steps=3,
        eval_every=0,
        eval_examples=16,
        log_every=1,
        ckpt_every=0,
        device="cpu",
        progress=False,
        weight_decay=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bit_identical(tmp_path):
    task = SelectiveCopying(SelectiveCopyingConfig(seq_len=24, n_tokens=4, vocab_size=8, seed=1))
    n = 6
    torch.manual_seed(0)
    full_model = ToyLM(8)
    full = train(full_model, task, _cfg(2 * n), tmp_path / "full")
    assert full.step == 2 * n and not full.interrupted and len(full.losses) == 2 * n

    torch.manual_seed(0)
    first = ToyLM(8, interrupt_at_call=n)  # SIGINT arrives during step n; the trainer stops after it
    r1 = train(first, task, _cfg(2 * n), tmp_path / "split")
    assert r1.interrupted and r1.step == n
    assert r1.stop_reason is StopReason.SIGNAL and r1.exit_code == 130
    torch.manual_seed(123)  # a different init and RNG state: everything must come from the checkpoint
    second = ToyLM(8)
    torch.rand(7)
    r2 = train(second, task, _cfg(2 * n), tmp_path / "split", resume=r1.checkpoint)
    assert r2.step == 2 * n and not r2.interrupted
    assert r2.stop_reason is StopReason.FINISHED and r2.exit_code == 0
    assert r1.losses + r2.losses == full.losses  # exact equality, step by step
    for (k, a), (_, b) in zip(full_model.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    _, header = read_checkpoint(tmp_path / "split" / "checkpoint.safetensors")
    assert header["step"] == 2 * n
    # metrics.jsonl has each train step exactly once after the resume
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["event"] == "train"
    ]
    assert steps == list(range(1, 2 * n + 1))


def test_outputs_and_learning(tmp_path):
    task = Copying(CopyingConfig(seq_len=8, n_tokens=2, vocab_size=6, seed=0))
    torch.manual_seed(0)
    res = train(
        ToyLM(6, d=32), task, _cfg(60, lr=1e-2, eval_every=30, eval_lengths=[8, 12], log_every=5), tmp_path
    )
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["event"] == "eval"]
    assert {(r["step"], r["length"]) for r in evals} == {(30, 8), (30, 12), (60, 8), (60, 12)}
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 60
    assert res.losses[-1] < res.losses[0]  # it trains
    assert set(res.final_eval) == {8, 12}
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]  # atomic writes leave no temporaries


def test_checkpoint_restores_optimizer_and_rng(tmp_path):
    from ssmkit.train.checkpoint import restore, save_checkpoint

    torch.manual_seed(0)
    m = ToyLM(5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 5, (2, 6))).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", m, opt, 17, {"note": "x"})
    expected_next = torch.rand(3)
    m2 = ToyLM(5)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    tensors, header = read_checkpoint(tmp_path / "c.safetensors")
    assert restore(tensors, header, m2, opt2) == 17 and header["note"] == "x"
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)
    for p, q in zip(opt.state.values(), opt2.state.values()):
        torch.testing.assert_close(p["exp_avg_sq"], q["exp_avg_sq"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not an ssmkit"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        read_checkpoint(tmp_path / "other.safetensors")


def test_bad_config():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="^steps: expected >= 1, got 0$"):
        TrainConfig(steps=0)
    for name, value in [("ckpt_every", -1), ("eval_every", -1), ("grad_clip", -1.0), ("eval_chunk_size", 0)]:
        with pytest.raises(ValueError, match=f"^{name}: expected .*, got {value}$"):
            TrainConfig(**{name: value})


def test_config_from_an_older_checkpoint_header():
    """Headers written before the chunk flag was renamed call eval_chunk_size 'eval_chunk'."""
    old = {k: v for k, v in __import__("dataclasses").asdict(TrainConfig()).items() if k != "eval_chunk_size"}
    cfg = TrainConfig.from_dict({**old, "eval_chunk": 64, "betas": [0.9, 0.95]})
    assert cfg.eval_chunk_size == 64 and cfg.betas == (0.9, 0.95)


def test_sigterm_stops_saves_and_reports_143(tmp_path):
    task = Copying(CopyingConfig(seq_len=8, n_tokens=2, vocab_size=6))
    torch.manual_seed(0)
    res = train(ToyLM(6, interrupt_at_call=3, sig=signal.SIGTERM), task, _cfg(50), tmp_path)
    assert res.stop_reason is StopReason.SIGNAL and res.signal == signal.SIGTERM and res.exit_code == 143
    assert res.step == 3 and res.final_eval == {}
    assert read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["step"] == 3


def test_time_limit_stops_saves_and_evaluates(tmp_path):
    task = Copying(CopyingConfig(seq_len=8, n_tokens=2, vocab_size=6))
    torch.manual_seed(0)
    res = train(ToyLM(6), task, _cfg(50, time_limit_s=0.0), tmp_path)
    assert res.step == 1 and not res.interrupted and 8 in res.final_eval
    assert res.stop_reason is StopReason.TIME_LIMIT and res.exit_code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by_time_limit"] and summary["step"] == 1
    _, header = read_checkpoint(tmp_path / "checkpoint.safetensors")
    assert header["step"] == 1


def test_bf16_autocast_runs_and_changes_numerics(tmp_path):
    task = Copying(CopyingConfig(seq_len=8, n_tokens=2, vocab_size=6))
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        losses[bf16] = train(ToyLM(6), task, _cfg(3, bf16=bf16), tmp_path / str(bf16)).losses
    assert all(math.isfinite(x) for x in losses[True])
    assert losses[True] != losses[False]  # autocast really ran in bfloat16 …
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=0.05, atol=0.05)


def test_final_steps_train_at_final_seq_len_and_resume_across_the_switch(tmp_path):
    """The length curriculum: steps [steps − final_steps, steps) draw the task's batch of that step at
    final_seq_len (the same seeded stream, longer sequences); a run interrupted before the switch and
    resumed equals the straight run, loss for loss."""
    task = SelectiveCopying(SelectiveCopyingConfig(seq_len=24, n_tokens=4, vocab_size=8, seed=1))
    lengths = []

    class Recording(ToyLM):
        def forward(self, ids, cache=None):
            if self.training:
                lengths.append(ids.shape[1])
            return super().forward(ids, cache)

    cfg = _cfg(8, final_seq_len=40, final_steps=3)
    torch.manual_seed(0)
    full = train(Recording(8), task, cfg, tmp_path / "full")
    assert lengths == [28] * 5 + [44] * 3  # selective copying's inputs: region + n_tokens = 4 queries
    torch.manual_seed(0)
    r1 = train(Recording(8, interrupt_at_call=4), task, cfg, tmp_path / "split")
    r2 = train(Recording(8), task, cfg, tmp_path / "split", resume=r1.checkpoint)
    assert r1.step == 4 and r1.losses + r2.losses == full.losses  # stopped before the switch at step 5


def test_final_steps_config_errors():
    for kw, match in [
        (dict(final_seq_len=64), r"^final_steps: expected > 0 exactly when final_seq_len is set, got 0$"),
        (dict(final_steps=5), r"^final_steps: expected > 0 exactly when final_seq_len is set, got 5$"),
        (dict(steps=10, final_seq_len=64, final_steps=11), r"^final_steps: expected in \[0, steps = 10\]"),
        (dict(final_seq_len=0, final_steps=1), r"^final_seq_len: expected >= 1 or None, got 0$"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)
