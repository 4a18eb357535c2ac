"""A STAT study overtakes routine studies already waiting for the worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from pydicom import dcmread
from sqlalchemy import select

from plugin.catalog.models import Analysis, DispatchJob, Study
from tests.integration.conftest import Pipeline
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import storescp, storescu
from tests.peers.ports import free_port

RULES = """\
version: 1
rules:
  - name: emergency-room
    match:
      calling_ae_title: [ER_CR1]
    priority: stat
"""
ROUTINE_STUDIES = 20
REDIS_URL = "redis://127.0.0.1:6379/12"  # a database of its own, emptied before the test


def broker_settings(broker: str) -> dict[str, str]:
    if broker == "sqlite":
        return {}
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()
    except redis.ConnectionError as exc:
        pytest.skip(f"no Redis server on 127.0.0.1:6379: {exc}")
    return {"broker_url": REDIS_URL, "result_backend_url": REDIS_URL}


def states(run: Pipeline) -> dict[str, str]:
    with run.node.sessions() as session:
        return dict(session.execute(select(Study.study_instance_uid, Study.state)).all())


def delivery_times(run: Pipeline) -> dict[str, float]:
    with run.node.sessions() as session:
        rows = session.execute(
            select(Study.study_instance_uid, DispatchJob.delivered_at)
            .join(Analysis, Analysis.study_id == Study.id)
            .join(DispatchJob, DispatchJob.analysis_id == Analysis.id)
            .where(DispatchJob.state == "delivered")
        ).all()
    return {uid: at.timestamp() for uid, at in rows}


@pytest.mark.parametrize("broker", ["sqlite", "redis"])
def test_stat_study_is_delivered_before_the_routine_backlog(
    pipeline: Callable[..., Pipeline], tmp_path: Path, broker: str
) -> None:
    port = free_port()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with storescp(port, tmp_path / "pacs", aet="PACS"):
        # Each analysis takes at least 0.4 s, so the routine studies queue up.
        run = pipeline(
            slow_analysis_s=0.4,
            rules_file=rules,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
            **broker_settings(broker),
        )
        routine = []
        for n in range(ROUTINE_STUDIES):
            [source] = ct_small_copies(1, tmp_path / f"routine{n}")
            routine.append(str(dcmread(source).StudyInstanceUID))
            assert storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]
        deadline = time.monotonic() + 30
        while sum(states(run).get(uid) != "receiving" for uid in routine) < ROUTINE_STUDIES:
            assert time.monotonic() < deadline, "the routine studies were not all queued"
            time.sleep(0.05)

        [source] = ct_small_copies(1, tmp_path / "stat")
        stat_uid = str(dcmread(source).StudyInstanceUID)
        waiting = [uid for uid, state in states(run).items() if state == "queued"]
        assert storescu(
            [source], "127.0.0.1", run.node.port, aec="PACSCLIP", aet="ER_CR1"
        ).statuses == [0]
        run.wait_for_state(stat_uid, "delivered", timeout_s=120)
        for uid in routine:
            run.wait_for_state(uid, "delivered", timeout_s=120)

    assert len(waiting) >= ROUTINE_STUDIES // 2, "too few studies were waiting to test priority"
    delivered = delivery_times(run)
    overtaken = [uid for uid in waiting if delivered[uid] > delivered[stat_uid]]
    # At most the one routine study already running (and the next one the worker had
    # reserved) finish first; every other waiting study is overtaken.
    assert len(overtaken) >= len(waiting) - 2, (len(overtaken), len(waiting))
