"""fastinf: which training images made a diffusion model generate this image?

EK-FAC influence functions for diffusion models (DESIGN §1). Start with
`topk_influencers(query)` on the embedded digits default, or build an `InfluenceEngine`
for your own model, noise schedule and training set.
"""

import importlib

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
