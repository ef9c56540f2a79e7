"""project_score / project_score_dense: reference vs a float64 dense oracle, Triton vs
reference (odd sizes and block tails, several dtypes, every route)."""

from __future__ import annotations

import pytest
import torch

from fastinf.kernels import project_score, project_score_dense
from fastinf.kernels.score import choose_route

ON_GPU = torch.cuda.is_available()

# (B, M, d_in, d_out, Q): ones; tails of every block (B > 16, M > 32, d > 16, Q > 32).
CASES = [(1, 1, 1, 1, 1), (7, 5, 130, 7, 3), (3, 63, 20, 63, 7), (17, 3, 33, 9, 40)]
if ON_GPU:
    CASES += [(64, 256, 1152, 128, 130), (33, 7, 4608, 512, 64)]
DENSE_CASES = [(7, 7, 130, 3), (5, 63, 20, 40)]  # (B, d_out, d_in, Q): both kernel sides
if ON_GPU:
    DENSE_CASES += [(48, 256, 2304, 100), (16, 512, 128, 33)]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def make_layer(inputs, b, m, d_in, d_out, q, dtype=torch.float32):
    """act, grad, Q_A, Q_S, W, Q̂ of one layer."""
    return (
        inputs.normal(b, m, d_in, dtype=dtype),
        inputs.normal(b, m, d_out, dtype=dtype),
        inputs.orthogonal(d_in, dtype=dtype),
        inputs.orthogonal(d_out, dtype=dtype),
        inputs.uniform(d_out, d_in, low=0.1, high=2.0, dtype=dtype),
        inputs.normal(q, d_out, d_in, dtype=dtype),
    )


def dense_oracle(act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries):
    """float64 scores from explicit G_b = Σ_m grad ⊗ act and the Kronecker identity
    flatten(Q_Sᵀ G Q_A) = (Q_Sᵀ ⊗ Q_Aᵀ) flatten(G)."""
    act, grad, queries = act.double(), grad.double(), queries.double()
    kron = torch.kron(eigvecs_grad.double().T, eigvecs_act.double().T)
    scores = torch.zeros(act.shape[0], queries.shape[0], dtype=torch.float64)
    for b in range(act.shape[0]):
        grads = sum(torch.outer(grad[b, m], act[b, m]) for m in range(act.shape[1]))
        preconditioned = (kron @ grads.flatten()) * inv_damped.double().flatten()
        for q in range(queries.shape[0]):
            scores[b, q] = (preconditioned * queries[q].flatten()).sum()
    return scores


@pytest.mark.parametrize("route", ["rows", "summed"])
@pytest.mark.parametrize("case", [(1, 1, 1, 1, 1), (3, 5, 7, 4, 2), (2, 9, 13, 6, 3)])
def test_reference_matches_dense_oracle(inputs, assert_close_scaled, case, route):
    layer64 = make_layer(inputs, *case, dtype=torch.float64)
    expected = dense_oracle(*(t.cpu() for t in layer64))
    got64 = project_score(*layer64, route=route, backend="reference")
    assert got64.dtype == torch.float64
    assert_close_scaled(got64.cpu(), expected, 1e-12)
    got32 = project_score(*(t.float() for t in layer64), route=route, backend="reference")
    assert got32.dtype == torch.float32
    assert_close_scaled(got32.cpu(), expected.float(), 1e-5)


def test_dense_reference_matches_factored(inputs, assert_close_scaled):
    act, grad, *curvature = make_layer(inputs, 3, 4, 6, 5, 2, dtype=torch.float64)
    grads = grad.transpose(1, 2) @ act
    expected = project_score(act, grad, *curvature, backend="reference")
    assert_close_scaled(
        project_score_dense(grads, *curvature, backend="reference"), expected, 1e-12
    )


@pytest.mark.usefixtures("needs_triton", "nan_empty")
@pytest.mark.parametrize("route", ["rows", "summed"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(inputs, assert_close_scaled, triton_tol, case, route):
    layer = make_layer(inputs, *case)
    got = project_score(*layer, route=route, backend="triton")
    expected = project_score(*layer, route=route, backend="reference")
    assert got.dtype == torch.float32
    assert_close_scaled(got, expected, triton_tol)


@pytest.mark.usefixtures("needs_triton", "nan_empty")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_triton_low_precision_inputs(inputs, assert_close_scaled, triton_tol, dtype):
    # Both backends upcast the same fp16/bf16 values to float32, so the float32 tolerance holds.
    layer = make_layer(inputs, 5, 6, 40, 18, 9, dtype=dtype)
    got = project_score(*layer, backend="triton")
    assert_close_scaled(got, project_score(*layer, backend="reference"), triton_tol)


@pytest.mark.usefixtures("needs_triton", "nan_empty")
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_triton_dense_matches_reference(inputs, assert_close_scaled, triton_tol, case):
    b, d_out, d_in, q = case
    _, _, *curvature = make_layer(inputs, 1, 1, d_in, d_out, q)
    grads = inputs.normal(b, d_out, d_in)
    got = project_score_dense(grads, *curvature, backend="triton")
    expected = project_score_dense(grads, *curvature, backend="reference")
    assert_close_scaled(got, expected, triton_tol)


@pytest.mark.usefixtures("needs_triton")
def test_triton_strided_inputs(inputs, assert_close_scaled, triton_tol):
    """Transposed views (non-unit inner strides) reach the kernel as they are."""
    act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries = make_layer(inputs, 4, 3, 9, 7, 5)
    inv_damped_t = inv_damped.T.contiguous().T
    queries_t = queries.transpose(1, 2).contiguous().transpose(1, 2)
    layer = (act, grad, eigvecs_act, eigvecs_grad, inv_damped_t, queries_t)
    got = project_score(*layer, route="rows", backend="triton")
    assert_close_scaled(got, project_score(*layer, backend="reference"), triton_tol)


def test_choose_route_by_cost():
    assert choose_route(1, 8, 8) == "rows"
    # a 3x3 conv with 512 input and output channels at 32² positions: summing first wins
    assert choose_route(32 * 32, 4608, 512) == "summed"
    # equal costs: M (d_in² + d_out²) = d_out d_in (d_in + d_out) at M = 1, d_in = d_out = 1
    assert choose_route(1, 1, 1) == "rows"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_and_queries(request, inputs, backend):
    if backend == "triton":
        request.getfixturevalue("needs_triton")
    act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries = make_layer(inputs, 0, 3, 5, 4, 2)
    scores = project_score(
        act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries, backend=backend
    )
    assert scores.shape == (0, 2)
    act, grad, *_ = make_layer(inputs, 2, 3, 5, 4, 1)
    scores = project_score(
        act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries[:0], backend=backend
    )
    assert scores.shape == (2, 0)


def test_shape_and_route_errors(inputs):
    act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries = make_layer(inputs, 2, 3, 5, 4, 2)
    with pytest.raises(ValueError, match="grad must have shape"):
        project_score(act, grad[:, :2], eigvecs_act, eigvecs_grad, inv_damped, queries)
    with pytest.raises(ValueError, match="queries must have shape"):
        project_score(act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries[:, :, :4])
    with pytest.raises(ValueError, match="unknown route"):
        project_score(act, grad, eigvecs_act, eigvecs_grad, inv_damped, queries, route="fast")
