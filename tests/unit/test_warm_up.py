"""What the node and the worker set up before the first study, so that it is not slower than
the next ones."""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.celery_publisher import CeleryPublisher
from plugin.catalog.db import open_catalog
from plugin.catalog.models import Analysis
from plugin.settings import Settings
from plugin.task_queue import ROUTINE_QUEUE, STAT_QUEUE, make_celery
from worker.tasks import WorkerContext


def test_the_worker_scores_and_builds_once_in_memory_at_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, demo_model="live")
    context = WorkerContext(settings)

    built = context.analyser.warm_up()
    context.warm_up()

    assert built == ["SR", "SC", "SEG"]  # an SR, an overlay and a SEG: the builders a study uses
    assert "plugin.delivery.jobs" in sys.modules
    assert not any(settings.results_dir.rglob("*.dcm"))  # nothing written, nothing recorded
    with context.catalog.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Analysis)) == 0


def test_the_node_declares_the_analysis_queues_before_the_first_study(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    catalog = open_catalog(settings.effective_database_url)
    publisher = CeleryPublisher(make_celery(settings), catalog.sessions)

    publisher.connect()

    broker = settings.effective_broker_url.removeprefix("sqla+sqlite:///")
    with sqlite3.connect(broker) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM kombu_queue")}
    assert {STAT_QUEUE, ROUTINE_QUEUE} <= names


def test_a_broker_down_at_start_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    catalog = open_catalog(settings.effective_database_url)
    publisher = CeleryPublisher(make_celery(settings), catalog.sessions)

    with caplog.at_level(logging.WARNING, logger="dicom_node.celery_publisher"):
        publisher.connect()

    assert "broker not reachable at start" in caplog.text
