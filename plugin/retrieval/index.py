"""Vector index over image/report embeddings of one model version, for similar-case retrieval.

Pure of any database: the catalog's embedding rows are the source of truth and the caller feeds
them in (``add``, ``remove``, ``rebuild``); this module only keeps the search structure and its
two files on disk:

- ``path``: an uncompressed ``.npz`` with the catalog keys by position (-1 once removed), the
  float32 vectors, and, for large indexes, the serialised FAISS product-quantisation codes.
- ``path`` + ``.json``: a sidecar naming dim, model_ref, count, the highest key ever added,
  metric, library and format, so an index of another model version or dimension is refused
  before it is loaded.

Search is exact (one matrix product) below ``exact_threshold`` vectors. Above it, a FAISS
``IndexPQFastScan`` (4-bit codes, two dimensions per sub-quantiser) scans every vector in a few
milliseconds and proposes ``refine_factor * k`` candidates, which are re-ranked exactly with
the float32 vectors. Embeddings are L2-normalised, so the inner product is the cosine.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
from numpy.typing import NDArray

from plugin.durable import write_durably
from plugin.errors import PacsclipError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
METRIC = "inner_product"
LIBRARY = "faiss"
STRUCTURE = "pq-fastscan-4bit+exact-refine"
# Below this many vectors a brute-force matrix product on one core is about as fast as the
# quantised scan (20,000 x 128 in ~0.4 ms) and exact.
DEFAULT_EXACT_THRESHOLD = 20_000
# Product quantisation needs enough vectors to learn its 16 centroids per sub-quantiser
# (FAISS warns below 39 per centroid); fewer than this stay exact whatever the threshold.
MIN_TRAIN_VECTORS = 1_024
TRAIN_SAMPLE = 65_536
# Candidates re-ranked exactly per wanted hit. Measured on random unit vectors (the hardest
# case, no cluster structure), 1,000,000 x 128: recall@10 0.924 / 0.969 / 0.992 at 16 / 32 / 64,
# p99 2.5-2.9 ms on one core (docs/retrieval.md, tests/benchmarks/retrieval.py).
DEFAULT_REFINE_FACTOR = 64
# A filtered search widens its candidate list by this factor each round until k allowed hits
# are found; once a round would cover 1/EXACT_CROSSOVER of the index, it scans exactly.
OVERFETCH = 4
EXACT_CROSSOVER = 16
REBUILD_BATCH = 10_000
# A vector whose norm is this far from 1 was not normalised upstream: a pipeline bug.
NORM_TOLERANCE = 1e-2

Vectors = NDArray[np.float32]
Keys = NDArray[np.int64]


class RetrievalError(PacsclipError):
    """Base class of the vector index's errors."""


class IndexMismatch(RetrievalError):
    """Model version or dimension of the embeddings differs from the index's."""


class IndexCorrupt(RetrievalError):
    """The index files are missing, unreadable or inconsistent: rebuild from the catalog."""


class InvalidVector(RetrievalError):
    """An embedding that is not finite and L2-normalised."""


class Hit(NamedTuple):
    key: int
    similarity: float


@dataclass(frozen=True)
class IndexInfo:
    """The sidecar: what an index holds, readable without loading the index."""

    dim: int
    model_ref: str
    count: int
    high_water: int = -1  # the highest key ever added: the catalog rows after it are new
    metric: str = METRIC
    library: str = LIBRARY
    library_version: str = faiss.__version__
    structure: str = STRUCTURE
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> IndexInfo:
        try:
            raw = json.loads(data)
            info = cls(**raw)
        except (ValueError, TypeError) as exc:
            raise IndexCorrupt(f"unreadable index sidecar {where}: {exc}") from exc
        if info.format != FORMAT_VERSION or info.library != LIBRARY or info.metric != METRIC:
            raise IndexCorrupt(
                f"index {where} is format {info.format}, {info.library}, {info.metric}; this "
                f"version reads format {FORMAT_VERSION}, {LIBRARY}, {METRIC}: rebuild it"
            )
        return info


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


@dataclass
class _Acceptor:
    """The caller's ``allowed`` filter, asked at most once per key across over-fetch rounds."""

    allowed: Callable[[int], bool] | None
    seen: dict[int, bool] = field(default_factory=dict)

    def __call__(self, key: int) -> bool:
        if self.allowed is None:
            return True
        if key not in self.seen:
            self.seen[key] = bool(self.allowed(key))
        return self.seen[key]


class VectorIndex:
    """Nearest-neighbour index of L2-normalised float32 embeddings of one model version.

    Not safe for concurrent writers: one process owns the file and writes it (``save``).
    """

    def __init__(
        self,
        path: Path,
        info: IndexInfo,
        ids: Keys,
        vectors: Vectors,
        coarse: faiss.IndexPQFastScan | None = None,
        *,
        exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
        refine_factor: int = DEFAULT_REFINE_FACTOR,
    ) -> None:
        self.path = path
        self.dim = info.dim
        self.model_ref = info.model_ref
        self.high_water = info.high_water
        self.exact_threshold = exact_threshold
        self.refine_factor = refine_factor
        self._n = len(ids)
        # Grown by doubling so that one-at-a-time adds from the worker stay amortised O(1).
        self._ids = np.array(ids, dtype=np.int64)
        self._vectors = np.array(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._coarse = coarse
        self._removed = int(np.count_nonzero(self._ids < 0))

    # -- construction and persistence ------------------------------------------------------

    @classmethod
    def create(
        cls,
        dim: int,
        model_ref: str,
        path: Path,
        *,
        exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
        refine_factor: int = DEFAULT_REFINE_FACTOR,
    ) -> VectorIndex:
        """An empty index; nothing is written until ``save`` (which replaces any file there)."""
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        if not model_ref:
            raise ValueError("model_ref must name the model version of the embeddings")
        info = IndexInfo(dim=dim, model_ref=model_ref, count=0)
        empty = np.empty((0, dim), dtype=np.float32)
        return cls(
            path,
            info,
            np.empty(0, dtype=np.int64),
            empty,
            exact_threshold=exact_threshold,
            refine_factor=refine_factor,
        )

    @classmethod
    def open(
        cls,
        path: Path,
        model_ref: str | None = None,
        *,
        exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
        refine_factor: int = DEFAULT_REFINE_FACTOR,
    ) -> VectorIndex:
        """Load a saved index; refuse it when it holds another model version than ``model_ref``."""
        info = read_info(path)
        if model_ref is not None and info.model_ref != model_ref:
            raise IndexMismatch(
                f"index {path} holds embeddings of model {info.model_ref!r}, not {model_ref!r}; "
                "build an index for this model (pacsclip index rebuild)"
            )
        ids, vectors, coarse = _read_arrays(path, info.dim)
        opened = cls(
            path,
            info,
            ids,
            vectors,
            coarse,
            exact_threshold=exact_threshold,
            refine_factor=refine_factor,
        )
        if len(opened) != info.count:
            # Both files are replaced atomically, but one after the other: a crash between
            # the two renames leaves a complete index and a sidecar with the previous count.
            logger.warning(
                "index %s holds %d vectors, its sidecar says %d (interrupted save)",
                path,
                len(opened),
                info.count,
            )
        return opened

    def save(self) -> None:
        """Write the index, then its sidecar, each atomically (temp file, fsync, rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        coarse = (
            faiss.serialize_index(self._coarse)
            if self._coarse is not None
            else np.empty(0, dtype=np.uint8)
        )
        np.savez(buffer, ids=self._ids[: self._n], vectors=self._vectors[: self._n], coarse=coarse)
        write_durably(self.path, buffer.getvalue(), self.path.parent)
        write_durably(sidecar_path(self.path), self.info().to_json(), self.path.parent)

    def info(self) -> IndexInfo:
        return IndexInfo(
            dim=self.dim, model_ref=self.model_ref, count=len(self), high_water=self.high_water
        )

    # -- updates ---------------------------------------------------------------------------

    def add(self, keys: Keys, vectors: Vectors, *, model_ref: str | None = None) -> None:
        """Add embeddings under their catalog keys; a key already present is replaced."""
        self._check_model(model_ref)
        keys = _as_keys(keys)
        matrix = self._as_matrix(vectors)
        if len(keys) != len(matrix):
            raise ValueError(f"{len(keys)} keys for {len(matrix)} vectors")
        if len(keys) == 0:
            return
        keys, matrix = _last_of_each_key(keys, matrix)
        self._tombstone(keys)
        self._append(keys, matrix)
        self.high_water = max(self.high_water, int(keys.max()))
        if self._coarse is not None:
            self._coarse.add(matrix)
        elif self._wants_coarse():
            self._train_coarse()

    def remove(self, keys: Keys) -> int:
        """Remove keys (absent ones are ignored); returns how many were present."""
        return self._tombstone(_as_keys(keys))

    def keys(self) -> Keys:
        """The keys present, for reconciling the index with the catalog."""
        ids = self._ids[: self._n]
        return ids[ids >= 0].copy()

    def recent_keys(self, count: int) -> Keys:
        """The keys of the last ``count`` entries added (for catching up with the catalog)."""
        return self._ids[max(0, self._n - count) : self._n].copy()

    def __len__(self) -> int:
        return self._n - self._removed

    @property
    def removed(self) -> int:
        """Entries removed or replaced but still stored; a rebuild drops them."""
        return self._removed

    @property
    def approximate(self) -> bool:
        """Whether searches go through the quantised scan (else every search is exact)."""
        return self._coarse is not None and len(self) >= self.exact_threshold

    # -- search ----------------------------------------------------------------------------

    def search(
        self,
        vector: Vectors,
        k: int,
        *,
        allowed: Callable[[int], bool] | None = None,
        model_ref: str | None = None,
    ) -> list[Hit]:
        """The k most similar entries to one query ([D] or [1, D]), best first.

        ``allowed`` is the caller's metadata filter (modality, site, date, findings): the
        index over-fetches until it has k allowed hits or has looked at every entry.
        """
        self._check_model(model_ref)
        query = self._as_matrix(vector)
        if len(query) != 1:
            raise ValueError(f"search takes one query, got {len(query)}: use search_batch")
        if k <= 0 or len(self) == 0:
            return []
        accept = _Acceptor(allowed)
        if self.approximate:
            return self._search_coarse(query, k, accept)
        return self._search_exact(query[0], k, accept)

    def search_batch(
        self,
        queries: Vectors,
        k: int,
        *,
        allowed: Callable[[int], bool] | None = None,
        model_ref: str | None = None,
    ) -> list[list[Hit]]:
        """``search`` for each row of a [Q, D] matrix."""
        matrix = self._as_matrix(queries)
        return [self.search(row, k, allowed=allowed, model_ref=model_ref) for row in matrix]

    def _search_coarse(self, query: Vectors, k: int, accept: _Acceptor) -> list[Hit]:
        assert self._coarse is not None
        fetch = k * self.refine_factor
        if accept.allowed is not None or self._removed > 0:
            fetch *= OVERFETCH
        while fetch * EXACT_CROSSOVER < self._n:
            # One thread: waking a second OpenMP thread for one query costs a scheduler
            # slice (~10 ms) on a busy host, more than the whole scan.
            faiss.omp_set_num_threads(1)
            _, positions = self._coarse.search(query, fetch)
            found = positions[0][positions[0] >= 0]  # -1 pads a short answer
            sims = self._vectors[found] @ query[0]
            order = np.argsort(-sims, kind="stable")
            hits = _take(self._ids[found[order]], sims[order], k, accept)
            if len(hits) == k:
                return hits
            fetch *= OVERFETCH
        return self._search_exact(query[0], k, accept)

    def _search_exact(self, query: Vectors, k: int, accept: _Acceptor) -> list[Hit]:
        ids = self._ids[: self._n]
        sims = self._vectors[: self._n] @ query
        sims[ids < 0] = -np.inf
        if accept.allowed is None:
            # Unfiltered: only the top k matter; a partial sort of all of them is wasted.
            top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
            order = top[np.argsort(-sims[top], kind="stable")]
        else:
            order = np.argsort(-sims, kind="stable")
        return _take(ids[order], sims[order], k, accept)

    # -- internals -------------------------------------------------------------------------

    def _append(self, keys: Keys, matrix: Vectors) -> None:
        needed = self._n + len(keys)
        if needed > len(self._ids):
            capacity = max(needed, 2 * len(self._ids), 64)
            ids = np.full(capacity, -1, dtype=np.int64)
            ids[: self._n] = self._ids[: self._n]
            vectors = np.zeros((capacity, self.dim), dtype=np.float32)
            vectors[: self._n] = self._vectors[: self._n]
            self._ids, self._vectors = ids, vectors
        self._ids[self._n : needed] = keys
        self._vectors[self._n : needed] = matrix
        self._n = needed

    def _wants_coarse(self) -> bool:
        return len(self) >= max(self.exact_threshold, MIN_TRAIN_VECTORS)

    def _train_coarse(self) -> None:
        """Learn the product quantiser on (a sample of) the stored vectors, then code them all.

        Later additions are coded with these centroids; a rebuild learns them afresh.
        """
        subquantisers = self.dim // 2 if self.dim % 2 == 0 else self.dim
        coarse = faiss.IndexPQFastScan(self.dim, subquantisers, 4, faiss.METRIC_INNER_PRODUCT)
        live = np.flatnonzero(self._ids[: self._n] >= 0)
        rng = np.random.default_rng(0)
        sample = live if len(live) <= TRAIN_SAMPLE else rng.choice(live, TRAIN_SAMPLE, False)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        coarse.train(np.ascontiguousarray(self._vectors[np.sort(sample)]))
        # Removed entries are coded too: positions in the codes must match positions here.
        coarse.add(np.ascontiguousarray(self._vectors[: self._n]))
        self._coarse = coarse

    def _tombstone(self, keys: Keys) -> int:
        # Entries keep their position (the quantised codes are positional); the key becomes
        # -1, which every search skips. `pacsclip index rebuild` compacts.
        if len(keys) == 0 or len(self) == 0:
            return 0
        ids = self._ids[: self._n]
        hit = np.isin(ids, keys)
        ids[hit] = -1
        removed = int(np.count_nonzero(hit))
        self._removed += removed
        return removed

    def _check_model(self, model_ref: str | None) -> None:
        if model_ref is not None and model_ref != self.model_ref:
            raise IndexMismatch(
                f"embeddings of model {model_ref!r} cannot go into or query the index of "
                f"model {self.model_ref!r}"
            )

    def _as_matrix(self, vectors: Vectors) -> Vectors:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise IndexMismatch(
                f"vectors of shape {np.shape(vectors)} do not fit the {self.dim}-dimensional "
                f"index of model {self.model_ref!r}"
            )
        return _checked_unit(matrix)


def read_info(path: Path) -> IndexInfo:
    """The sidecar of the index at ``path``."""
    where = sidecar_path(path)
    try:
        data = where.read_bytes()
    except FileNotFoundError as exc:
        raise IndexCorrupt(f"no index at {path}: build it (pacsclip index rebuild)") from exc
    return IndexInfo.from_json(data, where)


def rebuild(
    path: Path,
    dim: int,
    model_ref: str,
    rows: Iterable[tuple[int, Vectors]],
    *,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    refine_factor: int = DEFAULT_REFINE_FACTOR,
) -> VectorIndex:
    """A fresh index from the catalog's (key, embedding) rows, saved over ``path``.

    The quantiser is trained once on all the rows. The old files serve searches until the new
    index replaces them in one rename.
    """
    index = VectorIndex.create(
        dim, model_ref, path, exact_threshold=exact_threshold, refine_factor=refine_factor
    )
    # Stay exact while loading so the quantiser learns from every row, not the first batch.
    index.exact_threshold = np.iinfo(np.int64).max
    for batch in _batches(rows, REBUILD_BATCH):
        keys = np.fromiter((key for key, _ in batch), dtype=np.int64, count=len(batch))
        index.add(keys, np.stack([np.asarray(vector) for _, vector in batch]))
    index.exact_threshold = exact_threshold
    if index._wants_coarse():
        index._train_coarse()
    index.save()
    return index


def _batches(rows: Iterable[tuple[int, Vectors]], size: int) -> Iterator[list[Any]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


def _read_arrays(path: Path, dim: int) -> tuple[Keys, Vectors, faiss.IndexPQFastScan | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, vectors, coarse_bytes = data["ids"], data["vectors"], data["coarse"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise IndexCorrupt(f"unreadable index file {path}: rebuild it ({exc})") from exc
    if vectors.ndim != 2 or vectors.shape[1] != dim or len(ids) != len(vectors):
        raise IndexCorrupt(f"index file {path} does not match its sidecar ({dim} dims): rebuild it")
    coarse: faiss.IndexPQFastScan | None = None
    if len(coarse_bytes):
        loaded = faiss.downcast_index(faiss.deserialize_index(coarse_bytes))
        if not isinstance(loaded, faiss.IndexPQFastScan) or loaded.ntotal != len(ids):
            raise IndexCorrupt(f"index file {path} has inconsistent codes: rebuild it")
        coarse = loaded
    return ids.astype(np.int64), vectors.astype(np.float32), coarse


def _as_keys(keys: Keys) -> Keys:
    array = np.asarray(keys)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"keys must be a 1-D integer array, got {array.dtype} {array.shape}")
    # -1 marks a removed entry, so catalog keys must be non-negative.
    if len(array) and int(array.min()) < 0:
        raise ValueError("keys must be non-negative catalog ids")
    return array.astype(np.int64, copy=False)


def _checked_unit(matrix: Vectors) -> Vectors:
    if not np.all(np.isfinite(matrix)):
        raise InvalidVector("embedding contains NaN or infinity")
    norms = np.linalg.norm(matrix, axis=1)
    if np.any(np.abs(norms - 1.0) > NORM_TOLERANCE):
        raise InvalidVector("embeddings must be L2-normalised (similarity is the inner product)")
    # FAISS reads the buffer directly: it must be contiguous float32.
    return np.ascontiguousarray(matrix)


def _last_of_each_key(keys: Keys, matrix: Vectors) -> tuple[Keys, Vectors]:
    """Within one batch a repeated key keeps its last vector, as if added one by one."""
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    if len(first_in_reversed) == len(keys):
        return keys, matrix
    keep = np.sort(len(keys) - 1 - first_in_reversed)
    return keys[keep], np.ascontiguousarray(matrix[keep])


def _take(ids: Keys, sims: Vectors, k: int, accept: _Acceptor) -> list[Hit]:
    """The first k allowed entries of a best-first candidate list (-1: removed or padding)."""
    hits: list[Hit] = []
    for key, similarity in zip(ids.tolist(), sims.tolist(), strict=True):
        if key < 0 or not accept(key):
            continue
        hits.append(Hit(key, similarity))
        if len(hits) == k:
            break
    return hits
