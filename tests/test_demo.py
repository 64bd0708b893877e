"""``ssmkit demo``: section names (valid ones run, an unknown one is one error naming the valid ones,
``--help`` lists them), atomic writes, and the kernels built before anything is timed."""

from __future__ import annotations

import argparse

import pytest

import ssmkit.demo.selectivity as selectivity
from ssmkit import demo
from ssmkit.cli import demo as demo_cli
from ssmkit.utils import TEMP_SUFFIX


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssmkit")
    demo_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_help_lists_every_section():
    sub = _parser()._subparsers._group_actions[0].choices["demo"]
    text = " ".join(sub.format_help().split())
    for name in demo.SECTIONS:
        assert f"{name}:" in text
    assert "of: lti, s4, selectivity" in text


@pytest.mark.parametrize("only", ["hippo", "lti,hippo", ","])
def test_unknown_section_is_one_error_naming_the_valid_ones(tmp_path, only):
    args = _parser().parse_args(["demo", "--only", only, "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError) as err:
        args.func(args)
    message = str(err.value)
    assert "\n" not in message and "--only" in message
    if only != ",":
        assert "'hippo'" in message and "valid sections: lti, s4, selectivity" in message
    assert not (tmp_path / "out").exists()  # nothing was written or created


def test_valid_section_runs_and_writes_atomically(tmp_path, capsys):
    out = tmp_path / "out"
    args = _parser().parse_args(["demo", "--only", "s4", "--out", str(out)])
    assert args.func(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["s4_kernels.png"]
    assert (out / "s4_kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if TEMP_SUFFIX in p.name]
    assert "s4_kernels.png" in capsys.readouterr().out


def test_check_sections_keeps_demo_order():
    assert demo.check_sections(["selectivity", "lti"]) == ["lti", "selectivity"]
    assert demo.check_sections(None) == list(demo.SECTIONS)


def test_selectivity_builds_the_kernels_before_training(tmp_path, monkeypatch):
    """The one-time compile happens before the first model trains, so the wall-time table excludes it."""
    import ssmkit.train.trainer as trainer

    events = []

    class Stop(Exception):
        pass

    def fake_load(ext):
        events.append(f"load {ext.name}")
        return object()

    def fake_train(*args, **kwargs):
        events.append("train")
        raise Stop

    monkeypatch.setattr(selectivity.kernels, "load", fake_load)
    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setenv("SSMKIT_DEMO_STEPS", "2")
    with pytest.raises(Stop):
        selectivity.run(tmp_path)
    assert events == ["load scan", "load conv", "train"]
