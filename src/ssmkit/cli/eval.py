"""`ssmkit eval CKPT`: accuracy of a trained model at many sequence lengths (length extrapolation).

    ssmkit eval OUT/checkpoint.safetensors --task induction-heads --lengths 64,128,256,…,1048576
    ssmkit eval LM-RUN/checkpoint.safetensors --lengths 256,1024    (--task lm runs: loss and bits/byte
                                                                   on the validation split)

Sequences longer than ``--chunk-size`` tokens are streamed through the model's recurrent state chunk by
chunk, so memory stays constant in the length (an attention model's KV cache still grows). Writes
``eval.json``, ``eval.csv`` and ``eval.png`` (accuracy against log2 length) into OUT.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ssmkit.cli._args import check_device, int_at_least, int_list


def add_parser(sub) -> None:
    from ssmkit.tasks import TASKS

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on a task at many lengths (streams long sequences)"
    )
    p.add_argument(
        "checkpoint", type=Path, help="checkpoint.safetensors written by ssmkit train (in its --out folder)"
    )
    p.add_argument("--task", choices=sorted(TASKS), default=None, help="task (default: the training task)")
    p.add_argument(
        "--lengths",
        type=int_list("--lengths", minimum=3),
        default=None,
        help="comma-separated lengths (default: the training length)",
    )
    p.add_argument(
        "--examples", type=int_at_least(1), default=256, help="validation examples per length (default: 256)"
    )
    p.add_argument(
        "--max-tokens",
        type=int_at_least(1),
        default=None,
        help="cap examples per length at max(1, MAX_TOKENS // length), e.g. 8388608",
    )
    p.add_argument(
        "--max-length",
        type=int_at_least(1),
        default=None,
        help="skip (and report as not run) lengths above this, e.g. for attention memory",
    )
    p.add_argument(
        "--chunk-size",
        type=int_at_least(1),
        default=4096,
        help="stream sequences longer than this through the state, this many tokens at a time "
        "(default: 4096)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=32, help="examples per forward pass (default: 32)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: next to the checkpoint)")
    p.set_defaults(func=_run)


def evaluate_lengths(
    model, task, lengths, examples, max_tokens, max_length, chunk_size, batch_size, device
) -> list[dict]:
    """One row {length, examples, acc, loss, seconds} per length (acc None when skipped)."""
    from ssmkit.train.evaluate import evaluate

    rows = []
    for n in lengths:
        if max_length is not None and n > max_length:
            rows.append(
                {"length": n, "examples": 0, "acc": None, "loss": None, "seconds": 0.0, "skipped": True}
            )
            print(f"[eval] L={n:>8}: skipped (--max-length {max_length})", flush=True)
            continue
        k = examples if max_tokens is None else max(1, min(examples, max_tokens // n))
        data = task.validation_set(n, k)
        t0 = time.perf_counter()
        r = evaluate(model, data, batch_size=batch_size, chunk_size=chunk_size, device=device)
        dt = time.perf_counter() - t0
        rows.append(
            {"length": n, "examples": k, "acc": r["acc"], "loss": r["loss"], "seconds": dt, "skipped": False}
        )
        print(
            f"[eval] L={n:>8}: acc {100 * r['acc']:6.2f}%  loss {r['loss']:.4f}  ({k} examples, {dt:.1f}s)",
            flush=True,
        )
    return rows


def plot_rows(rows: list[dict], png: Path, title: str, metric: str = "acc") -> None:
    """Accuracy (``metric="acc"``) or bits per byte (``"bpb"``) against log2 length, written atomically."""
    import matplotlib

    from ssmkit.utils import atomic_save

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r["skipped"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if metric == "acc":
        ax.plot([r["length"] for r in done], [100 * r["acc"] for r in done], "o-")
        ax.set(ylabel="accuracy (%)", ylim=(0, 102))
    else:
        ax.plot([r["length"] for r in done], [r[metric] for r in done], "o-")
        ax.set(ylabel="validation bits per byte")
    ax.set(xscale="log", xlabel="sequence length", title=title)
    ax.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"$2^{{{int(round(__import__('math').log2(v)))}}}$")
    )
    fig.tight_layout()
    try:
        atomic_save(png, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def check_checkpoint_path(path: Path) -> None:
    """FileNotFoundError / ValueError saying what ``ssmkit eval`` expected, and what to pass instead."""
    expected = "expected the checkpoint.safetensors that `ssmkit train` writes into its --out folder"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {expected}")
    if path.is_dir():
        if (path / "checkpoint.safetensors").is_file():
            raise ValueError(f"{path} is a folder; {expected}: pass {path / 'checkpoint.safetensors'}")
        if (path / "config.json").is_file():
            run = path.parent / "checkpoint.safetensors"
            instead = f"pass {run}" if run.is_file() else "pass the run's checkpoint.safetensors"
            raise ValueError(
                f"{path} is a model folder (for `ssmkit generate`), not a training checkpoint; "
                f"{expected}: {instead}"
            )
        raise ValueError(f"{path} is a folder; {expected}")
    if (path.parent / "config.json").is_file():
        raise ValueError(
            f"{path} is the weights file of a model folder (for `ssmkit generate {path.parent}`), not a "
            f"training checkpoint; {expected}"
        )


def _run(args) -> int:
    import torch
    from safetensors import SafetensorError

    from ssmkit.train.build import build_task, load_trained
    from ssmkit.utils import atomic_write_text

    check_device("--device", args.device)
    check_checkpoint_path(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, header = load_trained(args.checkpoint)
    except SafetensorError as err:
        raise ValueError(
            f"{args.checkpoint} is not a readable safetensors file ({err}); expected the "
            "checkpoint.safetensors that `ssmkit train` writes"
        ) from None
    model.to(args.device)
    tspec = dict(header["task"])
    is_lm = tspec["task"] == "lm"
    if args.task:
        if is_lm:
            raise ValueError(f"--task {args.task}: {args.checkpoint} is a language model (task 'lm')")
        tspec["task"] = args.task
    task = build_task(tspec, verbose=is_lm)
    lengths = args.lengths or [tspec["seq_len"]]
    rows = evaluate_lengths(
        model,
        task,
        lengths,
        args.examples,
        args.max_tokens,
        args.max_length,
        args.chunk_size,
        args.batch_size,
        args.device,
    )
    if is_lm:
        for r in rows:
            r["bpb"] = None if r["loss"] is None else task.bits_per_byte(r["loss"])
            if r["bpb"] is not None:
                print(f"[eval] L={r['length']:>8}: {r['bpb']:.4f} bits/byte", flush=True)
    out = args.out or args.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(args.checkpoint),
        "task": tspec,
        "model": header["model"],
        "step": header["step"],
        "rows": rows,
    }
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2))
    cols = ["length", "examples", "acc", "loss", *(["bpb"] if is_lm else []), "seconds"]

    def cell(r: dict, c: str) -> str:
        return "" if r[c] is None else (f"{r[c]:.3f}" if c == "seconds" else str(r[c]))

    csv = ",".join(cols) + "\n" + "".join(",".join(cell(r, c) for c in cols) + "\n" for r in rows)
    atomic_write_text(out / "eval.csv", csv)
    cfg = header["model"]["config"]
    if is_lm:
        plot_rows(rows, out / "eval.png", f"lm: {header['model']['kind']}", metric="bpb")
    else:
        plot_rows(rows, out / "eval.png", f"{tspec['task']}: {cfg.get('arch')}/{cfg.get('layer')}")
    print(f"[eval] wrote {(out / 'eval.json').resolve()}, eval.csv, eval.png")
    return 0
