"""score_params: reference vs a float64 loop oracle; Triton vs reference (odd sizes and
block tails, several dtypes, strided views, empty dimensions)."""

from __future__ import annotations

import pytest
import torch

from fastinf.kernels import score_params

ON_GPU = torch.cuda.is_available()

# (B, M, d_in, d_out, Q): ones; tails of every block (B > 16, M > 32, d > 16, Q > 32).
CASES = [(1, 1, 1, 1, 1), (7, 5, 130, 7, 3), (3, 63, 20, 63, 7), (17, 33, 9, 18, 40)]
if ON_GPU:
    CASES += [(64, 256, 1152, 128, 130), (33, 7, 4608, 512, 64), (16, 1024, 288, 32, 257)]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def make_rows(inputs, b, m, d_in, d_out, q, dtype=torch.float32):
    """act [B, M, d_in], grad [B, M, d_out], queries V [Q, d_out, d_in]."""
    return (
        inputs.normal(b, m, d_in, dtype=dtype),
        inputs.normal(b, m, d_out, dtype=dtype),
        inputs.normal(q, d_out, d_in, dtype=dtype),
    )


def loop_oracle(act, grad, queries):
    """float64 scores from G_b built one outer product grad[b,m] ⊗ act[b,m] at a time."""
    act, grad, queries = act.double().cpu(), grad.double().cpu(), queries.double().cpu()
    scores = torch.zeros(act.shape[0], queries.shape[0], dtype=torch.float64)
    for b in range(act.shape[0]):
        grads = torch.zeros(grad.shape[2], act.shape[2], dtype=torch.float64)
        for m in range(act.shape[1]):
            grads += torch.outer(grad[b, m], act[b, m])
        for q in range(queries.shape[0]):
            scores[b, q] = (grads * queries[q]).sum()
    return scores


@pytest.mark.parametrize("case", [(1, 1, 1, 1, 1), (3, 5, 7, 4, 2), (2, 9, 13, 6, 3)], ids=str)
def test_reference_matches_loop_oracle(inputs, assert_close_scaled, case):
    rows64 = make_rows(inputs, *case, dtype=torch.float64)
    expected = loop_oracle(*rows64)
    got64 = score_params(*rows64, backend="reference")
    assert got64.dtype == torch.float64
    assert_close_scaled(got64.cpu(), expected, 1e-12)
    got32 = score_params(*(t.float() for t in rows64), backend="reference")
    assert got32.dtype == torch.float32
    assert_close_scaled(got32.cpu(), expected.float(), 1e-5)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(inputs, assert_close_scaled, triton_tol, case):
    rows = make_rows(inputs, *case)
    got = score_params(*rows, backend="triton")
    assert got.dtype == torch.float32
    assert_close_scaled(got, score_params(*rows, backend="reference"), triton_tol)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_triton_low_precision_inputs(inputs, assert_close_scaled, triton_tol, dtype):
    # The kernel upcasts the raw fp16/bf16 rows on load, the reference before its matmuls:
    # both see the same values, so the float32 tolerance holds.
    size = (64, 256, 2304, 256, 96) if ON_GPU else (5, 37, 20, 18, 9)
    rows = make_rows(inputs, *size, dtype=dtype)
    got = score_params(*rows, backend="triton")
    assert got.dtype == torch.float32
    assert_close_scaled(got, score_params(*rows, backend="reference"), triton_tol)


@pytest.mark.usefixtures("needs_triton")
def test_triton_mixed_dtypes(inputs, assert_close_scaled, triton_tol):
    act = inputs.normal(3, 9, 17, dtype=torch.bfloat16)
    grad = inputs.normal(3, 9, 5, dtype=torch.float16)
    queries = inputs.normal(4, 5, 17)
    got = score_params(act, grad, queries, backend="triton")
    assert_close_scaled(got, score_params(act, grad, queries, backend="reference"), triton_tol)


@pytest.mark.usefixtures("needs_triton")
def test_triton_strided_inputs(inputs, assert_close_scaled, triton_tol):
    """Views with non-unit inner strides, a stepped batch and a storage offset reach the
    kernel as they are."""
    b, m, d_in, d_out, q = 4, 35, 19, 10, 6
    act = inputs.normal(2 * b, d_in, m).transpose(1, 2)[::2]  # [B, M, d_in], stride_i = M
    grad = inputs.normal(b, m, d_out + 3)[:, :, 2 : 2 + d_out]  # offset, padded rows
    queries = inputs.normal(q, d_in, d_out).transpose(1, 2)  # [Q, d_out, d_in]
    assert not (act.is_contiguous() or grad.is_contiguous() or queries.is_contiguous())
    got = score_params(act, grad, queries, backend="triton")
    expected = score_params(
        act.contiguous(), grad.contiguous(), queries.contiguous(), backend="reference"
    )
    assert_close_scaled(got, expected, triton_tol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_rows_and_queries(request, inputs, backend):
    if backend == "triton":
        request.getfixturevalue("needs_triton")
    act, grad, queries = make_rows(inputs, 0, 3, 5, 4, 2)
    assert score_params(act, grad, queries, backend=backend).shape == (0, 2)
    act, grad, queries = make_rows(inputs, 2, 3, 5, 4, 0)
    assert score_params(act, grad, queries, backend=backend).shape == (2, 0)
    # no rows, or a layer without parameters: every score is an empty sum
    for rows in (make_rows(inputs, 2, 0, 5, 4, 3), make_rows(inputs, 2, 3, 0, 4, 3)):
        scores = score_params(*rows, backend=backend)
        assert torch.equal(scores, torch.zeros(2, 3, device=scores.device))


def test_input_errors(inputs):
    act, grad, queries = make_rows(inputs, 2, 3, 5, 4, 2)
    with pytest.raises(ValueError, match="grad must have shape"):
        score_params(act, grad[:, :2], queries)
    with pytest.raises(ValueError, match=r"queries must have shape \[\*, 4, 5\], got \[2, 5, 4\]"):
        score_params(act, grad, queries.transpose(1, 2))
    with pytest.raises(ValueError, match="act must have shape"):
        score_params(act[0], grad, queries)
    with pytest.raises(TypeError, match="queries must be a floating-point tensor"):
        score_params(act, grad, queries.to(torch.int64))
    with pytest.raises(TypeError, match="float64"):
        score_params(act.double(), grad, queries, backend="triton")
