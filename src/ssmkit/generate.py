"""Sampling and the autoregressive decode loop over a model's recurrent cache.

The logit processors are small pure functions on (b, v) logits, applied in this order (transformers'
order; mamba-ssm's ``utils/generation.py`` is the reference for the loop):

    1. repetition penalty (CTRL, Keskar et al. 2019, arXiv 1909.05858): for every token id already in the
       sequence (prompt included) the logit s becomes s / θ if s > 0 else s · θ;
    2. temperature: s / T  (T == 0 means greedy argmax, no sampling);
    3. top-k: keep the k largest logits (ties at the k-th value are kept);
    4. top-p (nucleus, Holtzman et al. 2019): keep the smallest set of most-probable tokens whose
       probability sums to >= p (the most probable token is always kept);
    5. min-p (Nguyen et al. 2024, arXiv 2407.01082): keep tokens with p_i >= min_p · max_j p_j.
       (mamba-ssm's own min-p compares logits of token 0 and is a no-op in practice; this is the
       standard rule.)

Removed tokens get logit −inf; the next token is drawn with ``torch.multinomial`` from the given
``torch.Generator`` (so a seed fixes the output). Padded vocabulary rows (ids >= config.vocab_size) are
never produced. Decoding: one prefill call on the whole prompt, then one call per new token, all through
``model(ids, cache=cache)``. Rows that emitted ``eos_token_id`` keep emitting it; the loop stops early
once every row has finished. A list of prompts of different lengths is prefilled row by row, then
decoded as one batch (``cache.cat``), each finished row leaving it at once (``cache.select``). Stop
strings (transformers' ``stop_strings`` with its ``tokenizer``): a row also finishes with the token that
completes one of them in its decoded continuation; the tokens are kept up to and including that one.

Glossary: b batch, v vocabulary, θ repetition penalty, T temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def apply_repetition_penalty(logits: Tensor, seen_ids: Tensor, penalty: float) -> Tensor:
    """CTRL penalty on (b, v) logits for the ids in ``seen_ids`` (b, t): positive / θ, negative · θ."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    if penalty == 1.0:
        return logits
    score = logits.gather(1, seen_ids)  # (b, t)
    score = torch.where(score > 0, score / penalty, score * penalty)  # (b, t)
    return logits.scatter(1, seen_ids, score)  # (b, v)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (others −inf); k <= 0 or k >= v keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))  # (b, v)


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest most-probable set with total probability >= p; p >= 1 keeps all."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, v)
    probs = sorted_logits.softmax(-1)  # (b, v)
    mass_before = probs.cumsum(-1) - probs  # (b, v) probability of strictly more probable tokens
    remove_sorted = mass_before >= p  # (b, v); the first token has mass_before 0 and is always kept
    remove = remove_sorted.scatter(1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def filter_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens with p_i >= min_p · max_j p_j (others −inf); min_p == 0 keeps all."""
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if min_p == 0:
        return logits
    probs = logits.softmax(-1)  # (b, v)
    threshold = min_p * probs.max(-1, keepdim=True).values  # (b, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: Tensor,
    seen_ids: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """All processors in order on (b, v) float logits; with temperature == 0 only the penalty applies."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, repetition_penalty)
    if temperature == 0:
        return logits
    logits = logits / temperature
    logits = filter_top_k(logits, top_k)
    logits = filter_top_p(logits, top_p)
    return filter_min_p(logits, min_p)


def sample_next(
    logits: Tensor,
    seen_ids: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token (b,) from (b, v) logits: argmax when temperature == 0, else a seeded multinomial draw."""
    logits = process_logits(logits, seen_ids, temperature, top_k, top_p, min_p, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)  # (b,)
    probs = logits.softmax(-1)  # (b, v)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (b,)


def _check_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id, vocab):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab:
        raise ValueError(f"eos_token_id must be in [0, {vocab}), got {eos_token_id}")


def check_input_ids(input_ids: Tensor, vocab_size: int | None = None) -> None:
    """ValueError unless ``input_ids`` is an int64/int32 (b, l) tensor with b, l >= 1.

    With ``vocab_size``, also check that every id lies in [0, vocab_size) — a reduction read back to the
    host, so it is done once at the boundary (``generate``, the CLI), never in a model's forward.
    """
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor of shape (b, l), got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(
            f"input_ids must be an integer tensor (torch.long or int32), got dtype {input_ids.dtype}"
        )
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (b, l) with b, l >= 1, got {tuple(input_ids.shape)}")
    if vocab_size is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]"
            )


def check_num_last_tokens(num_last_tokens: int) -> None:
    """ValueError unless ``num_last_tokens`` is an int >= 0 (0: logits for every position)."""
    if isinstance(num_last_tokens, bool) or not isinstance(num_last_tokens, int) or num_last_tokens < 0:
        raise ValueError(f"num_last_tokens must be an int >= 0 (0 = all positions), got {num_last_tokens!r}")


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor | list,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    stop_strings: Sequence[str] | str | None = None,
    tokenizer=None,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
) -> Tensor | list[Tensor]:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: speaks the state protocol — ``config.vocab_size``, ``new_cache(b)`` and
            ``model(ids, cache=, num_last_tokens=)`` (:class:`ssmkit.MambaLM`, ``TransformerLM``).
        input_ids: a (b, l) long tensor of equal-length prompts, or a list of prompts of any lengths
            (each a list of ids or a 1-D tensor): each is prefilled on its own tokens, then all are
            decoded together, and a row that emits ``eos_token_id`` leaves the batch at once.
        max_new_tokens: number of tokens to add (fewer if every row emits ``eos_token_id``).
        temperature, top_k, top_p, min_p, repetition_penalty: see the module docstring; temperature
            defaults to 0 — greedy, as transformers (do_sample=False) and mamba-ssm (top_k=1) decode by
            default, so ``model.generate(ids, n)`` is reproducible; give a temperature > 0 to sample.
        eos_token_id: the token that ends a row (a tensor batch keeps emitting it in finished rows).
        generator: torch.Generator for the draws (seed it for reproducible output); for a list of prompts
            also a list with one generator per prompt, so that each row's text is what it would be alone.
        streamer: called after each step with the new tokens (b,) long (tensor batches only).
        stop_strings: a string or strings; a row finishes once its continuation, decoded with
            ``tokenizer``, contains one (in a tensor batch of several rows the finished row is padded
            with ``eos_token_id``, which is then required).
        tokenizer: has ``decode(list[int]) -> str``; needed with ``stop_strings``.
        attention_mask: (b, l) of 0/1 beside a padded ``input_ids`` batch (transformers' convention: 1 =
            a prompt token, 0 = padding, on either side): each row is generated from its own tokens
            only, exactly as that prompt alone (it goes through the list-of-prompts path).
        pad_token_id: fills the generated part of rows that finished early in a masked batch (default:
            ``eos_token_id``; required when rows can end at different lengths and there is none).
    Returns:
        for a tensor, (b, l + k) long: the prompts followed by the k <= max_new_tokens generated tokens
        (with ``attention_mask``: each input row as given, padding included, then its tokens, right-padded
        with ``pad_token_id`` to the longest);
        for a list, one 1-D long tensor per prompt: the prompt followed by its generated tokens.
    """
    vocab = model.config.vocab_size
    _check_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id, vocab)
    stop = StopStrings(stop_strings, tokenizer)
    if attention_mask is not None:
        if streamer is not None:
            raise ValueError("streamer is not supported with attention_mask (each row is generated alone)")
        return _generate_masked(
            model, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, generator,
            dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty, stop_strings=stop_strings, tokenizer=tokenizer),
        )  # fmt: skip
    if isinstance(input_ids, (list, tuple)):
        if streamer is not None:
            raise ValueError("streamer is only supported for a (b, l) tensor of equal-length prompts")
        sampling = (temperature, top_k, top_p, min_p, repetition_penalty)
        return _generate_ragged(model, input_ids, max_new_tokens, sampling, eos_token_id, generator, stop)
    if isinstance(generator, (list, tuple)):
        raise ValueError("a list of generators needs a list of prompts (one generator per prompt)")
    check_input_ids(input_ids, vocab)
    sequences = input_ids.to(torch.long)  # (b, l)
    if max_new_tokens == 0:
        return sequences
    b, l0 = sequences.shape
    if stop and b > 1 and eos_token_id is None:
        raise ValueError(
            "stop_strings with a batch of several rows needs eos_token_id to pad the rows that stop "
            "first (or pass a list of prompts: each row then ends on its own)"
        )
    cache = model.new_cache(b)
    finished = torch.zeros(b, dtype=torch.bool, device=sequences.device)  # (b,)
    logits = model(sequences, cache=cache, num_last_tokens=1)[:, -1, :vocab]  # (b, v) prefill
    for step in range(max_new_tokens):
        token = sample_next(
            logits, sequences, temperature, top_k, top_p, min_p, repetition_penalty, generator
        )  # (b,)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        sequences = torch.cat([sequences, token[:, None]], dim=1)  # (b, l + step + 1)
        if stop:
            for i in range(b):
                if not finished[i] and stop.found(sequences[i, l0:].tolist()):
                    finished[i] = True
        if streamer is not None:
            streamer(token)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = model(token[:, None], cache=cache)[:, -1, :vocab]  # (b, v) one-token decode
    return sequences


def _generate_masked(model, input_ids, mask, max_new_tokens, pad_token_id, eos_token_id, generator, kw):
    """A padded (b, l) batch with its attention mask: each row's unmasked tokens as one prompt of the
    list path, the results put back after the rows as given and right-padded with ``pad_token_id``."""
    check_input_ids(input_ids, model.config.vocab_size)
    if not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (prompt tokens)")
    keep = mask.bool()
    if not bool(keep.any(dim=1).all()):
        raise ValueError("attention_mask: every row needs at least one prompt token (a 1)")
    prompts = [input_ids[i][keep[i]] for i in range(input_ids.shape[0])]
    outs = generate(model, prompts, max_new_tokens, eos_token_id=eos_token_id, generator=generator, **kw)
    new = [o[len(p) :] for o, p in zip(outs, prompts, strict=True)]
    width = max(len(t) for t in new)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if pad is None and any(len(t) < width for t in new):
        raise ValueError("rows ended at different lengths: give pad_token_id (or eos_token_id) to pad them")
    rows = [torch.cat([t, torch.full((width - len(t),), pad if pad is not None else 0)]) for t in new]
    return torch.cat([input_ids.to(torch.long), torch.stack(rows).to(input_ids.device)], dim=1)


class StopStrings:
    """The stop strings of one ``generate`` call: ``found(new_ids)`` is True once the decoded
    continuation contains one of them (false-y when there are none)."""

    def __init__(self, strings: Sequence[str] | str | None, tokenizer):
        strings = [strings] if isinstance(strings, str) else list(strings or [])
        if any(not isinstance(x, str) or not x for x in strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {strings!r}")
        if strings and not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("stop_strings needs tokenizer= (an object with decode(list[int]) -> str)")
        self.strings, self.tokenizer = strings, tokenizer
        # A stop string completed by the newest token lies in the text of the last few tokens: one of c
        # characters spans at most 4c bytes, so at most 4c byte-level tokens, plus the newest. Decoding
        # only that tail keeps a long generation linear (decoding everything each step is quadratic);
        # earlier text was searched at earlier steps.
        self.window = 4 * max((len(x) for x in strings), default=0) + 2

    def __bool__(self) -> bool:
        return bool(self.strings)

    def found(self, new_ids: list[int]) -> bool:
        text = self.tokenizer.decode(new_ids[-self.window :])
        return any(x in text for x in self.strings)


def _generate_ragged(
    model, prompts, max_new_tokens, sampling, eos_token_id, generator, stop: StopStrings
) -> list[Tensor]:
    """Prompts of different lengths: prefill each alone, batch their caches, decode together.

    The caches are joined with ``cache.cat`` and finished rows dropped with ``cache.select`` (the cache
    protocol of ``ssmkit.models.cache.Cache``); every row is sampled from its own logits and its own ids,
    so greedy decoding gives exactly the tokens of each prompt generated alone.
    """
    vocab = model.config.vocab_size
    if len(prompts) == 0:
        raise ValueError("input_ids: the list of prompts is empty")
    rows = []
    for i, p in enumerate(prompts):
        t = torch.as_tensor(p).reshape(1, -1)
        try:
            check_input_ids(t, vocab)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        rows.append(t.to(torch.long))  # (1, l_i)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(rows)
    if len(gens) != len(rows):
        raise ValueError(f"generator: got {len(gens)} generators for {len(rows)} prompts")
    if max_new_tokens == 0:
        return [r[0] for r in rows]
    lengths = [r.shape[1] for r in rows]  # prompt lengths: the continuation starts there
    caches, logits = [], []
    for r in rows:  # prefill: each row on its own tokens only
        c = model.new_cache(1)
        logits.append(model(r, cache=c, num_last_tokens=1)[:, -1, :vocab])  # (1, v)
        caches.append(c)
    cache, logits = caches[0].cat(caches), torch.cat(logits)  # batch of all rows; (b, v)
    active = list(range(len(rows)))  # prompt index of each batch row
    for step in range(max_new_tokens):
        tokens = torch.cat(
            [
                sample_next(logits[j : j + 1], rows[i], *sampling, generator=gens[i])
                for j, i in enumerate(active)
            ]
        )  # (b,)
        for j, i in enumerate(active):
            rows[i] = torch.cat([rows[i], tokens[j : j + 1, None]], dim=1)  # (1, l_i + step + 1)
        keep = [
            j
            for j, i in enumerate(active)
            if (eos_token_id is None or int(tokens[j]) != eos_token_id)
            and not (stop and stop.found(rows[i][0, lengths[i] :].tolist()))
        ]
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch, their state is freed
            cache, tokens = cache.select(keep), tokens[keep]
            active = [active[j] for j in keep]
        logits = model(tokens[:, None], cache=cache)[:, -1, :vocab]  # (b, v) one-token decode
    return [r[0] for r in rows]


class GenerationMixin:
    """``model.generate(input_ids, max_new_tokens, …)`` for any model that speaks the state protocol
    (MambaLM, TransformerLM): the function itself, bound as a method, so ``model`` is ``self``."""

    generate = generate
