"""Attention baseline: the layer against a float64 loop written here (softmax over the causal past,
rotary as complex multiplication), KV-cache decoding and chunked prefill == one full forward."""

import math

import pytest
import torch

from ssmkit.layers.attention import MultiheadAttention, TransformerBlock, sinusoidal_positions


def naive_attention(attn: MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Loop over batch, head, query: float64 reference of causal attention with grouped KV heads and
    (partial) rotary positions as complex multiplication."""
    x = x.double().detach()
    b, l, d = x.shape
    h, hkv, e = attn.n_head, attn.n_head_kv, attn.head_dim
    W, bias = attn.in_proj.weight.double().detach(), attn.in_proj.bias.double().detach()
    qkv = x @ W.T + bias  # (b, l, (h + 2 h_kv) e)
    scale = attn.softmax_scale if attn.softmax_scale is not None else 1 / math.sqrt(e)
    out = torch.zeros(b, l, h * e, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hkv)  # the key/value head this query head reads
            q = qkv[bi, :, hi * e : (hi + 1) * e].clone()
            k = qkv[bi, :, h * e + g * e : h * e + (g + 1) * e].clone()
            v = qkv[bi, :, (h + hkv) * e + g * e : (h + hkv) * e + (g + 1) * e]
            if attn.positional == "rope":
                half = attn.rotary_dim // 2
                theta = torch.tensor(
                    [attn.rope_base ** (-2 * i / attn.rotary_dim) for i in range(half)], dtype=torch.float64
                )
                for m in range(l):
                    rot = torch.polar(torch.ones(half, dtype=torch.float64), m * theta)  # e^{i m θ}
                    for t in (q, k):
                        z = torch.complex(t[m, :half], t[m, half : 2 * half]) * rot
                        t[m, :half], t[m, half : 2 * half] = z.real, z.imag
            for m in range(l):
                scores = torch.tensor([float(q[m] @ k[n]) * scale for n in range(m + 1)], dtype=torch.float64)
                w = torch.softmax(scores.double(), 0)
                out[bi, m, hi * e : (hi + 1) * e] = (w[:, None] * v[: m + 1]).sum(0)
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


@pytest.mark.parametrize("l", [1, 7])
def test_grouped_query_partial_rotary_attention_matches_loop(l):
    torch.manual_seed(9)
    attn = MultiheadAttention(
        16, n_head=4, n_head_kv=2, head_dim=6, rotary_dim=4, softmax_scale=0.3, positional="rope"
    ).double()
    with torch.no_grad():
        attn.in_proj.bias.normal_()
    x = torch.randn(2, l, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), rtol=1e-10, atol=1e-10)
    cache = attn.new_state(2)
    y = torch.cat(
        [attn(x[:, :t_end][:, t_end - 1 :], cache) for t_end in range(1, l + 1)], 1
    )  # token by token
    torch.testing.assert_close(y, naive_attention(attn, x), rtol=1e-10, atol=1e-10)
    assert cache.k.shape[1] == 2  # the cache holds the 2 key/value heads, not 4


@pytest.mark.parametrize("positional", ["rope", "none"])
@pytest.mark.parametrize("l", [1, 7])
def test_attention_matches_loop(positional, l):
    torch.manual_seed(0)
    attn = MultiheadAttention(16, n_head=4, positional=positional).double()
    x = torch.randn(2, l, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), rtol=1e-10, atol=1e-10)
    cache = attn.new_state(2)
    torch.testing.assert_close(attn(x, cache), naive_attention(attn, x), rtol=1e-10, atol=1e-10)
    assert cache.t == l and cache.k.shape[:2] == (2, 4) and cache.capacity >= l
    assert cache.nbytes == 2 * 2 * 4 * l * 4 * 8  # K and V × batch × heads × tokens × e × float64


def test_sinusoids_closed_form():
    pe = sinusoidal_positions(torch.tensor([0, 3, 1000]), 6)
    for r, m in enumerate([0, 3, 1000]):
        for i in range(3):
            w = 1 / 10000 ** (2 * i / 6)
            assert pe[r, 2 * i].item() == pytest.approx(math.sin(m * w), abs=1e-6)
            assert pe[r, 2 * i + 1].item() == pytest.approx(math.cos(m * w), abs=1e-6)


def add_abs_positions(x, offset=0):
    return x + sinusoidal_positions(torch.arange(offset, offset + x.shape[1]), x.shape[-1]).to(x.dtype)


@pytest.mark.parametrize("d_mlp", [128, 0])
@pytest.mark.parametrize("positional", ["abs", "rope"])
@pytest.mark.parametrize("capacity", [0, 2, 64])
def test_kv_cache_decode_and_chunks_equal_full_forward(positional, d_mlp, capacity):
    torch.manual_seed(1)
    blocks = [TransformerBlock(32, n_head=4, positional=positional, d_mlp=d_mlp).double() for _ in range(2)]
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    if positional == "abs":
        x = add_abs_positions(x)

    def run(chunks):
        states = [blk.new_state(3, capacity) for blk in blocks]
        outs, s = [], 0
        for c in chunks:
            h = x[:, s : s + c]
            for blk, st in zip(blocks, states, strict=True):
                h = blk(h, st)
            outs.append(h)
            s += c
        assert all(st.t == 11 and st.capacity >= 11 for st in states)
        return torch.cat(outs, 1)

    full = x
    for blk in blocks:
        full = blk(full)
    torch.testing.assert_close(run([11]), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run([1] * 11), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run([4, 4, 3]), full, rtol=1e-10, atol=1e-10)


def test_causal_and_positions_matter():
    torch.manual_seed(2)
    for positional in ("abs", "rope"):
        blk = TransformerBlock(16, n_head=2, positional=positional, d_mlp=64)
        pos = add_abs_positions if positional == "abs" else (lambda t: t)
        x = torch.randn(1, 6, 16)
        x2 = x.clone()
        x2[:, 4:] = torch.randn(1, 2, 16)
        torch.testing.assert_close(blk(pos(x))[:, :4], blk(pos(x2))[:, :4], rtol=0, atol=0)  # no leak
        perm = x[:, [1, 0, 2, 3, 4, 5]]  # swapping two earlier tokens changes the last output
        assert not torch.allclose(blk(pos(x))[:, -1], blk(pos(perm))[:, -1], atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positional"):
        MultiheadAttention(16, 2, positional="xpos")
    with pytest.raises(ValueError, match=r"multiple of n_head \(8\)"):
        MultiheadAttention(12, 8)
    with pytest.raises(ValueError, match="even number of features"):
        MultiheadAttention(12, 4)  # head size 3
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        MultiheadAttention(16, 4, n_head_kv=3)
    with pytest.raises(ValueError, match=r"x must be \(b, l, 16\)"):
        MultiheadAttention(16, 2)(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="state holds batch size 2"):
        MultiheadAttention(16, 2)(torch.randn(1, 3, 16), MultiheadAttention(16, 2).new_state(2))
    with pytest.raises(ValueError, match="capacity"):
        MultiheadAttention(16, 2).new_state(1, -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("positional", ["abs", "rope"])
def test_cuda_matches_cpu(positional):
    torch.manual_seed(3)
    blk = TransformerBlock(32, n_head=4, positional=positional, d_mlp=128)
    x = torch.randn(2, 9, 32)
    expected = blk(x)
    blk_cuda = blk.cuda()
    st = blk_cuda.new_state(2)
    y1 = blk_cuda(x[:, :4].cuda(), st)
    y2 = blk_cuda(x[:, 4:].cuda(), st)
    torch.testing.assert_close(torch.cat([y1, y2], 1).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_sequence_model_attention_is_attention_only_like_the_papers_137k_baseline():
    """Mamba paper Table 11: MHA with 2 layers, d_model 128 has 137K parameters — embedding, 2 × (q, k, v,
    out) projections and the head, no MLP. Count ours from the formula, not from the module."""
    from ssmkit.models.sequence import SequenceModel, SequenceModelConfig

    d, V, n = 128, 16, 2
    m = SequenceModel(SequenceModelConfig(vocab_size=V, d_model=d, n_layer=n, arch="attention", layer="rope"))
    per_layer = 4 * (d * d + d) + 2 * d  # q, k, v, out (with bias) + the pre-norm LayerNorm
    head = 0 if m.config.tie_embeddings else V * d  # the head shares the embedding when tied
    expected = V * d + n * per_layer + d + head  # + the final RMSNorm
    assert sum(p.numel() for p in m.parameters()) == expected
    assert 130_000 < expected < 140_000
    assert all(blk.mlp is None for blk in m.layers)
    with pytest.raises(ValueError, match="d_mlp"):
        TransformerBlock(8, n_head=2, d_mlp=-1)


@pytest.mark.parametrize("positional", ["rope", "none"])
def test_sequence_model_hybrid_interleaves_mamba_and_attention_and_streams(positional):
    """arch "hybrid": Mamba blocks at even indices, attention-only blocks at odd ones (mamba-ssm's
    attn_layer_idx = odd layers); the output is those blocks composed by hand in float64, and a chunked
    and token-by-token pass through the cache gives the full forward."""
    from ssmkit.layers.blocks import Block
    from ssmkit.layers.mamba import Mamba
    from ssmkit.models.sequence import SequenceModel, SequenceModelConfig

    torch.manual_seed(0)
    cfg = SequenceModelConfig(vocab_size=16, d_model=16, n_layer=4, arch="hybrid", layer=positional)
    m = SequenceModel(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert [type(b) for b in m.layers] == [Block, TransformerBlock] * 2
    assert isinstance(m.layers[0].mixer, Mamba) and m.layers[1].attn.positional == positional
    ids = torch.randint(0, 16, (2, 11))
    x = m.embedding(ids)
    for blk in m.layers:
        x = blk(x)
    expected = m.lm_head(m.norm_f(x))
    full = m(ids)
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
    cache = m.new_cache(2)
    parts = [m(ids[:, :5], cache=cache)] + [m(ids[:, t : t + 1], cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="hybrid"):
        SequenceModelConfig(vocab_size=16, arch="hybrid", layer="abs")
