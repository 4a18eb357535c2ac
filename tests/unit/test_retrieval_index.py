from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from plugin.retrieval import (
    IndexCorrupt,
    IndexMismatch,
    InvalidVector,
    VectorIndex,
    read_info,
    rebuild,
)
from plugin.retrieval.index import DEFAULT_EXACT_THRESHOLD

MODEL = "pacsclip-demo@1"
DIM = 32
# exact_threshold=0 turns the quantised scan on from MIN_TRAIN_VECTORS vectors; the default
# keeps small indexes exact.
APPROXIMATE = 0
EXACT = DEFAULT_EXACT_THRESHOLD


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def near(vector: NDArray[np.float32], seed: int = 99) -> NDArray[np.float32]:
    """The vector with tiny noise: what a re-acquired or re-processed image looks like."""
    noisy = vector + 0.01 * np.random.default_rng(seed).standard_normal(vector.shape)
    return (noisy / np.linalg.norm(noisy)).astype(np.float32)


def exact_top(
    keys: NDArray[np.int64], vectors: NDArray[np.float32], query: NDArray[np.float32], k: int
) -> list[int]:
    order = np.argsort(-(vectors @ query), kind="stable")[:k]
    return [int(key) for key in keys[order]]


def filled(
    path: Path, n: int = 2_000, *, exact_threshold: int = EXACT, seed: int = 0
) -> tuple[VectorIndex, NDArray[np.int64], NDArray[np.float32]]:
    # Catalog row ids are sparse and arbitrary, not positions.
    keys = np.arange(n, dtype=np.int64) * 7 + 1_000
    vectors = unit_vectors(n, seed=seed)
    index = VectorIndex.create(DIM, MODEL, path, exact_threshold=exact_threshold)
    index.add(keys, vectors)
    return index, keys, vectors


@pytest.mark.parametrize("threshold", [EXACT, APPROXIMATE], ids=["exact", "approximate"])
def test_near_duplicate_is_found_first(tmp_path: Path, threshold: int) -> None:
    index, keys, vectors = filled(tmp_path / "i.faiss", exact_threshold=threshold)

    for row in (0, 777, 1_999):
        hits = index.search(near(vectors[row]), 5)

        assert hits[0].key == keys[row]
        assert hits[0].similarity > 0.99 > hits[1].similarity
        assert [hit.similarity for hit in hits] == sorted(
            (hit.similarity for hit in hits), reverse=True
        )


def test_exact_search_below_threshold_equals_brute_force(tmp_path: Path) -> None:
    index, keys, vectors = filled(tmp_path / "i.faiss", n=500)
    query = unit_vectors(1, seed=5)[0]

    hits = index.search(query, 10)

    assert [hit.key for hit in hits] == exact_top(keys, vectors, query, 10)
    assert hits[0].similarity == pytest.approx(float(np.max(vectors @ query)), abs=1e-5)


@pytest.mark.parametrize("threshold", [EXACT, APPROXIMATE], ids=["exact", "approximate"])
def test_filter_rejecting_most_keys_still_returns_k(tmp_path: Path, threshold: int) -> None:
    index, keys, vectors = filled(tmp_path / "i.faiss", n=3_000, exact_threshold=threshold)
    # 1 key in 50 passes (say: same modality, site and date range), far fewer than one
    # over-fetch round brings back.
    allowed_keys = set(keys[::50].tolist())
    asked: Counter[int] = Counter()

    def allowed(key: int) -> bool:
        asked[key] += 1
        return key in allowed_keys

    query = unit_vectors(1, seed=3)[0]
    hits = index.search(query, 10, allowed=allowed)

    assert len(hits) == 10
    assert all(hit.key in allowed_keys for hit in hits)
    mask = np.isin(keys, list(allowed_keys))
    assert [hit.key for hit in hits] == exact_top(keys[mask], vectors[mask], query, 10)
    assert max(asked.values()) == 1  # the caller's filter (a catalog lookup) runs once per key


@pytest.mark.parametrize("threshold", [EXACT, APPROXIMATE], ids=["exact", "approximate"])
def test_filter_with_fewer_matches_than_k_returns_all_of_them(
    tmp_path: Path, threshold: int
) -> None:
    index, keys, _ = filled(tmp_path / "i.faiss", exact_threshold=threshold)
    wanted = {int(keys[3]), int(keys[1_500])}

    hits = index.search(unit_vectors(1, seed=4)[0], 10, allowed=lambda key: key in wanted)

    assert {hit.key for hit in hits} == wanted


@pytest.mark.parametrize("threshold", [EXACT, APPROXIMATE], ids=["exact", "approximate"])
def test_index_survives_restart_and_matches_rebuild(tmp_path: Path, threshold: int) -> None:
    path = tmp_path / "catalog" / "retrieval" / "demo.faiss"
    index, keys, vectors = filled(path, exact_threshold=threshold)
    index.remove(keys[:10])
    queries = unit_vectors(20, seed=8)
    before = index.search_batch(queries, 10)
    index.save()

    reopened = VectorIndex.open(path, MODEL, exact_threshold=threshold)
    rebuilt = rebuild(
        tmp_path / "rebuilt.faiss",
        DIM,
        MODEL,
        zip(keys[10:].tolist(), vectors[10:], strict=True),
        exact_threshold=threshold,
    )

    assert len(reopened) == len(rebuilt) == len(keys) - 10
    assert reopened.search_batch(queries, 10) == before
    assert [[h.key for h in hits] for hits in rebuilt.search_batch(queries, 10)] == [
        [h.key for h in hits] for hits in before
    ]
    assert sorted(reopened.keys().tolist()) == sorted(keys[10:].tolist())
    assert VectorIndex.open(rebuilt.path, MODEL).search(vectors[500], 1)[0].key == keys[500]


def test_sidecar_describes_the_index_and_no_temp_files_remain(tmp_path: Path) -> None:
    path = tmp_path / "demo.faiss"
    index, _, _ = filled(path, n=100)
    index.save()

    info = read_info(path)

    assert (info.dim, info.model_ref, info.count, info.metric, info.library) == (
        DIM,
        MODEL,
        100,
        "inner_product",
        "faiss",
    )
    assert info.library_version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.faiss", "demo.faiss.json"]


def test_other_model_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "demo.faiss"
    index, keys, vectors = filled(path, n=100)
    index.save()

    with pytest.raises(IndexMismatch, match="pacsclip-demo@1"):
        VectorIndex.open(path, "pacsclip-demo@2")
    with pytest.raises(IndexMismatch):
        index.add(keys[:1] + 1, vectors[:1], model_ref="pacsclip-demo@2")
    with pytest.raises(IndexMismatch):
        index.search(vectors[0], 3, model_ref="pacsclip-demo@2")
    assert len(index) == 100
    assert index.search(vectors[0], 1, model_ref=MODEL)[0].key == keys[0]


def test_wrong_dimension_is_refused(tmp_path: Path) -> None:
    index, _, _ = filled(tmp_path / "i.faiss", n=100)
    other = unit_vectors(2, dim=DIM * 2)

    with pytest.raises(IndexMismatch, match="32-dimensional"):
        index.add(np.array([1, 2]), other)
    with pytest.raises(IndexMismatch):
        index.search(other[0], 3)
    assert len(index) == 100


def test_index_file_that_disagrees_with_sidecar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "demo.faiss"
    index, _, _ = filled(path, n=10)
    index.save()
    other = VectorIndex.create(DIM * 2, MODEL, tmp_path / "other.faiss")
    other.save()
    (tmp_path / "other.faiss").replace(path)

    with pytest.raises(IndexCorrupt, match="rebuild"):
        VectorIndex.open(path, MODEL)


def test_missing_index_is_reported(tmp_path: Path) -> None:
    with pytest.raises(IndexCorrupt, match="pacsclip index rebuild"):
        VectorIndex.open(tmp_path / "none.faiss")


@pytest.mark.parametrize("threshold", [EXACT, APPROXIMATE], ids=["exact", "approximate"])
def test_empty_index_answers_with_empty_list(tmp_path: Path, threshold: int) -> None:
    path = tmp_path / "demo.faiss"
    index = VectorIndex.create(DIM, MODEL, path, exact_threshold=threshold)
    query = unit_vectors(1)[0]

    assert index.search(query, 10) == []
    index.save()
    assert VectorIndex.open(path, MODEL).search(query, 10, allowed=lambda key: True) == []
    index.add(np.array([5]), query[None, :])
    index.remove(np.array([5]))
    assert len(index) == 0
    assert index.search(query, 10) == []


@pytest.mark.parametrize("threshold", [EXACT, APPROXIMATE], ids=["exact", "approximate"])
def test_remove_and_replace(tmp_path: Path, threshold: int) -> None:
    index, keys, vectors = filled(tmp_path / "i.faiss", exact_threshold=threshold)

    assert index.remove(np.array([keys[0], 123_456_789])) == 1
    assert index.remove(keys[:1]) == 0
    assert len(index) == len(keys) - 1
    assert keys[0] not in {hit.key for hit in index.search(vectors[0], 20)}

    # Re-adding a key replaces its vector: the old one is no longer found under it.
    replacement = unit_vectors(1, seed=77)[0]
    index.add(keys[1:2], replacement[None, :])
    assert len(index) == len(keys) - 1
    assert index.removed == 2
    assert index.search(vectors[1], 1)[0].key != keys[1]
    [hit] = index.search(replacement, 1)
    assert hit.key == keys[1]
    assert hit.similarity == pytest.approx(1.0, abs=1e-5)


def test_repeated_key_in_one_batch_keeps_the_last_vector(tmp_path: Path) -> None:
    index = VectorIndex.create(DIM, MODEL, tmp_path / "i.faiss")
    first, last = unit_vectors(2, seed=11)

    index.add(np.array([9, 9]), np.stack([first, last]))

    assert len(index) == 1
    assert index.search(last, 1)[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_vectors_that_are_not_unit_embeddings_are_refused(tmp_path: Path) -> None:
    index = VectorIndex.create(DIM, MODEL, tmp_path / "i.faiss")
    bad = unit_vectors(2)
    bad[1, 0] = np.nan

    with pytest.raises(InvalidVector, match="NaN"):
        index.add(np.array([1, 2]), bad)
    with pytest.raises(InvalidVector, match="normalised"):
        index.add(np.array([1]), 3 * unit_vectors(1))
    with pytest.raises(ValueError, match="non-negative"):
        index.add(np.array([-1]), unit_vectors(1))
    assert len(index) == 0


def test_approximate_recall_at_10_against_exact(tmp_path: Path) -> None:
    n, dim = 20_000, 128
    vectors = unit_vectors(n, dim=dim, seed=21)
    keys = np.arange(n, dtype=np.int64)
    index = VectorIndex.create(dim, MODEL, tmp_path / "i.faiss", exact_threshold=APPROXIMATE)
    index.add(keys, vectors)
    queries = unit_vectors(100, dim=dim, seed=22)
    assert index.approximate

    found = [{hit.key for hit in hits} for hits in index.search_batch(queries, 10)]
    truth = [set(exact_top(keys, vectors, query, 10)) for query in queries]
    recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)])

    assert recall >= 0.95
