"""The decode-cost measurement: time per generated token and state held per sequence, vs context length.

The claim under test (Gu & Dao 2023, §3.4 and Fig. 8 "inference throughput"; the lecture's practical
promise): a Mamba LM generates like an RNN — each new token costs O(1) time and its recurrent state has a
fixed size (per layer ``conv_state`` (b, E·D, d_conv) + ``ssm_state`` (b, E·D, N)) — while a Transformer
attends over a KV cache of 2 × n_layer × l × D numbers that grows with the context l, and so does the
time of each new token.

Protocol, per model and context length l (batch 1, random weights, no gradients):
    1. prefill: feed l random token ids through ``model(ids, cache=cache)`` in chunks of ``chunk_size``
       tokens (memory stays bounded; the cache carries the context between chunks);
    2. decode: ``decode_steps`` greedy steps, each ``model(last_token, cache=cache)`` + argmax, timed one
       by one with ``time.perf_counter`` (``torch.cuda.synchronize`` first on CUDA); we report the
       median and the mean in ms/token;
    3. state bytes: the bytes of the cache tensors that hold this sequence after the decode (Mamba: conv
       + SSM state; Transformer: the filled part of the K and V buffers).

The two models have the same width D and depth; the Transformer's MLP width is solved for so that the
parameter counts match (reported; the test and the CLI check ±10%).

Glossary: D d_model; l context length; E expand; N d_state.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ssmkit.models.config import MambaConfig
from ssmkit.models.mamba_lm import MambaLM
from ssmkit.models.transformer_lm import TransformerConfig, TransformerLM
from ssmkit.utils import atomic_save, atomic_write, atomic_write_text, count_parameters


@dataclass
class DecodeBenchConfig:
    """Settings of ``ssmkit bench decode``."""

    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    """Context lengths (tokens prefilled before the timed decode)."""
    d_model: int = 256
    """Width D of both models."""
    n_layer: int = 4
    """Depth of both models."""
    n_head: int = 4
    """Attention heads of the Transformer (head size D / n_head)."""
    d_state: int = 16
    """SSM state size N of Mamba."""
    vocab_size: int = 256
    """Vocabulary (bytes by default)."""
    decode_steps: int = 64
    """Timed decode steps per context."""
    chunk_size: int = 1024
    """Tokens per prefill call (bounds the attention score matrix at chunk × l per head)."""
    models: list[str] = field(default_factory=lambda: ["mamba", "transformer"])
    """Which models to measure."""
    device: str = "cpu"
    """Torch device."""
    seed: int = 0
    """Seed of the weights and the context tokens."""

    def __post_init__(self) -> None:
        if not self.contexts or any(not isinstance(c, int) or c < 1 for c in self.contexts):
            raise ValueError(f"contexts must be a non-empty list of positive ints, got {self.contexts!r}")
        for name in (
            "d_model",
            "n_layer",
            "n_head",
            "d_state",
            "vocab_size",
            "decode_steps",
            "chunk_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        bad = sorted(set(self.models) - {"mamba", "transformer"})
        if bad or not self.models:
            raise ValueError(
                f"models must be a non-empty subset of ['mamba', 'transformer'], got {self.models}"
            )


@dataclass
class DecodeRow:
    """One measurement."""

    model: str
    context: int
    params: int
    prefill_s: float
    """Wall time of the whole (chunked) prefill."""
    ms_per_token: float
    """Median decode step time."""
    ms_per_token_mean: float
    ms_per_token_min: float
    """Fastest decode step (the least disturbed by other processes on a shared machine)."""
    state_bytes: int
    """Bytes of cache held for this one sequence after prefill + decode."""


def matched_transformer_config(mamba_cfg: MambaConfig, n_head: int) -> TransformerConfig:
    """A Transformer of the same D, depth and vocabulary whose MLP width makes its parameter count equal
    (to a multiple of 8) the Mamba's. The count is linear in ``d_mlp``, so two probes on the meta device
    (no memory) give the slope and the intercept."""

    def build(d_mlp: int) -> TransformerConfig:
        return TransformerConfig(
            d_model=mamba_cfg.d_model,
            n_layer=mamba_cfg.n_layer,
            vocab_size=mamba_cfg.vocab_size,
            n_head=n_head,
            d_mlp=d_mlp,
            pad_vocab_size_multiple=mamba_cfg.pad_vocab_size_multiple,
        )

    with torch.device("meta"):
        target = count_parameters(MambaLM(mamba_cfg))
        p8, p16 = count_parameters(TransformerLM(build(8))), count_parameters(TransformerLM(build(16)))
    slope = (p16 - p8) / 8  # parameters per unit of d_mlp
    d_mlp = max(8, 8 * round((8 + (target - p8) / slope) / 8))
    return build(d_mlp)


def build_models(cfg: DecodeBenchConfig) -> dict[str, nn.Module]:
    """The two random-weight models of ``cfg``, in eval mode on ``cfg.device``."""
    torch.manual_seed(cfg.seed)
    mcfg = MambaConfig(
        d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=cfg.vocab_size, d_state=cfg.d_state
    )
    tcfg = matched_transformer_config(mcfg, cfg.n_head)
    out = {}
    with torch.device(cfg.device):  # build (and initialise) directly on the device
        if "mamba" in cfg.models:
            out["mamba"] = MambaLM(mcfg).eval()
        if "transformer" in cfg.models:
            out["transformer"] = TransformerLM(tcfg).eval()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_decode(
    model: nn.Module, context: int, cfg: DecodeBenchConfig, progress=None
) -> tuple[float, list[float], int]:
    """Prefill ``context`` random tokens in chunks, then time ``cfg.decode_steps`` greedy steps.

    Returns (prefill seconds, per-step seconds, cache bytes after decoding). ``progress`` (a tqdm bar or
    None) is advanced by the number of tokens consumed."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(cfg.seed + context)
    # the Transformer's KV buffers are reserved up front, so no regrowth copies land in the timed steps
    if isinstance(model, TransformerLM):
        cache = model.new_cache(1, capacity=context + cfg.decode_steps)
    else:
        cache = model.new_cache(1)
    _sync(device)
    t0 = time.perf_counter()
    logits = None
    for start in range(0, context, cfg.chunk_size):
        n = min(cfg.chunk_size, context - start)
        ids = torch.randint(0, vocab, (1, n), generator=g).to(device)  # (1, c)
        logits = model(ids, cache=cache, num_last_tokens=1)  # (1, 1, V_pad)
        if progress is not None:
            progress.update(n)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    token = logits[:, -1, :vocab].argmax(-1, keepdim=True)  # (1, 1)
    steps = []
    for _ in range(cfg.decode_steps):
        _sync(device)
        t0 = time.perf_counter()
        logits = model(token, cache=cache)  # (1, 1, V_pad)
        token = logits[:, -1, :vocab].argmax(-1, keepdim=True)  # (1, 1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return prefill_s, steps, cache.nbytes


def run_decode_bench(cfg: DecodeBenchConfig, out_dir: Path | None = None, show_progress: bool = True):
    """Measure every (model, context); print the table; write ``decode.csv``, ``decode.json`` and
    ``decode.png`` into ``out_dir`` when given. Returns (rows, written files)."""
    from tqdm import tqdm

    models = build_models(cfg)
    params = {name: count_parameters(m) for name, m in models.items()}
    for name, p in params.items():
        print(f"[bench decode] {name}: {p:,} parameters")
    # warm-up (discarded): first calls pay one-off costs (kernel compilation, allocator growth, lazy init)
    warm = replace(cfg, decode_steps=4, chunk_size=min(cfg.chunk_size, 32))
    for model in models.values():
        measure_decode(model, 32, warm)
    total = len(models) * (sum(cfg.contexts) + len(cfg.contexts) * cfg.decode_steps)
    rows: list[DecodeRow] = []
    with tqdm(total=total, unit="tok", disable=not show_progress, desc="bench decode") as bar:
        for context in cfg.contexts:
            for name, model in models.items():
                bar.set_postfix_str(f"{name} l={context}")
                prefill_s, steps, nbytes = measure_decode(model, context, cfg, progress=bar)
                rows.append(
                    DecodeRow(
                        model=name,
                        context=context,
                        params=params[name],
                        prefill_s=prefill_s,
                        ms_per_token=1e3 * statistics.median(steps),
                        ms_per_token_mean=1e3 * statistics.fmean(steps),
                        ms_per_token_min=1e3 * min(steps),
                        state_bytes=nbytes,
                    )
                )
    print(format_table(rows))
    files: list[Path] = []
    if out_dir is not None:
        files = write_results(rows, cfg, Path(out_dir), params)
    return rows, files


def format_table(rows: list[DecodeRow]) -> str:
    """A fixed-width text table of the rows."""
    head = (
        f"{'model':<12} {'context':>8} {'params':>11} {'prefill s':>10} {'ms/token':>9} {'mean':>8} "
        f"{'min':>8} {'state':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<12} {r.context:>8} {r.params:>11,} {r.prefill_s:>10.2f} {r.ms_per_token:>9.2f} "
            f"{r.ms_per_token_mean:>8.2f} {r.ms_per_token_min:>8.2f} {human_bytes(r.state_bytes):>11}"
        )
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def write_results(rows: list[DecodeRow], cfg: DecodeBenchConfig, out_dir: Path, params: dict) -> list[Path]:
    """decode.csv, decode.json (config + rows + torch/threads info) and decode.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = out_dir / "decode.csv", out_dir / "decode.json", out_dir / "decode.png"
    with atomic_write(csv_path) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0])), lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    info = {
        "config": asdict(cfg),
        "params": params,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": [asdict(r) for r in rows],
    }
    atomic_write_text(json_path, json.dumps(info, indent=1))
    plot_decode(rows, png_path)
    return [csv_path, json_path, png_path]


def plot_decode(rows: list[DecodeRow], path: Path) -> None:
    """Two panels, log-log: ms/token vs context and state bytes vs context, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r.model for r in rows):
        rs = sorted((r for r in rows if r.model == name), key=lambda r: r.context)
        x = [r.context for r in rs]
        ax_t.plot(x, [r.ms_per_token for r in rs], "o-", label=name)
        ax_m.plot(x, [r.state_bytes for r in rs], "o-", label=name)
    for ax, title, ylabel in (
        (ax_t, "time per generated token", "ms / token (median)"),
        (ax_m, "state held per sequence", "bytes"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def expected_state_bytes(model: nn.Module, context: int) -> int:
    """The analytic state size for one sequence (float32): Mamba n_layer·E·D·(d_conv + N)·4 whatever the
    context; Transformer 2·n_layer·l·D·4 (K and V of every past token)."""
    cfg = model.config
    if isinstance(model, MambaLM):
        return cfg.n_layer * cfg.d_inner * (cfg.d_conv * 4 + cfg.d_state * 4)
    return 2 * cfg.n_layer * context * cfg.d_model * 4


__all__ = [
    "DecodeBenchConfig",
    "DecodeRow",
    "build_models",
    "expected_state_bytes",
    "format_table",
    "matched_transformer_config",
    "measure_decode",
    "run_decode_bench",
]
