"""A persistent index of the training set (DESIGN §2 step 3b): every train gradient computed
once, whitened so that the EK-FAC score is an inner product, compressed, stored in shards,
and searched with faiss.

    from fastinf.index import IndexConfig
    engine.build_index("index/", IndexConfig())   # or `fastinf index --out index/`
    engine.load_index("index/")                   # engine.score / topk_influencers use it

`COMPRESSORS` names the compressions an `IndexConfig` can ask for. Modules, in the order of
the flow: `config` (IndexConfig), `compress` and `encode` (gradients → index vectors →
stored values), `store` (files on disk), `identity` (what an index was built for), `build`
(stream the training set into shards), `index` (a loaded index: search), `scorer`
(queries → search → bounded exact re-rank).
"""

from .build import build_index
from .compress import COMPRESSORS
from .config import IndexConfig
from .index import TrainingIndex
from .scorer import IndexScorer

__all__ = ["COMPRESSORS", "IndexConfig", "IndexScorer", "TrainingIndex", "build_index"]
