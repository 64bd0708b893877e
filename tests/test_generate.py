"""Sampling rules on hand-made logits, and the decode loop (greedy, seeds, EOS, streaming, batches)."""

import math

import pytest
import torch

from ssmkit import MambaConfig, MambaLM
from ssmkit.generate import (
    apply_repetition_penalty,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    generate,
    process_logits,
    sample_next,
)

NEG = float("-inf")


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()


def log_probs(*p):
    return torch.tensor([[math.log(x) for x in p]])


# ------------------------------------------------------------------------------ logit processors
def test_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]])
    assert kept(filter_top_k(logits, 2)) == [3, 4]
    assert kept(filter_top_k(logits, 1)) == [3]
    assert kept(filter_top_k(logits, 0)) == [0, 1, 2, 3, 4]
    assert kept(filter_top_k(logits, 9)) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(filter_top_k(logits, 2)[0, 3:], logits[0, 3:])  # kept values unchanged


@pytest.mark.parametrize(
    "p,expected",
    [(0.4, [0]), (0.5, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p(p, expected):
    # probabilities 0.5, 0.3, 0.15, 0.05 at shuffled positions 1, 3, 0, 2 (checks the un-sorting)
    logits = log_probs(0.15, 0.5, 0.05, 0.3)
    rank_to_pos = [1, 3, 0, 2]
    expected_positions = sorted(rank_to_pos[r] for r in expected)
    assert kept(filter_top_p(logits, p)) == expected_positions


@pytest.mark.parametrize(
    "min_p,expected", [(0.0, [0, 1, 2, 3]), (0.05, [0, 1, 2, 3]), (0.25, [0, 1, 2]), (0.7, [0])]
)
def test_min_p(min_p, expected):
    logits = log_probs(0.5, 0.3, 0.15, 0.05)  # threshold = min_p * 0.5
    assert kept(filter_min_p(logits, min_p)) == expected


def test_min_p_is_relative_to_the_max_probability_per_row():
    logits = torch.cat([log_probs(0.5, 0.3, 0.15, 0.05), log_probs(0.05, 0.15, 0.3, 0.5)])
    out = filter_min_p(logits, 0.5)  # keep p >= 0.25
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [False, False, True, True]]


def test_repetition_penalty_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]])
    seen = torch.tensor([[0, 1, 1, 3]])  # repeats count once
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 0.25, -1.0]]))
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    seen = torch.tensor([[0]])
    assert sample_next(logits, seen, temperature=0).item() == 0
    assert sample_next(logits, seen, temperature=0, repetition_penalty=2.0).item() == 1  # 3/2 < 2


def test_temperature_scales_logits_before_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    seen = torch.zeros(1, 0, dtype=torch.long)
    torch.testing.assert_close(process_logits(logits, seen, temperature=0.5), logits / 0.5)
    # with T = 10 the distribution flattens, so top-p 0.6 keeps more tokens than at T = 1
    assert len(kept(process_logits(logits, seen, temperature=1.0, top_p=0.6))) == 1
    assert len(kept(process_logits(logits, seen, temperature=10.0, top_p=0.6))) == 3


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    n = 20000
    g = torch.Generator().manual_seed(0)
    draws = sample_next(
        logits.expand(n, 4), torch.zeros(n, 0, dtype=torch.long), temperature=0.7, generator=g
    )
    freq = torch.bincount(draws, minlength=4).double() / n
    expected = torch.softmax(logits.double() / 0.7, -1)
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)
    draws_k = sample_next(logits.expand(n, 4), torch.zeros(n, 0, dtype=torch.long), top_k=2, generator=g)
    assert set(draws_k.tolist()) == {0, 3}


# ------------------------------------------------------------------------------ decode loop
class ScriptedLM:
    """A stand-in model whose next token is scripted per row and step (independent of the real model)."""

    def __init__(self, script: list[list[int]], vocab: int = 10):
        self.script = script  # [row][step]
        self.config = MambaConfig(d_model=4, n_layer=1, vocab_size=vocab)
        self.calls = []

    def check_input_ids(self, ids):
        assert ids.dtype == torch.long

    def new_cache(self, b):
        return {"step": 0}

    def __call__(self, ids, cache, num_last_tokens=0):
        self.calls.append(ids.shape[1])
        step = cache["step"]
        cache["step"] += 1
        logits = torch.zeros(ids.shape[0], 1, self.config.padded_vocab_size)
        for r, row in enumerate(self.script):
            logits[r, 0, row[step]] = 10.0
        return logits


def test_eos_rows_keep_emitting_eos_and_loop_stops_when_all_done():
    eos = 9
    lm = ScriptedLM([[1, 9, 2, 3, 4, 5], [1, 2, 3, 9, 7, 7]])
    streamed = []
    out = generate(
        lm, torch.tensor([[5, 5], [6, 6]]), 6, temperature=0, eos_token_id=eos, streamer=streamed.append
    )
    assert out.tolist() == [[5, 5, 1, 9, 9, 9], [6, 6, 1, 2, 3, 9]]
    assert lm.calls == [2, 1, 1, 1]  # prefill then one token per step; stopped after the 4th token
    torch.testing.assert_close(torch.stack(streamed, 1), out[:, 2:])


def test_without_eos_generates_exactly_max_new_tokens():
    lm = ScriptedLM([[3] * 8])
    out = generate(lm, torch.tensor([[1]]), 5, temperature=0)
    assert out.tolist() == [[1, 3, 3, 3, 3, 3]]
    assert generate(lm, torch.tensor([[1]]), 0).tolist() == [[1]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=100)).eval()


def test_greedy_matches_uncached_argmax_loop(model):
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, 8, temperature=0)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq)[:, -1, :100].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    torch.testing.assert_close(out, seq, rtol=0, atol=0)


def test_batch_equals_rows(model):
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, 6, temperature=0)
    rows = torch.cat([model.generate(ids[i : i + 1], 6, temperature=0) for i in range(3)])
    torch.testing.assert_close(out, rows, rtol=0, atol=0)


def test_seeded_sampling_is_reproducible(model):
    ids = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=1.3, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    a = model.generate(ids, 12, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(ids, 12, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(ids, 12, generator=torch.Generator().manual_seed(8), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_padded_vocab_rows_are_never_generated():
    torch.manual_seed(4)
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=100, tie_embeddings=False)).eval()
    with torch.no_grad():
        lm.lm_head.weight[100:] = 50.0  # rows 100..103 exist only for padding; make them dominate
    out = lm.generate(torch.tensor([[1, 2]]), 10, temperature=0)
    assert out[:, 2:].max() < 100
    out = lm.generate(torch.tensor([[1, 2]]), 10, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert out[:, 2:].max() < 100


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(eos_token_id=100), "eos_token_id"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2]]), **args)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(torch.tensor([[1, 200]]), 3)


# ------------------------------------------------------------------------------ prompts of any lengths
def _lm():
    torch.manual_seed(3)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=30, d_state=4)).double().eval()


def test_ragged_prompts_give_exactly_the_tokens_of_each_prompt_alone():
    model = _lm()
    prompts = [[1, 2], [3, 4, 5, 6, 7], torch.tensor([8, 9, 10, 11, 12, 13, 14, 15, 16])]
    alone = [model.generate(torch.as_tensor(p).reshape(1, -1), 6, temperature=0)[0] for p in prompts]
    together = model.generate(prompts, 6, temperature=0)
    assert [t.tolist() for t in together] == [a.tolist() for a in alone]
    # a row that emits eos leaves the batch; the others go on exactly as alone
    eos = int(alone[1][5 + 2])  # the third token generated for prompt 1
    expected = []
    for p, a in zip(prompts, alone, strict=True):
        gen = a[len(p) :].tolist()
        expected.append(a[: len(p) + (gen.index(eos) + 1 if eos in gen else len(gen))].tolist())
    together_eos = model.generate(prompts, 6, temperature=0, eos_token_id=eos)
    assert [t.tolist() for t in together_eos] == expected
    assert len(expected[1]) <= 5 + 3 and expected[1][-1] == eos


def test_ragged_sampling_with_one_generator_per_prompt_is_reproducible_per_row():
    model = _lm()
    prompts = [[1, 2, 3], [4]]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    together = model.generate(prompts, 5, temperature=0.9, top_k=10, generator=gens())
    for p, seed, t in zip(prompts, (11, 12), together, strict=True):
        alone = model.generate(
            torch.tensor([p]), 5, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(seed)
        )[0]
        assert t.tolist() == alone.tolist()


def test_ragged_bad_arguments():
    model = _lm()
    with pytest.raises(ValueError, match="empty"):
        model.generate([], 3)
    with pytest.raises(ValueError, match="prompt 1: input_ids must lie in"):
        model.generate([[1], [99]], 3)
    with pytest.raises(ValueError, match="2 generators for 1 prompts"):
        model.generate([[1]], 3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="list of prompts"):
        model.generate(torch.tensor([[1]]), 3, generator=[torch.Generator()])


class _LetterTokenizer:
    """Token id t decodes to one letter (a…z, cycling) — a tokenizer whose texts are easy to predict."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _cut_at_stop(prompt_len, full, stops, tok):
    """The independent expectation: the shortest prefix of the continuation whose text contains a stop."""
    gen = full[prompt_len:]
    for n in range(1, len(gen) + 1):
        if any(s in tok.decode(gen[:n]) for s in stops):
            return full[: prompt_len + n]
    return full


def test_stop_strings_end_each_row_at_the_token_that_completes_them(model):
    tok = _LetterTokenizer()
    prompts = [[1, 2], [3, 4, 5, 6], [7]]
    alone = [model.generate(torch.tensor([p]), 12, temperature=0)[0].tolist() for p in prompts]
    # stop strings taken from the middle of the continuations (two letters: spans a token boundary)
    stops = [tok.decode(alone[0][2 + 4 : 2 + 6]), tok.decode(alone[1][4 + 7 : 4 + 8])]
    expected = [_cut_at_stop(len(p), a, stops, tok) for p, a in zip(prompts, alone, strict=True)]
    assert len(expected[0]) <= 2 + 6 and len(expected[1]) <= 4 + 8  # they do stop early
    got = model.generate(prompts, 12, temperature=0, stop_strings=stops, tokenizer=tok)
    assert [g.tolist() for g in got] == expected
    one = model.generate(torch.tensor([prompts[0]]), 12, temperature=0, stop_strings=stops[0], tokenizer=tok)
    assert one[0].tolist() == _cut_at_stop(2, alone[0], stops[:1], tok)
    # a tensor batch: the stopped row is padded with eos while the other goes on
    batch = torch.tensor([prompts[0][:2], prompts[1][:2]])
    full = model.generate(batch, 10, temperature=0).tolist()
    cut = _cut_at_stop(2, full[0], stops[:1], tok)
    out = model.generate(batch, 10, temperature=0, stop_strings=stops[:1], tokenizer=tok, eos_token_id=99)
    assert out[0].tolist()[: len(cut)] == cut and set(out[0].tolist()[len(cut) :]) <= {99}
    assert out[1].tolist()[: len(_cut_at_stop(2, full[1], stops[:1], tok))] == _cut_at_stop(
        2, full[1], stops[:1], tok
    )
    with pytest.raises(ValueError, match="needs tokenizer"):
        model.generate(batch, 3, stop_strings=["x"])
    with pytest.raises(ValueError, match="needs eos_token_id"):
        model.generate(batch, 3, stop_strings=["x"], tokenizer=tok)
    with pytest.raises(ValueError, match="non-empty strings"):
        model.generate(batch[:1], 3, stop_strings=[""], tokenizer=tok)


def test_a_padded_batch_with_an_attention_mask_generates_each_row_as_alone(model):
    """transformers' convention: a padded (b, l) batch and its 0/1 mask (left or right padding); each row
    gets exactly the tokens of its prompt generated alone, appended after the row as given."""
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = [model.generate(torch.tensor([p]), 6, temperature=0)[0, len(p) :].tolist() for p in prompts]
    l = 5
    left = torch.tensor([[0] * (l - len(p)) + p for p in prompts])
    left_mask = torch.tensor([[0] * (l - len(p)) + [1] * len(p) for p in prompts])
    right = torch.tensor([p + [0] * (l - len(p)) for p in prompts])
    right_mask = torch.tensor([[1] * len(p) + [0] * (l - len(p)) for p in prompts])
    for ids, mask in ((left, left_mask), (right, right_mask)):
        out = model.generate(ids, 6, temperature=0, attention_mask=mask)
        assert out.shape == (3, l + 6)
        assert torch.equal(out[:, :l], ids) and out[:, l:].tolist() == alone
    # rows that end early are right-padded with pad_token_id (default: eos)
    eos = alone[1][2]
    out = model.generate(left, 6, temperature=0, attention_mask=left_mask, eos_token_id=eos, pad_token_id=0)
    for row, gen in zip(out[:, l:].tolist(), alone, strict=True):
        n = gen.index(eos) + 1 if eos in gen else len(gen)
        assert row[:n] == gen[:n] and set(row[n:]) <= {0}
    with pytest.raises(ValueError, match="attention_mask must be a tensor of input_ids' shape"):
        model.generate(left, 2, attention_mask=left_mask[:, :3])
    with pytest.raises(ValueError, match="only 0"):
        model.generate(left, 2, attention_mask=left_mask * 2)
    with pytest.raises(ValueError, match="at least one prompt token"):
        model.generate(left, 2, attention_mask=torch.zeros_like(left_mask))


def test_stop_strings_decode_a_bounded_tail_and_find_multibyte_stops():
    """Each step decodes only the last 4·len(stop) + 2 tokens (a long generation stays linear), and a stop
    string of multi-byte characters spread over byte tokens is still found at the token completing it,
    against the full-text search over every prefix."""
    from ssmkit.generate import StopStrings

    class Bytes:
        seen = []

        def decode(self, ids):
            self.seen.append(len(ids))
            return bytes(ids).decode("utf-8", errors="replace")

    tok = Bytes()
    text = ("x" * 300 + "naïve €uro — ok").encode()  # ï: 2 bytes, €: 3, —: 3
    stops = StopStrings(["€uro —"], tok)
    first = next(n for n in range(1, len(text) + 1) if stops.found(list(text[:n])))
    assert first == next(
        n for n in range(1, len(text) + 1) if "€uro —" in text[:n].decode("utf-8", "replace")
    )
    assert max(tok.seen) == 4 * len("€uro —") + 2
