"""Bad input: ValueError naming the argument and the shapes, dtypes or values; non-finite input raises."""

import re

import pytest
import torch

from ssmkit.lti import continuous_response, convolve, discretize, kernel, recurrent, scan, scan_sequential

f64 = torch.float64


def raises(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


def test_discretize_shape_mismatch_names_both_shapes():
    A, B = -torch.eye(4, dtype=f64), torch.ones(3, 1, dtype=f64)
    with pytest.raises(ValueError) as e:
        discretize(A, B, 0.1)
    msg = str(e.value)
    assert "A" in msg and "B" in msg and "(4, 4)" in msg and "(3, 1)" in msg
    with pytest.raises(ValueError) as e:
        discretize(-torch.ones(3, 4, dtype=f64), torch.ones(3, 5, dtype=f64), 0.1)  # diagonal, n = 4 vs 5
    assert "(3, 4)" in str(e.value) and "(3, 5)" in str(e.value)


def test_discretize_batch_mismatch_names_leading_dims():
    A, B = -torch.ones(2, 3, 3, dtype=f64), torch.ones(2, 3, 1, dtype=f64)
    with raises("dt leading dims (5,)"):
        discretize(A, B, torch.full((5,), 0.1, dtype=f64))
    with raises("B leading dims (4,)"):
        discretize(A, torch.ones(4, 3, 1, dtype=f64), 0.1)


def test_discretize_ambiguous_shapes_ask_for_diagonal():
    A, B = -torch.ones(4, 4, dtype=f64), torch.ones(4, 4, dtype=f64)
    with raises("pass diagonal=True or diagonal=False"):
        discretize(A, B, 0.1)
    Ab, _ = discretize(A, B, 0.1, diagonal=True)
    assert Ab.shape == (4, 4)
    torch.testing.assert_close(Ab, torch.exp(-0.1 * torch.ones(4, 4, dtype=f64)))


def test_discretize_dtype_errors():
    with raises("A must have dtype in (float32, float64, complex64, complex128), got torch.int64"):
        discretize(-torch.ones(2, 2, dtype=torch.long), torch.ones(2, 1, dtype=f64), 0.1)
    with raises("got torch.bfloat16"):
        discretize(-torch.eye(2, dtype=f64), torch.ones(2, 1, dtype=torch.bfloat16), 0.1)
    with raises("A: torch.float32, B: torch.float64"):
        discretize(-torch.eye(2), torch.ones(2, 1, dtype=f64), 0.1)
    with raises("dt must have dtype in (float32, float64)"):
        discretize(-torch.eye(2, dtype=f64), torch.ones(2, 1, dtype=f64), torch.tensor(0.1j))


def test_discretize_method_and_value_errors():
    A, B = -torch.eye(2, dtype=f64), torch.ones(2, 1, dtype=f64)
    with raises("method must be one of"):
        discretize(A, B, 0.1, "rk4")
    with raises("alpha must be a float in [0, 1] for method 'gbt', got None"):
        discretize(A, B, 0.1, "gbt")
    with raises("alpha must be a float in [0, 1] for method 'gbt', got 1.5"):
        discretize(A, B, 0.1, "gbt", 1.5)
    with raises("alpha is only used by method 'gbt'"):
        discretize(A, B, 0.1, "zoh", 0.5)
    with raises("dt must be > 0 everywhere, got min -0.1"):
        discretize(A, B, -0.1)
    with raises("dt must be > 0"):
        discretize(A, B, torch.tensor([0.1, 0.0], dtype=f64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_raise(bad):
    A, B = -torch.eye(2, dtype=f64), torch.ones(2, 1, dtype=f64)
    A_bad = A.clone()
    A_bad[0, 1] = bad
    with raises("A must be finite, got 1 non-finite entries (shape (2, 2))"):
        discretize(A_bad, B, 0.1)
    with raises("dt must be finite"):
        discretize(A, B, bad)
    u = torch.zeros(5, 1, dtype=f64)
    u[3] = bad
    with raises("u must be finite"):
        recurrent(A, B, torch.ones(1, 2, dtype=f64), None, u)
    with raises("K must be finite"):
        convolve(torch.zeros(5, dtype=f64), torch.tensor([1.0, bad], dtype=f64))
    with raises("b must be finite"):
        scan(torch.ones(3, 2, dtype=f64), torch.full((3, 2), bad, dtype=f64))
    with raises("state must be finite"):
        scan_sequential(
            torch.ones(3, 2, dtype=f64), torch.ones(3, 2, dtype=f64), torch.full((2,), bad, dtype=f64)
        )


def test_recurrent_shape_errors():
    Ab, Bb, C = 0.5 * torch.eye(3, dtype=f64), torch.ones(3, 2, dtype=f64), torch.ones(4, 3, dtype=f64)
    with raises("u must be (..., l, p) with p = 2 (from Bb (3, 2)), got (10, 3)"):
        recurrent(Ab, Bb, C, None, torch.zeros(10, 3, dtype=f64))
    with raises("C must be (..., q, n) with n = 3, got (4, 5)"):
        recurrent(Ab, Bb, torch.ones(4, 5, dtype=f64), None, torch.zeros(10, 2, dtype=f64))
    with raises("D must be (..., q, p) = (..., 4, 2), got (2, 4)"):
        recurrent(Ab, Bb, C, torch.ones(2, 4, dtype=f64), torch.zeros(10, 2, dtype=f64))
    with raises("state must be (..., n) with n = 3, got (2,)"):
        recurrent(Ab, Bb, C, None, torch.zeros(10, 2, dtype=f64), torch.zeros(2, dtype=f64))


def test_kernel_and_convolve_errors():
    Ab, Bb, C = 0.5 * torch.eye(3, dtype=f64), torch.ones(3, 2, dtype=f64), torch.ones(4, 3, dtype=f64)
    with raises("length must be an int >= 0, got -1"):
        kernel(Ab, Bb, C, -1)
    with raises("C must be (..., q, n) with n = 3, got (4, 2)"):
        kernel(Ab, Bb, torch.ones(4, 2, dtype=f64), 5)
    with raises("u and K must be u (..., l, p) and K (..., L, q, p)"):
        convolve(torch.zeros(10, 2, dtype=f64), torch.zeros(5, 4, 3, dtype=f64), siso=False)
    with raises("pass siso=True or siso=False"):
        convolve(torch.zeros(1, 1, 5, 2, dtype=f64), torch.zeros(1, 5, 2, dtype=f64))


def test_scan_shape_errors():
    with raises("a must be (..., l, n, n) matching b (..., l, n) = (2, 7, 3), got (2, 7, 3, 4)"):
        scan(torch.ones(2, 7, 3, 4, dtype=f64), torch.ones(2, 7, 3, dtype=f64))
    with raises(
        "a must be (..., l, n) broadcasting with b (..., l, n) = (7, 3), or (..., l, n, n); got (5, 3)"
    ):
        scan(torch.ones(5, 3, dtype=f64), torch.ones(7, 3, dtype=f64))
    with raises("state must be (..., n) = (3,), got (4,)"):
        scan(torch.ones(2, 7, 3, 3, dtype=f64)[0], torch.ones(7, 3, dtype=f64), torch.ones(4, dtype=f64))


def test_continuous_response_errors():
    A, B, C = -torch.eye(2, dtype=f64), torch.ones(2, 1, dtype=f64), torch.ones(1, 2, dtype=f64)
    with raises("dt must be a float > 0, got 0.0"):
        continuous_response(A, B, C, None, torch.zeros(4, 1, dtype=f64), 0.0)
    with raises("u must be (..., l, p) with p = 1, got (4, 3)"):
        continuous_response(A, B, C, None, torch.zeros(4, 3, dtype=f64), 0.1)
