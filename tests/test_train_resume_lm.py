"""Resuming a language-model run honours --total-steps and --no-time-limit, as resuming a synthetic run
does (both go through the one training driver), and the extension equals one longer run bit for bit."""

import json

import torch
from safetensors.torch import load_file

from ssmkit.cli import main
from ssmkit.train.checkpoint import read_checkpoint

SENTENCE = "the quick brown fox jumps over the lazy dog.\n"


def lm_args(data, out, steps, *extra):
    return [
        "train",
        "--task",
        "lm",
        "--model",
        "transformer",
        "--n-head",
        "2",
        "--data",
        str(data),
        "--d-model",
        "16",
        "--n-layer",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--steps",
        str(steps),
        "--schedule",
        "constant",
        "--warmup-steps",
        "0",
        "--eval-every",
        "0",
        "--ckpt-every",
        "0",
        "--eval-examples",
        "2",
        "--val-fraction",
        "0.1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def model_tensors(ckpt):
    return {k: v for k, v in load_file(str(ckpt)).items() if k.startswith("model.")}


def test_lm_resume_total_steps_extends_the_run_exactly(tmp_path, capsys):
    data = tmp_path / "fox.txt"
    data.write_text(SENTENCE * 100)
    assert main(lm_args(data, tmp_path / "long", 5)) == 0
    assert main(lm_args(data, tmp_path / "short", 3)) == 0
    ckpt = tmp_path / "short" / "checkpoint.safetensors"
    assert main(["train", "--resume", str(ckpt), "--total-steps", "5", "--no-progress"]) == 0
    assert "[train] saved model + tokenizer" in capsys.readouterr().out
    header = read_checkpoint(ckpt)[1]
    assert header["step"] == 5 and header["train"]["steps"] == 5
    assert json.loads((tmp_path / "short" / "summary.json").read_text())["step"] == 5
    long = model_tensors(tmp_path / "long" / "checkpoint.safetensors")
    for k, v in model_tensors(ckpt).items():
        torch.testing.assert_close(v, long[k], rtol=0, atol=0, msg=k)  # constant lr: the same 5 steps


def test_lm_resume_no_time_limit_drops_the_stored_limit(tmp_path):
    data = tmp_path / "fox.txt"
    data.write_text(SENTENCE * 100)
    out = tmp_path / "run"
    assert main(lm_args(data, out, 4, "--time-limit-s", "0")) == 0  # stops after the first step
    ckpt = out / "checkpoint.safetensors"
    assert read_checkpoint(ckpt)[1]["step"] == 1
    assert main(["train", "--resume", str(ckpt), "--no-progress"]) == 0  # the limit still applies
    assert read_checkpoint(ckpt)[1]["step"] == 2
    assert main(["train", "--resume", str(ckpt), "--no-time-limit", "--no-progress"]) == 0
    header = read_checkpoint(ckpt)[1]
    assert header["step"] == 4 and header["train"]["time_limit_s"] is None
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "finished"
