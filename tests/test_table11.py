"""benchmarks/table11.py: the fine-tuning phases chain (each ``ssmkit train --init-from`` the previous
phase's checkpoint, the last one scored) and its one-line error on a bad ``--finetune``."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table11.py"


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600)


def test_finetune_phases_chain_and_the_last_one_is_scored(tmp_path):
    out = tmp_path / "t11"
    r = _run(
        *("--models", "mamba", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--jobs", "1"),
        *("--finetune", "64:1:2:1e-3,128:1:1:5e-4:wsd", "--eval-log2", "6,7", "--examples", "2"),
        *("--out", str(out)),
    )
    assert r.returncode == 0, r.stderr
    run = out / "mamba-seed0"
    base, ft1, ft2, ev = (run / "command.txt").read_text().splitlines()
    assert "--init-from" not in base and base.endswith(f"--out {run}")
    assert f"--init-from {run}/checkpoint.safetensors" in ft1
    assert "--seq-len 64 --steps 2 --batch-size 1 --lr 0.001 --schedule constant" in ft1
    assert f"--init-from {run}/finetune/checkpoint.safetensors" in ft2
    assert "--seq-len 128 --steps 1 --batch-size 1 --lr 0.0005 --schedule wsd" in ft2
    assert ev.split()[4] == f"{run}/finetune2/checkpoint.safetensors"
    steps = [
        json.loads((f / "summary.json").read_text())["step"]
        for f in (run, run / "finetune", run / "finetune2")
    ]
    assert steps == [2, 2, 1]
    assert (run / "finetune2" / "eval.json").exists() and not (run / "eval.json").exists()
    table = (out / "table11.md").read_text()
    assert "| mamba-seed0 (ours) | 2 + 2 + 1 |" in table


def test_bad_finetune_spec_is_a_one_line_error(tmp_path):
    for spec in ("64:1:2", "64:1:2:1e-3:cosine", "64:0:2:1e-3", "a:1:2:1e-3"):
        r = _run("--finetune", spec, "--out", str(tmp_path))
        assert r.returncode != 0
        assert r.stderr.strip() == (
            f"error: --finetune: expected LENGTH:BATCH:STEPS:LR[:constant|wsd] phases or 'none', got {spec!r}"
        )
