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
    ready_with = context.warm_up()

    assert ready_with == f"model {context.analyser.model.bundle.ref} loaded and ran once"
    health = context.readiness.check()
    assert not health.ready and health.reason == f"{ready_with}; not consuming yet"
    assert built == ["SR", "SC", "SEG"]  # an SR, an overlay and a SEG: the builders a study uses
    assert "plugin.delivery.jobs" in sys.modules
    assert not any(settings.results_dir.rglob("*.dcm"))  # nothing written, nothing recorded
    with context.catalog.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Analysis)) == 0


def test_a_worker_whose_model_does_not_load_is_not_ready_and_says_why(tmp_path: Path) -> None:
    context = WorkerContext(Settings(data_dir=tmp_path, model_bundle=tmp_path / "missing"))

    ready_with = context.warm_up()

    assert ready_with is None
    health = context.readiness.check()
    assert not health.ready
    assert health.reason == (
        f"model failed to load: {tmp_path / 'missing'} is not a model bundle: "
        "bundle.json is missing"
    )


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
