"""The vector indexes on disk, kept in step with the catalog's embedding rows.

The catalog rows are the truth; each index file is a snapshot that remembers the highest row id
it holds (``high_water``). Whoever opens an index first adds the rows written since that
snapshot, so a search always sees every committed embedding, whether or not a worker has saved
the file since. Workers save snapshots (``sync``) under a file lock; a snapshot never replaces a
newer one. ``rebuild`` starts over from the rows.

Layout: ``<data_dir>/retrieval/<model name>@<version>/{images,reports}.index`` (+ ``.json``).
One folder per model version, so embeddings of two versions never meet.
"""

from __future__ import annotations

import fcntl
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog.index_rows import IMAGE_EMBEDDING_ROWS, REPORT_EMBEDDING_ROWS, EmbeddingRows
from plugin.retrieval.index import IndexCorrupt, VectorIndex, Vectors, read_info, rebuild

logger = logging.getLogger(__name__)

# A worker saves a large index at most this often: a snapshot of a million vectors is half a
# gigabyte, and the rows it would add are in the catalog anyway (read back on open).
SAVE_INTERVAL_S = 60.0
ALWAYS_SAVE_BELOW = 100_000
CATCH_UP_BATCH = 5_000
# Row ids are handed out at insert but committed in any order (PostgreSQL), so a row may become
# visible after one with a higher id. Catching up re-reads this many ids below the high-water
# mark and skips those already held; a row committed later than that waits for a rebuild.
COMMIT_LAG_IDS = 1_024


class Kind(StrEnum):
    IMAGES = "images"
    REPORTS = "reports"


_ROWS: dict[Kind, EmbeddingRows] = {
    Kind.IMAGES: IMAGE_EMBEDDING_ROWS,
    Kind.REPORTS: REPORT_EMBEDDING_ROWS,
}


def model_folder(model_ref: str) -> str:
    """A folder name for a model version that cannot climb out of the retrieval folder."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", model_ref).lstrip(".") or "_"


class Owners:
    """Catalog row id -> study id for every entry of an index, so that filters and grouping
    by study need no query per hit. Two int64 arrays, kept sorted by row id."""

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype=np.int64)
        self._studies = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[int, int]] = []

    def add(self, key: int, study: int) -> None:
        self._pending.append((key, study))

    def __len__(self) -> int:
        self._merge()
        return len(self._keys)

    def study_of(self, key: int) -> int | None:
        self._merge()
        at = int(np.searchsorted(self._keys, key))
        if at < len(self._keys) and self._keys[at] == key:
            return int(self._studies[at])
        return None

    def _merge(self) -> None:
        if not self._pending:
            return
        new = np.array(self._pending, dtype=np.int64).reshape(-1, 2)
        self._pending = []
        keys = np.concatenate([self._keys, new[:, 0]])
        studies = np.concatenate([self._studies, new[:, 1]])
        # A stable sort keeps the latest of a repeated key last; then keep one per key.
        order = np.argsort(keys, kind="stable")
        keys, studies = keys[order], studies[order]
        last = np.append(keys[1:] != keys[:-1], True)
        self._keys, self._studies = keys[last], studies[last]


class IndexStore:
    """Open indexes of this process, caught up with the catalog before every use."""

    def __init__(self, root: Path, sessions: sessionmaker[Session]) -> None:
        self.root = root
        self.sessions = sessions
        self._open: dict[tuple[Kind, str], VectorIndex] = {}
        self._owners: dict[tuple[Kind, str], Owners] = {}
        self._saved_at: dict[tuple[Kind, str], float] = {}
        self._lock = threading.Lock()

    def path(self, kind: Kind, model_ref: str) -> Path:
        return self.root / model_folder(model_ref) / f"{kind.value}.index"

    def current(self, kind: Kind, model_ref: str, dim: int) -> VectorIndex:
        """The index holding every committed embedding row of that kind and model version."""
        with self._lock:
            index = self._open.get((kind, model_ref))
            if index is None:
                owners = self._owners[(kind, model_ref)] = Owners()
                index = self._load(kind, model_ref, dim, owners)
                self._open[(kind, model_ref)] = index
            self._catch_up(index, kind, self._owners[(kind, model_ref)])
            return index

    def owners(self, kind: Kind, model_ref: str) -> Owners:
        """Row id -> study id of the entries of an index ``current`` returned."""
        return self._owners[(kind, model_ref)]

    def sync(self, kind: Kind, model_ref: str, dim: int, *, force: bool = False) -> VectorIndex:
        """Catch up with the catalog and save the snapshot when the file on disk is behind."""
        index = self.current(kind, model_ref, dim)
        key = (kind, model_ref)
        recently = time.monotonic() - self._saved_at.get(key, 0.0) < SAVE_INTERVAL_S
        if not force and len(index) >= ALWAYS_SAVE_BELOW and recently:
            return index
        with self._lock, _file_lock(index.path.parent):
            if _saved_high_water(index.path) < index.high_water:
                index.save()
            self._saved_at[key] = time.monotonic()
        return index

    def rebuild(self, kind: Kind, model_ref: str, dim: int) -> VectorIndex:
        """A fresh index from every catalog row of that model version, saved and used."""
        path = self.path(kind, model_ref)
        with self._lock, _file_lock(path.parent):
            owners = Owners()
            rows = self._rows(kind, model_ref, after=-1, owners=owners)
            index = rebuild(path, dim, model_ref, rows)
            self._open[(kind, model_ref)] = index
            self._owners[(kind, model_ref)] = owners
            self._saved_at[(kind, model_ref)] = time.monotonic()
            return index

    def _load(self, kind: Kind, model_ref: str, dim: int, owners: Owners) -> VectorIndex:
        path = self.path(kind, model_ref)
        if not path.exists():
            return VectorIndex.create(dim, model_ref, path)
        try:
            index = VectorIndex.open(path, model_ref)
        except IndexCorrupt as exc:
            # The rows are the truth: a damaged snapshot costs a rebuild, not an outage.
            logger.warning("%s; rebuilding it from the catalog", exc)
            with _file_lock(path.parent):
                rows = self._rows(kind, model_ref, after=-1, owners=owners)
                return rebuild(path, dim, model_ref, rows)
        self._read_owners(kind, model_ref, index.high_water, owners)
        return index

    def _read_owners(self, kind: Kind, model_ref: str, upto: int, owners: Owners) -> None:
        with self.sessions() as session:
            for key, study in _ROWS[kind].owners(
                session, model_ref, upto=upto, batch=CATCH_UP_BATCH
            ):
                owners.add(key, study)

    def _catch_up(self, index: VectorIndex, kind: Kind, owners: Owners) -> None:
        held = set(index.recent_keys(2 * COMMIT_LAG_IDS).tolist())
        after = max(-1, index.high_water - COMMIT_LAG_IDS)
        batch_keys: list[int] = []
        batch_vectors: list[Vectors] = []
        for key, vector in self._rows(kind, index.model_ref, after=after, owners=owners):
            if key in held:
                continue
            batch_keys.append(key)
            batch_vectors.append(vector)
            if len(batch_keys) == CATCH_UP_BATCH:
                index.add(np.array(batch_keys, dtype=np.int64), np.stack(batch_vectors))
                batch_keys, batch_vectors = [], []
        if batch_keys:
            index.add(np.array(batch_keys, dtype=np.int64), np.stack(batch_vectors))

    def _rows(
        self, kind: Kind, model_ref: str, *, after: int, owners: Owners
    ) -> Iterator[tuple[int, Vectors]]:
        with self.sessions() as session:
            for key, study, blob in _ROWS[kind].after(
                session, model_ref, after=after, batch=CATCH_UP_BATCH
            ):
                owners.add(key, study)
                yield key, np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _saved_high_water(path: Path) -> int:
    try:
        return read_info(path).high_water
    except IndexCorrupt:
        return -2  # nothing usable on disk: any snapshot is newer


@contextmanager
def _file_lock(folder: Path) -> Iterator[None]:
    """One writer per index folder across processes (prefork workers, the CLI, the API)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
