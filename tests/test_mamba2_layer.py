"""The Mamba-2 mixer (``ssmkit.layers.mamba2.Mamba2``) against independent references.

1. transformers' ``Mamba2Mixer`` (its pure-PyTorch path, which runs on CPU) with the same perturbed
   weights copied in: outputs ≤ 1e-5 relative in float32 and parameter gradients, over several configs
   (ngroups > 1 and = nheads, d_conv 3, biases, dt_limit, chunk sizes that do not divide l).
2. The options transformers lacks (an MLP part d_ssm < d_inner, rmsnorm=False, norm_before_gate=True,
   D_has_hdim) against a float64 transcription of mamba-ssm's ``Mamba2.forward`` written here.
3. The state protocol: cached decoding in uneven chunks (incl. one-token steps through ``ssd_step``) ==
   one full forward; states replaced, never modified in place; gradients through the state.
4. Names, shapes, initialisation and optimiser tags as mamba-ssm's; argument errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers.mamba2 import Mamba2, Mamba2State, RMSNormGated
from ssmkit.scan.ssd import ssd

transformers = pytest.importorskip("transformers")
from transformers import Mamba2Config  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # noqa: E402


def perturb(layer: torch.nn.Module, seed: int, scale: float = 0.2) -> dict:
    """Perturb every parameter (so default inits — D = 1, norm = 1, zero biases — cannot hide a bug)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * (1 + p.abs().mean()))
            if name == "A_log":  # A = −exp(A_log) spread over the usual [1, 16]
                p.copy_(torch.log(torch.linspace(1, 16, p.numel(), dtype=p.dtype)))
    return {k: v.clone() for k, v in layer.state_dict().items()}


def hf_mixer(cfg: dict, chunk_size: int) -> Mamba2Mixer:
    config = Mamba2Config(
        hidden_size=cfg["d_model"], num_heads=cfg["d_model"] * 2 // cfg["headdim"], head_dim=cfg["headdim"],
        state_size=cfg["d_state"], n_groups=cfg["ngroups"], conv_kernel=cfg["d_conv"], expand=2,
        chunk_size=chunk_size, num_hidden_layers=1, layer_norm_epsilon=1e-5, use_bias=cfg.get("bias", False),
        use_conv_bias=cfg.get("conv_bias", True), time_step_limit=cfg.get("dt_limit", (0.0, math.inf)),
    )  # fmt: skip
    return Mamba2Mixer(config, layer_idx=0).eval()


CONFIGS = [
    dict(d_model=16, d_state=8, d_conv=4, headdim=8, ngroups=1, l=29, chunk=8, hf_chunk=8),
    dict(d_model=32, d_state=16, d_conv=3, headdim=8, ngroups=2, l=23, chunk=7, hf_chunk=5),
    dict(d_model=24, d_state=4, d_conv=4, headdim=4, ngroups=12, l=17, chunk=256, hf_chunk=6, bias=True),
    dict(
        d_model=16,
        d_state=16,
        d_conv=2,
        headdim=16,
        ngroups=2,
        l=9,
        chunk=4,
        hf_chunk=256,
        conv_bias=False,
        dt_limit=(0.02, 0.3),
    ),  # fmt: skip
]


def ours(cfg: dict, **extra) -> Mamba2:
    keys = ("d_model", "d_state", "d_conv", "headdim", "ngroups", "bias", "conv_bias", "dt_limit")
    kw = {k: cfg[k] for k in keys if k in cfg}
    return Mamba2(**kw, chunk_size=cfg["chunk"], **extra)


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"dm{c['d_model']}g{c['ngroups']}k{c['d_conv']}l{c['l']}"
)
def test_matches_transformers_mamba2_mixer(cfg):
    torch.manual_seed(0)
    layer = ours(cfg)
    sd = perturb(layer, seed=1)
    ref = hf_mixer(cfg, cfg["hf_chunk"])
    ref.load_state_dict(sd)
    u = torch.randn(2, cfg["l"], cfg["d_model"], generator=torch.Generator().manual_seed(2))
    y = layer(u)
    y_ref = ref(u)
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * scale)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        g, g_ref = p.grad, grads_ref[name].grad
        assert (g - g_ref).norm() <= 1e-4 * g_ref.norm(), name


# ---- mamba-ssm's Mamba2.forward, transcribed in float64 (for the options transformers does not have) ------


def mamba_ssm_forward(layer: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """``Mamba2.forward`` of mamba-ssm without cache, with the SSD by the sequential loop (tested alone)."""
    b, l, _ = u.shape
    zxbcdt = F.linear(u, layer.in_proj.weight, layer.in_proj.bias)
    d_mlp = (zxbcdt.shape[-1] - 2 * layer.d_ssm - 2 * layer.ngroups * layer.d_state - layer.nheads) // 2
    z0, x0, z, xBC, dt = torch.split(
        zxbcdt,
        [d_mlp, d_mlp, layer.d_ssm, layer.d_ssm + 2 * layer.ngroups * layer.d_state, layer.nheads],
        dim=-1,
    )
    xBC = F.silu(layer.conv1d(xBC.transpose(1, 2)).transpose(1, 2)[:, :l])
    x, B, C = torch.split(
        xBC, [layer.d_ssm, layer.ngroups * layer.d_state, layer.ngroups * layer.d_state], dim=-1
    )
    A = -torch.exp(layer.A_log)
    D = layer.D.view(layer.nheads, layer.headdim) if layer.D_has_hdim else layer.D
    y = ssd(
        x.reshape(b, l, layer.nheads, layer.headdim), dt, A, B.reshape(b, l, layer.ngroups, -1),
        C.reshape(b, l, layer.ngroups, -1), D=D,
        z=None if layer.rmsnorm else z.reshape(b, l, layer.nheads, layer.headdim), dt_bias=layer.dt_bias,
        dt_softplus=True, dt_limit=layer.dt_limit, backend="reference",
    ).reshape(b, l, -1)  # fmt: skip
    if layer.rmsnorm:  # rms_norm_ref of mamba-ssm's layernorm_gated
        gs = layer.d_ssm // layer.ngroups
        if not layer.norm_before_gate:
            y = y * F.silu(z)
        yg = y.reshape(b, l, -1, gs)
        y = (yg / torch.sqrt(yg.square().mean(-1, keepdim=True) + 1e-5)).reshape(b, l, -1) * layer.norm.weight
        if layer.norm_before_gate:
            y = y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return layer.out_proj(y)


@pytest.mark.parametrize(
    "extra",
    [
        dict(d_ssm=16),  # MLP part: d_inner 32, d_ssm 16
        dict(rmsnorm=False),  # z gates inside the SSD operator
        dict(norm_before_gate=True, D_has_hdim=True),
        dict(d_ssm=24, ngroups=3, D_has_hdim=True, dt_limit=(0.0, 0.05), bias=True),
    ],
    ids=str,
)
def test_matches_mamba_ssm_forward_float64(extra):
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, d_conv=4, headdim=4, chunk_size=5, **extra).double()
    perturb(layer, seed=4)
    u = torch.randn(2, 13, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(layer(u), mamba_ssm_forward(layer, u), rtol=1e-11, atol=1e-11)


# ---- the state protocol ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize(
    "extra", [dict(), dict(ngroups=2, d_conv=3, rmsnorm=False, D_has_hdim=True)], ids=str
)
@pytest.mark.parametrize("b", [1, 2])  # b = 1: a one-token step's conv input is a (1, ·, 1) strided view
def test_cached_decode_in_uneven_chunks_equals_full_forward(dtype, tol, extra, b):
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=4, chunk_size=4, **extra).to(dtype)
    perturb(layer, seed=6)
    l = 26
    u = torch.randn(b, l, 16, dtype=dtype, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = layer(u)
        state = layer.new_state(b)
        assert state.ssm_state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        outs, pos = [], 0
        for size in [5, 1, 1, 3, 1, 9, 1, 2, 1, 2]:  # one-token steps (ssd_step) and chunks (ssd)
            old = state.conv_state, state.ssm_state
            old_copies = old[0].clone(), old[1].clone()
            outs.append(layer(u[:, pos : pos + size], state))
            pos += size
            assert torch.equal(old[0], old_copies[0]) and torch.equal(old[1], old_copies[1])  # replaced
        assert pos == l
    scale = full.abs().max().item()
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=tol, atol=tol * scale)
    # the conv state is the last d_conv pre-conv inputs [x, B, C], oldest first
    xBC = layer.in_proj(u)[..., layer.d_inner : layer.d_inner + layer.conv_dim]
    torch.testing.assert_close(state.conv_state, xBC[:, -layer.d_conv :].transpose(1, 2).detach())


def test_prefill_state_equals_operator_final_state():
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=4, chunk_size=4).double()
    perturb(layer, seed=8)
    u = torch.randn(1, 11, 16, dtype=torch.float64)
    state = layer.new_state(1)
    with torch.no_grad():
        layer(u, state)
        # the same state by running token by token from zeros
        s2 = layer.new_state(1)
        for t in range(11):
            layer(u[:, t : t + 1], s2)
    torch.testing.assert_close(state.ssm_state, s2.ssm_state, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(state.conv_state, s2.conv_state, rtol=1e-13, atol=1e-13)


def test_gradient_flows_through_the_state():
    """Two chunks with the state passed between them == one forward, gradients included (float64)."""
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=4, ngroups=2, chunk_size=3).double()
    perturb(layer, seed=9)
    u = torch.randn(2, 14, 16, dtype=torch.float64)
    w = torch.randn(2, 14, 16, dtype=torch.float64)
    (layer(u) * w).sum().backward()
    g_full = {k: p.grad.clone() for k, p in layer.named_parameters()}
    layer.zero_grad()
    state = layer.new_state(2)
    y = torch.cat([layer(u[:, :6], state), layer(u[:, 6:7], state), layer(u[:, 7:], state)], dim=1)
    (y * w).sum().backward()
    for k, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, g_full[k], rtol=1e-10, atol=1e-10, msg=k)


# ---- parameters, initialisation, errors ------------------------------------------------------------------


def test_names_shapes_and_init():
    torch.manual_seed(0)
    m = Mamba2(64, d_state=16, headdim=16, ngroups=2, d_ssm=96, D_has_hdim=True, dt_min=0.01, dt_max=0.05)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    nheads, conv_dim = 96 // 16, 96 + 2 * 2 * 16
    assert shapes == {
        "in_proj.weight": (2 * 128 + 2 * 2 * 16 + nheads, 64),
        "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (96,),
        "norm.weight": (96,),
        "out_proj.weight": (64, 128),
    }
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all() and A.dtype == torch.float32
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 0.01 * (1 - 1e-5)) & (dt <= 0.05 * (1 + 1e-5))).all()
    assert torch.equal(m.D, torch.ones(96)) and torch.equal(m.norm.weight, torch.ones(96))
    for p in (m.A_log, m.D, m.dt_bias):
        assert p._no_weight_decay is True and p._ssm_optim == {"weight_decay": 0.0}
    assert m.norm.group_size == 48 and m.norm.norm_before_gate is False and m.norm.eps == 1e-5
    assert Mamba2(8, d_state=4, headdim=4, conv_init=0.01).conv1d.weight.abs().max() <= 0.01


def test_rms_norm_gated_matches_formula():
    norm = RMSNormGated(6, group_size=3, norm_before_gate=False).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x, z = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    v = (x * z * torch.sigmoid(z)).view(4, 2, 3)
    expected = (v / (v.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).view(4, 6) * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x, z), expected.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=16, headdim=5), r"d_ssm = 32 must be a multiple of headdim = 5"),
        (dict(d_model=16, headdim=8, ngroups=3), r"ngroups = 3 must divide nheads .* = 4"),
        (dict(d_model=16, d_ssm=48), r"d_ssm must be <= d_inner .* = 32, got 48"),
        (dict(d_model=16, headdim=8, A_init_range=(0, 4)), r"A_init_range"),
        (dict(d_model=0), r"d_model must be a positive int, got 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(**kwargs)


def test_forward_errors():
    m = Mamba2(16, d_state=4, headdim=8)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(b, l >= 1, d_model=16\)"):
        m(torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match=r"state.ssm_state must have shape \(2, 4, 8, 4\)"):
        s = m.new_state(2)
        m(torch.randn(2, 3, 16), Mamba2State(s.conv_state, torch.zeros(2, 4, 8, 5)))
    with pytest.raises(ValueError, match=r"state must be a Mamba2State"):
        m(torch.randn(2, 3, 16), (s.conv_state, s.ssm_state))


def test_bfloat16_layer_keeps_a_float32_state():
    torch.manual_seed(0)
    layer = Mamba2(32, d_state=16, headdim=8, ngroups=2, chunk_size=8)
    perturb(layer, seed=10)
    u = torch.randn(2, 21, 32)
    with torch.no_grad():
        y32 = layer(u)
        layer = layer.bfloat16()
        state = layer.new_state(2)
        y16 = torch.cat([layer(u[:, :9].bfloat16(), state), layer(u[:, 9:10].bfloat16(), state),
                         layer(u[:, 10:].bfloat16(), state)], dim=1)  # fmt: skip
    assert y16.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32
    assert (y16.float() - y32).norm() <= 2e-2 * y32.norm()


def test_bf16_autocast_training_step():
    """bf16 autocast (``ssmkit train --bf16``): float32 weights, a close output, finite gradients."""
    torch.manual_seed(0)
    layer = Mamba2(32, d_state=16, headdim=8, ngroups=2, chunk_size=8)
    perturb(layer, seed=11)
    u = torch.randn(2, 21, 32)
    with torch.no_grad():
        y32 = layer(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(u)
    y.float().square().mean().backward()
    assert (y.float() - y32).norm() <= 3e-2 * y32.norm()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
