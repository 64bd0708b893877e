"""Attention baseline: the layer against a float64 loop written here (softmax over the causal past,
rotary as complex multiplication), KV-cache decoding and chunked prefill == one full forward."""

import math

import pytest
import torch

from ssmkit.layers.attention import (
    MultiheadAttention,
    TransformerBlock,
    TransformerBlockConfig,
    sinusoidal_positions,
)


def naive_attention(attn: MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Loop over batch, head, query: float64 reference of causal MHA with complex-number RoPE."""
    x = x.double().detach()
    b, l, d = x.shape
    h, e = attn.n_heads, attn.head_dim
    W, bias = attn.qkv.weight.double().detach(), attn.qkv.bias.double().detach()
    qkv = x @ W.T + bias  # (b, l, 3d)
    out = torch.zeros(b, l, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            q = qkv[bi, :, hi * e : (hi + 1) * e].clone()
            k = qkv[bi, :, d + hi * e : d + (hi + 1) * e].clone()
            v = qkv[bi, :, 2 * d + hi * e : 2 * d + (hi + 1) * e]
            if attn.positional == "rope":
                half = e // 2
                theta = torch.tensor(
                    [attn.rope_base ** (-2 * i / e) for i in range(half)], dtype=torch.float64
                )
                for m in range(l):
                    rot = torch.polar(torch.ones(half, dtype=torch.float64), m * theta)  # e^{i m θ}
                    for t in (q, k):
                        z = torch.complex(t[m, :half], t[m, half:]) * rot
                        t[m, :half], t[m, half:] = z.real, z.imag
            for m in range(l):
                scores = torch.tensor(
                    [float(q[m] @ k[n]) / math.sqrt(e) for n in range(m + 1)], dtype=torch.float64
                )
                w = torch.softmax(scores.double(), 0)
                out[bi, m, hi * e : (hi + 1) * e] = (w[:, None] * v[: m + 1]).sum(0)
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


@pytest.mark.parametrize("positional", ["rope", "none"])
@pytest.mark.parametrize("l", [1, 7])
def test_attention_matches_loop(positional, l):
    torch.manual_seed(0)
    attn = MultiheadAttention(16, n_heads=4, positional=positional).double()
    x = torch.randn(2, l, 16, dtype=torch.float64)
    y, cache = attn(x)
    torch.testing.assert_close(y, naive_attention(attn, x), rtol=1e-10, atol=1e-10)
    assert cache.offset == l and cache.k.shape == (2, 4, l, 4)


def test_sinusoids_closed_form():
    pe = sinusoidal_positions(torch.tensor([0, 3, 1000]), 6)
    for r, m in enumerate([0, 3, 1000]):
        for i in range(3):
            w = 1 / 10000 ** (2 * i / 6)
            assert pe[r, 2 * i].item() == pytest.approx(math.sin(m * w), abs=1e-6)
            assert pe[r, 2 * i + 1].item() == pytest.approx(math.cos(m * w), abs=1e-6)


@pytest.mark.parametrize("mlp_ratio", [4, 0])
@pytest.mark.parametrize("positional", ["abs", "rope"])
def test_kv_cache_decode_and_chunks_equal_full_forward(positional, mlp_ratio):
    torch.manual_seed(1)
    blocks = [
        TransformerBlock(
            TransformerBlockConfig(
                d_model=32, n_heads=4, positional=positional, mlp_ratio=mlp_ratio, add_positions=i == 0
            )
        )
        for i in range(2)
    ]
    blocks = [blk.double() for blk in blocks]
    x = torch.randn(3, 11, 32, dtype=torch.float64)

    def run(chunks):
        states = [blk.new_state(3) for blk in blocks]
        outs, s = [], 0
        for c in chunks:
            h = x[:, s : s + c]
            for i, blk in enumerate(blocks):
                h, states[i] = blk(h, states[i], return_state=True)
            outs.append(h)
            s += c
        return torch.cat(outs, 1)

    full = x
    for blk in blocks:
        full = blk(full)
    torch.testing.assert_close(run([11]), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run([1] * 11), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run([4, 4, 3]), full, rtol=1e-10, atol=1e-10)
    # step() is one-token forward
    st = blocks[0].new_state(3)
    ys = []
    for t in range(11):
        y, st = blocks[0].step(x[:, t], st)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), blocks[0](x), rtol=1e-10, atol=1e-10)


def test_causal_and_positions_matter():
    torch.manual_seed(2)
    for positional in ("abs", "rope"):
        blk = TransformerBlock(
            TransformerBlockConfig(d_model=16, n_heads=2, positional=positional, add_positions=True)
        )
        x = torch.randn(1, 6, 16)
        x2 = x.clone()
        x2[:, 4:] = torch.randn(1, 2, 16)
        torch.testing.assert_close(blk(x)[:, :4], blk(x2)[:, :4], rtol=0, atol=0)  # future does not leak
        perm = x[:, [1, 0, 2, 3, 4, 5]]  # swapping two earlier tokens changes the last output
        assert not torch.allclose(blk(x)[:, -1], blk(perm)[:, -1], atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positional"):
        MultiheadAttention(16, 2, positional="xpos")
    with pytest.raises(ValueError, match="multiple of 2·n_heads"):
        MultiheadAttention(12, 8)
    with pytest.raises(ValueError, match=r"x must be \(b, l, 16\)"):
        MultiheadAttention(16, 2)(torch.randn(1, 3, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("positional", ["abs", "rope"])
def test_cuda_matches_cpu(positional):
    torch.manual_seed(3)
    blk = TransformerBlock(
        TransformerBlockConfig(d_model=32, n_heads=4, positional=positional, add_positions=True)
    )
    x = torch.randn(2, 9, 32)
    expected = blk(x)
    blk_cuda = blk.cuda()
    st = blk_cuda.new_state(2)
    y1, st = blk_cuda(x[:, :4].cuda(), st, return_state=True)
    y2, _ = blk_cuda(x[:, 4:].cuda(), st, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_sequence_model_attention_is_attention_only_like_the_papers_137k_baseline():
    """Mamba paper Table 11: MHA with 2 layers, d_model 128 has 137K parameters — embedding, 2 × (q, k, v,
    out) projections and the head, no MLP. Count ours from the formula, not from the module."""
    from ssmkit.models.sequence import SequenceModel, SequenceModelConfig

    d, V, n = 128, 16, 2
    m = SequenceModel.from_config(
        SequenceModelConfig(vocab_size=V, d_model=d, n_layer=n, arch="attention", layer="rope")
    )
    per_layer = 4 * (d * d + d) + 2 * d  # q, k, v, out (with bias) + the pre-norm LayerNorm
    head = 0 if m.config.tie_embeddings else V * d  # the head shares the embedding when tied
    expected = V * d + n * per_layer + d + head  # + the final RMSNorm
    assert sum(p.numel() for p in m.parameters()) == expected
    assert 130_000 < expected < 140_000
    assert all(blk.mlp is None for blk in m.layers)
    with pytest.raises(ValueError, match="mlp_ratio"):
        TransformerBlock(TransformerBlockConfig(d_model=8, n_heads=2, mlp_ratio=-1))
