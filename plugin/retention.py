"""Retention: what pacsclip keeps, for how long, and what goes first when the disk fills.

Each kind has its own age limit (``retention_<kind>_days``; unset: kept for ever):

- ``spool``: the received originals of finished studies (the study, its analyses and results
  stay; the study is marked so that it is never analysed from files that are gone);
- ``results``: pacsclip's own SR, overlay and SEG files once every destination has them;
- ``quarantine``: refused objects with their reasons;
- ``embeddings``: image and report embeddings, and their entries in the similar-case index;
- ``cache``: the images the dashboard rendered;
- ``access_log``: entries of the access log (who saw what): only ever by age, never by a
  purge of the data they describe nor by the free-disk floor.

A free-disk floor (``retention_free_disk_floor_mb``) deletes the oldest items of the kinds in
``retention_disk_kinds`` first, whatever their age, until the free space under the data
directory is back above it. Files go before their rows, so that an interrupted run leaves
rows that the next run finishes, never spooled files without rows (those the node would
catalog again at its next start). The DICOM node applies retention every
``retention_interval_s``; ``pacsclip retention run [--dry-run]`` applies it once.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from plugin.catalog import access_log
from plugin.catalog import retention as rows
from plugin.catalog.db import Catalog
from plugin.purge import DASHBOARD_CACHE, RETRIEVAL, rebuild_indexes
from plugin.settings import Settings

logger = logging.getLogger(__name__)

BATCH: Final = 200  # items read per query while deleting
PREVIEW_LIMIT: Final = 100_000  # items a dry run looks at per kind


class RetentionKind(StrEnum):
    SPOOL = "spool"
    RESULTS = "results"
    QUARANTINE = "quarantine"
    EMBEDDINGS = "embeddings"
    CACHE = "cache"
    ACCESS_LOG = "access_log"


@dataclass(frozen=True)
class RetentionPolicy:
    days: Mapping[RetentionKind, int]  # only the kinds with an age limit
    free_disk_floor_bytes: int | None
    disk_kinds: frozenset[RetentionKind]

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        days = {
            RetentionKind.SPOOL: settings.retention_spool_days,
            RetentionKind.RESULTS: settings.retention_results_days,
            RetentionKind.QUARANTINE: settings.retention_quarantine_days,
            RetentionKind.EMBEDDINGS: settings.retention_embeddings_days,
            RetentionKind.CACHE: settings.retention_cache_days,
            RetentionKind.ACCESS_LOG: settings.retention_access_log_days,
        }
        floor = settings.retention_free_disk_floor_mb
        return cls(
            days={kind: value for kind, value in days.items() if value is not None},
            free_disk_floor_bytes=None if floor is None else floor * 2**20,
            disk_kinds=frozenset(RetentionKind(k) for k in settings.retention_disk_kinds),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.days) or self.free_disk_floor_bytes is not None


@dataclass
class RetentionReport:
    dry_run: bool
    deleted: dict[RetentionKind, int] = field(default_factory=dict)
    freed_bytes: dict[RetentionKind, int] = field(default_factory=dict)
    free_bytes_before: int = 0
    free_bytes_after: int = 0

    def add(self, kind: RetentionKind, items: int, size: int) -> None:
        self.deleted[kind] = self.deleted.get(kind, 0) + items
        self.freed_bytes[kind] = self.freed_bytes.get(kind, 0) + size

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "deleted": {str(k): v for k, v in sorted(self.deleted.items())},
            "freed_bytes": {str(k): v for k, v in sorted(self.freed_bytes.items())},
            "free_bytes_before": self.free_bytes_before,
            "free_bytes_after": self.free_bytes_after,
        }


class RetentionMetrics:
    """What retention deleted, per kind, and when it last ran, in a process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deleted = Counter(
            "pacsclip_retention_deleted",
            "Items retention deleted: files (spool, results, cache), quarantine entries, "
            "embedding rows",
            ["kind"],
            registry=registry,
        )
        self.freed = Counter(
            "pacsclip_retention_freed_bytes",
            "Bytes of files retention deleted",
            ["kind"],
            registry=registry,
        )
        self.last_run = Gauge(
            "pacsclip_retention_last_run_timestamp_seconds",
            "When retention last ran to the end (Unix time)",
            registry=registry,
        )
        self.failures = Counter(
            "pacsclip_retention_failures",
            "Retention runs that stopped on an error",
            registry=registry,
        )
        for kind in RetentionKind:
            self.deleted.labels(kind=kind.value)
            self.freed.labels(kind=kind.value)

    def observe(self, report: RetentionReport, at: float) -> None:
        if report.dry_run:
            return
        for kind, count in report.deleted.items():
            self.deleted.labels(kind=kind.value).inc(count)
        for kind, size in report.freed_bytes.items():
            self.freed.labels(kind=kind.value).inc(size)
        self.last_run.set(at)


def run_retention(
    settings: Settings,
    catalog: Catalog,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    free_bytes: Callable[[], int] | None = None,
) -> RetentionReport:
    """Apply the settings' retention once (``dry_run``: only say what would go)."""
    run = _Run(settings, catalog, dry_run, free_bytes or _free_bytes(settings.data_dir))
    policy = RetentionPolicy.from_settings(settings)
    now = now or datetime.now(UTC)
    run.report.free_bytes_before = run.free()
    for kind, days in policy.days.items():
        run.by_age(kind, now - timedelta(days=days))
    if policy.free_disk_floor_bytes is not None:
        run.to_floor(policy.free_disk_floor_bytes, policy.disk_kinds)
    run.report.free_bytes_after = run.free()
    if any(run.report.deleted.values()):
        logger.info(
            "retention %s: %s",
            "would delete" if dry_run else "deleted",
            ", ".join(f"{k}={v}" for k, v in sorted(run.report.deleted.items()) if v),
        )
    return run.report


def _free_bytes(root: Path) -> Callable[[], int]:
    def free() -> int:
        root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(root).free

    return free


# One item that may go: when it was made, and how to delete it (returns files and bytes).
_Item = tuple[datetime, RetentionKind, Callable[[], tuple[int, int]]]


class _Run:
    def __init__(
        self, settings: Settings, catalog: Catalog, dry_run: bool, free: Callable[[], int]
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.dry_run = dry_run
        self.free = free
        self.report = RetentionReport(dry_run=dry_run)
        self.cache_dir = settings.data_dir / DASHBOARD_CACHE

    # -- by age ------------------------------------------------------------------------------

    def by_age(self, kind: RetentionKind, before: datetime) -> None:
        if kind is RetentionKind.EMBEDDINGS:
            self._embeddings(before)
            return
        if kind is RetentionKind.ACCESS_LOG:
            self._access_log(before)
            return
        while True:
            items = self._items(kind, before, PREVIEW_LIMIT if self.dry_run else BATCH)
            for _, _, delete in items:
                self.report.add(kind, *delete())
            # A dry run deletes nothing, so the next query would return the same items.
            if self.dry_run or len(items) < BATCH:
                return

    def _access_log(self, before: datetime) -> None:
        with self.catalog.sessions.begin() as session:
            if self.dry_run:
                gone = access_log.count_older_than(session, before)
            else:
                gone = access_log.delete_older_than(session, before)
        self.report.add(RetentionKind.ACCESS_LOG, gone, 0)

    def _embeddings(self, before: datetime) -> None:
        with self.catalog.sessions() as session:
            expired = rows.expired_embeddings(session, before)
        if not expired.rows:
            return
        if not self.dry_run:
            with self.catalog.sessions.begin() as session:
                rows.delete_expired_embeddings(session, before)
            rebuild_indexes(
                self.settings.data_dir / RETRIEVAL,
                self.catalog,
                images=list(expired.images),
                reports=list(expired.reports),
            )
        self.report.add(RetentionKind.EMBEDDINGS, expired.rows, 0)

    # -- by free disk ------------------------------------------------------------------------

    def to_floor(self, floor: int, kinds: Iterable[RetentionKind]) -> None:
        """Delete the oldest items of ``kinds`` until at least ``floor`` bytes are free."""
        free = self.free()
        wanted = [k for k in kinds if k is not RetentionKind.EMBEDDINGS]
        while free < floor:
            limit = PREVIEW_LIMIT if self.dry_run else BATCH
            items = sorted(
                (item for kind in wanted for item in self._items(kind, None, limit)),
                key=lambda item: item[0],
            )
            if not items:
                logger.warning(
                    "free disk %d MiB is below the retention floor %d MiB and nothing more "
                    "may be deleted (retention_disk_kinds)",
                    free // 2**20,
                    floor // 2**20,
                )
                return
            for _, kind, delete in items:
                files, size = delete()
                self.report.add(kind, files, size)
                free = free + size if self.dry_run else self.free()
                if free >= floor:
                    return
            if self.dry_run:
                return

    # -- the items of each kind --------------------------------------------------------------

    def _items(self, kind: RetentionKind, before: datetime | None, limit: int) -> list[_Item]:
        with self.catalog.sessions() as session:
            if kind is RetentionKind.SPOOL:
                originals = rows.originals_to_prune(session, before=before, limit=limit)
                return [(o.at, kind, self._pruner(o)) for o in originals]
            if kind is RetentionKind.RESULTS:
                results = rows.results_to_prune(session, before=before, limit=limit)
                return [(r.at, kind, self._result_pruner(r)) for r in results]
            if kind is RetentionKind.QUARANTINE:
                entries = rows.quarantine_to_prune(session, before=before, limit=limit)
                return [(q.at, kind, self._quarantine_pruner(q)) for q in entries]
        if kind is RetentionKind.CACHE:
            return self._cache_items(before, limit)
        raise ValueError(f"retention kind {kind} has no files")

    def _pruner(self, originals: rows.StudyOriginals) -> Callable[[], tuple[int, int]]:
        def prune() -> tuple[int, int]:
            root = self.settings.spool_dir
            # Only the cataloged files: one just received (not yet cataloged) must stay.
            removed = self._remove(root / p for p in originals.paths)
            if not self.dry_run:
                _remove_empty_dirs(root, originals.study_instance_uid)
                with self.catalog.sessions.begin() as session:
                    rows.mark_originals_pruned(session, originals.study_id, datetime.now(UTC))
            return removed

        return prune

    def _result_pruner(self, results: rows.AnalysisResults) -> Callable[[], tuple[int, int]]:
        def prune() -> tuple[int, int]:
            root = self.settings.results_dir
            removed = self._remove(root / p for p in results.paths)
            if not self.dry_run:
                _remove_empty_dirs(root, results.study_instance_uid)
                with self.catalog.sessions.begin() as session:
                    rows.forget_result_objects(session, results.analysis_id)
            return removed

        return prune

    def _quarantine_pruner(self, entry: rows.QuarantinedObject) -> Callable[[], tuple[int, int]]:
        def prune() -> tuple[int, int]:
            path = self.settings.quarantine_dir / entry.path
            _, size = self._remove([path, path.with_suffix(".json")])
            if not self.dry_run:
                with self.catalog.sessions.begin() as session:
                    rows.forget_quarantined(session, entry.entry_id)
            return 1, size  # one entry, with or without its files

        return prune

    def _cache_items(self, before: datetime | None, limit: int) -> list[_Item]:
        if not self.cache_dir.is_dir():
            return []
        found: list[_Item] = []
        for path in self.cache_dir.glob("*.png"):
            try:
                at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            except FileNotFoundError:
                continue
            if before is None or at < before:
                found.append((at, RetentionKind.CACHE, self._file_pruner(path)))
        found.sort(key=lambda item: item[0])
        return found[:limit]

    def _file_pruner(self, path: Path) -> Callable[[], tuple[int, int]]:
        return lambda: self._remove([path])

    def _remove(self, paths: Iterable[Path]) -> tuple[int, int]:
        files = size = 0
        for path in paths:
            try:
                size += path.stat().st_size
                if not self.dry_run:
                    path.unlink()
            except FileNotFoundError:
                continue
            files += 1
        return files, size


def _remove_empty_dirs(root: Path, study_uid: str) -> None:
    """The study's folder and its series folders, where retention emptied them."""
    folder = root / study_uid
    if not folder.is_dir():
        return
    for directory in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir():
            _rmdir_if_empty(directory)
    _rmdir_if_empty(folder)


def _rmdir_if_empty(directory: Path) -> None:
    # Not empty (an instance arrived since, a file retention may not delete): it stays.
    with suppress(OSError):
        directory.rmdir()


class RetentionSchedule:
    """Applies retention every ``retention_interval_s`` on a thread of its own (in the DICOM
    node), so that deleting many files never holds up receiving or completion."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        metrics: RetentionMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    @property
    def enabled(self) -> bool:
        return RetentionPolicy.from_settings(self.settings).enabled

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.settings.drain_timeout_s)

    def run_once(self) -> RetentionReport | None:
        """One run; an error is logged and counted, and the next run tries again."""
        try:
            report = run_retention(self.settings, self.catalog)
        except Exception:
            self.metrics.failures.inc()
            logger.exception(
                "retention run failed; next try in %.0f s", self.settings.retention_interval_s
            )
            return None
        self.metrics.observe(report, self.clock())
        return report

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            if self._stop.wait(self.settings.retention_interval_s):
                return
