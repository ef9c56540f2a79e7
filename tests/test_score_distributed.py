"""Exact scoring across processes: 2 gloo ranks share the pass over the training set and
every rank returns what one process returns (top-k lists, full score matrices, ties), and
`fastinf topk` under them writes the one-process JSON.

Run as a script, this file is the worker the test launches under `torch.distributed.run`:
    python tests/test_score_distributed.py CURVATURES OUT_DIR [FASTINF TOPK OPTIONS...]
Each rank saves its results to OUT_DIR/rank<r>.pt; rank 0 writes OUT_DIR/topk.json.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_multinode import one_thread, write_shared_files

from fastinf.cli import main
from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.distributed import init_distributed
from fastinf.engine import InfluenceEngine
from fastinf.queries import QueryPreparer
from fastinf.scoring import ExactScorer

from tiny import LinearEps, TinyConvEps, random_dataset

# 11 examples in blocks of 2: rank 0 scores positions {0,1,4,5,8,9}, rank 1 {2,3,6,7,10}.
CONFIG = ScoreConfig(train_draws=2, query_draws=2, damping=1e-3, block_size=2, batch_size=64)
NUM_EXAMPLES = 11
PERMUTED = [9, 2, 7, 0, 5, 10, 3]  # chosen examples in a scoring order of their own
CHOSEN = [8, 3, 6]  # scored by one rank alone
SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.2)
HERE = Path(__file__).resolve().parent
TIMEOUT_S = 240


class Recording(torch.utils.data.Dataset):
    """The same items; remembers which positions were read."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, set()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        self.read.add(int(position))
        return self.dataset[position]


def make_engine() -> InfluenceEngine:
    torch.manual_seed(0)
    data = Recording(random_dataset(NUM_EXAMPLES, (2, 5, 5), seed=1))
    return InfluenceEngine(TinyConvEps().double(), SCHEDULE, data, config=CONFIG)


def make_zero_engine() -> InfluenceEngine:
    """ε̂ = 0·x_t measured by `square_norm`: every query gradient, hence every τ, is exactly
    0, so the top-k lists are decided by the tie rule alone."""
    model = LinearEps((1, 2, 2)).double()
    torch.nn.init.zeros_(model.linear.weight)
    config = ScoreConfig(
        train_draws=1, query_draws=1, measurement="square_norm", block_size=2, batch_size=64
    )
    data = random_dataset(NUM_EXAMPLES, (1, 2, 2), seed=3)
    return InfluenceEngine(model, SCHEDULE, data, config=config)


def queries():
    return random_dataset(3, (2, 5, 5), seed=7).images


def results(engine: InfluenceEngine, zero: InfluenceEngine, rank: int) -> dict:
    """Everything compared between one process and each rank of two."""
    engine.train_set.read.clear()
    full = engine.score(queries(), k=4, return_scores=True)
    read = sorted(engine.train_set.read)
    chosen = engine.score(queries(), k=3, indices=PERMUTED, return_scores=True)
    caches = [
        engine.prepare_queries(queries()[:2]),
        engine.with_config(damping=0.1).prepare_queries(queries()),
    ]
    matrices = engine.score_matrices(caches, indices=PERMUTED)
    ties = zero.score(random_dataset(2, (1, 2, 2), seed=4).images, k=5, return_scores=True)
    out = {
        "read": read,
        "matrices": matrices,
        **{f"full_{key}": value for key, value in _flat(full).items()},
        **{f"chosen_{key}": value for key, value in _flat(chosen).items()},
        **{f"ties_{key}": value for key, value in _flat(ties).items()},
    }
    if rank == 1:  # not a collective: rank 0 is not there to take part
        exact = ExactScorer(engine.source, QueryPreparer(engine.source, engine.curvature))
        out["alone"] = exact.scores(caches[0], CHOSEN)
    return out


def _flat(result) -> dict:
    return {
        "proponents": result.proponents.indices,
        "proponent_scores": result.proponents.scores,
        "opponents": result.opponents.indices,
        "opponent_scores": result.opponents.scores,
        "scores": result.scores,
    }


@pytest.fixture(scope="module")
def curvatures(tmp_path_factory):
    directory = tmp_path_factory.mktemp("curvatures")
    for name, engine in (("conv", make_engine()), ("zero", make_zero_engine())):
        engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))
        engine.save_curvature(directory / name)
    return directory


@pytest.fixture(scope="module")
def topk_command(tmp_path_factory):
    """`fastinf topk` (exact) of generated queries on tiny files, scored in blocks of 2."""
    common = write_shared_files(tmp_path_factory.mktemp("shared"))
    options = ["--train-draws", "2", "--query-draws", "2", "--block-size", "2", "--k", "3"]
    return ["topk", *common, *options, "--generate", "2"]


def _launch(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run a torchrun launch to its end; past TIMEOUT_S stop it (the agent stops its
    workers on SIGTERM) and fail."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"the 2-rank run did not finish in {TIMEOUT_S}s:\n{output[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output)


def test_two_gloo_ranks_share_the_pass_and_return_the_one_process_result(
    curvatures, topk_command, tmp_path
):
    engine, zero = make_engine(), make_zero_engine()
    engine.load_curvature(curvatures / "conv")
    zero.load_curvature(curvatures / "zero")
    expected = results(engine, zero, rank=1)

    env = {**os.environ, "FASTINF_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    worker = [str(HERE / "test_score_distributed.py"), str(curvatures), str(tmp_path)]
    worker += topk_command
    done = _launch([*launcher, *worker], env)
    assert done.returncode == 0, done.stdout[-3000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    # The work was shared: each rank read its own blocks, and together all of them.
    assert ranks[0]["read"] == [0, 1, 4, 5, 8, 9]
    assert ranks[1]["read"] == [2, 3, 6, 7, 10]
    assert expected["read"] == list(range(NUM_EXAMPLES))
    # Ties go to the lower dataset index, whichever rank scored it.
    assert bool((expected["ties_scores"] == 0).all())
    assert expected["ties_proponents"].tolist() == [list(range(5))] * 2
    for got in ranks:
        for key, value in expected.items():
            if key == "read" or (key == "alone" and got is ranks[0]):
                continue
            if key == "matrices":
                assert len(got[key]) == len(value)
                for mine, theirs in zip(got[key], value, strict=True):
                    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-15)
            elif value.dtype == torch.int64:
                assert torch.equal(got[key], value), key
            else:
                torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-15, msg=key)
    # `fastinf topk` under the 2 ranks: rank 0 writes the JSON one process writes.
    with one_thread():  # as each rank runs (OMP_NUM_THREADS=1): the same float32 sums
        assert main([*topk_command, "--out", str(tmp_path / "alone.json")]) == 0
    assert (tmp_path / "topk.json").read_text() == (tmp_path / "alone.json").read_text()
    assert "alone" not in ranks[0] and "alone" in ranks[1]
    for got in ranks:
        assert "the 2 ranks disagree on queries:" in got["disagree"]


def _worker_main(curvatures: str, out: str, *topk: str) -> None:
    rank, world = init_distributed()
    assert world == 2
    engine, zero = make_engine(), make_zero_engine()
    engine.load_curvature(Path(curvatures) / "conv")
    zero.load_curvature(Path(curvatures) / "zero")
    found = results(engine, zero, rank)
    try:  # rank 1 asks about other queries: both ranks must refuse, neither wait
        engine.score(queries()[: 3 - rank], k=2)
    except ValueError as error:
        found["disagree"] = str(error)
    torch.save(found, Path(out) / f"rank{rank}.pt")
    assert main([*topk, "--out", str(Path(out) / "topk.json")]) == 0


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])
