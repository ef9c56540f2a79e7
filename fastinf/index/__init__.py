"""A persistent index of the training set (DESIGN §2 step 3b): every train gradient computed
once, whitened so that the EK-FAC score is an inner product, compressed, stored in shards,
and searched with faiss.

    from fastinf.index import IndexConfig
    engine.build_index("index/", IndexConfig())   # or `fastinf index --out index/`
    engine.load_index("index/")                   # engine.score / topk_influencers use it

`COMPRESSORS` names the compressions an `IndexConfig` can ask for. Modules, in the order of
the flow: `config` (IndexConfig), `compress` and `encode` (gradients → index vectors →
stored values), `store` (files on disk), `identity` (what an index was built for), `build`
(stream the training set into shards), `search` (faiss structures), `twostage` (large N:
sketches give candidates, stored vectors rank them), `index` (a loaded index: search),
`scorer` (queries → search → bounded exact re-rank).
"""

from ..lazy import lazy_exports

# Public name → the module defining it, imported on first use (`fastinf.index.config` is
# read by the command line's parser without loading torch or faiss).
_EXPORTS = {
    "COMPRESSORS": "compress",
    "IndexConfig": "config",
    "IndexScorer": "scorer",
    "TrainingIndex": "index",
    "build_index": "build",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
