"""Two-stage search (search="twostage"): sketches give candidates, stored vectors rank them.

Oracles: with every row a candidate the lists are the flat search's, bit for bit; with
fewer, every answer is the top-k by stored score of exactly the candidate rows that a
brute-force search over the stored sketches names; a build resumes and refuses other
first-stage settings.
"""

import dataclasses

import numpy as np
import pytest
import torch

from fastinf.artifacts import ArtifactCorruptError, ArtifactMismatchError
from fastinf.cli import build_parser
from fastinf.config import CurvatureConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.index import IndexConfig
from fastinf.index.store import IndexStore
from fastinf.index.twostage import FirstStageProjection, principal_directions

from tiny import SMALL_SCORE, TinyConvEps, random_dataset

NUM_EXAMPLES = 23
# 63 int4 values: an odd vector, whose last byte holds a padding nibble.
FLAT = IndexConfig(
    compression="countsketch",
    dim=63,
    storage="int4",
    shard_size=5,
    calibration_examples=8,
    exact_rerank=0,
)
TWOSTAGE = dataclasses.replace(
    FLAT, search="twostage", first_stage_dim=8, first_stage_candidates=NUM_EXAMPLES
)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    engine = InfluenceEngine(
        TinyConvEps().double(),
        NoiseSchedule.linear(100, 1e-3, 0.2),
        random_dataset(NUM_EXAMPLES, (2, 5, 5), seed=1),
        config=SMALL_SCORE,
    )
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    queries = random_dataset(6, (2, 5, 5), seed=7).images
    return engine, queries


@pytest.fixture
def engine(fitted):
    engine = fitted[0]
    yield engine
    engine.unload_index()


def _vectors(engine, queries):
    return engine.scorer.query_vectors(queries)[0]


def _same(found, expected):
    for part, truth in zip(found, expected, strict=True):
        assert torch.equal(part.indices, truth.indices)
        assert torch.equal(part.scores, truth.scores)


@pytest.mark.parametrize(
    "options",
    [
        dict(first_stage_search="flat"),
        dict(first_stage_search="hnsw", first_stage_projection="countsketch"),
        dict(first_stage_search="ivf", nlist=3, nprobe=3),
    ],
)
def test_every_row_a_candidate_is_the_flat_search(fitted, engine, tmp_path, options):
    _, queries = fitted
    flat = engine.build_index(tmp_path / "flat", FLAT)
    vectors = _vectors(engine, queries)
    expected = flat.search(vectors, 4)
    twostage = engine.build_index(tmp_path / "two", dataclasses.replace(TWOSTAGE, **options))
    assert not hasattr(flat, "two_stage") and twostage.two_stage.size == NUM_EXAMPLES
    _same(twostage.search(vectors, 4), expected)
    _same(twostage.search(vectors, 4, candidates=10 * NUM_EXAMPLES), expected)
    np.testing.assert_array_equal(twostage.vectors(), flat.vectors())  # the same codes


def _sketch_candidates(index, vectors, count):
    """Brute force over the stored sketches: rows of the top-`count` ⟨±s_q, s_n⟩."""
    store, config = index.store, index.config
    sketches = np.concatenate(
        [store.open_sketches(r, config.first_stage_dim) for r in index.manifest["shards"]]
    ).astype(np.float64)
    projected = index.two_stage.projection.project(index.quantizer.query(vectors))
    scores = projected.astype(np.float64) @ sketches.T
    return [np.argsort(-sign * scores, axis=1, kind="stable")[:, :count] for sign in (1, -1)]


@pytest.mark.parametrize("count", [1, 3, 6])
def test_fewer_candidates_rank_exactly_the_candidates_named_by_the_sketches(
    fitted, engine, tmp_path, count
):
    _, queries = fitted
    config = dataclasses.replace(TWOSTAGE, first_stage_search="flat")
    index = engine.build_index(tmp_path, config)
    vectors = _vectors(engine, queries)
    exact = index.scores(vectors)  # ⟨q, stored vector⟩ of every row, float64
    k = 2
    proponents, opponents = index.search(vectors, k, candidates=count)
    plus, minus = _sketch_candidates(index, vectors, max(count, k))
    rows = {int(example): row for row, example in enumerate(index.order)}
    for query in range(len(queries)):
        union = sorted(set(plus[query]) | set(minus[query]))
        scores = exact[query, union]
        for part, sign in ((proponents, 1.0), (opponents, -1.0)):
            found = [rows[int(e)] for e in part.indices[query]]
            truth = [union[i] for i in torch.argsort(sign * scores, descending=True)[:k]]
            assert found == truth
            torch.testing.assert_close(
                part.scores[query], exact[query, found], rtol=1e-5, atol=1e-6
            )
    # Fewer candidates than rows: some query misses a flat top-k member (else the test
    # would not tell the two searches apart).
    if count == 1:
        flat = index.scores(vectors).topk(k, dim=1).indices
        listed = torch.tensor([[rows[int(e)] for e in line] for line in proponents.indices])
        assert not torch.equal(listed.sort(1).values, flat.sort(1).values)


def test_bounded_rerank_over_a_twostage_index_matches_the_flat_index(fitted, engine, tmp_path):
    _, queries = fitted
    rerank = dict(exact_rerank=8, rerank_sigmas=1.0)
    engine.build_index(tmp_path / "flat", dataclasses.replace(FLAT, **rerank))
    expected = engine.score(queries, k=3)
    engine.build_index(tmp_path / "two", dataclasses.replace(TWOSTAGE, **rerank))
    result = engine.score(queries, k=3)
    for part, truth in (
        (result.proponents, expected.proponents),
        (result.opponents, expected.opponents),
    ):
        assert torch.equal(part.indices, truth.indices)
        assert torch.equal(part.exact, truth.exact)
        torch.testing.assert_close(part.scores, truth.scores)


def test_sketches_are_the_projection_of_the_stored_vectors(engine, tmp_path):
    index = engine.build_index(tmp_path, TWOSTAGE)
    projection = index.two_stage.projection
    assert projection.scale == 2.0 ** round(np.log2(projection.scale))  # a power of two
    stored = index.quantizer.values(index.vectors())
    for record in index.manifest["shards"]:
        sketches = index.store.open_sketches(record, TWOSTAGE.first_stage_dim)
        assert sketches.dtype == np.float16
        rows = stored[record["start"] : record["stop"]]
        np.testing.assert_array_equal(sketches, projection.project(rows).astype(np.float16))
    # pca: the leading uncentred principal directions of every stored vector (the fitted
    # sample is all 23 examples here), as numpy's SVD finds them.
    directions = np.linalg.svd(stored.astype(np.float64), full_matrices=False)[2][:8]
    overlap = projection.basis.double().numpy() @ directions.T
    np.testing.assert_allclose(np.abs(overlap), np.eye(8), atol=1e-4)


def test_countsketch_sketches_hash_each_stored_value_into_one_signed_bucket(engine, tmp_path):
    config = dataclasses.replace(TWOSTAGE, first_stage_projection="countsketch")
    projection = engine.build_index(tmp_path, config).two_stage.projection
    matrix = projection.project(np.eye(FLAT.dim, dtype=np.float32)) / projection.scale
    assert ((matrix != 0).sum(1) == 1).all()
    np.testing.assert_array_equal(
        matrix[np.arange(FLAT.dim), projection.bucket.numpy()], projection.sign.numpy()
    )


def test_principal_directions_beyond_the_rank_are_zero():
    generator = np.random.default_rng(0)
    values = generator.standard_normal((3, 10)).astype(np.float32)
    basis = principal_directions(values, 5).double().numpy()
    np.testing.assert_allclose(basis[:3] @ basis[:3].T, np.eye(3), atol=1e-6)
    assert not basis[3:].any()
    # The 3 directions span the vectors: projecting keeps every inner product.
    np.testing.assert_allclose(
        (values @ basis.T) @ (values @ basis.T).T, values @ values.T, rtol=1e-5
    )


def test_a_resumed_build_keeps_finished_shards_and_recomputes_a_missing_sketch(engine, tmp_path):
    engine.build_index(tmp_path, TWOSTAGE, load=False)
    store = IndexStore(tmp_path)
    manifest = store.read_manifest()
    before = {r["shard"]: store.open_sketches(r, 8).copy() for r in manifest["shards"]}
    kept = store.shard_path(0).stat().st_mtime_ns
    store.sketch_path(2).unlink()  # as a build killed between a shard and its sketches
    (tmp_path / "shards" / "shard_00003.json").unlink()
    store.write_manifest({**manifest, "complete": False})
    with pytest.raises(RuntimeError, match=r"incomplete \(3 of 5 shards\)"):
        engine.load_index(tmp_path)
    resumed = engine.build_index(tmp_path, TWOSTAGE)
    assert store.shard_path(0).stat().st_mtime_ns == kept
    for record in resumed.manifest["shards"]:
        np.testing.assert_array_equal(store.open_sketches(record, 8), before[record["shard"]])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(first_stage_dim=4), r"vectors\.first_stage_dim"),
        (dict(first_stage_projection="countsketch"), r"vectors\.first_stage_projection"),
        (dict(first_stage_fit=12), r"vectors\.first_stage_fit"),
        (dict(search="flat"), r"vectors\.first_stage_dim"),
    ],
)
def test_resuming_with_other_first_stage_settings_is_refused(engine, tmp_path, change, field):
    engine.build_index(tmp_path, TWOSTAGE, load=False)
    with pytest.raises(ArtifactMismatchError, match=field):
        engine.build_index(tmp_path, dataclasses.replace(TWOSTAGE, **change))
    # Search-time settings are not part of the stored vectors: a resume takes them.
    again = engine.build_index(tmp_path, dataclasses.replace(TWOSTAGE, first_stage_candidates=3))
    assert again.config.first_stage_candidates == 3


def test_a_flat_build_is_not_resumed_as_twostage(engine, tmp_path):
    engine.build_index(tmp_path, FLAT, load=False)
    with pytest.raises(ArtifactMismatchError, match=r"vectors\.first_stage_dim"):
        engine.build_index(tmp_path, TWOSTAGE)


def test_a_loaded_index_with_other_sketches_or_structure_is_refused(engine, tmp_path):
    config = dataclasses.replace(TWOSTAGE, first_stage_projection="countsketch")
    engine.build_index(tmp_path / "a", config, load=False)
    engine.build_index(tmp_path / "b", dataclasses.replace(config, first_stage_dim=4))
    # Another build's first-stage structure in its place: the checksum names it.
    (tmp_path / "a" / "search.faiss").write_bytes((tmp_path / "b" / "search.faiss").read_bytes())
    with pytest.raises(ArtifactCorruptError, match="search structure"):
        engine.load_index(tmp_path / "a")
    engine.build_index(tmp_path / "a", config, overwrite=True, load=False)
    store = IndexStore(tmp_path / "a")
    # A manifest whose config asks for other sketches than its shards hold.
    manifest = store.read_manifest()
    edited = {**manifest, "config": {**manifest["config"], "first_stage_dim": 4}}
    edited["vectors"] = {**manifest["vectors"], "first_stage_dim": 4}
    edited["first_stage"] = {
        **manifest["first_stage"],
        "projection": FirstStageProjection(IndexConfig(**edited["config"]), 63).fingerprint(),
    }
    store.write_manifest(edited)
    with pytest.raises(ArtifactMismatchError, match="first_stage_dim=4"):
        engine.load_index(tmp_path / "a")
    # Other random numbers than the build's (another torch version): named, not used.
    store.write_manifest(
        {**manifest, "first_stage": {**manifest["first_stage"], "projection": "0"}}
    )
    with pytest.raises(ArtifactMismatchError, match="another torch version"):
        engine.load_index(tmp_path / "a")
    # A damaged sketch file.
    store.write_manifest(manifest)
    path = store.sketch_path(1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match=r"sketches of shard 1 .* checksum"):
        engine.load_index(tmp_path / "a")


def test_invalid_first_stage_settings_name_the_fix(engine, tmp_path):
    with pytest.raises(ValueError, match=r"first_stage_search='ivfpq'"):
        IndexConfig(search="twostage", first_stage_search="ivfpq")
    with pytest.raises(ValueError, match=r"first_stage_candidates=0"):
        IndexConfig(first_stage_candidates=0)
    with pytest.raises(ValueError, match=r"first_stage_dim=63 is not below the 63 values"):
        engine.build_index(tmp_path, dataclasses.replace(TWOSTAGE, first_stage_dim=63))
    few = dataclasses.replace(TWOSTAGE, first_stage_dim=20, first_stage_fit=16)
    with pytest.raises(ValueError, match=r"need at least 20 fitted examples.*only 16"):
        engine.build_index(tmp_path, few)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # refused before writing
    with pytest.raises(ValueError, match="has no first stage"):
        FLAT.first_stage_config()


def test_the_index_command_takes_the_first_stage_options():
    command = ["index", "--curvature", "c", "--out", "o", "--search", "twostage"]
    command += ["--first-stage-dim", "256", "--first-stage-search", "ivf"]
    command += ["--first-stage-candidates", "300", "--first-stage-projection", "countsketch"]
    command += ["--first-stage-fit", "2000", "--first-stage-ef-search", "5000"]
    args = build_parser().parse_args(command)
    assert (args.search, args.first_stage_dim, args.first_stage_search) == ("twostage", 256, "ivf")
    assert (args.first_stage_candidates, args.first_stage_projection) == (300, "countsketch")
    assert (args.first_stage_fit, args.first_stage_ef_search) == (2000, 5000)
    defaults = build_parser().parse_args(["index", "--curvature", "c", "--out", "o"])
    assert defaults.first_stage_dim == IndexConfig.first_stage_dim
    assert defaults.first_stage_candidates == IndexConfig.first_stage_candidates
