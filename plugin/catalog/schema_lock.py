"""One process at a time creates or migrates a schema; the others wait for it.

Every process (node, workers, API, ``pacsclip db upgrade``) brings the schemas it uses up to
date when it starts, and a rollout starts them all at once. SQLite: an exclusive ``flock`` on
a file beside the database (processes that share a SQLite file share a host). PostgreSQL: a
transaction-level advisory lock taken on the connection that changes the schema, so that it
is released when that transaction ends, which is when the others can see the new schema.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import Connection, Engine, text

logger = logging.getLogger(__name__)

CATALOG_SCHEMA = "catalog"
BROKER_SCHEMA = "broker"


def advisory_key(schema: str) -> int:
    """The PostgreSQL advisory lock key of ``schema``: fixed, and unlikely to be another
    application's (it shows in ``pg_locks`` as classid/objid)."""
    digest = hashlib.sha256(f"pacsclip:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_file(engine: Engine) -> Path | None:
    """The lock file beside a SQLite database file; None for any other database."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):  # a URI filename (uri=true), which may name no file at all
        return None
    path = Path(database)
    return path.with_name(f"{path.name}.lock")


@contextmanager
def schema_lock(engine: Engine, schema: str) -> Iterator[Connection]:
    """A connection in a transaction, held by no other process for ``schema`` until it has
    committed. Waiting is logged once, with what is waited on."""
    path = lock_file(engine)
    with _flock(path, schema) if path else nullcontext(), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            _advisory_xact_lock(connection, schema)
        yield connection


@contextmanager
def _flock(path: Path, schema: str) -> Iterator[None]:
    # Never deleted: a process waiting on the old file would not exclude one that made a new one.
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait(schema, f"lock file {path}", lambda: fcntl.flock(handle, fcntl.LOCK_EX))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _advisory_xact_lock(connection: Connection, schema: str) -> None:
    key = {"key": advisory_key(schema)}
    if connection.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), key):
        return
    _wait(
        schema,
        f"PostgreSQL advisory lock {key['key']}",
        lambda: connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), key),
    )


def _wait(schema: str, what: str, acquire: Callable[[], object]) -> None:
    logger.info("waiting for another process to create or migrate the %s schema (%s)", schema, what)
    started = time.monotonic()
    acquire()
    logger.info("%s schema lock acquired after %.1f s", schema, time.monotonic() - started)
