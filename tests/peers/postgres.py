"""A private PostgreSQL cluster (initdb + pg_ctl from the Debian packages) in a temp directory.

The soak restarts it on purpose, which it must not do to a server others use. As root the
cluster runs as the ``postgres`` system user (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.peers.ports import free_port

HOST = "127.0.0.1"


def postgres_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL server binaries not found (Debian: postgresql)")
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pacsclip-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def url(self, database: str = "pacsclip") -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{database}"

    def _run(self, *args: str, timeout_s: float = 120) -> None:
        command = [*(["runuser", "-u", "postgres", "--"] if self.as_postgres else []), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout_s, cwd=self.root)

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._run(
            str(self.bin / "pg_ctl"), action, "-D", str(self.data), "-w", "-t", "60",
            "-l", str(self.log), *extra,
        )  # fmt: skip

    def start(self) -> None:
        """Create the cluster and its ``pacsclip`` database, and start it."""
        self._run(str(self.bin / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(self.data))
        # A throwaway cluster: no fsync (the spool, not the catalog, is pacsclip's journal).
        options = f"-p {self.port} -k {self.root} -c listen_addresses={HOST} -c fsync=off"
        self._pg_ctl("start", "-o", options)
        self._run(str(self.bin / "createdb"), "-h", HOST, "-p", str(self.port), "-U", "postgres",
                  "pacsclip")  # fmt: skip

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


SHARED_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432"


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A uniquely named database on the machine's shared PostgreSQL server, dropped afterwards
    (with FORCE: a stopped process's pooled connections may outlive it). Skips the test when
    the server cannot be reached."""
    import pytest
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(
        f"{SHARED_SERVER_URL}/postgres",
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5},
    )
    try:
        with admin.connect():
            pass
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc.orig}")
    name = f"{prefix}_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{SHARED_SERVER_URL}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
