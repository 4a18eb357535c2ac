"""Engine, sessions and migrations of the catalog."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog.schema_lock import CATALOG_SCHEMA, schema_lock

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI read while the node writes; NORMAL sync is safe because the
    # fsynced spool is the journal: startup reconciliation re-catalogs any file a
    # power loss took from the last commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent).

    Every process migrates when it starts, and a rollout starts them together: one migrates
    under the schema lock while the others wait for it, then find nothing left to do.
    """
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    heads = set(ScriptDirectory.from_config(cfg).get_heads())
    with engine.connect() as connection:
        if _current_heads(connection) == heads:
            return
    with schema_lock(engine, CATALOG_SCHEMA) as connection:
        if _current_heads(connection) == heads:
            logger.info("catalog schema migrated by another process")
            return
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def _current_heads(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def ping(session: Session) -> None:
    """A round trip to the database; raises SQLAlchemyError when it cannot be reached."""
    session.execute(text("SELECT 1"))


@dataclass(frozen=True)
class Catalog:
    engine: Engine
    sessions: sessionmaker[Session]


def open_catalog(url: str, *, upgrade: bool = True) -> Catalog:
    """Engine + migrations + session factory, in the order every entry point needs them."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    if upgrade:
        migrate(engine)
    return Catalog(engine, make_session_factory(engine))
