"""Vector index, side by side: exact search (numpy), pacsclip's VectorIndex (FAISS PQ
fast-scan + exact re-rank), optionally a usearch HNSW graph.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/retrieval.py [--n 1000000] [--dim 128] [--also 100000x512]
        [--queries 1000] [--recall-queries 200] [--refine 16,32,64] [--usearch] [--json]

For each data set: seeded random unit vectors (the hardest case for a graph index: no cluster
structure), the exact top-10 of a subset of queries by a numpy matrix product, then each engine
builds its index in a forked child process (so memory one engine freed cannot hide what the next
one takes) and answers single-query top-10 calls, as the API makes them. Printed per engine:
build time, RSS growth over the build (from /proc/self/status), the index's own size, query
latency p50/p99, recall@10 against the exact top-10, and the p50 and p99 latency of exact search
divided by the engine's (how many times faster). Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

# Every engine answers a query on one core, as one API request does; left to itself, numpy's
# BLAS spreads each exact matrix-vector product over all cores (and on a busy host waits a
# scheduler slice for the second one). Set before numpy loads; the index builds still use
# every core (FAISS through OpenMP, usearch through its own threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from numpy.typing import NDArray

from plugin.retrieval.index import DEFAULT_REFINE_FACTOR, STRUCTURE, VectorIndex, rebuild

K = 10
MB = 1_000_000
EXACT_LATENCY_QUERIES = 100  # exact search is slow at 1M; its latency settles within 100 calls
GENERATE_CHUNK = 100_000
# usearch's graph, for comparison (--usearch): the parameters an HNSW index is usually given.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128

Matrix = NDArray[np.float32]
Search = Callable[[Matrix], NDArray[np.int64]]


@dataclass(frozen=True)
class DataSet:
    n: int
    dim: int
    vectors: Matrix
    queries: Matrix
    truth: NDArray[np.int64]  # [recall queries, K] exact top-K positions


@dataclass
class Figures:
    engine: str
    build_s: float | None
    rss_growth_mb: float | None
    index_mb: float
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    speedup_p50: float = 1.0
    speedup_p99: float = 1.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmRSS in /proc/self/status")


def unit_vectors(n: int, dim: int, seed: int) -> Matrix:
    # Generated in chunks so that 1M x 512 does not pass through a float64 temporary.
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, GENERATE_CHUNK):
        block = rng.standard_normal((min(GENERATE_CHUNK, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def exact_top(vectors: Matrix, queries: Matrix, k: int = K) -> NDArray[np.int64]:
    """Exact top-k positions by inner product, scanning the data in chunks (bounded memory)."""
    best_sims = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), GENERATE_CHUNK):
        sims = queries @ vectors[start : start + GENERATE_CHUNK].T
        ids = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
        all_sims = np.concatenate([best_sims, sims], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        keep = np.argpartition(-all_sims, k - 1, axis=1)[:, :k]
        best_sims = np.take_along_axis(all_sims, keep, axis=1)
        best_ids = np.take_along_axis(all_ids, keep, axis=1)
    order = np.argsort(-best_sims, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def make_data_set(n: int, dim: int, queries: int, recall_queries: int, seed: int) -> DataSet:
    vectors = unit_vectors(n, dim, seed)
    query_vectors = unit_vectors(queries, dim, seed + 1)
    truth = exact_top(vectors, query_vectors[:recall_queries])
    return DataSet(n, dim, vectors, query_vectors, truth)


def recall_at_k(found: Sequence[NDArray[np.int64]], truth: NDArray[np.int64]) -> float:
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=False)]
    return float(np.mean(hits)) / K


def timed_queries(search: Search, data: DataSet, count: int) -> tuple[list[float], float]:
    """Latencies (ms) of single-query calls, and recall@10 on the queries with a known truth."""
    latencies: list[float] = []
    found: list[NDArray[np.int64]] = []
    for query in data.queries[:count]:
        start = time.perf_counter()
        ids = search(query)
        latencies.append((time.perf_counter() - start) * 1e3)
        found.append(ids)
    return latencies, recall_at_k(found[: len(data.truth)], data.truth)


def figures(
    engine: str,
    build_s: float | None,
    rss: float | None,
    size_mb: float,
    timed: tuple[list[float], float],
) -> Figures:
    latencies, recall = timed
    return Figures(
        engine=engine,
        build_s=build_s,
        rss_growth_mb=rss,
        index_mb=size_mb,
        p50_ms=float(np.percentile(latencies, 50)),
        p99_ms=float(np.percentile(latencies, 99)),
        recall_at_10=recall,
    )


# -- engines (each runs in a forked child and returns one Figures per setting) ----------------


def measure_exact(data: DataSet) -> Figures:
    def search(query: Matrix) -> NDArray[np.int64]:
        sims = data.vectors @ query
        top = np.argpartition(-sims, K - 1)[:K]
        result: NDArray[np.int64] = top[np.argsort(-sims[top], kind="stable")]
        return result

    count = min(EXACT_LATENCY_QUERIES, len(data.queries))
    timed = timed_queries(search, data, count)
    return figures("exact (numpy matmul)", None, None, data.vectors.nbytes / MB, timed)


def faiss_engine(data: DataSet, factors: Sequence[int], count: int) -> list[Figures]:
    """pacsclip's own index, measured through its API: rebuild from rows, then search."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.faiss"
        rows = zip(range(data.n), data.vectors, strict=True)
        before = rss_mb()
        start = time.perf_counter()
        index = rebuild(path, data.dim, "bench", rows, exact_threshold=0)
        build_s = time.perf_counter() - start
        growth = rss_mb() - before
        size_mb = path.stat().st_size / MB
    results = []
    for factor in factors:
        index.refine_factor = factor

        def search(query: Matrix, index: VectorIndex = index) -> NDArray[np.int64]:
            return np.array([hit.key for hit in index.search(query, K)], dtype=np.int64)

        name = f"pacsclip VectorIndex / faiss {faiss.__version__} refine x{factor}"
        results.append(figures(name, build_s, growth, size_mb, timed_queries(search, data, count)))
    return results


def usearch_engine(data: DataSet, efs: Sequence[int], count: int) -> list[Figures]:
    """An HNSW graph for comparison (slow to build: about 280 s per 100,000 on 2 cores)."""
    import usearch  # type: ignore[import-not-found,unused-ignore]
    from usearch.index import Index  # type: ignore[import-not-found,unused-ignore]

    before = rss_mb()
    start = time.perf_counter()
    index = Index(
        ndim=data.dim,
        metric="ip",
        dtype="f32",
        connectivity=HNSW_M,
        expansion_add=HNSW_EF_CONSTRUCTION,
    )
    index.add(np.arange(data.n, dtype=np.int64), data.vectors)
    build_s = time.perf_counter() - start
    growth = rss_mb() - before
    size_mb = index.serialized_length / MB
    results = []
    for ef in efs:
        # usearch's setter has no annotation, so mypy sees a read-only property.
        index.expansion_search = ef  # type: ignore[misc,unused-ignore]

        def search(query: Matrix) -> NDArray[np.int64]:
            keys: NDArray[np.int64] = index.search(query, K, threads=1).keys.astype(np.int64)
            return keys

        name = f"usearch {usearch.__version__} HNSW{HNSW_M} ef={ef}"
        results.append(figures(name, build_s, growth, size_mb, timed_queries(search, data, count)))
    return results


Engine = Callable[[DataSet, Sequence[int], int], list[Figures]]


def run_in_child(engine: Engine, data: DataSet, efs: Sequence[int], count: int) -> list[Figures]:
    # Forked, not spawned: the child shares the parent's vectors copy-on-write. The parent has
    # not started FAISS's OpenMP threads, so forking is safe.
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(engine, data, efs, count, sender))
    child.start()
    sender.close()
    try:
        rows: list[Figures] = receiver.recv()
    except EOFError as exc:
        child.join()
        raise RuntimeError(f"{engine.__name__} died (exit code {child.exitcode})") from exc
    child.join()
    return rows


def _child_main(
    engine: Engine, data: DataSet, efs: Sequence[int], count: int, sender: Connection
) -> None:
    sender.send(engine(data, efs, count))
    sender.close()


def available_engines(
    args: argparse.Namespace,
) -> Iterator[tuple[str, Engine, Sequence[int]]]:
    yield "pacsclip", faiss_engine, args.refine
    if not args.usearch:
        return
    try:
        import usearch.index  # noqa: F401
    except ImportError:
        progress("usearch not installed: measuring pacsclip's index alone")
    else:
        yield "usearch", usearch_engine, args.usearch_ef


def measure(data: DataSet, args: argparse.Namespace) -> list[Figures]:
    count = args.queries
    progress(f"{data.n:,} x {data.dim}: exact search")
    exact = measure_exact(data)
    rows = [exact]
    for name, engine, settings in available_engines(args):
        progress(f"{data.n:,} x {data.dim}: {name} build and {count} queries per setting")
        rows.extend(run_in_child(engine, data, settings, count))
    for row in rows[1:]:
        row.speedup_p50 = exact.p50_ms / row.p50_ms
        row.speedup_p99 = exact.p99_ms / row.p99_ms
    return rows


# -- report ------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(data: DataSet, rows: Sequence[Figures], args: argparse.Namespace) -> list[str]:
    lines = [
        f"{data.n:,} x {data.dim} float32 unit vectors (seed {args.seed}), top-{K}, "
        f"{args.queries} single-query calls ({min(EXACT_LATENCY_QUERIES, args.queries)} for "
        f"exact), recall on {len(data.truth)} queries against exact",
        f"{'engine':<50} {'build s':>8} {'RSS +MB':>8} {'index MB':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'recall@10':>9} {'x exact p50':>11} {'x exact p99':>11}",
    ]
    for row in rows:
        lines.append(
            f"{row.engine:<50} {fmt(row.build_s):>8} {fmt(row.rss_growth_mb, 0):>8} "
            f"{fmt(row.index_mb, 0):>9} {fmt(row.p50_ms, 3):>8} {fmt(row.p99_ms, 3):>8} "
            f"{row.recall_at_10:>9.3f} {fmt(row.speedup_p50):>11} {fmt(row.speedup_p99):>11}"
        )
    return lines


def header(args: argparse.Namespace) -> list[str]:
    return [
        "retrieval index benchmark",
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
        f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}; "
        f"pacsclip index: {STRUCTURE}",
        "targets at 1M: p99 <= 10 ms, recall@10 >= 0.95",
    ]


def parse_shape(text: str) -> tuple[int, int]:
    n, _, dim = text.lower().partition("x")
    return int(n), int(dim)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the main set")
    parser.add_argument("--dim", type=int, default=128, help="the demo model's dimension")
    parser.add_argument(
        "--also", action="append", default=[], metavar="NxD", help="another set, e.g. 100000x512"
    )
    parser.add_argument("--queries", type=int, default=1_000, help="single-query calls timed")
    parser.add_argument("--recall-queries", type=int, default=200, help="queries with exact truth")
    parser.add_argument(
        "--refine",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[16, 32, DEFAULT_REFINE_FACTOR],
        help="refine factors (candidates re-ranked per hit), comma-separated",
    )
    parser.add_argument("--usearch", action="store_true", help="also build a usearch HNSW graph")
    parser.add_argument(
        "--usearch-ef", type=lambda text: [int(v) for v in text.split(",")], default=[512, 1024]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality-cases", type=int, default=1_200, help="demo held-out cases")
    parser.add_argument(
        "--no-quality", action="store_true", help="skip the demo model's retrieval quality"
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = [(args.n, args.dim), *(parse_shape(text) for text in args.also)]
    print("\n".join(header(args)), flush=True)
    results = []
    for n, dim in shapes:
        data = make_data_set(
            n, dim, args.queries, min(args.recall_queries, args.queries), args.seed
        )
        rows = measure(data, args)
        # Printed as each set finishes: a 1M run takes long, and partial figures still count.
        print("\n".join(["", *table(data, rows, args)]), flush=True)
        results.append({"n": n, "dim": dim, "engines": [asdict(row) for row in rows]})
    quality = None if args.no_quality else demo_quality(args.quality_cases)
    if args.json:
        print(
            json.dumps(
                {"k": K, "seed": args.seed, "data_sets": results, "demo_quality": quality},
                indent=2,
            )
        )
    return 0


def demo_quality(n_eval: int) -> dict[str, dict[str, float]]:
    """Cross-modal Recall@1/5/10 of the built-in demo model on held-out synthetic cases (the
    same evaluation as ``pacsclip model eval``): a hit is a case with the same findings."""
    from plugin.demo.evaluation import evaluate_bundle
    from plugin.models.bundle import load_bundle
    from plugin.models.registry import builtin_bundle_dirs

    bundle = load_bundle(builtin_bundle_dirs()[0])
    progress(f"demo model {bundle.ref}: retrieval quality on {n_eval} held-out cases")
    evaluation = evaluate_bundle(bundle, n_eval=n_eval, n_bootstrap=10, progress=progress)
    lines = [
        "",
        f"retrieval quality, {bundle.ref} (synthetic demo model, not for clinical use), "
        f"{n_eval} held-out synthetic cases, report phrasings unseen in training; "
        "a hit shares the query's findings and sides",
    ]
    for name in ("image_to_text", "text_to_image"):
        r = evaluation.retrieval[name]
        recalls = "  ".join(f"R@{k} {r[f'R@{k}']:.3f}" for k in (1, 5, 10))
        lines.append(f"  {name.replace('_to_', '->'):<14} {recalls}")
    print("\n".join(lines), flush=True)
    return evaluation.retrieval


if __name__ == "__main__":
    sys.exit(main())
