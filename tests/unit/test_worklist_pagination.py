"""Worklist pages stay fast with 100,000 studies: keyset pagination over an index (STAT studies
first, then the others), checked by the SQLite query plan and by the time a page takes to
render, first page and deep."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import case, insert, select, text

from plugin.api import create_app
from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import Site, Study
from plugin.catalog.worklist import Cursor, WorklistQuery, worklist_page
from plugin.dashboard import mount_dashboard
from plugin.metrics import PacsclipMetrics
from plugin.settings import Settings

TOKEN = "pagination-token"
STUDIES = 100_000
START = datetime(2026, 1, 1, tzinfo=UTC)


def seed(catalog: Catalog, count: int) -> None:
    """``count`` studies over 3 sites, two by two sharing a received_at (ties break on id)."""
    with catalog.sessions.begin() as session:
        session.execute(
            insert(Site), [{"key": f"AE{n}|Site {n}", "created_at": START} for n in range(3)]
        )
        site_ids = list(session.scalars(select(Site.id)))
        rows = [
            {
                "study_instance_uid": f"1.2.826.0.1.3680043.10.1.{n}",
                "site_id": site_ids[n % 3],
                "state": ("analysed", "delivered", "receiving")[n % 3],
                "priority": "stat" if n % 10 == 0 else "routine",
                "calling_ae_title": "AE",
                "received_at": START + timedelta(seconds=n // 2),
                "needs_reanalysis": False,
                "generation": 1,
            }
            for n in range(count)
        ]
        session.execute(insert(Study), rows)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Catalog]:
    from plugin.settings import load_settings

    data = tmp_path_factory.mktemp("big")
    settings = load_settings(data_dir=data, api_token=TOKEN)
    catalog = open_catalog(settings.effective_database_url)
    seed(catalog, STUDIES)
    return settings, catalog


def test_pages_follow_each_other_without_gaps_or_repeats(big: tuple[Settings, Catalog]) -> None:
    _, catalog = big
    seen: list[tuple[datetime, str]] = []
    seen_rows = []
    cursor: Cursor | None = None
    with catalog.sessions() as session:
        for _ in range(4):
            page = worklist_page(session, WorklistQuery(after=cursor, limit=49))
            seen += [(r.received_at, r.study_instance_uid) for r in page.rows]
            seen_rows += page.rows
            cursor = page.next_cursor
            assert cursor is not None
            cursor = Cursor.parse(cursor.token())  # as it travels through a URL
        stat_first = case((Study.priority == "stat", 0), else_=1)
        newest = session.execute(
            select(Study.received_at, Study.study_instance_uid)
            .order_by(stat_first, Study.received_at.desc(), Study.id.desc())
            .limit(4 * 49)
        ).all()
        stat = worklist_page(session, WorklistQuery(priority="stat", limit=20))
        oldest = worklist_page(session, WorklistQuery(order="oldest", limit=3))
    assert seen == [tuple(r) for r in newest]
    assert len(stat.rows) == 20 and {r.priority for r in stat.rows} == {"stat"}
    assert {r.priority for r in seen_rows} == {"stat"}  # 10,000 STAT studies come first
    assert [r.study_instance_uid.rsplit(".", 1)[1] for r in oldest.rows] == ["0", "10", "20"]


def test_the_page_query_is_an_index_range_scan(big: tuple[Settings, Catalog]) -> None:
    _, catalog = big
    with catalog.engine.connect() as connection:
        for where in (
            "",
            "WHERE state = 'analysed' AND ",
            # The two groups of a page: STAT studies first, then the others.
            "WHERE priority = 'stat' AND ",
            "WHERE (priority IS NULL OR priority != 'stat') AND ",
            "WHERE (priority IS NULL OR priority != 'stat') AND state = 'analysed' AND ",
        ):
            condition = f"{where or 'WHERE '}(received_at, id) < ('2026-01-01 10:00:00', 500)"
            plan = " ".join(
                str(row[-1])
                for row in connection.execute(
                    text(
                        f"EXPLAIN QUERY PLAN SELECT id, received_at FROM study {condition} "
                        "ORDER BY received_at DESC, id DESC LIMIT 51"
                    )
                )
            )
            assert "USING" in plan and "INDEX ix_study_" in plan, plan
            assert "TEMP B-TREE" not in plan, plan  # no sort of the whole table


def test_a_worklist_page_renders_in_well_under_a_second(big: tuple[Settings, Catalog]) -> None:
    settings, catalog = big
    metrics = PacsclipMetrics()
    app = create_app(settings, catalog.sessions, metrics)
    mount_dashboard(app, settings, catalog.sessions, metrics)
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    client.get("/")  # warm: templates compiled, connections open
    timings = {}
    for name, url in (
        ("first", "/"),
        ("filtered", "/?state=analysed&priority=stat"),
    ):
        started = time.perf_counter()
        page = client.get(url)
        timings[name] = time.perf_counter() - started
        assert page.status_code == 200 and page.text.count('class="study ') == 50
        deep = re.search(r'id="next-page" href="([^"]+)"', page.text)
        assert deep is not None
    # 1,000 pages deep: the cursor of a study half-way through the table.
    middle = Cursor(START + timedelta(seconds=STUDIES // 4), STUDIES // 2)
    started = time.perf_counter()
    page = client.get("/", params={"after": middle.token()})
    timings["deep"] = time.perf_counter() - started
    assert page.text.count('class="study ') == 50
    print("worklist page times (s):", {k: round(v, 4) for k, v in timings.items()})
    assert max(timings.values()) < 0.5, timings
