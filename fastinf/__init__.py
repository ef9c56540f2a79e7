"""fastinf: which training images made a diffusion model generate this image?

EK-FAC influence functions for diffusion models (DESIGN §1). Start with
`topk_influencers(query)` on the embedded digits default, or build an `InfluenceEngine`
for your own model, noise schedule and training set.
"""

from .lazy import lazy_exports

# Public name → the module defining it. Imported on first use, so that `fastinf --help` and
# the command line's argument errors answer without loading torch.
_EXPORTS = {
    "ArtifactCorruptError": "artifacts",
    "ArtifactMismatchError": "artifacts",
    "CurvatureConfig": "config",
    "CurvatureError": "curvature",
    "InfluenceEngine": "engine",
    "InfluenceResult": "scoring",
    "NoiseSchedule": "diffusion",
    "QueryCache": "queries",
    "ScoreConfig": "config",
    "TopK": "scoring",
    "topk_influencers": "engine",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
