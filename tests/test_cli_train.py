"""`ssmkit train` / `ssmkit eval` end to end on tiny configs: files written, resume via the CLI, and the
streamed (chunked) evaluation equal to one full forward pass."""

import json

import pytest
import torch

from ssmkit.cli import main
from ssmkit.train.build import build_task, load_trained
from ssmkit.train.evaluate import evaluate

TINY = [
    "--d-model",
    "16",
    "--n-layer",
    "1",
    "--d-state",
    "4",
    "--batch-size",
    "4",
    "--eval-examples",
    "8",
    "--log-every",
    "1",
    "--no-progress",
    "--device",
    "cpu",
    "--warmup-steps",
    "1",
]


@pytest.mark.parametrize(
    "arch,layer,task",
    [
        ("mamba", "s6", "induction-heads"),
        ("attention", "rope", "selective-copying"),
        ("mamba2", "ssd", "copying"),
    ],
)
def test_train_eval_roundtrip(tmp_path, monkeypatch, arch, layer, task):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--task",
            task,
            "--arch",
            arch,
            "--layer",
            layer,
            "--seq-len",
            "12",
            "--n-tokens",
            "2",
            "--vocab-size",
            "6",
            "--steps",
            "3",
            "--eval-every",
            "2",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert rc == 0
    for name in ("checkpoint.safetensors", "metrics.jsonl", "learning_curve.png", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    ckpt = out / "checkpoint.safetensors"
    rc = main(
        [
            "eval",
            str(ckpt),
            "--lengths",
            "8,12,37",
            "--examples",
            "6",
            "--chunk-size",
            "5",
            "--batch-size",
            "3",
        ]
    )
    assert rc == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["length"] for r in rows] == [8, 12, 37] and all(0 <= r["acc"] <= 1 for r in rows)
    assert (out / "eval.png").is_file() and (out / "eval.csv").read_text().startswith("length,")
    # streaming through the state in chunks of 5 == one full forward pass
    model, header = load_trained(ckpt)
    data = build_task(header["task"]).validation_set(37, 6)
    full = evaluate(model, data, batch_size=6, chunk_size=None)
    streamed = evaluate(model, data, batch_size=6, chunk_size=5)
    assert streamed["acc"] == full["acc"] and streamed["n"] == full["n"]
    torch.testing.assert_close(
        torch.tensor(streamed["loss"]), torch.tensor(full["loss"]), rtol=1e-5, atol=1e-5
    )
    # on a CPU a streamed forward takes at most CPU_STREAM_TOKENS tokens: here 2 examples x 5 at a time
    import ssmkit.train.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "CPU_STREAM_TOKENS", 10)
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    capped = evaluate(model, data, batch_size=6, chunk_size=5)
    hook.remove()
    assert shapes[0] == (2, 5) and len(shapes) == 3 * 8  # 3 batches x 8 chunks (37 tokens)
    assert capped["acc"] == full["acc"] and capped["n"] == full["n"]
    torch.testing.assert_close(torch.tensor(capped["loss"]), torch.tensor(full["loss"]), rtol=1e-5, atol=1e-5)


def test_cli_resume_and_skip(tmp_path, capsys):
    out = tmp_path / "r"
    base = [
        "train",
        "--task",
        "copying",
        "--arch",
        "none",
        "--layer",
        "s4d",
        "--seq-len",
        "10",
        "--n-tokens",
        "2",
        "--vocab-size",
        "5",
        "--eval-every",
        "0",
        "--ckpt-every",
        "2",
        "--out",
        str(out),
        *TINY,
    ]
    assert main([*base, "--steps", "4"]) == 0
    assert (
        main(["train", "--resume", str(out / "checkpoint.safetensors"), "--no-progress"]) == 0
    )  # already done
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    ckpt = str(out / "checkpoint.safetensors")
    assert main(["train", "--resume", ckpt, "--no-progress", "--total-steps", "6"]) == 0  # extend the run
    assert json.loads((out / "summary.json").read_text())["step"] == 6
    capsys.readouterr()
    assert main(["train", "--resume", ckpt, "--total-steps", "2"]) == 1
    assert capsys.readouterr().err == "error: --total-steps: 2 is below the checkpoint's step 6\n"
    assert (
        main(
            [
                "eval",
                str(out / "checkpoint.safetensors"),
                "--lengths",
                "10,64",
                "--max-length",
                "32",
                "--examples",
                "4",
            ]
        )
        == 0
    )
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert rows[1]["skipped"] and rows[1]["acc"] is None and not rows[0]["skipped"]
    with pytest.raises(SystemExit):
        main(["eval", str(out / "checkpoint.safetensors"), "--lengths", "2"])


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, capsys):
    """--init-from: the weights come from the checkpoint (a 1e-30 learning rate leaves them as they were,
    bit for bit), the task and training settings from the flags (here a longer sequence); another model
    or --resume beside it is a one-line error."""
    from ssmkit.train.checkpoint import model_state, read_checkpoint

    base = ["train", "--task", "induction-heads", "--arch", "mamba", "--layer", "s6", "--vocab-size", "6"]
    base += ["--eval-every", "0", *TINY]
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([*base, "--seq-len", "12", "--steps", "3", "--out", str(first)]) == 0
    ckpt = first / "checkpoint.safetensors"
    argv = [*base, "--seq-len", "40", "--steps", "1", "--lr", "1e-30", "--init-from", str(ckpt)]
    assert main([*argv, "--out", str(second)]) == 0
    old = model_state(read_checkpoint(ckpt)[0])
    tensors, header = read_checkpoint(second / "checkpoint.safetensors")
    new = model_state(tensors)
    assert header["step"] == 1 and header["task"]["seq_len"] == 40
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    capsys.readouterr()
    assert main([*argv, "--d-model", "24", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from: ") and "give the same model flags" in err
    assert err.count("\n") == 1
    assert main([*argv, "--resume", str(ckpt)]) == 1
    assert "give one of them" in capsys.readouterr().err
    assert main([*base, "--init-from", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err


def parsed(*argv):
    from ssmkit.cli import build_parser
    from ssmkit.cli.train import configs_from_args

    return configs_from_args(build_parser().parse_args(["train", *argv]))


def test_each_task_gets_its_own_defaults_and_given_values_win():
    """The size/optimisation flags default per task (synthetic vs --task lm); a value the user gives is
    kept even when it equals the other task's default."""
    from ssmkit.cli.train import LM_DEFAULTS
    from ssmkit.tasks import LMTaskConfig, SelectiveCopyingConfig
    from ssmkit.train.config import TrainConfig

    syn = parsed()
    assert isinstance(syn.task, SelectiveCopyingConfig) and syn.task.vocab_size == 16
    assert (syn.model.kind, syn.model.d_model, syn.model.n_layer) == ("sequence", 64, 2)
    assert syn.train == TrainConfig()
    lm = parsed("--task", "lm")
    assert isinstance(lm.task, LMTaskConfig) and lm.model.kind == "mamba_lm"
    assert (lm.model.d_model, lm.model.n_layer) == (LM_DEFAULTS["d_model"], LM_DEFAULTS["n_layer"])
    assert all(getattr(lm.train, k) == v for k, v in LM_DEFAULTS.items() if hasattr(lm.train, k))
    given = parsed("--task", "lm", "--d-model", "64", "--steps", "12000", "--schedule", "wsd")
    assert (given.model.d_model, given.train.steps, given.train.schedule) == (64, 12000, "wsd")
    assert given.train.lr == LM_DEFAULTS["lr"]  # not given: the LM default
    assert parsed("--steps", "400").train.steps == 400 and parsed("--steps", "400").model.d_model == 64
    tr = parsed("--task", "lm", "--model", "transformer", "--n-head", "2", "--eval-chunk-size", "64")
    assert (tr.model.kind, tr.model.n_head, tr.train.eval_chunk_size) == ("transformer_lm", 2, 64)
    res = parsed("--resume", "x/checkpoint.safetensors", "--total-steps", "9", "--no-time-limit")
    assert (res.total_steps, res.no_time_limit, str(res.checkpoint)) == (9, True, "x/checkpoint.safetensors")
