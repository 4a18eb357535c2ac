"""Catalog times are stored in UTC and read back timezone-aware, on SQLite too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select, text

from plugin.catalog import repository
from plugin.catalog.db import open_catalog
from plugin.catalog.models import Site, Study

CET = timezone(timedelta(hours=1))


def test_times_come_back_aware_in_utc(tmp_path: Path) -> None:
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with catalog.sessions.begin() as session:
        site = Site(key="site-a")
        session.add(site)
        session.flush()
        session.add(
            Study(
                study_instance_uid="1.2.3",
                site_id=site.id,
                state="receiving",
                calling_ae_title="MODALITY",
                received_at=datetime(2025, 3, 4, 13, 0, tzinfo=CET),
                completed_at=datetime(2025, 3, 4, 12, 30),  # naive: taken as UTC
            )
        )

    with catalog.sessions() as session:
        stored = session.execute(text("SELECT received_at FROM study")).scalar_one()
        study = session.scalars(select(Study)).one()
        [receiving] = repository.receiving_studies(session)

    assert stored.startswith("2025-03-04 12:00:00")
    assert study.received_at == datetime(2025, 3, 4, 12, 0, tzinfo=UTC)
    assert study.received_at.tzinfo is UTC
    assert study.completed_at == datetime(2025, 3, 4, 12, 30, tzinfo=UTC)
    assert receiving.received_at.tzinfo is UTC
