"""`ssmkit bench generate`: the rows it reports for a model folder (structure, not speed: speed is measured in
benchmarks/, not asserted in tests), and its one-line errors."""

import json

import pytest
import torch

from ssmkit import Mamba2Config, MambaConfig, MambaLM
from ssmkit.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64)).save_pretrained(path)
    return path


def test_every_dtype_batch_and_thread_count_gets_a_pp_and_a_tg_row(folder, tmp_path, capsys):
    n = torch.get_num_threads()
    out = tmp_path / "rows.json"
    argv = ["bench", "generate", str(folder), "-p", "8", "-n", "3", "-r", "2", "--dtypes", "fp32,bf16,int8"]
    assert main([*argv, "--batch", "1,2", "--threads", "1", "--json", str(out)]) == 0
    assert torch.get_num_threads() == n  # restored
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2 * 2 and text.count("\n| " + str(folder)) == len(rows)
    combos = {(r["dtype"], r["batch"], r["test"]) for r in rows}
    assert combos == {(d, b, t) for d in ("fp32", "bf16", "int8") for b in (1, 2) for t in ("pp8", "tg3")}
    for r in rows:
        assert r["impl"] == "ssmkit" and r["threads"] == 1
        assert 0 < r["tok_s_min"] <= r["tok_s"] <= r["tok_s_max"]
        assert (r["limit_tok_s"] is not None) == (r["test"] == "tg3" and r["batch"] == 1)
    wb = {r["dtype"]: r["weight_bytes"] for r in rows}
    assert wb["int8"] < wb["bf16"] < wb["fp32"]


def test_compare_adds_transformers_rows_of_the_same_weights(folder, capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "generate", str(folder), "-p", "4", "-n", "2", "-r", "1", "--compare"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(f"| {folder}")]
    assert [x.split(" | ")[1] for x in lines] == ["ssmkit", "ssmkit", "transformers", "transformers"]


def test_int8_runs_a_mamba2_model_and_skips_a_hybrid_with_the_reason(tmp_path, capsys):
    from ssmkit.bench.generate import BenchGenerateConfig, run

    m2 = tmp_path / "m2"
    MambaLM(Mamba2Config(d_model=32, n_layer=1, vocab_size=64, headdim=16, d_state=16)).save_pretrained(m2)
    argv = ["-p", "4", "-n", "2", "-r", "1", "--dtypes", "fp32,int8"]
    assert main(["bench", "generate", str(m2), *argv]) == 0
    cap = capsys.readouterr()
    assert "skipped" not in cap.err
    assert sum(x.startswith(f"| {m2}") for x in cap.out.splitlines()) == 4  # pp and tg, fp32 and int8
    attn = {"num_heads": 2, "head_dim": 16, "causal": True}  # a hybrid: no transformers folder, so in-process
    hybrid = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=[1], attn_cfg=attn))
    cfg = BenchGenerateConfig(dtypes=("fp32", "int8"), prompt_tokens=4, gen_tokens=2, repeats=1)
    rows = run(hybrid, "hybrid", cfg, lambda row: None)
    assert "int8: skipped" in capsys.readouterr().err
    assert [r["dtype"] for r in rows] == ["fp32", "fp32"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--dtypes", "fp16"], "--dtypes: expected values among fp32,bf16,int8"),
        (["--shape", "mamba-130m"], "MODEL or --shape, not both"),
    ],
)
def test_errors_are_one_line(folder, capsys, extra, match):
    assert main(["bench", "generate", str(folder), *extra]) == 1
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
