"""TransformerLM: the KV-cache decode path equals the full forward, causality, parameter and cache sizes
against formulas written here, generation through ``ssmkit.generate`` and save/load round trips."""

import pytest
import torch

from ssmkit.generate import generate
from ssmkit.models.transformer_lm import TransformerConfig, TransformerLM

torch.set_default_dtype(torch.float32)


def tiny(pos="rope", **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, vocab_size=50, n_head=4, d_mlp=48, pos=pos)
    cfg.update(kw)
    return TransformerLM(TransformerConfig(**cfg)).eval()


@pytest.mark.parametrize("pos", ["rope", "abs"])
@pytest.mark.parametrize("chunks", [[1] * 11, [4, 7], [11], [3, 1, 1, 6]])
def test_cached_forward_equals_full_forward(pos, chunks):
    model = tiny(pos).double()
    ids = torch.randint(0, 50, (3, sum(chunks)), generator=torch.Generator().manual_seed(1))  # (b, l)
    with torch.no_grad():
        full = model(ids)  # (b, l, V)
        cache = model.new_cache(3)
        parts, s = [], 0
        for c in chunks:
            parts.append(model(ids[:, s : s + c], cache=cache))
            s += c
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.seqlen_offset == sum(chunks)


@pytest.mark.parametrize("pos", ["rope", "abs"])
def test_causal(pos):
    model = tiny(pos).double()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 1) % 50  # change the future only
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-12, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_parameter_count_formula():
    d, L, V, f = 32, 2, 50, 48
    model = tiny(d_model=d, n_layer=L, vocab_size=V, d_mlp=f)
    v_pad = 56  # 50 rounded up to a multiple of 8
    attn = 3 * d * d + 3 * d + d * d + d  # qkv and output projections with biases
    mlp = d * f + f + f * d + d  # up and down projections with biases
    norms = 2 * (2 * d)  # two LayerNorms (weight + bias) per block
    expected = v_pad * d + L * (attn + mlp + norms) + 2 * d  # tied head; final LayerNorm
    assert sum(p.numel() for p in model.parameters()) == expected
    untied = tiny(d_model=d, n_layer=L, vocab_size=V, d_mlp=f, tie_embeddings=False)
    assert sum(p.numel() for p in untied.parameters()) == expected + v_pad * d


def test_cache_nbytes_is_the_filled_kv():
    model = tiny()
    cache = model.new_cache(2)
    assert cache.nbytes == 0
    with torch.no_grad():
        model(torch.zeros(2, 9, dtype=torch.long), cache=cache)
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert cache.nbytes == 2 * 2 * 2 * 10 * 32 * 4  # K and V × layers × batch × tokens × D × float32


def test_cache_grows_past_its_capacity():
    model = tiny().double()
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, capacity=3)
        steps = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(20)], 1)
    assert all(layer.capacity >= 20 for layer in cache.layers)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)


def test_bad_config():
    with pytest.raises(ValueError, match="n_head"):
        TransformerConfig(d_model=30, n_layer=1, vocab_size=10, n_head=4)
    with pytest.raises(ValueError, match="pos"):
        TransformerConfig(d_model=32, n_layer=1, vocab_size=10, n_head=4, pos="alibi")
    with pytest.raises(ValueError, match="vocab_size"):  # checked once, by generate, not per forward
        tiny().generate(torch.tensor([[50]]), max_new_tokens=1)


def test_generate_greedy_equals_argmax_of_full_forward():
    model = tiny()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    out = generate(model, prompt, 6, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):  # independent greedy loop without a cache
            nxt = model(seq)[:, -1, :50].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    torch.testing.assert_close(out, seq, rtol=0, atol=0)


def test_save_and_load_round_trip(tmp_path):
    model = tiny("abs")
    model.save_pretrained(tmp_path / "m")
    again = TransformerLM.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_load_errors_name_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state.pop("embedding.weight")
    save_file(state, weights)
    with pytest.raises(
        ValueError, match=r"model.safetensors does not match its config.json: missing \['embedding"
    ):
        TransformerLM.from_pretrained(tmp_path / "m")
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        TransformerLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "ssmkit-transformer", "d_model": "32"}')
    with pytest.raises(ValueError, match="d_model must be of type int"):
        TransformerLM.from_pretrained(tmp_path / "m")
