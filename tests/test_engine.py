"""Engine API: bad input errors, artifacts (save/load, mismatches, corruption), public API."""

import dataclasses

import pytest
import torch

import fastinf
from fastinf.artifacts import ArtifactCorruptError, ArtifactMismatchError
from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.queries import QueryCache

from tiny import TinyConvEps, random_dataset, undocumented

CONFIG = ScoreConfig(train_draws=2, query_draws=2, damping=1e-3)


@pytest.fixture
def engine():
    torch.manual_seed(0)
    engine = InfluenceEngine(
        TinyConvEps().double(),
        NoiseSchedule.linear(50),
        random_dataset(5, (2, 5, 5)),
        config=CONFIG,
    )
    engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))
    return engine


def test_public_api_is_pinned():
    assert sorted(fastinf.__all__) == sorted(
        [
            "ArtifactCorruptError",
            "ArtifactMismatchError",
            "CurvatureConfig",
            "CurvatureError",
            "InfluenceEngine",
            "InfluenceResult",
            "NoiseSchedule",
            "QueryCache",
            "ScoreConfig",
            "TopK",
            "topk_influencers",
        ]
    )
    assert undocumented(fastinf) == []


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        (torch.zeros(2, 3, 5, 5, dtype=torch.float64), "channel"),
        (torch.zeros(2, 2, 4, 5, dtype=torch.float64), "height"),
        (torch.zeros(2, 2, 5, 5, dtype=torch.int64), "floating"),
        (torch.zeros(5, 5, dtype=torch.float64), "dim"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_queries_raise_clear_errors(engine, queries, message):
    with pytest.raises(ValueError, match=message):
        engine.score(queries)


def test_nan_pixels_are_named(engine):
    queries = torch.zeros(3, 2, 5, 5, dtype=torch.float64)
    queries[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        engine.score(queries)


def test_nan_training_example_is_named_with_its_index():
    images = random_dataset(4, (2, 5, 5)).images.clone()
    images[2, 1, 0, 0] = float("inf")

    class Raw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return images[i], -1

    engine = InfluenceEngine(TinyConvEps().double(), NoiseSchedule.linear(50), Raw(), config=CONFIG)
    engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1), indices=[0, 1, 3])
    with pytest.raises(ValueError, match=r"training examples \[2\] contain NaN/Inf"):
        engine.score(torch.zeros(1, 2, 5, 5, dtype=torch.float64))


def test_score_without_curvature_says_how_to_fix():
    engine = InfluenceEngine(
        TinyConvEps().double(), NoiseSchedule.linear(50), random_dataset(3, (2, 5, 5))
    )
    with pytest.raises(RuntimeError, match=r"engine.fit\(\)"):
        engine.score(torch.zeros(1, 2, 5, 5, dtype=torch.float64))


def test_curvature_roundtrip_gives_identical_scores(engine, tmp_path):
    queries = random_dataset(2, (2, 5, 5), seed=3).images
    before = engine.score(queries, return_scores=True).scores
    engine.save_curvature(tmp_path)
    engine.curvature = None
    engine.load_curvature(tmp_path)
    # Saved tensors are contiguous copies: BLAS may round differently, nothing more.
    torch.testing.assert_close(
        engine.score(queries, return_scores=True).scores, before, rtol=1e-12, atol=0
    )


def test_curvature_of_another_model_or_dataset_is_rejected(engine, tmp_path):
    engine.save_curvature(tmp_path)
    torch.manual_seed(1)
    other_model = InfluenceEngine(TinyConvEps().double(), engine.schedule, engine.train_set)
    with pytest.raises(ArtifactMismatchError, match="model="):
        other_model.load_curvature(tmp_path)
    other_data = InfluenceEngine(
        engine.model, engine.schedule, random_dataset(5, (2, 5, 5), seed=9)
    )
    with pytest.raises(ArtifactMismatchError, match="dataset="):
        other_data.load_curvature(tmp_path)


def test_corrupted_curvature_is_detected(engine, tmp_path):
    engine.save_curvature(tmp_path)
    path = tmp_path / "curvature.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match="checksum"):
        engine.load_curvature(tmp_path)
    (tmp_path / "curvature.json").write_text("{not json")
    with pytest.raises(ArtifactCorruptError, match="not valid JSON"):
        engine.load_curvature(tmp_path)
    with pytest.raises(FileNotFoundError, match="no curvature artifact"):
        engine.load_curvature(tmp_path / "missing")


def test_query_cache_roundtrip_and_mismatch(engine, tmp_path):
    queries = random_dataset(3, (2, 5, 5), seed=3).images
    cache = engine.prepare_queries(queries)
    cache.save(tmp_path)
    loaded = QueryCache.load(tmp_path, engine.query_meta())
    assert torch.equal(
        engine.score(loaded, return_scores=True).scores,
        engine.score(cache, return_scores=True).scores,
    )
    engine.config = dataclasses.replace(CONFIG, damping=1.0)
    with pytest.raises(ArtifactMismatchError, match="score_config"):
        QueryCache.load(tmp_path, engine.query_meta())
    with pytest.raises(ArtifactMismatchError, match="score_config"):
        engine.score(loaded)


def test_config_validation_names_value_and_fix():
    with pytest.raises(ValueError, match=r"strategy='eigen' is not one of"):
        CurvatureConfig(strategy="eigen")
    with pytest.raises(ValueError, match="train_draws=0 must be a positive integer"):
        ScoreConfig(train_draws=0)
    with pytest.raises(ValueError, match="damping"):
        ScoreConfig(damping=-1.0)
    with pytest.raises(ValueError, match="timestep_loss' needs t_min"):
        InfluenceEngine(
            TinyConvEps().double(),
            NoiseSchedule.linear(50),
            random_dataset(3, (2, 5, 5)),
            config=ScoreConfig(measurement="timestep_loss"),
        ).query_gradients(torch.zeros(1, 2, 5, 5, dtype=torch.float64))


def test_score_matrices_match_score_and_split_over_draw_ranges(engine):
    """Several caches (two dampings) scored in one pass equal separate `score` calls, and
    draw ranges averaged by their draw counts reproduce the K-draw scores."""
    queries = torch.rand(
        3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    stiff = engine.with_config(damping=1.0, train_draws=4)
    grads = stiff.query_gradients(queries)
    ids = stiff.query_ids(queries)
    caches = [
        stiff.precondition_queries(grads, ids),
        engine.with_config(train_draws=4).precondition_queries(grads, ids),
    ]
    joint = stiff.score_matrices(caches)
    for cache, matrix in zip(caches, joint, strict=True):
        view = stiff.with_config(damping=cache.meta["score_config"]["damping"])
        expected = view.score(cache, k=2, return_scores=True).scores
        torch.testing.assert_close(matrix, expected, rtol=1e-10, atol=1e-12)
    first = stiff.score_matrices(caches, num_draws=1)
    rest = stiff.score_matrices(caches, draw_offset=1, num_draws=3)
    for whole, head, tail in zip(joint, first, rest, strict=True):
        torch.testing.assert_close((head + 3 * tail) / 4, whole, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(joint[0], joint[1])
    assert engine.config.damping == CONFIG.damping
