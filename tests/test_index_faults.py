"""Index across processes: 2 gloo ranks build and search like 1 process; kill -9, resume.

Run as a script, this file is the worker those tests launch:
    python tests/test_index_faults.py build CURVATURE INDEX [--slow]
    python tests/test_index_faults.py query CURVATURE INDEX OUT.json
(under `torch.distributed.run` the ranks share the build, or the search).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinf.config import CurvatureConfig, ScoreConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.distributed import init_distributed
from fastinf.engine import InfluenceEngine
from fastinf.index import IndexConfig

from tiny import TinyConvEps, random_dataset

CONFIG = ScoreConfig(train_draws=2, query_draws=2, damping=1e-3, block_size=2, batch_size=64)
INDEX = IndexConfig(
    exact_rerank=0,
    compression="hybrid",
    dim=24,
    storage="int8",
    shard_size=2,
    calibration_examples=4,
)
NUM_EXAMPLES = 12
HERE = Path(__file__).resolve().parent


class SlowDataset(torch.utils.data.Dataset):
    """The same items, one every 20 ms: a build lasts long enough to be killed mid-way."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        time.sleep(0.02)
        return self.dataset[position]


def make_engine(slow=False):
    torch.manual_seed(0)
    data = random_dataset(NUM_EXAMPLES, (2, 5, 5), seed=1)
    model = TinyConvEps().double()
    return InfluenceEngine(
        model,
        NoiseSchedule.linear(100, 1e-3, 0.2),
        SlowDataset(data) if slow else data,
        config=CONFIG,
    )


@pytest.fixture(scope="module")
def curvature_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("curvature")
    engine = make_engine()
    engine.fit(CurvatureConfig(factor_draws=1, eigval_draws=1))
    engine.save_curvature(directory)
    return directory


@pytest.fixture(scope="module")
def reference(curvature_dir, tmp_path_factory):
    """An uninterrupted one-process build."""
    directory = tmp_path_factory.mktemp("reference")
    engine = make_engine()
    engine.load_curvature(curvature_dir)
    return engine.build_index(directory, INDEX).vectors()


def _worker(*args):
    env = {**os.environ, "FASTINF_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return [sys.executable, str(HERE / "test_index_faults.py"), *map(str, args)], env


def test_two_gloo_ranks_build_the_same_index_as_one_process(curvature_dir, reference, tmp_path):
    command, env = _worker("build", curvature_dir, tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, *command[1:]], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    engine = make_engine()
    engine.load_curvature(curvature_dir)
    distributed = engine.load_index(tmp_path)
    np.testing.assert_array_equal(distributed.vectors(), reference)
    writers = {json.loads(p.read_text())["shard"] % 2 for p in (tmp_path / "shards").glob("*.json")}
    assert writers == {0, 1}


def test_build_killed_mid_way_resumes_without_missing_or_duplicated_rows(
    curvature_dir, reference, tmp_path
):
    command, env = _worker("build", curvature_dir, tmp_path, "--slow")
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    shards = tmp_path / "shards"
    deadline = time.monotonic() + 120
    while not list(shards.glob("shard_*.json")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard was finished in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in shards.glob("shard_*.json"))
    assert 1 <= len(finished) < NUM_EXAMPLES // INDEX.shard_size
    mtimes = {name: (shards / name).stat().st_mtime_ns for name in finished}

    engine = make_engine()
    engine.load_curvature(curvature_dir)
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.load_index(tmp_path)
    resumed = engine.build_index(tmp_path, INDEX)
    assert all((shards / name).stat().st_mtime_ns == mtimes[name] for name in finished)
    manifest = json.loads((tmp_path / "index.json").read_text())
    rows = [row for start, stop in manifest["completed"] for row in range(start, stop)]
    assert rows == list(range(NUM_EXAMPLES))
    assert resumed.order.tolist() == list(range(NUM_EXAMPLES))
    np.testing.assert_array_equal(resumed.vectors(), reference)
    assert not list(tmp_path.rglob("*.tmp"))


def _queries():
    return random_dataset(3, (2, 5, 5), seed=7).images


def test_two_gloo_ranks_search_their_shards_like_one_process(curvature_dir, tmp_path):
    engine = make_engine()
    engine.load_curvature(curvature_dir)
    engine.build_index(tmp_path / "index", INDEX)
    expected = engine.score(_queries(), k=4, return_scores=True)
    command, env = _worker("query", curvature_dir, tmp_path / "index", tmp_path / "out.json")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, *command[1:]], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["rows_per_rank"] == [6, 6]
    assert written["proponents"] == expected.proponents.indices.tolist()
    assert written["opponents"] == expected.opponents.indices.tolist()
    torch.testing.assert_close(
        torch.tensor(written["scores"], dtype=torch.float64), expected.scores
    )


def _worker_main(mode: str, curvature: str, directory: str, *rest: str) -> None:
    rank, world = init_distributed()
    engine = make_engine(slow="--slow" in rest)
    engine.load_curvature(curvature)
    if mode == "build":
        engine.build_index(directory, INDEX)
        return
    index = engine.load_index(directory, sharded=True)
    result = engine.score(_queries(), k=4, return_scores=True)
    rows: list = [None] * world
    torch.distributed.all_gather_object(rows, len(index.rows))
    if rank == 0:
        written = {
            "rows_per_rank": rows,
            "proponents": result.proponents.indices.tolist(),
            "opponents": result.opponents.indices.tolist(),
            "scores": result.scores.tolist(),
        }
        Path(rest[0]).write_text(json.dumps(written))


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])
