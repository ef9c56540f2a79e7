"""topk_merge: reference vs a plain-Python oracle, Triton vs reference over several
blocks (ties, NaN, ±0, ±inf, k larger than the examples seen so far)."""

from __future__ import annotations

import math

import pytest
import torch

from fastinf.kernels import empty_topk, topk_merge

ON_GPU = torch.cuda.is_available()

# (Q, k, B, blocks): ones; k > 2·B (slots stay empty); several merge chunks per block.
CASES = [(1, 1, 1, 2), (2, 7, 63, 2), (1, 130, 7, 1), (3, 5, 40, 2)]
if ON_GPU:
    CASES += [(1024, 100, 4096, 3), (130, 1000, 2048, 2)]


def oracle(run_values, run_indices, block_scores, block_offset, largest):
    """Sort (value, index) pairs in Python: NaN largest, ties by index, empty slots last."""
    k = run_values.shape[1]
    values, indices = [], []
    for q in range(run_values.shape[0]):
        pairs = list(zip(run_values[q].tolist(), run_indices[q].tolist(), strict=True))
        pairs += [
            (block_scores[b, q].item(), block_offset + b) for b in range(block_scores.shape[0])
        ]

        def key(pair, largest=largest):
            value, index = pair
            nan = math.isnan(value)
            ordered = 0.0 if nan else (-value if largest else value)
            return (not nan if largest else nan, ordered, index < 0, index)

        best = sorted(pairs, key=key)[:k]
        values.append([v for v, _ in best])
        indices.append([i for _, i in best])
    return torch.tensor(values, dtype=run_values.dtype), torch.tensor(indices)


def tie_heavy_scores(inputs, b, q):
    """Integer-valued scores (many ties), with NaN, ±0.0 and ±inf mixed in."""
    scores = torch.round(3 * inputs.normal(b, q))
    flat = scores.view(-1)
    specials = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), float("-inf")])
    positions = torch.arange(0, flat.numel(), 7)[: specials.numel()]
    flat[positions] = specials[: positions.numel()].to(flat.device)
    return scores


def assert_same_topk(got, expected):
    values, indices = got
    assert torch.equal(indices.cpu(), expected[1].cpu())
    torch.testing.assert_close(values.cpu(), expected[0].cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("case", [(1, 1, 1, 2), (3, 4, 9, 3), (2, 20, 6, 2)], ids=str)
def test_reference_matches_oracle(inputs, case, largest):
    n_q, k, n_b, blocks = case
    state = empty_topk(n_q, k, largest=largest, device=inputs.normal(1).device)
    for block in range(blocks):
        scores = tie_heavy_scores(inputs, n_b, n_q)
        expected = oracle(*(t.cpu() for t in state), scores.cpu(), block * n_b, largest)
        state = topk_merge(*state, scores, block * n_b, largest=largest, backend="reference")
        assert_same_topk(state, expected)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(inputs, case, largest):
    n_q, k, n_b, blocks = case
    device = inputs.normal(1).device
    triton_state = empty_topk(n_q, k, largest=largest, device=device)
    reference_state = empty_topk(n_q, k, largest=largest, device=device)
    # blocks arrive out of order: ties must still go to the smaller global index
    for block in reversed(range(blocks)):
        scores = tie_heavy_scores(inputs, n_b, n_q)
        offset = 1000 + block * n_b
        triton_state = topk_merge(*triton_state, scores, offset, largest=largest, backend="triton")
        reference_state = topk_merge(
            *reference_state, scores, offset, largest=largest, backend="reference"
        )
        assert_same_topk(triton_state, reference_state)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_low_precision_values(inputs, dtype):
    """Running values in fp16/bf16: block scores are rounded to that dtype first."""
    state = empty_topk(2, 6, dtype=dtype, device=inputs.normal(1).device)
    scores = inputs.normal(20, 2) / 3
    got = topk_merge(*state, scores, 5, backend="triton")
    expected = topk_merge(*state, scores, 5, backend="reference")
    assert got[0].dtype == dtype
    assert_same_topk(got, expected)


@pytest.mark.usefixtures("needs_triton")
def test_triton_rejects_indices_beyond_32_bits(inputs):
    state = empty_topk(1, 2, device=inputs.normal(1).device)
    with pytest.raises(ValueError, match="32 bits"):
        topk_merge(*state, inputs.normal(4, 1), 2**32 - 4, backend="triton")


def test_empty_topk_and_errors(inputs):
    values, indices = empty_topk(2, 3, largest=False)
    assert torch.isposinf(values).all() and (indices == -1).all()
    with pytest.raises(TypeError, match="int64"):
        topk_merge(values, indices.int(), inputs.normal(4, 2).cpu(), 0)
    with pytest.raises(ValueError, match="block_scores must have shape"):
        topk_merge(values, indices, inputs.normal(4, 3).cpu(), 0)
    with pytest.raises(ValueError, match="block_offset"):
        topk_merge(values, indices, inputs.normal(4, 2).cpu(), -1)
