"""eigval_accumulate: reference vs a float64 Kronecker oracle, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from fastinf.kernels import eigval_accumulate
from fastinf.kernels.eigval.naive import choose_route

ON_GPU = torch.cuda.is_available()

# (D, R, d_in, d_out): ones; tails of every block (d > 32, R > 32).
CASES = [(1, 1, 1, 1), (7, 5, 130, 7), (3, 63, 33, 63), (5, 40, 20, 9)]
if ON_GPU:
    CASES += [(64, 256, 1152, 128), (16, 1024, 4608, 512)]


def make_draws(inputs, d, r, d_in, d_out, dtype=torch.float32):
    """act, grad, Q_A, Q_S of D draws."""
    return (
        inputs.normal(d, r, d_in, dtype=dtype),
        inputs.normal(d, r, d_out, dtype=dtype),
        inputs.orthogonal(d_in, dtype=dtype),
        inputs.orthogonal(d_out, dtype=dtype),
    )


def kron_oracle(act, grad, eigvecs_act, eigvecs_grad):
    """float64 Σ_d (Q_Sᵀ G_d Q_A)^∘2 from explicit G_d and the Kronecker identity
    flatten(Q_Sᵀ G Q_A) = (Q_Sᵀ ⊗ Q_Aᵀ) flatten(G)."""
    act, grad = act.double().cpu(), grad.double().cpu()
    kron = torch.kron(eigvecs_grad.double().cpu().T, eigvecs_act.double().cpu().T)
    total = torch.zeros(grad.shape[2] * act.shape[2], dtype=torch.float64)
    for d in range(act.shape[0]):
        grads = sum(torch.outer(grad[d, r], act[d, r]) for r in range(act.shape[1]))
        total += (kron @ grads.flatten()).square()
    return total.reshape(grad.shape[2], act.shape[2])


# (D, R, d_in, d_out): the reference projects rows first in the first two, sums first in
# the last (test_oracle_cases_cover_both_routes).
ORACLE_CASES = [(1, 1, 1, 1), (3, 4, 7, 5), (4, 9, 6, 11)]


def test_choose_route_by_cost():
    assert choose_route(1, 8, 8) == "rows"
    # a 3x3 conv with 512 input and output channels at 32² positions: summing first wins
    assert choose_route(32 * 32, 4608, 512) == "summed"
    # equal costs: R (d_in² + d_out²) = d_out d_in (d_in + d_out) at R = 1, d_in = d_out = 1
    assert choose_route(1, 1, 1) == "rows"


def test_oracle_cases_cover_both_routes():
    routes = {choose_route(r, d_in, d_out) for _, r, d_in, d_out in ORACLE_CASES}
    assert routes == {"rows", "summed"}


@pytest.mark.parametrize("case", ORACLE_CASES, ids=str)
def test_reference_matches_kron_oracle(inputs, assert_close_scaled, case):
    draws = make_draws(inputs, *case, dtype=torch.float64)
    start = inputs.uniform(case[3], case[2], low=0.0, high=1.0, dtype=torch.float64)
    expected = kron_oracle(*draws) + start.cpu()
    out = start.clone()
    assert eigval_accumulate(*draws, out, backend="reference") is out
    assert_close_scaled(out.cpu(), expected, 1e-12)
    out32 = start.float()
    eigval_accumulate(*(t.float() for t in draws), out32, backend="reference")
    assert_close_scaled(out32.cpu(), expected.float(), 1e-5)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(inputs, assert_close_scaled, triton_tol, case, out_dtype):
    draws = make_draws(inputs, *case)
    start = inputs.uniform(case[3], case[2], low=0.0, high=1.0, dtype=out_dtype)
    expected = eigval_accumulate(*draws, start.clone(), backend="reference")
    out = start.clone()
    assert eigval_accumulate(*draws, out, backend="triton") is out
    assert out.dtype == out_dtype
    assert_close_scaled(out, expected, triton_tol)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_low_precision_inputs(inputs, assert_close_scaled, triton_tol, dtype):
    draws = make_draws(inputs, 6, 7, 35, 18, dtype=dtype)
    expected = eigval_accumulate(
        *draws, torch.zeros(18, 35, device=draws[0].device), backend="reference"
    )
    got = eigval_accumulate(*draws, torch.zeros(18, 35, device=draws[0].device), backend="triton")
    assert_close_scaled(got, expected, triton_tol)


def test_errors(inputs):
    act, grad, eigvecs_act, eigvecs_grad = make_draws(inputs, 2, 3, 5, 4)
    with pytest.raises(ValueError, match="out must have shape"):
        eigval_accumulate(act, grad, eigvecs_act, eigvecs_grad, torch.zeros(5, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        eigval_accumulate(act, grad, eigvecs_act, eigvecs_grad, torch.zeros(4, 5).half())
