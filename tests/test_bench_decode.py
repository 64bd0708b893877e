"""`ssmkit bench decode` at tiny sizes: parameter matching, state sizes against the analytic formula,
the written files, and the CLI end to end."""

import csv
import json

import pytest

from ssmkit.bench.decode import (
    DecodeBenchConfig,
    build_models,
    expected_state_bytes,
    measure_decode,
    run_decode_bench,
)
from ssmkit.utils import count_parameters

TINY = dict(d_model=32, n_layer=2, n_head=2, d_state=4, vocab_size=64, decode_steps=3, chunk_size=16)


def test_parameter_counts_match_within_ten_percent():
    for d_model, n_layer in ((32, 2), (256, 4), (768, 24)):
        cfg = DecodeBenchConfig(d_model=d_model, n_layer=n_layer, n_head=4, vocab_size=256, device="meta")
        models = build_models(cfg)  # on the meta device: shapes only, no memory
        pm, pt = count_parameters(models["mamba"]), count_parameters(models["transformer"])
        assert abs(pt - pm) <= 0.10 * pm, (d_model, n_layer, pm, pt)
        assert models["transformer"].config.d_model == d_model
        assert models["transformer"].config.n_layer == n_layer


def test_state_bytes_follow_the_formula():
    cfg = DecodeBenchConfig(contexts=[5, 37], **TINY)
    models = build_models(cfg)
    for name, model in models.items():
        sizes = []
        for context in cfg.contexts:
            _, steps, nbytes = measure_decode(model, context, cfg)
            assert len(steps) == cfg.decode_steps and all(s > 0 for s in steps)
            # the cache holds the context plus the decode steps' tokens
            # (the last sampled token is not fed back, so context + decode_steps tokens were consumed)
            assert nbytes == expected_state_bytes(model, context + cfg.decode_steps), name
            sizes.append(nbytes)
        if name == "mamba":
            assert sizes[0] == sizes[1]  # constant in the context
        else:
            assert sizes[1] > sizes[0]  # grows with the context


def test_expected_state_bytes_independent_formula():
    cfg = DecodeBenchConfig(**TINY)
    models = build_models(cfg)
    # Mamba: per layer conv (E·D × d_conv) + ssm (E·D × N) float32 numbers; E = 2
    assert expected_state_bytes(models["mamba"], 10**6) == 2 * (2 * 32) * (4 + 4) * 4
    # Transformer: K and V, n_layer × l × D float32 numbers each
    assert expected_state_bytes(models["transformer"], 100) == 2 * 2 * 100 * 32 * 4


def test_run_writes_table_csv_json_png(tmp_path, capsys):
    cfg = DecodeBenchConfig(contexts=[8, 24], **TINY)
    rows, files = run_decode_bench(cfg, tmp_path, show_progress=False)
    assert [(r.model, r.context) for r in rows] == [
        ("mamba", 8),
        ("transformer", 8),
        ("mamba", 24),
        ("transformer", 24),
    ]
    assert sorted(f.name for f in files) == ["decode.csv", "decode.json", "decode.png"]
    with open(tmp_path / "decode.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    info = json.loads((tmp_path / "decode.json").read_text())
    assert info["config"]["contexts"] == [8, 24] and len(info["rows"]) == 4
    assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "ms/token" in out and "transformer" in out


def test_cli_bench_decode(tmp_path, capsys):
    from ssmkit.cli import main

    rc = main(
        [
            "bench",
            "decode",
            "--contexts",
            "4,12",
            "--d-model",
            "32",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--d-state",
            "4",
            "--vocab-size",
            "64",
            "--decode-steps",
            "2",
            "--chunk-size",
            "8",
            "--out",
            str(tmp_path / "b"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert (tmp_path / "b" / "decode.png").exists()
    out = capsys.readouterr().out
    assert "parameters" in out and "Wrote 3 files" in out


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="contexts"):
        DecodeBenchConfig(contexts=[])
    with pytest.raises(ValueError, match="n_head"):
        DecodeBenchConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="models"):
        DecodeBenchConfig(models=["rnn"])
