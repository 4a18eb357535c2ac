"""Retention: off unless configured; by age per kind; by a free-disk floor, oldest first; never
a study still in flight; a study whose originals went is never analysed from missing files."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import (
    Analysis,
    DispatchJob,
    ImageEmbedding,
    Instance,
    QuarantineEntry,
    ResultObject,
    Series,
    Site,
    Study,
)
from plugin.catalog.repository import requeue
from plugin.cli.main import app
from plugin.errors import InvalidTransition
from plugin.retention import (
    RetentionKind,
    RetentionMetrics,
    RetentionSchedule,
    run_retention,
)
from plugin.retrieval.index import read_info
from plugin.retrieval.store import IndexStore, Kind
from plugin.settings import Settings

MODEL = "demo@1"
DIM = 8
DAY = timedelta(days=1)


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def add_study(
    settings: Settings,
    catalog: Catalog,
    uid: str,
    *,
    state: str,
    age: timedelta,
    job_state: str | None = "delivered",
    size: int = 1000,
) -> None:
    """A study with one instance in the spool, an analysis with one result file and a
    dispatch job, and an image embedding, all made ``age`` ago."""
    at = datetime.now(UTC) - age
    spool_path = f"{uid}/{uid}.1/{uid}.1.1.dcm"
    result_path = f"{uid}/{uid}.9.dcm"
    write(settings.spool_dir / spool_path, size)
    write(settings.results_dir / result_path, size)
    with catalog.sessions.begin() as session:
        site = session.scalar(select(Site)) or Site(key="site")
        study = Study(
            study_instance_uid=uid, site=site, state=state, calling_ae_title="PACS",
            received_at=at, completed_at=at, generation=1,
        )  # fmt: skip
        study.series = [
            Series(
                series_instance_uid=f"{uid}.1",
                instances=[
                    Instance(
                        sop_instance_uid=f"{uid}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", path=spool_path,
                        size_bytes=size, sha256="0" * 64, received_at=at, calling_ae_title="PACS",
                    )
                ],
            )
        ]  # fmt: skip
        analysis = Analysis(
            study=study, generation=1, algorithm_name="demo", algorithm_version="1",
            synthetic=True, priority="routine", triggered_by=[], findings=[], created_at=at,
        )  # fmt: skip
        analysis.objects = [
            ResultObject(
                kind="SR", sop_instance_uid=f"{uid}.9", series_instance_uid=f"{uid}.8",
                path=result_path,
            )
        ]  # fmt: skip
        if job_state is not None:
            analysis.jobs = [DispatchJob(destination="pacs", state=job_state)]
        session.add(analysis)
        session.flush()
        vector = (np.ones(DIM) / np.sqrt(DIM)).astype("<f4")
        session.add(
            ImageEmbedding(
                sop_instance_uid=f"{uid}.1.1", study_id=study.id, site_id=site.id,
                model_ref=MODEL, dim=DIM, vector=vector.tobytes(), created_at=at,
            )
        )  # fmt: skip


def add_quarantined(settings: Settings, catalog: Catalog, name: str, age: timedelta) -> None:
    write(settings.quarantine_dir / f"{name}.dcm", 100)
    write(settings.quarantine_dir / f"{name}.json", 10)
    with catalog.sessions.begin() as session:
        session.add(
            QuarantineEntry(
                path=f"{name}.dcm", reason="test", status=0xA900, size_bytes=100,
                at=datetime.now(UTC) - age,
            )
        )  # fmt: skip


def add_rendered(settings: Settings, name: str, age: timedelta) -> Path:
    path = settings.data_dir / "dashboard-cache" / f"{name}-160.png"
    write(path, 100)
    old = time.time() - age.total_seconds()
    os.utime(path, (old, old))
    return path


@pytest.fixture
def setup(make_settings: Callable[..., Settings]) -> Callable[..., tuple[Settings, Catalog]]:
    def make(**retention: Any) -> tuple[Settings, Catalog]:
        settings = make_settings(**retention)
        return settings, open_catalog(settings.effective_database_url)

    return make


def studies(catalog: Catalog) -> dict[str, tuple[str, int, bool, int]]:
    """uid -> (state, instances, originals pruned, result objects)."""
    with catalog.sessions() as session:
        return {
            s.study_instance_uid: (
                s.state,
                sum(len(series.instances) for series in s.series),
                s.originals_pruned_at is not None,
                len(session.scalars(
                    select(ResultObject).join(Analysis).where(Analysis.study_id == s.id)
                ).all()),
            )
            for s in session.scalars(select(Study))
        }  # fmt: skip


def test_nothing_is_deleted_unless_retention_is_configured(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup()
    add_study(settings, catalog, "1.2.1", state="delivered", age=3650 * DAY)
    before = sorted(settings.data_dir.rglob("*"))

    report = run_retention(settings, catalog)
    result = CliRunner().invoke(
        app, ["retention", "run"], env={"PACSCLIP_DATA_DIR": str(settings.data_dir)}
    )

    assert report.deleted == {}
    assert result.exit_code == 0 and "retention is off" in result.output
    assert sorted(settings.data_dir.rglob("*")) == before


def test_by_age_each_kind_goes_but_never_a_study_in_flight(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup(
        retention_spool_days=30,
        retention_results_days=60,
        retention_quarantine_days=10,
        retention_embeddings_days=90,
        retention_cache_days=7,
    )
    add_study(settings, catalog, "1.2.1", state="failed", age=100 * DAY)  # all of it goes
    add_study(settings, catalog, "1.2.2", state="delivered", age=40 * DAY)  # originals only
    add_study(settings, catalog, "1.2.3", state="queued", age=100 * DAY)  # in flight
    add_study(settings, catalog, "1.2.4", state="analysed", age=100 * DAY, job_state="pending")
    add_study(settings, catalog, "1.2.5", state="analysed", age=100 * DAY, job_state="failed")
    add_study(settings, catalog, "1.2.6", state="delivered", age=1 * DAY)  # too young
    add_quarantined(settings, catalog, "old", 11 * DAY)
    add_quarantined(settings, catalog, "new", 1 * DAY)
    old_png = add_rendered(settings, "1.2.1.1.1", 8 * DAY)
    new_png = add_rendered(settings, "1.2.6.1.1", 1 * DAY)
    IndexStore(settings.data_dir / "retrieval", catalog.sessions).rebuild(Kind.IMAGES, MODEL, DIM)
    index = IndexStore(settings.data_dir / "retrieval", catalog.sessions).path(Kind.IMAGES, MODEL)
    assert read_info(index).count == 6
    env = {"PACSCLIP_DATA_DIR": str(settings.data_dir), "PACSCLIP_RETENTION_SPOOL_DAYS": "30"}

    preview = CliRunner().invoke(app, ["retention", "run", "--dry-run", "--json"], env=env)
    assert preview.exit_code == 0, preview.output
    assert json.loads(preview.output)["deleted"] == {"spool": 3}  # 1.2.1, 1.2.2, 1.2.5
    assert (settings.spool_dir / "1.2.1").is_dir()

    metrics = RetentionMetrics(registry := _registry())
    report = RetentionSchedule(settings, catalog, metrics).run_once()

    assert report is not None
    assert report.deleted == {
        RetentionKind.SPOOL: 3,
        RetentionKind.RESULTS: 1,
        RetentionKind.QUARANTINE: 1,
        RetentionKind.EMBEDDINGS: 2,  # 1.2.1 and 1.2.5: finished, 100 days old
        RetentionKind.CACHE: 1,
    }
    assert studies(catalog) == {
        "1.2.1": ("failed", 0, True, 0),
        "1.2.2": ("delivered", 0, True, 1),
        "1.2.3": ("queued", 1, False, 1),
        "1.2.4": ("analysed", 1, False, 1),
        "1.2.5": ("analysed", 0, True, 1),  # a dead letter keeps its results for a replay
        "1.2.6": ("delivered", 1, False, 1),
    }
    assert sorted(p.name for p in settings.spool_dir.iterdir() if p.name[0] != ".") == [
        "1.2.3",
        "1.2.4",
        "1.2.6",
    ]
    assert not (settings.results_dir / "1.2.1").exists()
    assert sorted(p.name for p in settings.quarantine_dir.glob("*.*")) == ["new.dcm", "new.json"]
    assert not old_png.exists() and new_png.exists()
    assert read_info(index).count == 4  # 1.2.3 and 1.2.4 in flight, 1.2.2 and 1.2.6 younger
    with catalog.sessions() as session:
        assert len(session.scalars(select(QuarantineEntry)).all()) == 1
        # Originals gone: an operator's retry is refused, not analysed from missing files.
        with pytest.raises(InvalidTransition, match="send the study again"):
            requeue(session, ["1.2.1"], None)
    deleted = registry.get_sample_value("pacsclip_retention_deleted_total", {"kind": "spool"})
    freed = registry.get_sample_value("pacsclip_retention_freed_bytes_total", {"kind": "spool"})
    assert (deleted, freed) == (3, 3000)
    assert registry.get_sample_value("pacsclip_retention_last_run_timestamp_seconds")


def test_the_free_disk_floor_deletes_the_oldest_first(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup(
        retention_free_disk_floor_mb=1, retention_disk_kinds=["spool", "cache"]
    )
    mib = 2**20
    add_study(settings, catalog, "1.2.1", state="delivered", age=5 * DAY, size=mib // 2)
    add_study(settings, catalog, "1.2.2", state="delivered", age=3 * DAY, size=mib // 2)
    add_study(settings, catalog, "1.2.3", state="receiving", age=9 * DAY, size=mib // 2)
    add_rendered(settings, "1.2.1.1.1", 6 * DAY)  # the oldest item that may go
    add_rendered(settings, "1.2.2.1.1", 1 * DAY)

    def used() -> int:
        return sum(p.stat().st_size for p in settings.data_dir.rglob("*") if p.is_file())

    # 0.6 MiB free, the floor at 1 MiB: the oldest rendered image, then the oldest study's
    # originals (0.5 MiB) go, and nothing more.
    capacity = used() + mib * 6 // 10
    report = run_retention(settings, catalog, free_bytes=lambda: capacity - used())

    assert report.deleted == {RetentionKind.SPOOL: 1, RetentionKind.CACHE: 1}
    assert report.free_bytes_after >= mib > report.free_bytes_before
    assert studies(catalog)["1.2.1"][2] and not studies(catalog)["1.2.2"][2]
    assert not studies(catalog)["1.2.3"][2]  # still receiving: never touched
    cache = sorted(p.name for p in (settings.data_dir / "dashboard-cache").iterdir())
    assert cache == ["1.2.2.1.1-160.png"]
    assert (settings.results_dir / "1.2.1").is_dir()  # results were not allowed to go


def test_the_schedule_runs_on_its_own_thread_until_stopped(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup(retention_cache_days=1, retention_interval_s=0.05)
    metrics = RetentionMetrics(registry := _registry())
    schedule = RetentionSchedule(settings, catalog, metrics)
    old = add_rendered(settings, "1.2.9", 3 * DAY)

    schedule.start()
    try:
        deadline = time.monotonic() + 5
        while old.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        schedule.stop()

    assert not old.exists()
    assert registry.get_sample_value("pacsclip_retention_deleted_total", {"kind": "cache"}) == 1


def _registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()
