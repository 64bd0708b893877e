"""`ssmkit train` under faults and bad input: torn metrics lines, two runs into one folder, temporary
files a kill left, output permissions, bad flag values, tokenizer and data paths, signals' exit codes,
and a single text file as the whole corpus."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ssmkit.cli import main
from ssmkit.data.text import split_documents
from ssmkit.train.checkpoint import read_checkpoint

SENTENCE = "the quick brown fox jumps over the lazy dog.\n"
TINY = [
    "train",
    "--task",
    "copying",
    "--arch",
    "none",
    "--layer",
    "s4d",
    "--seq-len",
    "8",
    "--n-tokens",
    "2",
    "--vocab-size",
    "5",
    "--d-model",
    "8",
    "--n-layer",
    "1",
    "--d-state",
    "4",
    "--batch-size",
    "2",
    "--eval-examples",
    "2",
    "--eval-every",
    "0",
    "--log-every",
    "1",
    "--no-progress",
]
TINY_LM = [
    "train",
    "--task",
    "lm",
    "--model",
    "transformer",
    "--n-head",
    "2",
    "--d-model",
    "16",
    "--n-layer",
    "1",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--steps",
    "2",
    "--eval-examples",
    "2",
    "--no-progress",
]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------------- torn metrics line


def test_resume_drops_a_torn_last_metrics_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 3, "lo')  # a kill in the middle of a write
    ckpt = out / "checkpoint.safetensors"
    with pytest.warns(UserWarning, match="torn last line"):
        assert main(["train", "--resume", str(ckpt), "--total-steps", "4", "--no-progress"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "train"] == [1, 2, 3, 4]


def test_a_bad_line_inside_metrics_is_an_error_naming_the_line(tmp_path):
    from ssmkit.train.metrics import read_metrics

    (tmp_path / "m.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path / "m.jsonl")


# --------------------------------------------------------------------------------- one run per folder

HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_a_second_run_into_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / ".ssmkit-train.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*TINY, "--steps", "1", "--out", str(out)]) == 1
        err = one_line_error(capsys)
        assert f"pid {holder.pid}" in err and "--out" in err
        assert not (out / "checkpoint.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock went with it, the file with its pid stays and blocks nothing
    assert (out / ".ssmkit-train.lock").read_text().strip() == str(holder.pid)
    assert main([*TINY, "--steps", "1", "--out", str(out)]) == 0


def test_no_fixed_temporary_names(tmp_path):
    """The learning curve used to be written through the fixed name learning_curve.png.tmp.png; a second
    writer (or anything at that name) then broke the run."""
    out = tmp_path / "run"
    (out / "learning_curve.png.tmp.png").mkdir(parents=True)
    assert main([*TINY, "--steps", "1", "--out", str(out)]) == 0
    assert (out / "learning_curve.png").stat().st_size > 1000


# ------------------------------------------------------------------------ temporary files, permissions


def test_resume_removes_orphan_temps_and_checkpoints_are_0644(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    orphans = [
        out / "checkpoint.safetensors.k2j3abcd.tmp",  # a kill during an earlier version's save
        out / ".checkpoint.safetensors.x7yz.ssmkit-tmp.safetensors",  # … during this version's
        out / ".summary.json.q1w2.ssmkit-tmp",
    ]
    for p in orphans:
        p.write_bytes(b"\0" * 1000)
    ckpt = out / "checkpoint.safetensors"
    assert main(["train", "--resume", str(ckpt), "--total-steps", "3", "--no-progress"]) == 0
    assert "removed 3 temporary file(s)" in capsys.readouterr().out
    assert not [p for p in orphans if p.exists()]
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.safetensors", "summary.json", "learning_curve.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    assert read_checkpoint(ckpt)[1]["step"] == 3


# ------------------------------------------------------------------------------------ bad flag values


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--ckpt-every", "-1", ">= 0"),
        ("--eval-every", "-1", ">= 0"),
        ("--grad-clip", "-1", ">= 0"),
        ("--threads", "0", ">= 1"),
        ("--log-every", "0", ">= 1"),
        ("--warmup-steps", "-5", ">= 0"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(tmp_path, capsys, flag, value, expected):
    assert main([*TINY, "--steps", "1", "--out", str(tmp_path / "r"), flag, value]) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"error: {flag}: expected {expected}") and f"got {value}" in err.replace(".0", "")
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main([*TINY, "--steps", "1", "--out", str(tmp_path / "r"), "--device", "cuda"]) == 1
    err = one_line_error(capsys)
    assert err.startswith("error: --device:") and "'cuda'" in err and "is_available() is False" in err
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_unknown_device_is_one_line(tmp_path, capsys):
    assert main([*TINY, "--steps", "1", "--out", str(tmp_path / "r"), "--device", "gpu"]) == 1
    assert one_line_error(capsys).startswith("error: --device: expected 'auto', 'cpu'")


# ----------------------------------------------------------------------------------- tokenizer, data


def _bpe(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([SENTENCE] * 10, trainers.BpeTrainer(vocab_size=280, special_tokens=["[UNK]"]))
    tok.save(str(path))
    return tok


def test_tokenizer_flag_takes_the_file_it_names(tmp_path, capsys):
    from ssmkit.data.tokenizer import JsonTokenizer, load_tokenizer

    tok = _bpe(tmp_path / "my.json")  # not called tokenizer.json, and nothing else in the folder
    (tmp_path / "fox.txt").write_text(SENTENCE * 100)
    out = tmp_path / "run"
    argv = [*TINY_LM, "--data", str(tmp_path / "fox.txt"), "--tokenizer", str(tmp_path / "my.json")]
    assert main([*argv, "--val-fraction", "0.2", "--out", str(out)]) == 0
    loaded = load_tokenizer(out / "model")
    assert isinstance(loaded, JsonTokenizer) and loaded.vocab_size == tok.get_vocab_size()
    assert loaded.encode(SENTENCE) == tok.encode(SENTENCE).ids


def test_tokenizer_folder_without_tokenizer_json_is_one_line(tmp_path, capsys):
    (tmp_path / "fox.txt").write_text(SENTENCE * 100)
    (tmp_path / "empty").mkdir()
    argv = [*TINY_LM, "--data", str(tmp_path / "fox.txt"), "--tokenizer", str(tmp_path / "empty")]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys)
    assert (
        err.startswith("error: --tokenizer: expected a tokenizer.json") and "holds no tokenizer.json" in err
    )


def test_data_that_is_a_device_says_what_it_is(tmp_path, capsys):
    assert main([*TINY_LM, "--data", "/dev/zero", "--out", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys)
    assert err.startswith("error: --data: expected a regular file")
    assert "character device" in err and "does not exist" not in err


def test_one_text_file_without_line_breaks_is_a_usable_corpus(tmp_path, capsys):
    """An 18 KB file on one line: the split is made inside the document."""
    text = ("the quick brown fox jumps over the lazy dog. " * 400)[:18000]
    (tmp_path / "one_file.txt").write_text(text)
    train, val = split_documents([text], 0.02)
    assert train[0] + val[0] == text and len(val[0]) == 360
    out = tmp_path / "run"
    assert main([*TINY_LM, "--data", str(tmp_path / "one_file.txt"), "--out", str(out)]) == 0
    assert (out / "model" / "config.json").is_file()
    assert json.loads((out / "val_bpb.json").read_text())[-1]["step"] == 2


def test_split_inside_a_line_keeps_whole_characters():
    text = "é" * 100  # 200 bytes, 2 per character, no line break
    train, val = split_documents([text], 0.25)
    assert train[0] + val[0] == text and len(val[0]) == 25


# ------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_exit_codes_follow_the_shell_convention(tmp_path, sig, code):
    """128 + the signal number, after saving a checkpoint (SIGTERM used to exit 130)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssmkit", *TINY, "--steps", "100000", "--ckpt-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["stop_reason"] == "signal"
    assert read_checkpoint(out / "checkpoint.safetensors")[1]["step"] == summary["step"] >= 2
