"""Metrics as JSON lines and a PNG learning curve (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Append-only JSONL file. On resume, lines of steps after ``truncate_after`` are dropped first."""

    def __init__(self, path: Path, enabled: bool = True, truncate_after: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if enabled and self.path.exists():
            if truncate_after is None or truncate_after == 0:
                self.path.unlink()
            else:
                keep = [
                    ln
                    for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after
                ]
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(k + "\n" for k in keep))
                os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_learning_curve(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Training loss (left) and training/validation accuracy (right) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    tr = [r for r in recs if r.get("event") == "train"]
    ev = [r for r in recs if r.get("event") == "eval"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if tr:
        a1.plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1)
        a2.plot([r["step"] for r in tr], [r["acc"] for r in tr], lw=1, alpha=0.6, label="train")
    for n in sorted({r["length"] for r in ev}):
        pts = [r for r in ev if r["length"] == n]
        a2.plot([r["step"] for r in pts], [r["val_acc"] for r in pts], "o-", ms=3, label=f"val L={n}")
    a1.set(xlabel="step", ylabel="loss (answer positions)", yscale="log")
    a2.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    a2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
