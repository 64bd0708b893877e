"""User errors on the command line are one line `error: …` on stderr with exit status 1 (a traceback only
with --debug or SSMKIT_DEBUG=1); bugs keep their traceback; a misspelt flag prints the usage of the
subcommand it was typed in. Run in-process through ssmkit.cli.main, plus one real subprocess."""

import os
import subprocess
import sys

import pytest
import torch

import ssmkit
from ssmkit import MambaConfig, MambaLM
from ssmkit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=256, d_state=4)).save_pretrained(path)
    return path


def user_error(capsys, argv, *fragments) -> str:
    """Run ``argv``; it must exit 1 with exactly one stderr line ``error: …`` holding every fragment."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def usage_error(capsys, argv, usage: str, *fragments) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {usage} ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ssmkit {ssmkit.__version__}\n"


# ---------------------------------------------------------------------------- generate
def test_generate_missing_model_folder(tmp_path, capsys):
    user_error(
        capsys,
        ["generate", str(tmp_path / "nope"), "--prompt", "x"],
        str(tmp_path / "nope"),
        "does not exist",
    )


def test_generate_on_a_run_folder_names_its_model_folder(tmp_path, model_dir, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for f in model_dir.iterdir():
        (run / "model" / f.name).write_bytes(f.read_bytes())
    (run / "checkpoint.safetensors").write_bytes(b"")
    user_error(
        capsys,
        ["generate", str(run), "--prompt", "x"],
        "training run folder",
        f"pass its model folder {run / 'model'}",
    )
    assert main(["generate", str(run / "model"), "--prompt", "x", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--top-p", "3"),
        ("--top-p", "0"),
        ("--min-p", "1.5"),
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--repetition-penalty", "0"),
        ("--top-k", "-1"),
        ("--max-new-tokens", "-5"),
    ],
)
def test_generate_bad_sampling_values(model_dir, capsys, flag, value):
    user_error(capsys, ["generate", str(model_dir), "--prompt", "x", flag, value], flag, value)


def test_generate_needs_a_prompt(model_dir, capsys):
    user_error(capsys, ["generate", str(model_dir)], "--prompt", "--interactive")


def test_generate_on_a_llama_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 16, "vocab_size": 64}')
    user_error(
        capsys, ["generate", str(tmp_path), "--prompt", "x"], "model type 'llama' is not supported", "'mamba'"
    )


def test_generate_on_a_transformer_folder_works(tmp_path, capsys):
    from ssmkit import TransformerLM
    from ssmkit.models.transformer_lm import TransformerConfig

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(d_model=16, n_layer=1, vocab_size=256, n_head=2)).eval()
    model.save_pretrained(tmp_path)
    assert (
        main(["generate", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0"])
        == 0
    )
    expected = model.generate(torch.tensor([[97, 98]]), 4, temperature=0)
    assert capsys.readouterr().out == bytes(expected[0].tolist()).decode("utf-8", errors="replace") + "\n"


# ---------------------------------------------------------------------------- eval
def test_eval_on_a_model_folder_says_what_to_pass(tmp_path, model_dir, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for f in model_dir.iterdir():
        (run / "model" / f.name).write_bytes(f.read_bytes())
    (run / "checkpoint.safetensors").write_bytes(b"x")
    user_error(
        capsys, ["eval", str(run / "model")], "is a model folder", f"pass {run / 'checkpoint.safetensors'}"
    )
    user_error(capsys, ["eval", str(run / "model" / "model.safetensors")], "weights file of a model folder")
    user_error(capsys, ["eval", str(run)], f"pass {run / 'checkpoint.safetensors'}")


def test_eval_on_non_checkpoints(tmp_path, capsys):
    user_error(
        capsys, ["eval", str(tmp_path / "nope.safetensors")], "does not exist", "checkpoint.safetensors"
    )
    (tmp_path / "notes.txt").write_text("not a checkpoint at all")
    user_error(capsys, ["eval", str(tmp_path / "notes.txt")], "notes.txt is not a readable safetensors file")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    user_error(capsys, ["eval", str(tmp_path / "plain.safetensors")], "not an ssmkit training checkpoint")


def test_eval_bad_flag_values_get_evals_usage(tmp_path, capsys):
    ckpt = str(tmp_path / "c.safetensors")
    usage_error(capsys, ["eval", ckpt, "--lengths", "8,x"], "ssmkit eval", "--lengths", "'x'")
    usage_error(capsys, ["eval", ckpt, "--lengths", "2,8"], "ssmkit eval", ">= 3")
    usage_error(capsys, ["eval", ckpt, "--threads", "0"], "ssmkit eval", "--threads")
    usage_error(capsys, ["eval", ckpt, "--chunk-size", "0"], "ssmkit eval", "--chunk-size")
    user_error(capsys, ["eval", ckpt, "--device", "nonsense"], "--device", "'nonsense'")


# ---------------------------------------------------------------------------- convert, bench
def test_convert_missing_source(tmp_path, capsys):
    user_error(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")], "does not exist")
    assert not (tmp_path / "out").exists()


def test_bench_decode_bad_values(tmp_path, capsys):
    user_error(
        capsys, ["bench", "decode", "--models", "mamba,rnn", "--out", str(tmp_path)], "--models", "'rnn'"
    )
    usage_error(capsys, ["bench", "decode", "--contexts", "64,,x"], "ssmkit bench decode", "--contexts")
    usage_error(capsys, ["bench", "decode", "--chunk-size", "-1"], "ssmkit bench decode", "--chunk-size")


# ---------------------------------------------------------------------------- usage, debug, bugs
@pytest.mark.parametrize(
    "argv,usage,typo",
    [
        (["generate", "m", "--promt", "x"], "ssmkit generate", "--promt"),
        (["eval", "c", "--lenghts", "8"], "ssmkit eval", "--lenghts"),
        (["convert", "a", "b", "--froce"], "ssmkit convert", "--froce"),
        (["bench", "decode", "--contxts", "8"], "ssmkit bench decode", "--contxts"),
    ],
)
def test_flag_typo_prints_the_subcommands_usage(capsys, argv, usage, typo):
    usage_error(capsys, argv, usage, f"{usage}: error: unrecognized arguments: {typo}")


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["generate", str(tmp_path / "nope"), "--prompt", "x"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([*argv, "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    monkeypatch.setenv("SSMKIT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)
    monkeypatch.setenv("SSMKIT_DEBUG", "0")
    user_error(capsys, argv, "does not exist")


def test_bugs_keep_their_traceback(model_dir, monkeypatch):
    """Only ValueError and OSError are user errors; anything else escapes main unchanged."""
    import ssmkit.models.load

    def broken(path):
        raise KeyError("a bug in ssmkit")

    monkeypatch.setattr(ssmkit.models.load, "load_model", broken)
    with pytest.raises(KeyError, match="a bug in ssmkit"):
        main(["generate", str(model_dir), "--prompt", "x"])


def test_ctrl_c_exits_130_without_traceback(model_dir, capsys, monkeypatch):
    import ssmkit.models.load

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ssmkit.models.load, "load_model", interrupted)
    assert main(["generate", str(model_dir), "--prompt", "x"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_real_process_exit_status_and_no_traceback(tmp_path):
    env = {**os.environ, "SSMKIT_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "ssmkit", "generate", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"error: model folder {tmp_path / 'nope'} does not exist\n"
    assert proc.stdout == ""


def test_abbreviated_flags_are_not_silent_aliases(capsys):
    """argparse would take --chunk for --chunk-size; every ssmkit parser refuses abbreviations."""
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "x", "--chunk", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --chunk 3" in capsys.readouterr().err
