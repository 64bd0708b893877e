"""The Mamba mixer and RMSNorm against independent float64 loops written here, plus init and caching."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit import Mamba, RMSNorm
from ssmkit.layers.mamba import MambaState


def mixer_loop_f64(m: Mamba, u: torch.Tensor) -> torch.Tensor:
    """Mamba mixer as a plain per-time-step loop in float64 (paper §3, Alg. 2; mamba-ssm's ``step``)."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    u = u.double()
    b, l, _ = u.shape
    E, N, R, W = m.d_inner, m.d_state, m.dt_rank, m.d_conv
    xz = u @ p["in_proj.weight"].T + (p["in_proj.bias"] if "in_proj.bias" in p else 0.0)  # (b, l, 2E)
    x, z = xz[..., :E], xz[..., E:]
    A = -torch.exp(p["A_log"])  # (E, N)
    h = torch.zeros(b, E, N, dtype=torch.float64)
    window = torch.zeros(b, E, W, dtype=torch.float64)
    outs = []
    for t in range(l):
        window = torch.cat([window[:, :, 1:], x[:, t, :, None]], dim=-1)  # last W inputs
        xc = (window * p["conv1d.weight"][:, 0, :]).sum(-1)  # (b, E)
        if "conv1d.bias" in p:
            xc = xc + p["conv1d.bias"]
        xc = xc * torch.sigmoid(xc)  # SiLU
        dbl = xc @ p["x_proj.weight"].T  # (b, R + 2N)
        delta, Bt, Ct = dbl[:, :R], dbl[:, R : R + N], dbl[:, R + N :]
        dt = F.softplus(delta @ p["dt_proj.weight"].T + p["dt_proj.bias"])  # (b, E)
        h = torch.exp(dt[..., None] * A) * h + (dt * xc)[..., None] * Bt[:, None, :]  # (b, E, N)
        y = (h * Ct[:, None, :]).sum(-1) + p["D"] * xc  # (b, E)
        y = y * (z[:, t] * torch.sigmoid(z[:, t]))
        outs.append(y @ p["out_proj.weight"].T + (p["out_proj.bias"] if "out_proj.bias" in p else 0.0))
    return torch.stack(outs, dim=1)  # (b, l, D)


CONFIGS = [
    dict(d_model=16),
    dict(d_model=13, d_state=5, d_conv=3, expand=3, dt_rank=4, bias=True),
    dict(d_model=8, d_conv=2, conv_bias=False),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("length", [1, 7, 13])
def test_mixer_matches_float64_loop(kwargs, length, monkeypatch):
    monkeypatch.setenv("SSMKIT_SCAN_BACKEND", "reference")  # float64 mixer math on the exact scan
    torch.manual_seed(0)
    m = Mamba(**kwargs).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u = torch.randn(2, length, m.d_model, dtype=torch.float64)
    torch.testing.assert_close(m(u), mixer_loop_f64(m, u), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 13, 1], [20], [3, 17]])
def test_mixer_cache_equals_full_forward(chunks):
    torch.manual_seed(1)
    m = Mamba(d_model=16, d_state=8)
    u = torch.randn(3, sum(chunks), 16)
    full = m(u)
    state = m.new_state(3)
    outs, start = [], 0
    for c in chunks:
        outs.append(m(u[:, start : start + c], state=state))
        start += c
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)
    # the conv state holds the last d_conv pre-conv inputs (mamba-ssm / transformers layout)
    x_in = (u @ m.in_proj.weight.T)[..., : m.d_inner].transpose(1, 2)  # (b, E, l)
    torch.testing.assert_close(state.conv_state, x_in[:, :, -m.d_conv :], rtol=1e-6, atol=1e-6)
    assert state.ssm_state.dtype == torch.float32 and state.ssm_state.shape == (3, m.d_inner, 8)


def test_short_prefill_pads_conv_state_with_zeros():
    m = Mamba(d_model=8, d_conv=4)
    state = m.new_state(1)
    u = torch.randn(1, 2, 8)
    m(u, state=state)
    x_in = (u @ m.in_proj.weight.T)[..., : m.d_inner].transpose(1, 2)
    torch.testing.assert_close(state.conv_state[:, :, :2], torch.zeros(1, m.d_inner, 2))
    torch.testing.assert_close(state.conv_state[:, :, 2:], x_in, rtol=1e-6, atol=1e-6)


def test_state_passing_carries_gradient(monkeypatch):
    """Gradients through the returned state equal those of the unchunked forward (truncated BPTT)."""
    monkeypatch.setenv("SSMKIT_SCAN_BACKEND", "reference")  # float64 mixer math on the exact scan
    torch.manual_seed(2)
    m = Mamba(d_model=8, d_state=4).double()
    u = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    m(u).square().sum().backward()
    g_full = u.grad.clone()
    u.grad = None
    state = m.new_state(2, dtype=torch.float64)
    state.ssm_state = state.ssm_state.double()
    y = torch.cat([m(u[:, :4], state=state), m(u[:, 4:], state=state)], dim=1)
    y.square().sum().backward()
    torch.testing.assert_close(u.grad, g_full, rtol=1e-10, atol=1e-10)


def test_parameter_names_and_shapes():
    m = Mamba(d_model=24, d_state=6, d_conv=3, expand=2, dt_rank=5, bias=True)
    E = 48
    expected = {
        "in_proj.weight": (2 * E, 24),
        "in_proj.bias": (2 * E,),
        "conv1d.weight": (E, 1, 3),
        "conv1d.bias": (E,),
        "x_proj.weight": (5 + 12, E),
        "dt_proj.weight": (E, 5),
        "dt_proj.bias": (E,),
        "A_log": (E, 6),
        "D": (E,),
        "out_proj.weight": (24, E),
        "out_proj.bias": (24,),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert Mamba(d_model=33).dt_rank == math.ceil(33 / 16)
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32


@pytest.mark.parametrize("dt_min,dt_max,floor", [(1e-3, 0.1, 1e-4), (1e-2, 0.5, 1e-4), (1e-5, 1e-3, 1e-4)])
def test_init_statistics(dt_min, dt_max, floor):
    torch.manual_seed(3)
    m = Mamba(
        d_model=256, d_state=12, dt_rank=8, dt_min=dt_min, dt_max=dt_max, dt_init_floor=floor, dt_scale=2.0
    )
    dt = F.softplus(m.dt_proj.bias.detach().double())  # (E,)
    lo = max(dt_min, floor)
    assert dt.min() >= lo * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    # log-uniform: the mean of log Δ is the midpoint (std of the mean ≈ range/√12/√512 ≈ 1.3% of range)
    if floor <= dt_min:
        mid = 0.5 * (math.log(dt_min) + math.log(dt_max))
        assert abs(dt.log().mean().item() - mid) < 0.06 * (math.log(dt_max) - math.log(dt_min))
    expected_A_log = torch.log(torch.arange(1, 13, dtype=torch.float32)).expand(512, 12)
    torch.testing.assert_close(m.A_log.detach(), expected_A_log, rtol=0, atol=0)
    torch.testing.assert_close(m.D.detach(), torch.ones(512), rtol=0, atol=0)
    bound = 8**-0.5 * 2.0
    w = m.dt_proj.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert getattr(m.dt_proj.bias, "_no_reinit", False)


def test_constant_dt_init():
    m = Mamba(d_model=32, dt_rank=4, dt_init="constant", dt_scale=0.5)
    torch.testing.assert_close(m.dt_proj.weight.detach(), torch.full((64, 4), 4**-0.5 * 0.5))


def test_mixer_bad_input():
    m = Mamba(d_model=8)
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="conv_state"):
        m(torch.randn(2, 5, 8), state=m.new_state(3))
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(d_model=8, dt_init="bogus")
    with pytest.raises(ValueError, match="dt_rank"):
        Mamba(d_model=8, dt_rank=0)
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(d_model=8, dt_min=0.2, dt_max=0.1)
    assert isinstance(m.new_state(1), MambaState)


def test_rms_norm_matches_formula():
    torch.manual_seed(4)
    norm = RMSNorm(10, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(10))
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-3) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    # statistics in float32 for half inputs
    xb = x.to(torch.bfloat16)
    assert RMSNorm(10)(xb).dtype == torch.float32  # float32 weight promotes, like transformers' MambaRMSNorm
    with pytest.raises(ValueError, match="last dimension"):
        norm(torch.randn(2, 9, dtype=torch.float64))


def test_mixer_input_dtype_and_state_type_are_one_line_errors():
    m = Mamba(d_model=8)
    with pytest.raises(ValueError, match=r"dtype torch.float64 but the layer's weights are torch.float32"):
        m(torch.randn(1, 3, 8, dtype=torch.float64))
    st = m.new_state(1)
    with pytest.raises(ValueError, match="state must be a MambaState"):
        m(torch.randn(1, 3, 8), state=(st.conv_state, st.ssm_state))
