"""Index: exactness against engine.score, invariances, compressions, storage, search, errors."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import fastinf.index
from fastinf.artifacts import ArtifactCorruptError, ArtifactMismatchError
from fastinf.config import CurvatureConfig
from fastinf.curvature import CurvatureError, as_kfac
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.index import IndexConfig, TrainingIndex
from fastinf.index.compress import CoordinateLayout, damped_ratio, make_compressor
from fastinf.index.encode import Quantizer, VectorEncoder
from fastinf.index.scorer import bounded_rerank
from fastinf.index.search import SearchIndex
from fastinf.index.store import IndexStore
from fastinf.scoring import TopK

from tiny import SMALL_SCORE, TinyConvEps, random_dataset, undocumented

CONFIG = SMALL_SCORE
EXACT = IndexConfig(compression="exact", storage="fp32", shard_size=4, exact_rerank=0)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    engine = InfluenceEngine(
        TinyConvEps().double(),
        NoiseSchedule.linear(100, 1e-3, 0.2),
        random_dataset(9, (2, 5, 5), seed=1),
        config=CONFIG,
    )
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    queries = random_dataset(5, (2, 5, 5), seed=7).images
    exact = engine.score(queries, k=3, return_scores=True)
    return engine, queries, exact


@pytest.fixture
def engine(fitted):
    engine = fitted[0]
    engine.config = CONFIG
    engine.unload_index()
    yield engine
    engine.config = CONFIG
    engine.unload_index()


def test_public_api_is_pinned():
    assert sorted(fastinf.index.__all__) == [
        "COMPRESSORS",
        "IndexConfig",
        "IndexScorer",
        "TrainingIndex",
        "build_index",
    ]
    assert undocumented(fastinf.index) == []


def test_uncompressed_index_reproduces_engine_scores(fitted, engine, tmp_path):
    _, queries, exact = fitted
    index = engine.build_index(tmp_path, EXACT)
    assert index.dim == sum(
        p.numel() for n, p in engine.model.named_parameters() if "norm" not in n
    )
    result = engine.score(queries, k=3, return_scores=True)
    # Stored in float32: the index scores carry float32 rounding of each vector, nothing more.
    scale = exact.scores.abs().max()
    torch.testing.assert_close(result.scores, exact.scores, rtol=0, atol=1e-6 * float(scale))
    assert torch.equal(result.proponents.indices, exact.proponents.indices)
    assert torch.equal(result.opponents.indices, exact.opponents.indices)
    assert torch.equal(result.query_ids, exact.query_ids)
    assert (result.proponents.scores[:, :-1] >= result.proponents.scores[:, 1:]).all()
    assert (result.opponents.scores[:, :-1] <= result.opponents.scores[:, 1:]).all()


def test_query_cache_and_images_give_the_same_query_vectors(fitted, engine, tmp_path):
    _, queries, _ = fitted
    engine.build_index(tmp_path, EXACT)
    from_images, ids = engine.scorer.query_vectors(queries)
    from_cache, cache_ids = engine.scorer.query_vectors(engine.prepare_queries(queries))
    assert torch.equal(ids, cache_ids)
    torch.testing.assert_close(
        from_cache, from_images, rtol=1e-9, atol=1e-9 * float(from_images.abs().max())
    )


@pytest.mark.parametrize("storage", ["fp32", "int4"])
def test_build_is_invariant_to_block_and_shard_size(engine, tmp_path, storage):
    config = dataclasses.replace(EXACT, storage=storage, calibration_examples=9)
    engine.config = dataclasses.replace(CONFIG, block_size=2)
    first = engine.build_index(tmp_path / "a", dataclasses.replace(config, shard_size=3)).vectors()
    engine.config = dataclasses.replace(CONFIG, block_size=9)
    second = engine.build_index(tmp_path / "b", dataclasses.replace(config, shard_size=5)).vectors()
    if storage == "fp32":
        np.testing.assert_allclose(first, second, rtol=0, atol=1e-6 * np.abs(first).max())
    else:  # the same codes, up to a rounding tie flipped by a last-bit difference
        nibbles = [np.stack([v & 15, v >> 4]).astype(int) for v in (first, second)]
        assert np.abs(nibbles[0] - nibbles[1]).max() <= 1


def test_exact_rerank_of_every_candidate_is_the_exact_top_k(fitted, engine, tmp_path):
    _, queries, exact = fitted
    config = IndexConfig(compression="countsketch", dim=8, exact_rerank=9, rerank_sigmas=0.0)
    engine.build_index(tmp_path, config)
    approximate = engine.score(queries, k=3, exact_rerank=0)
    reranked = engine.score(queries, k=3)  # the index's default: re-rank every candidate
    assert torch.equal(reranked.proponents.indices, exact.proponents.indices)
    assert torch.equal(reranked.opponents.indices, exact.opponents.indices)
    torch.testing.assert_close(reranked.proponents.scores, exact.proponents.scores)
    assert not torch.equal(approximate.proponents.scores, exact.proponents.scores)


class _KnownScores:
    """Stands in for the exact re-scoring: τ from a table, every call recorded."""

    def __init__(self, exact):
        self.exact, self.known, self.calls = exact, {}, []

    def __call__(self, examples):
        self.calls.append(list(examples))
        for example in examples:
            self.known[example] = self.exact[:, example]


@pytest.mark.parametrize("batch", [1, 5, 1000])
def test_bounded_rerank_is_the_exact_top_k_when_the_bounds_hold(batch):
    """If every τ lies within ± z·σ of its index score, the lists are the exact top-k."""
    generator = torch.Generator().manual_seed(0)
    queries, examples, k, sigmas = 3, 60, 5, 2.0
    exact = torch.randn(queries, examples, generator=generator, dtype=torch.float64) ** 3
    sigma = 0.05 + 0.3 * torch.rand(queries, examples, generator=generator, dtype=torch.float64)
    noise = (2 * torch.rand(queries, examples, generator=generator) - 1).double()
    index_scores = exact + sigmas * sigma * noise  # inside the bounds
    found, spread = [], []
    for sign in (1.0, -1.0):
        order = (sign * index_scores).argsort(dim=1, descending=True)[:, :40]  # C = 40
        found.append(TopK(order, index_scores.gather(1, order)))
        spread.append(sigma.gather(1, order))
    rescore = _KnownScores(exact)
    proponents, opponents = bounded_rerank(tuple(found), spread, k, sigmas, rescore, batch)
    for part, sign in ((proponents, 1.0), (opponents, -1.0)):
        truth = (sign * exact).topk(k, dim=1).indices
        assert torch.equal(part.indices.sort(1).values, truth.sort(1).values)
        exact_rows = exact.gather(1, part.indices)
        torch.testing.assert_close(part.scores[part.exact], exact_rows[part.exact])
        inexact = ~part.exact
        torch.testing.assert_close(
            part.scores[inexact], index_scores.gather(1, part.indices)[inexact]
        )
    assert all(len(call) <= batch for call in rescore.calls)
    rescored = {example for call in rescore.calls for example in call}
    assert len(rescored) == sum(map(len, rescore.calls))  # nothing re-scored twice
    assert len(rescored) < examples  # the certain ones were left alone


def test_bounded_rerank_of_a_batch_equals_each_query_alone():
    """A micro-batch must not change an answer: each query uses only the exact scores it
    asked for itself, though the batch shares the re-scoring passes."""
    generator = torch.Generator().manual_seed(3)
    queries, examples, k, sigmas, batch = 6, 50, 4, 1.0, 3
    exact = torch.randn(queries, examples, generator=generator, dtype=torch.float64)
    sigma = 0.1 + 0.5 * torch.rand(queries, examples, generator=generator, dtype=torch.float64)
    index_scores = exact + sigma * torch.randn(queries, examples, generator=generator).double()
    found, spread = [], []
    for sign in (1.0, -1.0):
        order = (sign * index_scores).argsort(dim=1, descending=True)[:, :20]
        found.append(TopK(order, index_scores.gather(1, order)))
        spread.append(sigma.gather(1, order))
    together = _KnownScores(exact)
    batched = bounded_rerank(tuple(found), spread, k, sigmas, together, batch)
    computed = 0
    for row in range(queries):
        alone = _KnownScores(exact[row : row + 1])
        parts = tuple(TopK(p.indices[row : row + 1], p.scores[row : row + 1]) for p in found)
        single = bounded_rerank(parts, [s[row : row + 1] for s in spread], k, sigmas, alone, batch)
        computed += sum(map(len, alone.calls))
        for one, many in zip(single, batched, strict=True):
            assert torch.equal(one.indices[0], many.indices[row])
            assert torch.equal(one.scores[0], many.scores[row])
            assert torch.equal(one.exact[0], many.exact[row])
    shared = [example for call in together.calls for example in call]
    assert len(shared) == len(set(shared)) < computed  # shared passes, nothing twice
    assert all(len(call) <= batch for call in together.calls)


def test_countsketch_error_model_matches_the_sketch_variance(engine):
    """Var over sketch seeds of ⟨Sx, Sy⟩ − ⟨x, y⟩ is (‖x‖²‖y‖² + ⟨x, y⟩² − 2Σx_i²y_i²) / dim;
    the re-rank's model keeps its leading term ‖x‖²‖y‖² / dim."""
    layout = CoordinateLayout(engine.curvature)
    x, y = _random_vectors(layout, 2, 5)
    dim, errors = 16, []
    for seed in range(400):
        config = IndexConfig(compression="countsketch", dim=dim, sketch_seed=seed)
        encoder, _ = _encoder(engine, config)
        cx, cy = encoder.compress_whitened(layout.split(torch.stack([x, y])))
        errors.append(float(cx @ cy - x @ y))
    norms = x.square().sum() * y.square().sum()
    variance = (norms + (x @ y) ** 2 - 2 * (x.square() * y.square()).sum()) / dim
    assert abs(float(norms / dim / variance) - 1) < 0.05
    assert 0.8 < float(torch.tensor(errors).square().mean() / variance) < 1.2


def test_bounded_rerank_of_an_exact_int8_index_rescores_only_the_close_calls(
    fitted, engine, tmp_path, monkeypatch
):
    """Rounding is the only error of an exact int8 index: lists exact, few re-scored."""
    _, queries, exact = fitted
    config = dataclasses.replace(EXACT, storage="int8", calibration_examples=9, exact_rerank=9)
    index = engine.build_index(tmp_path, config)
    calls = []
    original = fastinf.index.scorer._ExactScores.__call__
    monkeypatch.setattr(
        fastinf.index.scorer._ExactScores,
        "__call__",
        lambda self, examples: calls.append(list(examples)) or original(self, examples),
    )
    vectors, _ = engine.scorer.query_vectors(queries)
    sketch, rounding = index.error_model(vectors)
    assert float(sketch.abs().max()) == 0.0 and float(rounding.min()) > 0
    result = engine.score(queries, k=3, rerank_sigmas=6.0)
    assert torch.equal(result.proponents.indices, exact.proponents.indices)
    assert torch.equal(result.opponents.indices, exact.opponents.indices)
    for part, truth in ((result.proponents, exact.proponents), (result.opponents, exact.opponents)):
        torch.testing.assert_close(part.scores[part.exact], truth.scores[part.exact])
        scale = float(truth.scores.abs().max())
        torch.testing.assert_close(part.scores, truth.scores, rtol=0, atol=0.05 * scale)
    assert sum(map(len, calls)) < 9


def test_index_over_a_subset_maps_rows_to_dataset_indices(fitted, engine, tmp_path):
    _, queries, _ = fitted
    subset = [8, 2, 5, 0]
    index = engine.build_index(tmp_path, EXACT, indices=subset)
    expected = engine.score(queries, k=2, indices=subset, return_scores=True)
    result = engine.score(queries, k=2, return_scores=True)
    assert index.order.tolist() == subset
    assert torch.equal(result.proponents.indices, expected.proponents.indices)
    scale = float(expected.scores.abs().max())
    torch.testing.assert_close(result.scores, expected.scores, rtol=0, atol=1e-6 * scale)


# -- compressions ---------------------------------------------------------------------------
def _encoder(engine, config, ranking=None):
    curvature = engine.curvature
    layout = CoordinateLayout(curvature)
    ranking = ranking or damped_ratio(curvature, CONFIG.damping, CONFIG.damping_mode)
    compressor = make_compressor(layout, config, ranking)
    return VectorEncoder(curvature, CONFIG.damping, CONFIG.damping_mode, compressor), layout


def _random_vectors(layout, count, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, layout.size, generator=generator, dtype=torch.float64)


def test_truncation_keeps_the_highest_ranked_coordinates(engine):
    encoder, layout = _encoder(engine, IndexConfig(compression="truncate", dim=37))
    ratio = torch.cat([r for r in damped_ratio(engine.curvature, 1e-3, "absolute").values()])
    kept = torch.sort(ratio, descending=True, stable=True).indices[:37]
    x, y = _random_vectors(layout, 2, 0)
    cx, cy = encoder.compress_whitened(layout.split(torch.stack([x, y])))
    torch.testing.assert_close(cx @ cy, (x[kept] * y[kept]).sum())
    torch.testing.assert_close(cx, x[kept])


def test_hybrid_is_truncation_plus_a_countsketch_of_the_rest(engine):
    config = IndexConfig(compression="hybrid", dim=40, exact_fraction=0.25)
    encoder, layout = _encoder(engine, config)
    x = _random_vectors(layout, 1, 1)
    out = encoder.compress_whitened(layout.split(x))[0]
    kept = encoder.compressor.kept
    assert kept.numel() == 10
    torch.testing.assert_close(out[:10], x[0, kept])
    rest = x.clone()
    rest[0, kept] = 0
    sketched = encoder.compress_whitened(layout.split(rest))[0]
    torch.testing.assert_close(sketched[10:], out[10:])
    torch.testing.assert_close(sketched[10:].sum().abs() > 0, torch.tensor(True))


def test_kronecker_sketch_is_the_kronecker_product(engine):
    encoder, layout = _encoder(engine, IndexConfig(compression="kronecker", dim=60))
    x = _random_vectors(layout, 1, 2)
    out = encoder.compress_whitened(layout.split(x))[0]
    compressor = encoder.compressor
    for block in layout:
        s_out, s_in = (s.double() for s in compressor.factors[block.layer])
        values = x[0, block.offset : block.offset + block.size]
        matrix = torch.kron(s_out, s_in) if block.part == "weight" else s_out
        expected = matrix @ values
        start = compressor.offsets[block.key]
        torch.testing.assert_close(out[start : start + expected.numel()], expected)


def test_fused_gaussian_sketch_matches_whiten_then_sketch(engine):
    encoder, _ = _encoder(engine, IndexConfig(compression="gaussian", dim=48))
    grads = engine.train_gradients([0, 1, 2])
    coords = encoder.rotate(grads)
    torch.testing.assert_close(
        encoder.compress(coords), encoder.compress_whitened(encoder.whiten(coords))
    )


@pytest.mark.parametrize("compression", ["countsketch", "gaussian", "kronecker"])
def test_sketches_preserve_inner_products_in_expectation(engine, compression):
    layout = CoordinateLayout(engine.curvature)
    x, y = _random_vectors(layout, 2, 3)
    x = x + 0.5 * y  # correlated: a non-zero inner product to recover
    estimates = []
    for seed in range(200):
        config = IndexConfig(compression=compression, dim=64, sketch_seed=seed)
        encoder, _ = _encoder(engine, config)
        cx, cy = encoder.compress_whitened(layout.split(torch.stack([x, y])))
        estimates.append(float(cx @ cy))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    error = float(estimates.mean() - x @ y)
    standard_error = float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(error) < 4 * standard_error
    assert float(estimates.std()) < float(x.norm() * y.norm())  # a real sketch, not noise


def test_countsketch_is_one_signed_bucket_per_coordinate(engine):
    encoder, layout = _encoder(engine, IndexConfig(compression="countsketch", dim=16))
    basis = torch.eye(layout.size, dtype=torch.float64)
    matrix = encoder.compress_whitened(layout.split(basis))
    assert ((matrix != 0).sum(1) == 1).all()
    assert set(matrix[matrix != 0].tolist()) <= {-1.0, 1.0}


# -- storage and search ---------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_integer_storage_error_is_half_a_step_and_search_is_exact(storage):
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(300, 24, generator=generator) * torch.linspace(0.1, 10, 24)
    quantizer = Quantizer.calibrate(IndexConfig(storage=storage), vectors)
    codes = quantizer.store(vectors)
    assert codes.shape == (300, 24 if storage == "int8" else 12)
    decoded = torch.from_numpy(quantizer.values(codes))
    assert ((decoded - vectors).abs() <= quantizer.scale / 2 + 1e-5).all()
    # Small query values: a search that rounded the query to integers would score 0.
    query = 1e-3 * torch.randn(3, 24, generator=generator)
    values = quantizer.values(codes)
    index = SearchIndex.build(
        IndexConfig(storage=storage), 24, 300, iter([values]), quantizer.scale_array()
    )
    scores, rows = index.search(quantizer.query(query), 5)
    brute = query.double() @ torch.from_numpy(values).double().T
    assert torch.equal(torch.from_numpy(rows), brute.topk(5, dim=1).indices)
    torch.testing.assert_close(torch.from_numpy(scores).double(), brute.topk(5, dim=1).values)


def test_fp16_overflow_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="overflow fp16"):
        Quantizer("fp16").store(torch.full((1, 4), 1e6))


def _clustered(count, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, dim, generator=generator)
    labels = torch.randint(0, 16, (count,), generator=generator)
    return (centres[labels] + 0.3 * torch.randn(count, dim, generator=generator)).numpy()


@pytest.mark.parametrize(
    ("search", "storage", "options", "minimum"),
    [
        ("ivf", "fp32", dict(nlist=8, nprobe=8), 1.0),  # every list probed: exact
        ("ivf", "int8", dict(nlist=8, nprobe=8), 1.0),
        ("hnsw", "fp32", dict(), 0.9),
        ("hnsw", "int8", dict(), 0.9),
        ("ivf", "int4", dict(nlist=8, nprobe=8), 1.0),
        ("ivfpq", "fp32", dict(nlist=4, nprobe=4, pq_bytes=8), 0.4),
    ],
)
def test_approximate_structures_against_flat(search, storage, options, minimum):
    values = _clustered(3000, 32, 0)
    queries = _clustered(20, 32, 1)
    scale = None
    if storage in ("int8", "int4"):
        quantizer = Quantizer.calibrate(IndexConfig(storage=storage), torch.from_numpy(values))
        values, scale = (
            quantizer.values(quantizer.store(torch.from_numpy(values))),
            quantizer.scale_array(),
        )
    flat = SearchIndex.build(IndexConfig(storage=storage), 32, 3000, iter([values]), scale)
    config = IndexConfig(search=search, storage=storage, **options)
    approx = SearchIndex.build(config, 32, 3000, iter(np.array_split(values, 7)), scale)
    truth = flat.search(queries, 10)[1]
    found = approx.search(queries, 10)[1]
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= minimum


def test_ivf_training_rows_are_capped_by_memory(monkeypatch):
    """A byte cap on the k-means sample (never below one row per list) keeps IVF exact when
    every list is probed, and every row is still added."""
    monkeypatch.setattr(fastinf.index.search, "_MAX_TRAIN_BYTES", 4 * 32 * 5)  # 5 rows
    values = _clustered(500, 32, 2)
    config = IndexConfig(search="ivf", storage="fp32", nlist=8, nprobe=8)
    approx = SearchIndex.build(config, 32, 500, iter(np.array_split(values, 9)))
    flat = SearchIndex.build(IndexConfig(storage="fp32"), 32, 500, iter([values]))
    assert approx.size == 500
    queries = _clustered(5, 32, 3)
    np.testing.assert_array_equal(approx.search(queries, 5)[1], flat.search(queries, 5)[1])


def test_approximate_index_is_written_and_read_back(engine, tmp_path):
    config = IndexConfig(compression="countsketch", dim=8, storage="fp16", search="hnsw")
    index = engine.build_index(tmp_path, config)
    assert (tmp_path / "search.faiss").exists()
    vectors, _ = engine.scorer.query_vectors(torch.zeros(1, 2, 5, 5, dtype=torch.float64))
    again = TrainingIndex.load(tmp_path, engine.source, engine.curvature)
    assert torch.equal(again.search(vectors, 3)[0].indices, index.search(vectors, 3)[0].indices)


def test_stored_norms_are_the_same_from_flat_and_approximate_indexes(engine, tmp_path):
    """The re-rank's ‖v_n‖: computed at load (flat) or read per row (approximate)."""
    config = IndexConfig(compression="countsketch", dim=8, storage="int4", shard_size=4)
    flat = engine.build_index(tmp_path / "flat", config, indices=[7, 1, 4, 0, 8, 3])
    hnsw = engine.build_index(
        tmp_path / "hnsw", dataclasses.replace(config, search="hnsw"), indices=[7, 1, 4, 0, 8, 3]
    )
    examples = torch.tensor([[8, 1, 7], [3, 3, 0]])
    expected = np.linalg.norm(flat.quantizer.values(flat.vectors()).astype(np.float64), axis=1)
    rows = {int(example): row for row, example in enumerate(flat.order)}
    truth = torch.tensor([[expected[rows[int(e)]] for e in line] for line in examples])
    torch.testing.assert_close(flat.norms(examples), truth)
    torch.testing.assert_close(hnsw.norms(examples), truth)


# -- errors ---------------------------------------------------------------------------------
def test_flipped_byte_in_a_shard_is_detected(engine, tmp_path):
    engine.build_index(tmp_path, EXACT)
    path = tmp_path / "shards" / "shard_00001.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match=r"shard 1 .* does not match its checksum"):
        engine.load_index(tmp_path)


def test_shard_of_another_build_is_detected(engine, tmp_path):
    engine.build_index(tmp_path / "a", EXACT)
    engine.build_index(tmp_path / "b", dataclasses.replace(EXACT, sketch_seed=1))
    for suffix in (".npy", ".json"):
        name = f"shard_00000{suffix}"
        (tmp_path / "a" / "shards" / name).write_bytes(
            (tmp_path / "b" / "shards" / name).read_bytes()
        )
    store = IndexStore(tmp_path / "a")  # as a build killed before its end leaves it
    store.write_manifest({**store.read_manifest(), "complete": False})
    with pytest.raises(ArtifactMismatchError, match="belongs to another index build"):
        engine.build_index(tmp_path / "a", EXACT)


def test_index_of_another_model_dataset_or_damping_is_rejected(fitted, engine, tmp_path):
    engine.build_index(tmp_path, EXACT)
    torch.manual_seed(1)
    other_model = InfluenceEngine(
        TinyConvEps().double(), engine.schedule, engine.train_set, config=CONFIG
    )
    other_model.curvature = engine.curvature
    with pytest.raises(ArtifactMismatchError, match=r"provenance\.model"):
        other_model.load_index(tmp_path)
    other_data = InfluenceEngine(
        engine.model, engine.schedule, random_dataset(9, (2, 5, 5), seed=5), config=CONFIG
    )
    other_data.curvature = engine.curvature
    with pytest.raises(ArtifactMismatchError, match=r"provenance\.dataset"):
        other_data.load_index(tmp_path)
    engine.config = dataclasses.replace(CONFIG, damping=0.1)
    with pytest.raises(ArtifactMismatchError, match=r"gradients\.damping"):
        engine.load_index(tmp_path)
    engine.config = CONFIG
    engine.load_index(tmp_path)
    engine.config = dataclasses.replace(CONFIG, damping_mode="relative")
    with pytest.raises(ArtifactMismatchError, match="damping_mode"):
        engine.score(fitted[1])


def test_resume_with_another_config_is_rejected_unless_overwritten(engine, tmp_path):
    engine.build_index(tmp_path, EXACT)
    other = IndexConfig(compression="countsketch", dim=8, storage="fp32", shard_size=4)
    with pytest.raises(ArtifactMismatchError, match=r"vectors\.compression"):
        engine.build_index(tmp_path, other)
    assert engine.build_index(tmp_path, other, overwrite=True).dim == 8


def test_incomplete_build_is_named_and_resumes_only_the_missing_shard(engine, tmp_path):
    complete = engine.build_index(tmp_path, EXACT).vectors()
    kept = tmp_path / "shards" / "shard_00000.npy"
    before = kept.stat().st_mtime_ns
    (tmp_path / "shards" / "shard_00001.json").unlink()
    store = IndexStore(tmp_path)  # as a build killed before its end leaves it
    store.write_manifest({**store.read_manifest(), "complete": False})
    with pytest.raises(RuntimeError, match=r"incomplete \(2 of 3 shards\)"):
        engine.load_index(tmp_path)
    resumed = engine.build_index(tmp_path, EXACT).vectors()
    assert kept.stat().st_mtime_ns == before
    np.testing.assert_array_equal(resumed, complete)


def test_missing_index_and_trak_curvature_say_what_to_do(engine, tmp_path):
    with pytest.raises(FileNotFoundError, match="fastinf index --out"):
        engine.load_index(tmp_path / "none")
    trak = engine.with_config()
    trak.fit(CurvatureConfig(strategy="trak", projection_dim=16, factor_draws=1))
    with pytest.raises(CurvatureError, match=r"needs a Kronecker eigenbasis.*'trak'.*'ekfac'"):
        trak.build_index(tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything
    with pytest.raises(ValueError, match=r"IndexConfig\.storage='int2'"):
        IndexConfig(storage="int2")


def test_default_config_fits_the_budget():
    config = IndexConfig()
    assert config.bytes_per_example(config.dim) <= 16 * 1024


def test_an_index_answers_only_for_its_own_curvature_and_draws(fitted, engine, tmp_path):
    _, queries, exact = fitted
    engine.build_index(tmp_path, EXACT)
    # Chosen examples are scored exactly even by a view whose damping the index lacks.
    view = engine.with_config(damping=CONFIG.damping * 10)
    subset = view.score(queries, k=2, indices=[0, 3, 5], return_scores=True)
    assert subset.scores.shape == (5, 3)
    with pytest.raises(ArtifactMismatchError, match="damping"):
        view.score(queries, k=2)
    # Another curvature in the engine: refused, not searched with the old vectors.
    original = engine.curvature
    engine.curvature = as_kfac(original)
    try:
        with pytest.raises(ArtifactMismatchError, match="curvature"):
            engine.score(queries, k=2)
    finally:
        engine.curvature = original
    assert torch.equal(engine.score(queries, k=3).proponents.indices, exact.proponents.indices)
    # Rebuilding without loading leaves no stale index in memory.
    engine.build_index(tmp_path / "other", EXACT, load=False)
    assert engine.index is None


def test_overwrite_deletes_only_the_index_files_and_refuses_foreign_ones(engine, tmp_path):
    engine.build_index(tmp_path, EXACT, load=False)
    (tmp_path / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"fastinf did not write \(shards/notes.txt\)"):
        engine.build_index(tmp_path, dataclasses.replace(EXACT, shard_size=3), overwrite=True)
    assert (tmp_path / "shards" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "index.json").exists()
    (tmp_path / "shards" / "notes.txt").unlink()
    rebuilt = engine.build_index(tmp_path, dataclasses.replace(EXACT, shard_size=3), overwrite=True)
    assert rebuilt.config.shard_size == 3


def test_query_caches_of_two_fits_with_one_config_are_not_mixed(fitted, engine):
    _, queries, _ = fitted
    cache = engine.prepare_queries(queries[:2])
    other = engine.with_config()
    other.fit(CurvatureConfig(factor_draws=2, eigval_draws=2), indices=[0, 1, 2, 3])
    with pytest.raises(ArtifactMismatchError, match="curvature_tensors"):
        other.score(cache, k=2)


def test_answers_report_the_first_stage_recall_measured_at_build(fitted, engine, tmp_path):
    _, queries, _ = fitted
    engine.build_index(tmp_path / "exact", EXACT)
    result = engine.score(queries, k=3)
    recall = result.search_recall
    assert recall == result.to_dict()["search_recall"]
    assert recall["pool"] == 9 and recall["k"] == 2 and recall["queries"] == 8
    assert recall["recall_at_k"] == 1.0  # uncompressed: the search ranks exactly
    coarse = IndexConfig(compression="countsketch", dim=2, storage="fp32", exact_rerank=0)
    engine.build_index(tmp_path / "coarse", dataclasses.replace(coarse, sketch_seed=3))
    assert engine.score(queries, k=3).search_recall["recall_at_k"] < 1.0
    assert engine.score(queries, k=3, indices=[0, 1, 2]).search_recall is None


def test_a_hand_edited_manifest_is_refused_and_a_rebuild_resumes(engine, tmp_path):
    built = engine.build_index(tmp_path, EXACT).vectors()
    path = tmp_path / "index.json"
    path.write_text(path.read_text().replace('"exact_rerank": 0', '"exact_rerank": 5'))
    with pytest.raises(ArtifactCorruptError, match=r"index.json was altered.*shards are kept"):
        engine.load_index(tmp_path)
    path.unlink()
    np.testing.assert_array_equal(engine.build_index(tmp_path, EXACT).vectors(), built)
