"""Blocks (arch × layer) and SequenceModel: one full forward == one-token decoding == chunked forward
with state passing (values and gradients); gradients reach every parameter; the s6 pieces against a
sequential loop written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers.blocks import ARCHS, LAYERS, S6, Block, CausalConv
from ssmkit.layers.mamba import Mamba
from ssmkit.models.cache import Cache
from ssmkit.models.sequence import SequenceModel, SequenceModelConfig

CASES = [(a, l) for a in ARCHS if a != "mamba2" for l in LAYERS if l != "ssd"] + [("mamba2", "ssd")]


def chunked(module, x, state, sizes):
    """Run ``module`` over x (b, l, ·) in chunks of the given sizes with one state (the state protocol)."""
    outs, start = [], 0
    for n in sizes:
        outs.append(module(x[:, start : start + n], state))
        start += n
    assert start == x.shape[1]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("arch,layer", CASES)
def test_block_forward_backward_and_chunks(arch, layer):
    torch.manual_seed(0)
    blk = Block(8, arch, layer, d_state=4, dtype=torch.float64)
    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the Mamba mixer keeps its scan state in float32 (mamba-ssm's layout), hence the looser tolerance
    tol = 1e-6 if (arch, layer) == ("mamba", "s6") else 1e-10
    with torch.no_grad():
        y_tokens = chunked(blk, x, blk.new_state(2), [1] * 13)  # one-token decoding
        y_chunks = chunked(blk, x, blk.new_state(2), [5, 1, 7])  # prefill, a token, a chunk
    torch.testing.assert_close(y_tokens, y.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(y_chunks, y.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "arch,layer", [("mamba", "s4d"), ("h3", "s4"), ("none", "s6"), ("mamba", "s6"), ("mamba2", "ssd")]
)
def test_gradients_flow_through_the_state(arch, layer):
    """Chunks with state passing give the same input and parameter gradients as one full forward:
    every state field is replaced, never modified in place."""
    torch.manual_seed(5)
    blk = Block(8, arch, layer, d_state=4, dtype=torch.float64)
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 11, 8, dtype=torch.float64)
    grads = []
    for run in (lambda: blk(x), lambda: chunked(blk, x, blk.new_state(2), [4, 1, 6])):
        blk.zero_grad()
        x.grad = None
        (run() * w).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in blk.parameters()])
    tol = 1e-6 if (arch, layer) == ("mamba", "s6") else 1e-9
    for g_full, g_chunk in zip(*grads, strict=True):
        torch.testing.assert_close(g_chunk, g_full, rtol=tol, atol=tol)


@pytest.mark.parametrize("arch,layer", [("mamba", "s4d"), ("h3", "s4"), ("none", "s6")])
def test_block_float32_tokens_match_forward(arch, layer):
    torch.manual_seed(1)
    blk = Block(8, arch, layer, d_state=8)
    x = torch.randn(2, 21, 8)
    with torch.no_grad():
        y = blk(x)
        y_tokens = chunked(blk, x, blk.new_state(2), [1] * 21)
    torch.testing.assert_close(y_tokens, y, rtol=1e-5, atol=1e-5)


def test_s6_matches_a_sequential_loop():
    """S6 (selective scan on d channels) vs the recurrence written out here in float64."""
    torch.manual_seed(2)
    s6 = S6(6, 4, dtype=torch.float64)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    with torch.no_grad():
        y = s6(x)
        delta, B, C = torch.split(s6.x_proj(x), [s6.dt_rank, 4, 4], dim=-1)
        dt = F.softplus(delta @ s6.dt_proj.weight.t() + s6.dt_proj.bias)  # (b, l, d)
        A = -torch.exp(s6.A_log)
        h = torch.zeros(2, 6, 4, dtype=torch.float64)
        ref = []
        for t in range(9):
            h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
            ref.append((h * C[:, t, None, :]).sum(-1) + s6.D * x[:, t])
    torch.testing.assert_close(y, torch.stack(ref, 1), rtol=1e-12, atol=1e-12)


def test_causal_conv_is_causal_and_matches_conv1d():
    torch.manual_seed(3)
    conv = CausalConv(5, 4, dtype=torch.float64)
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, None, groups=5).transpose(1, 2)
    y, none = conv(x)
    assert none is None
    torch.testing.assert_close(y, ref)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(conv(x2)[0][:, :6], y[:, :6])
    y1, st = conv(x[:, :6], conv.new_state(2))
    y2, st = conv(x[:, 6:], st)
    torch.testing.assert_close(torch.cat([y1, y2], 1), ref)
    torch.testing.assert_close(st, x[:, -4:].transpose(1, 2))  # the last w inputs, oldest first


def test_s6_is_built_from_the_mamba_mixers_parts():
    """The ablation's S6 and the Mamba mixer share parameter names, shapes and initialisation."""
    torch.manual_seed(7)
    s6 = S6(16, 4)
    torch.manual_seed(7)
    ref = Mamba(8, 4, expand=2, dt_rank=1)  # d_inner 16; its first draws are in_proj and conv1d
    assert {n: p.shape for n, p in s6.named_parameters()} == {
        n: p.shape
        for n, p in ref.named_parameters()
        if n.split(".")[0] in ("x_proj", "dt_proj", "A_log", "D")
    }
    torch.testing.assert_close(s6.A_log, ref.A_log)
    assert all(
        getattr(p, "_ssm_optim", None) == {"weight_decay": 0.0} for p in (s6.A_log, s6.D, s6.dt_proj.bias)
    )


@pytest.mark.parametrize(
    "arch,layer", [("none", "s4d"), ("h3", "s6"), ("mamba", "s4"), ("mamba", "s6"), ("mamba2", "ssd")]
)
def test_sequence_model_tokens_and_chunks(arch, layer):
    torch.manual_seed(4)
    model = SequenceModel(SequenceModelConfig(11, 8, 2, arch, layer, d_state=4), dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 17))
    logits = model(ids)
    assert logits.shape == (2, 17, 11)
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    tol = 1e-6 if (arch, layer) == ("mamba", "s6") else 1e-10
    with torch.no_grad():
        for sizes in ([5, 5, 5, 2], [1] * 17):
            cache, outs, start = model.new_cache(2), [], 0
            for n in sizes:
                outs.append(model(ids[:, start : start + n], cache=cache))
                start += n
            assert cache.seqlen_offset == 17
            torch.testing.assert_close(torch.cat(outs, 1), logits.detach(), rtol=tol, atol=tol)
        last = model(ids, num_last_tokens=3)
        torch.testing.assert_close(last, logits.detach()[:, -3:], rtol=tol, atol=tol)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        Block(4, "transformer", "s4d")
    with pytest.raises(ValueError, match="layer"):
        Block(4, "none", "lstm")
    with pytest.raises(ValueError, match="'ssd' goes with arch 'mamba2'"):
        Block(4, "mamba", "ssd")
    with pytest.raises(ValueError, match="'ssd' goes with arch 'mamba2'"):
        SequenceModelConfig(7, arch="mamba2", layer="s6")
    with pytest.raises(ValueError, match="d_model"):
        Block(4, "none", "s4d")(torch.randn(1, 3, 5))
    model = SequenceModel(SequenceModelConfig(7, 4, 1, "none", "s4d", d_state=4))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(1, 3))
    with pytest.raises(ValueError, match="cache holds 0 layer states"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=Cache([], 1))
    with pytest.raises(ValueError, match="SequenceModelConfig"):
        SequenceModel(7)


def test_mamba2_parameters_carry_no_weight_decay_in_the_optimiser_groups():
    from ssmkit.train.optim import param_groups

    model = SequenceModel(SequenceModelConfig(11, 8, 1, "mamba2", "ssd", d_state=4, headdim=4))
    groups = param_groups(model, weight_decay=0.1, lr=1e-3)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    mixer = model.layers[0].mixer
    assert {id(mixer.A_log), id(mixer.D), id(mixer.dt_bias)} <= no_decay
    assert id(mixer.in_proj.weight) not in no_decay


def _s6_loop(s6: S6, x: torch.Tensor) -> torch.Tensor:
    """The selective SSM of the Mamba paper (Algorithm 2) as a float64 loop over time: x (b, l, d)."""
    n = s6.A_log.shape[-1]
    delta, B, C = torch.split(x @ s6.x_proj.weight.t(), [s6.dt_rank, n, n], dim=-1)
    dt = F.softplus(delta @ s6.dt_proj.weight.t() + s6.dt_proj.bias)  # (b, l, d)
    A = -torch.exp(s6.A_log)  # (d, n)
    h = torch.zeros(x.shape[0], x.shape[2], n, dtype=torch.float64)
    out = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        out.append((h * C[:, t, None, :]).sum(-1) + s6.D * x[:, t])
    return torch.stack(out, 1)  # (b, l, d)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("arch", ["none", "h3"])
def test_no_gate_and_h3_blocks_with_s6_are_the_papers_definitions(arch):
    """Table 1's No-gate and H3 blocks with the S6 layer, re-stated in float64 from their definitions —
    no gate: x + W_o GELU(S6(RMSNorm x)); H3 (head size 1): x + W_o (q ⊙ S6(shift(k) ⊙ v)) with q, k, v
    linear maps of RMSNorm x and shift a causal FIR filter of width d_conv — on perturbed weights, so a
    swapped projection, a missing bias or an acausal shift would show."""
    torch.manual_seed(5)
    blk = Block(8, arch, "s6", d_state=4, d_conv=3, dtype=torch.float64)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(2, 10, 8, dtype=torch.float64)
        u = _rms(x, blk.norm.weight, blk.norm.eps)
        mix = blk.mixer
        if arch == "none":
            y = F.gelu(_s6_loop(mix.ssm, u)) @ mix.out_proj.weight.t() + mix.out_proj.bias
        else:
            q, k, v = (u @ lin.weight.t() + lin.bias for lin in (mix.q_proj, mix.k_proj, mix.v_proj))
            w = mix.shift.weight[:, 0, :]  # (d, width): y_t = Σ_j w_j k_{t-width+1+j}
            width = w.shape[-1]
            shifted = torch.zeros_like(k)
            for t in range(k.shape[1]):
                for j in range(width):
                    s = t - width + 1 + j
                    if s >= 0:
                        shifted[:, t] += w[:, j] * k[:, s]
            y = (q * _s6_loop(mix.ssm, shifted * v)) @ mix.out_proj.weight.t() + mix.out_proj.bias
        torch.testing.assert_close(blk(x), x + y, rtol=1e-10, atol=1e-10)
