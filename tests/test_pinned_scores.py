"""Scores of the digits default pinned from before the pipeline redesign (commit 1dfea92).

The refactor into a gradient source, curvature strategies, a query preparer and scorers
had to leave every score bit-identical; this test keeps it so. It scores two noisy digits
against 40 training images with each curvature strategy fitted on 96 examples, and
compares a few score columns, the first two proponents and opponents, and EK-FAC
self-influence with the values computed before the change. The tolerance (1e-3 of the
largest score) covers BLAS summation order across machines and thread counts (measured:
≤ 4e-4 between 1 and 2 threads); any change in draws, damping, preconditioning or
contraction moves these scores by far more.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from fastinf import CurvatureConfig, InfluenceEngine, ScoreConfig
from fastinf.data import load_digits_dataset
from fastinf.models import default_schedule, load_digits_model

COLUMNS = [0, 1, 7, 16, 22, 39]
TOLERANCE = 1e-3


class Pinned(NamedTuple):
    columns: tuple[tuple[float, ...], tuple[float, ...]]  # scores [2, len(COLUMNS)]
    proponents: list[list[int]]  # first two per query
    opponents: list[list[int]]


PINNED = {
    "ekfac": Pinned(
        columns=(
            (
                0.2276082061289344,
                33.40463138651103,
                3.9268581635551527,
                19.540288059040904,
                12.450239240657538,
                -11.017108609434217,
            ),
            (
                -0.13600319609395228,
                -4.491133299423382,
                10.657578856436885,
                -11.107490901602432,
                37.91179574280977,
                -0.023556602420285344,
            ),
        ),
        proponents=[[1, 16], [11, 21]],
        opponents=[[19, 12], [19, 16]],
    ),
    "kfac": Pinned(
        columns=(
            (
                0.022426038107369095,
                56.50026696268469,
                7.558924553915858,
                36.742670856649056,
                30.08926247805357,
                -17.20769403828308,
            ),
            (
                0.012833462475100532,
                -17.32759821973741,
                19.459693285170943,
                -17.72838391875848,
                68.34050604980439,
                -2.521174609195441,
            ),
        ),
        proponents=[[1, 16], [11, 21]],
        opponents=[[19, 12], [19, 16]],
    ),
    "identity": Pinned(
        columns=(
            (
                0.04698562799380035,
                0.2105787826882306,
                0.11679740793933036,
                -0.02538039183486518,
                0.23572513970739806,
                -0.01385317677644693,
            ),
            (
                -0.011761727027199242,
                -0.05409548615838844,
                -0.016897216002377036,
                -0.0317679343873607,
                -0.030552837385258158,
                0.02422413683475355,
            ),
        ),
        proponents=[[12, 22], [28, 30]],
        opponents=[[32, 30], [1, 23]],
    ),
    "trak": Pinned(
        columns=(
            (
                1.8271930309856543,
                12.728823924204335,
                -9.655126467579976,
                21.849273229483515,
                -13.441708687343635,
                -2.172598439923604,
            ),
            (
                -3.095261377398856,
                -3.1468445919454098,
                11.770508437650278,
                -14.673814216512255,
                -0.19229826983064413,
                1.7031024938332848,
            ),
        ),
        proponents=[[16, 19], [28, 23]],
        opponents=[[23, 2], [10, 35]],
    ),
}
SELF_INFLUENCE = (
    19.443306154354058,
    3164.9989641314246,
    844.8294312353655,
    0.4255100918312074,
    3274.8372917178585,
)


@pytest.fixture(scope="module")
def digits():
    data = load_digits_dataset()
    engine = InfluenceEngine(
        load_digits_model(),
        default_schedule(),
        data,
        config=ScoreConfig(train_draws=4, query_draws=8, damping=0.1),
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([data[1000][0], data[1500][0]])
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    queries = (images.double() + 0.1 * noise).float().clamp(-1, 1)
    return engine, queries


def _fit(engine, strategy):
    config = CurvatureConfig(strategy, factor_draws=1, eigval_draws=1, projection_dim=256)
    return engine.fit(config, indices=list(range(96)))


@pytest.mark.parametrize("strategy", list(PINNED))
def test_scores_match_the_values_pinned_before_the_redesign(digits, strategy):
    engine, queries = digits
    _fit(engine, strategy)
    result = engine.score(queries, 3, indices=list(range(40)), return_scores=True)
    pinned = PINNED[strategy]
    expected = torch.tensor(pinned.columns, dtype=torch.float64)
    scale = float(result.scores.abs().max())
    torch.testing.assert_close(
        result.scores[:, list(COLUMNS)], expected, rtol=0, atol=TOLERANCE * scale
    )
    assert result.proponents.indices[:, :2].tolist() == pinned.proponents
    assert result.opponents.indices[:, :2].tolist() == pinned.opponents


def test_self_influence_matches_the_values_pinned_before_the_redesign(digits):
    engine, _ = digits
    _fit(engine, "ekfac")
    values = engine.self_influence(list(range(5)))
    expected = torch.tensor(SELF_INFLUENCE, dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=TOLERANCE, atol=0)
