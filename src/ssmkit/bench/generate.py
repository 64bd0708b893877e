"""`ssmkit bench generate`: prefill (pp) and decode (tg) tokens per second, llama-bench style.

For a model folder (or a named shape with random weights), each combination of weight precision, batch
size and thread count is timed on two tests, named as llama.cpp's ``llama-bench`` names them:

    ppP   prefill: ``model(ids, cache=cache)`` on a (b, P) batch of random ids — b·P / time
    tgN   decode: N greedy steps, each ``model(token, cache=cache)`` + argmax after a P-token prefill — b·N /
          time (the one-token call goes to the fused C++ step where it applies, as in ``generate``)

Each figure is the median over ``repeats`` runs after one warm-up run, with the spread (min–max) beside
it. The machine's limit for decode is printed with it: a batch-1 step must read every weight once, so
tokens/s cannot exceed ``read bandwidth / weight bytes``; the read bandwidth is measured here as the best
rate of ``torch.sum`` over a 256 MiB tensor with the same threads (the fused step can read slightly
faster, so "% limit" can pass 100). With ``compare``, transformers' ``MambaForCausalLM`` /
``Mamba2ForCausalLM`` of the same shape and weights runs the same tests in the same process: pp is its
forward over the batch, tg is ``(generate(k + 2N) − generate(k)) / 2N`` (its set-up and prefill cancel).

Precisions: ``fp32``, ``bf16`` (``model.to(torch.bfloat16)``) and ``int8`` (``ssmkit.quantize``,
weight-only, Mamba-1 models). Glossary: b batch, P prompt tokens, N generated tokens.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ssmkit.bench.machine import cpu_model, read_bandwidth, weight_bytes
from ssmkit.models.config import Mamba2Config, MambaConfig

__all__ = ["BenchGenerateConfig", "cpu_model", "format_row", "run"]

DTYPES = ("fp32", "bf16", "int8")
VOCAB = 50280  # the GPT-NeoX vocabulary of the state-spaces checkpoints (a multiple of 8)
SHAPES: dict[str, Callable[[], MambaConfig | Mamba2Config]] = {  # the published checkpoints' shapes
    "mamba-130m": lambda: MambaConfig(d_model=768, n_layer=24, vocab_size=VOCAB),
    "mamba-370m": lambda: MambaConfig(d_model=1024, n_layer=48, vocab_size=VOCAB),
    "mamba-790m": lambda: MambaConfig(d_model=1536, n_layer=48, vocab_size=VOCAB),
    "mamba-1.4b": lambda: MambaConfig(d_model=2048, n_layer=48, vocab_size=VOCAB),
    "mamba-2.8b": lambda: MambaConfig(d_model=2560, n_layer=64, vocab_size=VOCAB),
    "mamba2-130m": lambda: Mamba2Config(d_model=768, n_layer=24, vocab_size=VOCAB, d_state=128, headdim=64),
    "mamba2-370m": lambda: Mamba2Config(d_model=1024, n_layer=48, vocab_size=VOCAB, d_state=128, headdim=64),
}


@dataclass
class BenchGenerateConfig:
    """What ``run`` times: every (dtype, batch, threads) on ppP and tgN."""

    dtypes: tuple[str, ...] = ("fp32",)
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (0,)  # 0: torch's own choice
    prompt_tokens: int = 512
    gen_tokens: int = 64
    repeats: int = 3
    compare: bool = False
    seed: int = 0

    def __post_init__(self):
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise ValueError(
                f"--dtypes: expected values among {','.join(DTYPES)}, got {','.join(self.dtypes)}"
            )
        for name, values in (("--batch", self.batches), ("--threads", self.threads)):
            low = 1 if name == "--batch" else 0
            if not values or any(v < low for v in values):
                raise ValueError(f"{name}: expected integers >= {low}, got {list(values)}")
        for name, v, low in (
            ("--prompt-tokens", self.prompt_tokens, 1),
            ("--gen-tokens", self.gen_tokens, 1),
            ("--repeats", self.repeats, 1),
        ):
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")


def with_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of the float32 ``model`` in ``dtype`` (``int8``: ``ssmkit.quantize``)."""
    from ssmkit.engine.quant import quantize

    other = copy.deepcopy(model)
    if dtype == "bf16":
        return other.to(torch.bfloat16)
    if dtype == "int8":
        return quantize(other, "int8")
    return other


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def time_ssmkit(model: nn.Module, b: int, p: int, n: int, repeats: int, gen: torch.Generator) -> dict:
    """tokens/s of ppP and tgN for ``model`` (runs: one warm-up + ``repeats``)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (b, p), generator=gen)
    pp, tg = [], []
    with torch.no_grad():
        for run in range(repeats + 1):
            cache = model.new_cache(b)
            t0 = time.perf_counter()
            logits = model(ids, cache=cache, num_last_tokens=1)
            t1 = time.perf_counter()
            tok = logits[:, -1, :vocab].argmax(-1, keepdim=True)  # (b, 1)
            t2 = time.perf_counter()
            for _ in range(n):
                tok = model(tok, cache=cache)[:, -1, :vocab].argmax(-1, keepdim=True)  # (b, 1)
            t3 = time.perf_counter()
            if run:  # the first run warms up (kernel packing, allocator)
                pp.append(b * p / (t1 - t0))
                tg.append(b * n / (t3 - t2))
    return {"pp": _median_spread(pp), "tg": _median_spread(tg)}


def transformers_twin(model: nn.Module, dtype: str) -> nn.Module | None:
    """transformers' model of the same shape and weights (None: not installed, or no such precision)."""
    if dtype == "int8":
        return None
    try:
        import transformers
    except ImportError:
        return None
    import tempfile

    cls = (
        transformers.Mamba2ForCausalLM
        if isinstance(model.config, Mamba2Config)
        else transformers.MambaForCausalLM
    )
    with tempfile.TemporaryDirectory() as folder:  # through the checkpoint format transformers reads
        model.save_pretrained(folder)
        hf = cls.from_pretrained(folder).eval()
    return hf.to(torch.bfloat16) if dtype == "bf16" else hf


def time_transformers(hf: nn.Module, b: int, p: int, n: int, repeats: int, gen: torch.Generator) -> dict:
    """tokens/s of ppP (forward) and tgN ((generate(4 + 2N) − generate(4)) / 2N) for transformers."""
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (b, p), generator=gen)
    short = ids[:, :4]

    def generate(k: int) -> float:
        t0 = time.perf_counter()
        hf.generate(short, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    pp, tg = [], []
    with torch.no_grad():
        for run in range(repeats + 1):
            t0 = time.perf_counter()
            hf(ids, use_cache=True)
            dt_pp = time.perf_counter() - t0
            base = generate(4)
            dt_tg = (generate(4 + 2 * n) - base) / (2 * n)
            if run:
                pp.append(b * p / dt_pp)
                tg.append(b / dt_tg)
    return {"pp": _median_spread(pp), "tg": _median_spread(tg)}


def run(model: nn.Module, name: str, cfg: BenchGenerateConfig, emit: Callable[[dict], None]) -> list[dict]:
    """Time every combination on ``model`` (float32); ``emit`` gets each row as soon as it is measured."""
    rows = []
    base_threads = torch.get_num_threads()
    p, n = cfg.prompt_tokens, cfg.gen_tokens
    try:
        for dtype in cfg.dtypes:
            try:
                m = with_dtype(model, dtype).eval()
            except ValueError as err:  # e.g. int8 of a hybrid model
                print(f"[bench generate] {dtype}: skipped — {err}", file=sys.stderr)
                continue
            nbytes = weight_bytes(m)
            hf = transformers_twin(model, dtype) if cfg.compare else None
            if cfg.compare and hf is None and dtype != "int8":
                print("[bench generate] --compare: transformers is not installed", file=sys.stderr)
            for threads in cfg.threads:
                torch.set_num_threads(threads or base_threads)
                limit = read_bandwidth()[1] * 1e9 / nbytes  # batch-1 decode limit, tokens/s
                for b in cfg.batches:
                    gen = torch.Generator().manual_seed(cfg.seed)
                    impls = [("ssmkit", time_ssmkit, m)]
                    if hf is not None:
                        impls.append(("transformers", time_transformers, hf))
                    for impl, measure, target in impls:
                        got = measure(target, b, p, n, cfg.repeats, gen)
                        for test, key, tokens in (("pp", "pp", p), ("tg", "tg", n)):
                            med, lo, hi = got[key]
                            row = {
                                "model": name,
                                "impl": impl,
                                "dtype": dtype,
                                "threads": torch.get_num_threads(),
                                "batch": b,
                                "test": f"{test}{tokens}",
                                "tok_s": med,
                                "tok_s_min": lo,
                                "tok_s_max": hi,
                                "weight_bytes": nbytes,
                                "limit_tok_s": limit if test == "tg" and b == 1 else None,
                            }
                            rows.append(row)
                            emit(row)
    finally:
        torch.set_num_threads(base_threads)
    return rows


HEADER = "| model | impl | dtype | threads | batch | test | t/s | min–max | limit t/s (share) |"


def format_row(r: dict) -> str:
    """One markdown table row (the limit column: batch-1 tg rows only)."""
    share = ""
    if r["limit_tok_s"]:
        share = f"{r['limit_tok_s']:.0f} ({100 * r['tok_s'] / r['limit_tok_s']:.0f} %)"
    return (
        f"| {r['model']} | {r['impl']} | {r['dtype']} | {r['threads']} | {r['batch']} | {r['test']} | "
        f"{r['tok_s']:.1f} | {r['tok_s_min']:.1f}–{r['tok_s_max']:.1f} | {share} |"
    )
