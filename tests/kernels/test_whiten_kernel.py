"""whiten_sketch: reference vs an explicit float64 oracle, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from fastinf.kernels import whiten_sketch

ON_GPU = torch.cuda.is_available()

# (B, d_out, d_in, k): ones; tails of every block (B > 32, k > 64, d_out·d_in > 32).
CASES = [(1, 1, 1, 1), (7, 7, 130, 63), (33, 9, 20, 130), (3, 63, 63, 7)]
if ON_GPU:
    CASES += [(256, 128, 1152, 1024), (64, 512, 4608, 256)]


def oracle(coords, inv_sqrt_damped, sketch):
    """float64 out[b, j] = Σ_{o,i} coords[b,o,i] W½[o,i] sketch[o·d_in + i, j], by loops over o."""
    coords, scale = coords.double().cpu(), inv_sqrt_damped.double().cpu()
    d_out, d_in = scale.shape
    if sketch is None:
        return torch.stack([(coords[b] * scale).reshape(-1) for b in range(coords.shape[0])])
    rows = sketch.double().cpu().reshape(d_out, d_in, -1)
    out = torch.zeros(coords.shape[0], rows.shape[2], dtype=torch.float64)
    for o in range(d_out):
        out += (coords[:, o, :] * scale[o]) @ rows[o]
    return out


@pytest.mark.parametrize("with_sketch", [False, True])
@pytest.mark.parametrize("case", [(1, 1, 1, 1), (4, 3, 5, 6), (2, 7, 4, 3)], ids=str)
def test_reference_matches_oracle(inputs, assert_close_scaled, case, with_sketch):
    b, d_out, d_in, k = case
    coords = inputs.normal(b, d_out, d_in, dtype=torch.float64)
    scale = inputs.uniform(d_out, d_in, low=0.1, high=2.0, dtype=torch.float64)
    sketch = inputs.normal(d_out * d_in, k, dtype=torch.float64) if with_sketch else None
    expected = oracle(coords, scale, sketch)
    assert_close_scaled(
        whiten_sketch(coords, scale, sketch, backend="reference").cpu(), expected, 1e-12
    )


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("with_sketch", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(inputs, assert_close_scaled, triton_tol, case, with_sketch):
    b, d_out, d_in, k = case
    coords = inputs.normal(b, d_out, d_in)
    scale = inputs.uniform(d_out, d_in, low=0.1, high=2.0)
    sketch = inputs.normal(d_out * d_in, k) if with_sketch else None
    got = whiten_sketch(coords, scale, sketch, backend="triton")
    assert got.dtype == torch.float32
    assert_close_scaled(got, whiten_sketch(coords, scale, sketch, backend="reference"), triton_tol)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_low_precision_and_strided(inputs, assert_close_scaled, triton_tol, dtype):
    """fp16/bf16 inputs, a transposed (column-major) sketch and non-contiguous coords."""
    coords = inputs.normal(5, 11, 9, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    scale = inputs.uniform(11, 9, low=0.1, high=2.0, dtype=dtype)
    sketch = inputs.normal(70, 99, dtype=dtype).T  # [99, 70]: rows d_out·d_in = 99
    for sk in (None, sketch):
        got = whiten_sketch(coords, scale, sk, backend="triton")
        assert_close_scaled(got, whiten_sketch(coords, scale, sk, backend="reference"), triton_tol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_dimensions(request, inputs, backend):
    """No examples or no sketch columns: empty outputs; no features: zeros (empty sums)."""
    if backend == "triton":
        request.getfixturevalue("needs_triton")
    for b, d_in, k in ((0, 4, 5), (2, 4, 0)):
        coords, scale = inputs.normal(b, 3, d_in), inputs.uniform(3, d_in, low=0.1, high=2.0)
        out = whiten_sketch(coords, scale, inputs.normal(3 * d_in, k), backend=backend)
        assert out.shape == (b, k)
    coords, scale, sketch = inputs.normal(2, 3, 0), inputs.normal(3, 0), inputs.normal(0, 5)
    out = whiten_sketch(coords, scale, sketch, backend=backend)
    assert torch.equal(out, torch.zeros(2, 5, device=out.device))
    assert whiten_sketch(coords, scale, None, backend=backend).shape == (2, 0)


def test_errors(inputs):
    coords = inputs.normal(2, 3, 4)
    with pytest.raises(ValueError, match="inv_sqrt_damped must have shape"):
        whiten_sketch(coords, inputs.normal(4, 3), None)
    with pytest.raises(ValueError, match="sketch must have shape"):
        whiten_sketch(coords, inputs.normal(3, 4), inputs.normal(13, 5))
