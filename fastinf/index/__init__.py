"""A persistent index of the training set (DESIGN §2 step 3b): every train gradient computed
once, whitened so that the EK-FAC score is an inner product, compressed, stored in shards,
and searched with faiss.

    from fastinf.index import IndexConfig
    engine.build_index("index/", IndexConfig())   # or `fastinf index --out index/`
    engine.load_index("index/")                   # engine.score / topk_influencers use it
"""

from .build import build_index, init_distributed
from .compress import COMPRESSORS
from .config import IndexConfig
from .index import TrainingIndex

__all__ = ["COMPRESSORS", "IndexConfig", "TrainingIndex", "build_index", "init_distributed"]
