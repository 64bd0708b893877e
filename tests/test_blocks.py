"""Blocks (arch × layer) and SequenceModel: forward == step-by-step recurrence == chunked forward with
state passing; gradients reach every parameter; the s6 pieces against a sequential loop written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers.blocks import ARCHS, LAYERS, S6, Block, CausalConv
from ssmkit.models.sequence import SequenceModel

CASES = [(a, l) for a in ARCHS for l in LAYERS]


def steps(module, x, state):
    ys = []
    for t in range(x.shape[1]):
        y_t, state = module.step(x[:, t], state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("arch,layer", CASES)
def test_block_forward_backward_step(arch, layer):
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
        y_step, _ = steps(blk, x, blk.new_state(2))
        y1, s1 = blk(x[:, :5], return_state=True)
        y2, _ = blk(x[:, 5:], s1, return_state=True)
    torch.testing.assert_close(y_step, y.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("arch,layer", [("mamba", "s4d"), ("h3", "s4"), ("none", "s6")])
def test_block_float32_step_matches_forward(arch, layer):
    torch.manual_seed(1)
    blk = Block(8, arch, layer, d_state=8)
    x = torch.randn(2, 21, 8)
    with torch.no_grad():
        y = blk(x)
        y_step, _ = steps(blk, x, blk.new_state(2))
    torch.testing.assert_close(y_step, y, rtol=1e-5, atol=1e-5)


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
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=5).transpose(1, 2)
    torch.testing.assert_close(conv(x), ref)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(conv(x2)[:, :6], conv(x)[:, :6])


@pytest.mark.parametrize("arch,layer", [("none", "s4d"), ("h3", "s6"), ("mamba", "s4"), ("mamba", "s6")])
def test_sequence_model_step_and_chunks(arch, layer):
    torch.manual_seed(4)
    model = SequenceModel(11, 8, 2, arch, layer, d_state=4, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 17))
    logits = model(ids)
    assert logits.shape == (2, 17, 11)
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    tol = 1e-6 if (arch, layer) == ("mamba", "s6") else 1e-10
    with torch.no_grad():
        state, outs = model.new_state(2), []
        for chunk in ids.split(5, dim=1):  # 5 + 5 + 5 + 2
            out, state = model(chunk, state, return_state=True)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, 1), logits.detach(), rtol=tol, atol=tol)
        state, outs = model.new_state(2), []
        for t in range(ids.shape[1]):
            out, state = model.step(ids[:, t], state)
            outs.append(out)
        torch.testing.assert_close(torch.stack(outs, 1), logits.detach(), rtol=tol, atol=tol)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        Block(4, "transformer", "s4d")
    with pytest.raises(ValueError, match="layer"):
        Block(4, "none", "lstm")
    with pytest.raises(ValueError, match="d_model"):
        Block(4, "none", "s4d")(torch.randn(1, 3, 5))
    model = SequenceModel(7, 4, 1, "none", "s4d", d_state=4)
    with pytest.raises(ValueError, match="ids"):
        model(torch.randn(1, 3))
    with pytest.raises(ValueError, match="state"):
        model(torch.zeros(1, 3, dtype=torch.long), state=[])
