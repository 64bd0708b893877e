"""Backend dispatch of ``ssmkit.selective_scan``: "auto", the SSMKIT_SCAN_BACKEND override, the one
warning when the fused CPU kernel is unavailable, and the CUDA choice (decided without a GPU)."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from scan_cases import ALL_OPTIONS, ScanCase, make_inputs

import ssmkit.scan as scan
import ssmkit.scan.chunked as chunked_mod
import ssmkit.scan.reference as reference_mod
from ssmkit.kernels import loader as kernel_loader


@pytest.fixture
def fresh(monkeypatch):
    """No env override, no warning given yet in this process, and a spy on the two Python backends."""
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setattr(scan, "_warned", set())
    monkeypatch.setattr(kernel_loader, "_warned", set())
    calls = []
    for mod, name in ((chunked_mod, "selective_scan_chunked"), (reference_mod, "selective_scan_reference")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    return calls


def _args():
    return make_inputs(ScanCase(b=1, d=3, n=2, l=5)).positional()[:5]


def test_auto_without_cpu_kernel_uses_chunked_and_warns_once(fresh, monkeypatch):
    monkeypatch.setattr(scan, "_cpu_unavailable_reason", lambda: "no C++ compiler (simulated)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            scan.selective_scan(*_args())
    ours = [w for w in caught if "fused selective-scan kernel is unavailable" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler (simulated)" in str(ours[0].message)
    assert issubclass(ours[0].category, RuntimeWarning)
    assert fresh == ["selective_scan_chunked"] * 3


def test_auto_with_cpu_kernel_picks_cpu(fresh, monkeypatch):
    monkeypatch.setattr(scan, "_cpu_unavailable_reason", lambda: None)
    assert scan.resolve_backend("auto", torch.zeros(1, 1, 1)) == "cpu"


def test_cpu_reason_from_module(monkeypatch):
    """A missing ``ssmkit.scan.cpu`` is the reason; a present one answers through ``unavailable_reason``.

    (Simulated through ``sys.modules``: the real module would build the extension, which is its own test.)
    """
    reason_of = scan._cpu_unavailable_reason.__wrapped__  # bypass the per-process cache
    monkeypatch.setitem(sys.modules, "ssmkit.scan.cpu", None)  # import raises ModuleNotFoundError
    assert reason_of() == "ssmkit.scan.cpu not built"
    fake = types.ModuleType("ssmkit.scan.cpu")
    fake.unavailable_reason = lambda: "g++ not found (fake)"
    monkeypatch.setitem(sys.modules, "ssmkit.scan.cpu", fake)
    assert reason_of() == "g++ not found (fake)"
    fake.unavailable_reason = lambda: None
    assert reason_of() is None


@pytest.mark.parametrize(
    "env, expected", [("reference", "selective_scan_reference"), ("chunked", "selective_scan_chunked")]
)
def test_env_overrides_auto(fresh, monkeypatch, env, expected):
    monkeypatch.setattr(scan, "_cpu_unavailable_reason", lambda: "simulated")
    monkeypatch.setenv(scan.ENV_VAR, env)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice gives no fallback warning
        scan.selective_scan(*_args())
    assert fresh == [expected]


def test_env_does_not_override_explicit_backend(fresh, monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, "chunked")
    scan.selective_scan(*_args(), backend="reference")
    assert fresh == ["selective_scan_reference"]


def test_env_cpu_when_unavailable_fails_with_reason(fresh, monkeypatch):
    monkeypatch.setattr(scan, "_cpu_unavailable_reason", lambda: "simulated: no compiler")
    monkeypatch.setenv(scan.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is unavailable: simulated: no compiler"):
        scan.selective_scan(*_args())
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is unavailable"):
        scan.selective_scan(*_args(), backend="cpu")


def test_bad_env_value(fresh, monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"SSMKIT_SCAN_BACKEND must be one of .*got 'gpu'"):
        scan.selective_scan(*_args())


def test_empty_env_means_auto(fresh, monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, "")
    monkeypatch.setattr(scan, "_cpu_unavailable_reason", lambda: None)
    assert scan.resolve_backend("auto", torch.zeros(1, 1, 1)) == "cpu"


def test_cuda_choice(fresh, monkeypatch):
    """On CUDA: mamba-ssm when it imports and the call is compatible, else chunked (one warning)."""
    monkeypatch.setattr(scan, "_mamba_ssm_scan", lambda: lambda *a: None)
    assert scan._auto_backend("cuda", torch.float32, mamba_compatible=True) == "mamba_ssm"
    assert scan._auto_backend("cuda", torch.float32, mamba_compatible=False) == "chunked"
    monkeypatch.setattr(scan, "_mamba_ssm_scan", lambda: None)
    with pytest.warns(RuntimeWarning, match="mamba_ssm is not installed"):
        assert scan._auto_backend("cuda", torch.float32, mamba_compatible=True) == "chunked"
    assert scan._auto_backend("mps", torch.float32, mamba_compatible=True) == "chunked"


def test_mamba_ssm_compatibility_rules():
    a = make_inputs(ScanCase(b=1, d=3, n=2, l=5, **ALL_OPTIONS))
    ok = dict(u=a.u, A=a.A, D=a.D, delta_bias=a.delta_bias, initial_state=None, last_state_grad=False)
    assert scan._mamba_ssm_compatible(**ok)
    assert not scan._mamba_ssm_compatible(**{**ok, "initial_state": a.initial_state})
    assert not scan._mamba_ssm_compatible(**{**ok, "last_state_grad": True})
    assert not scan._mamba_ssm_compatible(**{**ok, "u": a.u.double()})
    assert not scan._mamba_ssm_compatible(**{**ok, "A": a.A.bfloat16()})
    assert scan._mamba_ssm_compatible(**{**ok, "u": a.u.bfloat16()})


def test_backends_agree_through_public_function(fresh):
    args = make_inputs(ScanCase(b=2, d=5, n=3, l=40, **ALL_OPTIONS), dtype=torch.float64)
    u, delta, A, B, C, D, z, bias, sp, h0 = args.positional()
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=sp, initial_state=h0, return_last_state=True)
    out_r, last_r = scan.selective_scan(u, delta, A, B, C, **kw, backend="reference")
    out_c, last_c = scan.selective_scan(u, delta, A, B, C, **kw, backend="chunked")
    torch.testing.assert_close(out_c, out_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last_c, last_r, rtol=1e-12, atol=1e-12)
    assert fresh == ["selective_scan_reference", "selective_scan_chunked"]


def test_float64_auto_uses_chunked(fresh, monkeypatch):
    """The fused kernel is float32-only by design; "auto" sends float64 to the exact chunked backend."""
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setattr(scan, "_cpu_unavailable_reason", lambda: None)
    assert scan.resolve_backend("auto", torch.zeros(1, 1, 1, dtype=torch.float64)) == "chunked"
    assert scan.resolve_backend("auto", torch.zeros(1, 1, 1, dtype=torch.float32)) == "cpu"
