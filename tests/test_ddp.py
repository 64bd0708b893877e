"""DDP under torchrun (2 CPU processes, gloo): the losses equal one process with the same global batch,
and the two ranks see different rows of it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from ssmkit.tasks import SelectiveCopying, SelectiveCopyingConfig
    from ssmkit.train.trainer import TrainConfig, train

    class ToyLM(nn.Module):
        def __init__(self, vocab, d=16):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.conv = nn.Conv1d(d, d, 4, padding=3)
            self.head = nn.Linear(2 * d, vocab)

        def forward(self, ids, cache=None):
            h = self.emb(ids)
            l = ids.shape[1]
            mean = h.cumsum(1) / torch.arange(1, l + 1).view(1, l, 1)
            c = self.conv(h.transpose(1, 2))[..., :l].transpose(1, 2)
            return self.head(torch.cat([mean, torch.tanh(c)], -1))

    out = sys.argv[1]
    torch.manual_seed(0)
    model = ToyLM(8)
    task = SelectiveCopying(SelectiveCopyingConfig(seq_len=24, n_tokens=4, vocab_size=8, seed=2))
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1,
                      ckpt_every=0, device="cpu", progress=False, eval_examples=8)
    res = train(model, task, cfg, out)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    first = task.train_batch(0, cfg.batch_size // world, rank, world).inputs
    with open(os.path.join(out, f"losses{rank}.json"), "w") as f:
        json.dump({"losses": res.losses, "first_rows": first.tolist(),
                   "params": [p.detach().flatten().tolist() for p in model.parameters()]}, f)
    """
)


@pytest.mark.slow
def test_ddp_two_processes_match_single(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "losses0.json").read_text())
    r0 = json.loads((tmp_path / "two" / "losses0.json").read_text())
    r1 = json.loads((tmp_path / "two" / "losses1.json").read_text())
    assert len(one["losses"]) == 6
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r1["losses"]), torch.tensor(r0["losses"]), rtol=0, atol=0)
    # distinct data per rank, together the single process' global batch
    assert r0["first_rows"] != r1["first_rows"]
    assert r0["first_rows"] + r1["first_rows"] == one["first_rows"]
    for a, b in zip(r0["params"], one["params"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
