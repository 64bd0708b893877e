"""Synthetic tasks: layouts checked example by example with plain Python loops, determinism, sharding,
and the masked loss against a float64 log-softmax written here."""

import math

import pytest
import torch

from ssmkit.tasks import (
    IGNORE,
    Copying,
    CopyingConfig,
    InductionHeads,
    InductionHeadsConfig,
    SelectiveCopying,
    SelectiveCopyingConfig,
    build_task,
    make_task,
    masked_loss_sums,
    shard,
)


@pytest.mark.parametrize("L,M,V", [(32, 4, 16), (17, 17, 5), (256, 16, 16), (7, 1, 3)])
def test_selective_copying_layout(L, M, V):
    task = SelectiveCopying(SelectiveCopyingConfig(seq_len=L, n_tokens=M, vocab_size=V, seed=3))
    batch = task.train_batch(step=5, batch_size=8)
    assert batch.inputs.shape == (8, L + M) and batch.targets.shape == (8, L + M)
    for x, y in zip(batch.inputs.tolist(), batch.targets.tolist()):
        region, markers = x[:L], x[L:]
        data = [t for t in region if t != 0]  # in order of position
        assert len(data) == M
        assert all(1 <= t <= V - 2 for t in data)
        assert markers == [V - 1] * M
        assert y[:L] == [IGNORE] * L
        assert y[L:] == data


def test_selective_copying_positions_vary():
    task = SelectiveCopying(SelectiveCopyingConfig(seq_len=64, n_tokens=4, vocab_size=16))
    x = task.train_batch(0, 64).inputs[:, :64]
    first = [(row != 0).nonzero()[0].item() for row in x]
    assert len(set(first)) > 10  # positions are random per example, not fixed


def test_copying_layout_fixed_positions():
    L, M, V = 20, 5, 8
    task = Copying(CopyingConfig(seq_len=L, n_tokens=M, vocab_size=V))
    batch = task.train_batch(1, 6)
    for x, y in zip(batch.inputs.tolist(), batch.targets.tolist()):
        assert all(1 <= t <= V - 2 for t in x[:M])
        assert x[M:L] == [0] * (L - M)
        assert x[L:] == [V - 1] * M
        assert y == [IGNORE] * L + x[:M]


@pytest.mark.parametrize("L,V", [(3, 3), (64, 16), (257, 16)])
def test_induction_heads_layout(L, V):
    task = InductionHeads(InductionHeadsConfig(seq_len=L, vocab_size=V, seed=1))
    batch = task.train_batch(2, 16)
    assert batch.inputs.shape == (16, L)
    for x, y in zip(batch.inputs.tolist(), batch.targets.tolist()):
        trig = [i for i, t in enumerate(x) if t == V - 1]
        assert len(trig) == 2 and trig[1] == L - 1 and trig[0] <= L - 3
        assert all(0 <= t <= V - 1 for t in x)
        assert y[:-1] == [IGNORE] * (L - 1)
        assert y[-1] == x[trig[0] + 1] and y[-1] != V - 1


@pytest.mark.parametrize("name", ["selective-copying", "induction-heads", "copying"])
def test_determinism_and_sharding(name):
    task = make_task(name, seq_len=32, vocab_size=10, seed=7, n_tokens=4)
    a, b = task.train_batch(3, 8), task.train_batch(3, 8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(task.train_batch(4, 8).inputs, a.inputs)
    other_seed = make_task(name, seq_len=32, vocab_size=10, seed=8, n_tokens=4)
    assert not torch.equal(other_seed.train_batch(3, 8).inputs, a.inputs)
    # rank r of world 4 with per-rank batch 2 == rows [2r, 2r+2) of the global batch of 8
    parts = [task.train_batch(3, 2, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p.inputs for p in parts]), a.inputs)
    assert torch.equal(torch.cat([p.targets for p in parts]), a.targets)
    # validation sets are fixed and differ from the training stream
    v1, v2 = task.validation_set(32, 8), task.validation_set(32, 8)
    assert torch.equal(v1.inputs, v2.inputs)
    assert not torch.equal(v1.inputs, a.inputs)
    assert task.validation_set(64, 4).inputs.shape[1] in (64, 64 + 4)


@pytest.mark.parametrize("name", ["selective-copying", "induction-heads", "copying"])
def test_spec_rebuilds_the_same_task(name):
    """A checkpoint stores ``task.spec()``; ``build_task`` of it yields the same stream and validation set."""
    task = make_task(name, seq_len=20, vocab_size=9, seed=3, n_tokens=3)
    again = build_task(task.spec())
    assert again.name == name and again.spec() == task.spec()
    assert torch.equal(again.train_batch(5, 4).inputs, task.train_batch(5, 4).inputs)
    assert torch.equal(again.validation_set(20, 4).targets, task.validation_set(20, 4).targets)
    assert task.eval_metrics(1.0) == {} and task.export(None, None) is None


def test_lm_spec_rebuilds_the_same_task(tmp_path):
    from ssmkit.tasks import LMTaskConfig, task_from_config

    (tmp_path / "t.txt").write_text("some text to model, line after line.\n" * 40)
    cfg = LMTaskConfig(data=str(tmp_path / "t.txt"), seq_len=8, val_fraction=0.1).resolved(tmp_path / "run")
    assert cfg.token_cache == str((tmp_path / "token-cache").resolve())
    task = task_from_config(cfg)
    again = build_task(task.spec())
    assert again.spec() == task.spec() == {"task": "lm", **__import__("dataclasses").asdict(cfg)}
    assert torch.equal(again.train_batch(2, 3).inputs, task.train_batch(2, 3).inputs)
    assert task.eval_metrics(math.log(2)) == {"val_bpb": pytest.approx(1.0)}  # bytes: bpb = nats / ln 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_tokens"):
        SelectiveCopying(SelectiveCopyingConfig(seq_len=4, n_tokens=5))
    with pytest.raises(ValueError, match="vocab_size"):
        InductionHeads(InductionHeadsConfig(vocab_size=2))
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("nope", 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        shard(SelectiveCopying().train_batch(0, 3), 0, 2)


def test_masked_loss_matches_float64_loop():
    torch.manual_seed(0)
    b, l, V = 3, 9, 6
    logits = torch.randn(b, l, V)
    targets = torch.full((b, l), IGNORE)
    targets[0, 2], targets[1, 8], targets[2, 0], targets[2, 5] = 1, 5, 0, 3
    logits[2, 5, 3] = 10.0  # a sure correct prediction
    loss, correct, count = masked_loss_sums(logits, targets)
    exp_loss, exp_correct, exp_count = 0.0, 0, 0
    for i in range(b):
        for j in range(l):
            t = targets[i, j].item()
            if t == IGNORE:
                continue
            row = logits[i, j].double().tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            exp_loss += lse - row[t]
            exp_correct += int(max(range(V), key=lambda k: row[k]) == t)
            exp_count += 1
    torch.testing.assert_close(
        loss.double(), torch.tensor(exp_loss, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )
    assert correct.item() == exp_correct and count.item() == exp_count == 4
    with pytest.raises(ValueError, match="logits must be"):
        masked_loss_sums(logits[0], targets)
