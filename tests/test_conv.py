"""The fused causal depthwise conv1d + SiLU against independent references: a float64 per-step loop written
here, and ``F.conv1d`` on the left-padded input; forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers import conv
from ssmkit.layers.conv import causal_conv1d_silu, causal_conv1d_silu_reference


def conv_silu_loop(x, w, bias, history):
    """y_t = SiLU(bias + Σ_k w_k · xp_{t+k}) with xp = [history, x], one time step at a time."""
    b, d, l = x.shape
    K = w.shape[1]
    hist = torch.zeros(b, d, K - 1, dtype=x.dtype) if history is None else history
    xp = torch.cat([hist, x], dim=-1)  # (b, d, l + K − 1)
    ys = []
    for t in range(l):
        a = (xp[:, :, t : t + K] * w).sum(-1)  # (b, d)
        if bias is not None:
            a = a + bias
        ys.append(a * torch.sigmoid(a))
    return torch.stack(ys, dim=-1)  # (b, d, l)


def conv_silu_fconv(x, w, bias, history):
    """SiLU(F.conv1d([history, x]))."""
    b, d, _ = x.shape
    K = w.shape[1]
    hist = torch.zeros(b, d, K - 1, dtype=x.dtype) if history is None else history
    return F.silu(F.conv1d(torch.cat([hist, x], -1), w[:, None], bias, groups=d))


CASES = [
    # (b, d, l, K, bias, history)
    (1, 1, 1, 1, True, False),
    (1, 5, 1, 4, True, False),
    (2, 7, 3, 4, False, True),
    (3, 17, 13, 4, True, True),
    (2, 16, 40, 3, True, False),
    (1, 9, 2, 2, False, False),
    (2, 4, 5, 5, True, True),
]


def make(b, d, l, K, bias, history, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, l, generator=g, dtype=dtype)
    w = torch.randn(d, K, generator=g, dtype=dtype) * 0.7
    bb = torch.randn(d, generator=g, dtype=dtype) if bias else None
    h = torch.randn(b, d, K - 1, generator=g, dtype=dtype) if history else None
    return x, w, bb, h


@pytest.mark.parametrize("b,d,l,K,bias,history", CASES)
def test_forward_and_gradients_match_float64_loop(b, d, l, K, bias, history):
    x, w, bb, h = make(b, d, l, K, bias, history)
    inputs = [t.requires_grad_() for t in (x, w, bb, h) if t is not None]
    grad_y = torch.randn(b, d, l, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    y = causal_conv1d_silu(x, w, bb, h)
    grads = torch.autograd.grad(y, inputs, grad_y)
    y_ref = conv_silu_loop(x, w, bb, h)
    grads_ref = torch.autograd.grad(y_ref, inputs, grad_y)

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("b,d,l,K,bias,history", CASES[2:5])
def test_float32_matches_f_conv1d(b, d, l, K, bias, history):
    x, w, bb, h = make(b, d, l, K, bias, history, dtype=torch.float32, seed=3)
    inputs = [t.requires_grad_() for t in (x, w, bb, h) if t is not None]
    grad_y = torch.randn(b, d, l, generator=torch.Generator().manual_seed(4))
    y = causal_conv1d_silu(x, w, bb, h)
    y_ref = conv_silu_fconv(x, w, bb, h)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(torch.autograd.grad(y, inputs, grad_y), torch.autograd.grad(y_ref, inputs, grad_y)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def _cpp_apply(x, w, bb, h):
    reason = conv.unavailable_reason()
    if reason is not None:
        pytest.skip(f"C++ conv kernel unavailable: {reason}")
    return conv._CausalConv1dSiLUCPU.apply(x, w, bb, h)


def _torch_apply(x, w, bb, h):
    return conv._CausalConv1dSiLU.apply(x, w, bb, h)


@pytest.mark.parametrize("impl", [_cpp_apply, _torch_apply], ids=["cpp", "torch"])
@pytest.mark.parametrize("b,d,l,K,bias,history", CASES + [(2, 40, 300, 4, True, True)])
def test_float32_paths_match_float64_loop(impl, b, d, l, K, bias, history):
    """Both float32 implementations (the C++ kernel and the pure-PyTorch Function) against the loop."""
    x, w, bb, h = make(b, d, l, K, bias, history, seed=11)
    grad_y = torch.randn(b, d, l, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    args64 = [None if t is None else t.requires_grad_() for t in (x, w, bb, h)]
    args32 = [None if t is None else t.detach().float().requires_grad_() for t in (x, w, bb, h)]
    y_ref = conv_silu_loop(*args64)
    y = impl(*args32)
    grads_ref = torch.autograd.grad(y_ref, [t for t in args64 if t is not None], grad_y)
    grads = torch.autograd.grad(y, [t for t in args32 if t is not None], grad_y.float())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", [_cpp_apply, _torch_apply], ids=["cpp", "torch"])
def test_extreme_preactivations_stay_finite(impl):
    """SiLU at pre-activations where exp(−a) overflows float32 (a < −88.7): a training run hit a NaN at
    a = −88.74 (the fast-math exp overflowed). Identity weights make the pre-activation equal x; the
    values and gradients must equal the float64 formula, finite everywhere."""
    a = torch.tensor([-1e4, -200.0, -100.0, -88.74, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, 200.0])
    x = a.reshape(1, 1, -1).repeat(2, 3, 1).contiguous().requires_grad_()  # (b, d, l)
    w = torch.zeros(3, 4)
    w[:, -1] = 1.0  # the tap on the current step only
    w.requires_grad_()
    y = impl(x, w, None, None)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    a64 = a.double()
    torch.testing.assert_close(y[0, 0].double(), a64 * torch.sigmoid(a64), rtol=1e-5, atol=1e-30)
    s = torch.sigmoid(a64)
    torch.testing.assert_close(gx[0, 0].double(), s * (1 + a64 * (1 - s)), rtol=1e-4, atol=1e-30)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()


def test_float32_uses_the_cpp_kernel_when_available(monkeypatch):
    if conv.unavailable_reason() is not None:
        pytest.skip("C++ conv kernel unavailable")
    x = torch.randn(1, 3, 5, requires_grad=True)
    y = causal_conv1d_silu(x, torch.randn(3, 4), torch.randn(3))
    assert type(y.grad_fn).__name__.startswith("_CausalConv1dSiLUCPU")


def test_gradcheck_float64():
    x, w, bb, h = make(2, 3, 6, 4, True, True, seed=5)
    inputs = tuple(t.requires_grad_() for t in (x, w, bb, h))
    assert torch.autograd.gradcheck(causal_conv1d_silu, inputs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_noncontiguous_input_and_grad_and_conv1d_weight_shape(dtype, tol):
    """x as the mixer makes it (a channel slice of a bigger tensor), a transposed upstream gradient, and
    conv1d's own (d, 1, K) weight (float32 runs the C++ kernel when it builds)."""
    x, w, bb, _ = make(2, 6, 9, 4, True, False, dtype=torch.float64, seed=7)
    big = torch.randn(2, 12, 9, dtype=torch.float64)
    big[:, :6] = x
    xs = big.to(dtype).requires_grad_()
    grad_y = torch.randn(2, 9, 6, dtype=torch.float64).transpose(1, 2)  # (b, d, l), non-contiguous
    y = causal_conv1d_silu(xs[:, :6], w.to(dtype)[:, None], bb.to(dtype))
    (g_big,) = torch.autograd.grad(y, xs, grad_y.to(dtype))
    xv = x.clone().requires_grad_()
    y_ref = conv_silu_loop(xv, w, bb, None)
    (g_ref,) = torch.autograd.grad(y_ref, xv, grad_y)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_big[:, :6].double(), g_ref, rtol=10 * tol, atol=10 * tol)
    assert torch.count_nonzero(g_big[:, 6:]) == 0


def test_reference_twin_agrees():
    x, w, bb, h = make(2, 5, 11, 4, True, True, seed=9)
    torch.testing.assert_close(
        causal_conv1d_silu_reference(x, w, bb, h), conv_silu_loop(x, w, bb, h), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.zeros(2, 3)), "x must be"),
        (dict(x=torch.zeros(1, 3, 0)), "x must be"),
        (dict(weight=torch.zeros(4, 4)), "weight must have shape"),
        (dict(weight=torch.zeros(3, 0)), "weight must have K >= 1 taps"),
        (dict(bias=torch.zeros(4)), "bias must have shape"),
        (dict(history=torch.zeros(1, 3, 4)), "history must have shape"),
        (dict(weight=torch.zeros(3, 4, dtype=torch.float64)), "weight must have x's dtype"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(x=torch.zeros(1, 3, 5), weight=torch.zeros(3, 4), bias=torch.zeros(3), history=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_silu(**args)


def _same_nonfinite(actual, expected, what):
    """NaN / +inf / -inf at the same positions; finite values close (relative to the largest)."""
    a, e = actual.detach().double(), expected.detach().double()
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = test(a) != test(e)
        assert not bad.any(), f"{what}: {kind} differs at {bad.nonzero()[:4].tolist()}: {a[bad][:4].tolist()}"
    fin = torch.isfinite(e)
    scale = max(e[fin].abs().max().item(), 1.0) if fin.any() else 1.0
    torch.testing.assert_close(a[fin], e[fin], rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("impl", [_cpp_apply, _torch_apply], ids=["cpp", "torch"])
@pytest.mark.parametrize("seed", range(12))
def test_nonfinite_values_propagate_as_in_f_conv1d(impl, seed):
    """NaN/±inf planted in x, the weights, the bias or the history give what SiLU(F.conv1d(...)) gives —
    forward and every gradient (the C++ kernel gave SiLU(−inf) = −inf instead of NaN)."""
    g = torch.Generator().manual_seed(100 + seed)
    x, w, bb, h = make(2, 5, 9, 4, True, True, dtype=torch.float32, seed=seed)
    tensors = [x, w, bb, h]
    for _ in range(1 + seed % 3):
        t = tensors[int(torch.randint(0, 4 if seed % 2 else 1, (1,), generator=g))]
        value = (float("nan"), float("inf"), -float("inf"))[int(torch.randint(0, 3, (1,), generator=g))]
        t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = value
    grad_y = torch.randn(2, 5, 9, generator=g)
    ref_args = [t.clone().requires_grad_() for t in tensors]
    args = [t.clone().requires_grad_() for t in tensors]
    y_ref = causal_conv1d_silu_reference(*ref_args)
    y = impl(*args)
    _same_nonfinite(y, y_ref, "out")
    for name, a, r in zip(("x", "weight", "bias", "history"), args, ref_args):
        (ga,) = torch.autograd.grad(y, a, grad_y, retain_graph=True)
        (gr,) = torch.autograd.grad(y_ref, r, grad_y, retain_graph=True)
        _same_nonfinite(ga, gr, f"grad {name}")


@pytest.mark.parametrize("impl", [_cpp_apply, _torch_apply], ids=["cpp", "torch"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_silu_of_a_nonfinite_preactivation(impl, value):
    x = torch.tensor([[[1.0, value, 2.0]]], requires_grad=True)
    w = torch.tensor([[0.0, 1.0]], requires_grad=True)  # the pre-activation is x itself
    y = impl(x, w, None, None)
    expected = F.silu(torch.tensor(value))  # +inf -> inf; -inf -> NaN (-inf · 0); NaN -> NaN
    assert torch.equal(y[0, 0, 1].isnan(), expected.isnan()) and (expected.isnan() or y[0, 0, 1] == expected)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert gx[0, 0, 1].isnan()  # SiLU'(±inf) and SiLU'(NaN) are NaN in PyTorch


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5)])
def test_empty_batch_or_channels_give_empty_results(shape):
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(shape[1], 4, requires_grad=True)
    y = causal_conv1d_silu(x, w)
    assert y.shape == shape
    gx, gw = torch.autograd.grad(y.sum(), (x, w), allow_unused=True)
    assert gx.shape == shape and gw.shape == (shape[1], 4) and torch.count_nonzero(gw) == 0


def test_a_one_token_transposed_view_goes_through_the_kernel():
    """A (1, d, 1) view of a (1, 1, d) tensor has a non-unit time stride that .contiguous() keeps; the
    kernel must still read it right (the Mamba-2 mixer's one-token decode at batch 1 passes one)."""
    torch.manual_seed(5)
    x = torch.randn(1, 1, 6).transpose(1, 2)  # (1, 6, 1), stride (6, 1, 6)
    w, hist = torch.randn(6, 4), torch.randn(1, 6, 3)
    torch.testing.assert_close(
        causal_conv1d_silu(x, w, None, hist),
        causal_conv1d_silu_reference(x, w, None, hist),
        rtol=1e-6,
        atol=1e-6,
    )
