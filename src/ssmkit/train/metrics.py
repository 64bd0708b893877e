"""Metrics as JSON lines and a PNG learning curve (matplotlib, Agg backend: no display needed).

``metrics.jsonl`` holds one JSON object per line and event ("train": loss, accuracy, lr, tokens/s;
"eval": validation loss and accuracy at one length, plus the task's extra metrics). A process killed
while appending can leave a torn last line; readers drop torn trailing lines with a warning (the lines
before them are whole, since each append is one write of one line), and a bad line elsewhere is an error
that names the file and the line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ssmkit.utils import atomic_save, atomic_write_text


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; torn trailing lines (a kill mid-write) are dropped with a warning."""
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
            warnings.warn(
                f"{path}: dropped a torn last line (a run killed while writing it): {line[:80]!r}",
                stacklevel=2,
            )
            break
    return records


class MetricsLog:
    """Append-only JSONL file. On resume, records of steps after ``truncate_after`` (and a torn last line)
    are dropped first; a fresh run (``truncate_after`` None or 0) starts an empty file."""

    def __init__(self, path: Path, enabled: bool = True, truncate_after: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if enabled and self.path.exists():
            if truncate_after is None or truncate_after == 0:
                self.path.unlink()
            else:
                keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after]
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_learning_curve(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Training loss (left) and training/validation accuracy (right) against step, written atomically."""
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
    try:
        return atomic_save(Path(png_path), lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
