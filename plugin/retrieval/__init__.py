"""Similar-case retrieval: the vector index over embeddings of one model version."""

from plugin.retrieval.index import (
    Hit,
    IndexCorrupt,
    IndexInfo,
    IndexMismatch,
    InvalidVector,
    RetrievalError,
    VectorIndex,
    read_info,
    rebuild,
)

__all__ = [
    "Hit",
    "IndexCorrupt",
    "IndexInfo",
    "IndexMismatch",
    "InvalidVector",
    "RetrievalError",
    "VectorIndex",
    "read_info",
    "rebuild",
]
