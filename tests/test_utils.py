"""ssmkit.utils: atomic writes, stale-temp cleanup, parameter counting, list parsing, strict configs."""

import os
import stat
from dataclasses import dataclass

import pytest
import torch

from ssmkit.utils import (
    TEMP_SUFFIX,
    atomic_save,
    atomic_write,
    atomic_write_text,
    config_from_dict,
    count_parameters,
    parse_list,
    remove_stale_temps,
)


def test_atomic_write_replaces_and_keeps_usual_permissions(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_write(p) as fh:
        fh.write("half")
        raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_save_keeps_suffix_for_format_sniffing_writers(tmp_path):
    seen = []

    def writer(t):
        seen.append(t.suffix)
        t.write_bytes(b"png")

    atomic_save(tmp_path / "plot.png", writer)
    assert seen == [".png"] and (tmp_path / "plot.png").read_bytes() == b"png"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plot.png"]


def test_remove_stale_temps_only_removes_temps(tmp_path):
    (tmp_path / "keep.safetensors").write_text("x")
    (tmp_path / f".ckpt.safetensors.abc{TEMP_SUFFIX}").write_text("x")
    (tmp_path / f".plot.png.abc{TEMP_SUFFIX}.png").write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert len(removed) == 2
    assert [x.name for x in tmp_path.iterdir()] == ["keep.safetensors"]


def test_count_parameters_counts_tied_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_parameters(torch.nn.ModuleList([emb, head])) == 40


def test_parse_list():
    assert parse_list("64, 128,256,…") == [64, 128, 256]
    assert parse_list("0.5,1", float) == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"--lengths: .*'x'"):
        parse_list("1,x", int, "--lengths")
    with pytest.raises(ValueError, match="--lengths"):
        parse_list("", int, "--lengths")


@dataclass
class _Cfg:
    d_model: int
    eps: float = 1e-5
    name: str | None = None
    tie: bool = True


def test_config_from_dict_is_strict_and_names_the_source():
    assert config_from_dict(_Cfg, {"d_model": 4, "eps": 1}) == _Cfg(4, 1)
    with pytest.raises(ValueError, match=r"cfg.json: unknown keys \['x'\]"):
        config_from_dict(_Cfg, {"d_model": 4, "x": 1}, "cfg.json")
    with pytest.raises(ValueError, match=r"cfg.json: d_model must be of type int, got '16' \(str\)"):
        config_from_dict(_Cfg, {"d_model": "16"}, "cfg.json")
    with pytest.raises(ValueError, match="tie must be of type bool"):
        config_from_dict(_Cfg, {"d_model": 4, "tie": 1})
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        config_from_dict(_Cfg, [1, 2])
    assert config_from_dict(_Cfg, {"d_model": 4, "model_type": "m"}, ignore=("model_type",)).d_model == 4
