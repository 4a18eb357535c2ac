"""Processes that start together agree on who creates the catalog's and the broker's schema."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from kombu import Connection
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.orm import Session

from plugin.catalog.db import alembic_config, make_engine, open_catalog
from plugin.catalog.schema_lock import BROKER_SCHEMA, CATALOG_SCHEMA, lock_file, schema_lock
from plugin.task_queue import PollingSQLAlchemyTransport

PROCESSES = 4
WAITING = "waiting for another process to create or migrate the"


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"no log line {text!r}: {caplog.text}"
        time.sleep(0.02)


def migrate_while_another_waits(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Migrate ``url`` under the lock while ``open_catalog`` waits in a thread; the waiter
    must find the schema at head and leave it alone."""
    caplog.set_level(logging.INFO, logger="plugin.catalog")
    engine = make_engine(url)
    errors: list[BaseException] = []

    def open_waiting() -> None:
        try:
            open_catalog(url).engine.dispose()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    waiter = threading.Thread(target=open_waiting)
    try:
        with schema_lock(engine, CATALOG_SCHEMA) as connection:
            waiter.start()
            wait_for_log(caplog, f"{WAITING} catalog schema")
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
            assert waiter.is_alive()
        waiter.join(timeout=30)
        assert not waiter.is_alive()
        assert errors == []
        assert "catalog schema lock acquired after" in caplog.text
        assert "catalog schema migrated by another process" in caplog.text
    finally:
        engine.dispose()


def test_a_process_waits_for_the_one_migrating_the_catalog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    migrate_while_another_waits(url, caplog)
    assert (tmp_path / "catalog.sqlite3.lock").exists()


def test_an_up_to_date_catalog_is_opened_without_the_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    open_catalog(url).engine.dispose()
    caplog.set_level(logging.INFO, logger="plugin.catalog")
    engine = make_engine(url)
    with schema_lock(engine, CATALOG_SCHEMA):
        opened = threading.Thread(target=lambda: open_catalog(url).engine.dispose())
        opened.start()
        opened.join(timeout=10)
        assert not opened.is_alive(), "an up-to-date catalog waited for the schema lock"
    engine.dispose()
    assert WAITING not in caplog.text


def test_only_sqlite_files_get_a_lock_file(tmp_path: Path) -> None:
    assert lock_file(create_engine(f"sqlite:///{tmp_path / 'c.db'}")) == tmp_path / "c.db.lock"
    assert lock_file(create_engine("sqlite://")) is None
    assert lock_file(create_engine("postgresql+psycopg://u@127.0.0.1/db")) is None


def start_together(target: Callable[[str], None], url: str) -> list[int | None]:
    """Run ``target(url)`` in PROCESSES processes released at the same instant; exit codes."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(PROCESSES)

    def run() -> None:
        barrier.wait(timeout=30)
        target(url)

    processes = [context.Process(target=run) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


def open_and_close_catalog(url: str) -> None:
    open_catalog(url).engine.dispose()


def _declare_queues(url: str) -> None:
    with Connection(url, transport=PollingSQLAlchemyTransport) as connection:
        channel = connection.default_channel
        for name in ("stat", "dispatch", "routine"):
            channel.queue_declare(name)


def test_processes_migrating_a_fresh_catalog_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    assert start_together(open_and_close_catalog, url) == [0] * PROCESSES
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM alembic_version")) == 1
    engine.dispose()


def test_processes_declaring_queues_on_a_fresh_broker_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    assert start_together(_declare_queues, url) == [0] * PROCESSES
    engine = create_engine(url)
    with engine.connect() as connection:
        names = connection.scalars(text("SELECT name FROM kombu_queue ORDER BY name")).all()
    engine.dispose()
    assert names == ["dispatch", "routine", "stat"]


def test_the_broker_tables_are_created_under_the_schema_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plugin.catalog")
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    engine = create_engine(url)
    with Connection(url, transport=PollingSQLAlchemyTransport) as connection:
        channel = connection.default_channel
        with schema_lock(engine, BROKER_SCHEMA):
            opening = threading.Thread(target=channel._open)
            opening.start()
            wait_for_log(caplog, f"{WAITING} broker schema")
            assert not inspect(engine).has_table("kombu_queue")
        opening.join(timeout=10)
        assert not opening.is_alive()
        assert inspect(engine).has_table("kombu_queue")
    engine.dispose()


def test_a_queue_another_process_declared_meanwhile_is_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    other = create_engine(url)
    with Connection(url, transport=PollingSQLAlchemyTransport) as connection:
        channel = connection.default_channel

        def declare_elsewhere(_session: Session) -> None:
            # After this channel found no row for the queue, before it inserts its own.
            with other.begin() as elsewhere:
                elsewhere.execute(text("INSERT INTO kombu_queue (name) VALUES ('stat')"))

        event.listen(channel.session, "before_commit", declare_elsewhere, once=True)
        channel.queue_declare("stat")
        channel._put("stat", {"body": "task"})
        assert channel._size("stat") == 1
    with other.connect() as elsewhere:
        assert elsewhere.scalar(text("SELECT count(*) FROM kombu_queue")) == 1
    other.dispose()
