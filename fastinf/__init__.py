"""fastinf: which training images made a diffusion model generate this image?

EK-FAC influence functions for diffusion models (DESIGN §1). Start with
`topk_influencers(query)` on the embedded digits default, or build an `InfluenceEngine`
for your own model, noise schedule and training set.
"""

from .artifacts import ArtifactCorruptError, ArtifactMismatchError
from .config import CurvatureConfig, ScoreConfig
from .curvature import CurvatureError
from .diffusion import NoiseSchedule
from .engine import InfluenceEngine, topk_influencers
from .queries import QueryCache
from .scoring import InfluenceResult, TopK

__all__ = [
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
