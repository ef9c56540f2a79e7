"""Index builds across processes: 2 gloo ranks = 1 process; kill -9, then resume.

Run as a script, this file is the worker those tests launch:
    python tests/test_index_faults.py build CURVATURE INDEX [--slow]
(under `torch.distributed.run` the ranks share the build).
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
from fastinf.engine import InfluenceEngine
from fastinf.index import IndexConfig, init_distributed

from tiny import TinyConvEps, random_dataset

CONFIG = ScoreConfig(train_draws=2, query_draws=2, damping=1e-3, block_size=2, batch_size=64)
INDEX = IndexConfig(
    compression="hybrid", dim=24, storage="int8", shard_size=2, calibration_examples=4
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


def _build_worker(curvature: str, directory: str, slow: bool) -> None:
    init_distributed()
    engine = make_engine(slow=slow)
    engine.load_curvature(curvature)
    engine.build_index(directory, INDEX)


if __name__ == "__main__":
    _build_worker(sys.argv[2], sys.argv[3], "--slow" in sys.argv)
