"""The node on a PostgreSQL catalog: migrations, duplicates, replacements, and the CLI."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from plugin.catalog import repository
from plugin.catalog.access_log import (
    AccessEntry,
    access_events,
    delete_older_than,
    record_access,
)
from plugin.catalog.db import alembic_config, open_catalog
from tests.integration.conftest import RunningNode
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import storescu
from tests.peers.postgres import scratch_database

pytestmark = pytest.mark.postgres

SUCCESS = 0x0000
NODE_AET = "PACSCLIP"
STUDY_FIELDS = {"study_instance_uid", "state", "site", "instances", "received_at", "priority"}


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A fresh database on the local server for this module, dropped afterwards."""
    with scratch_database("pacsclip_test") as url:
        yield url


def _changed_pixel_copy(source: Path, out_dir: Path) -> Path:
    """The same object (same SOP Instance UID) with its first pixel byte flipped."""
    ds = pydicom.dcmread(source)
    pixels = bytearray(ds.PixelData)
    pixels[0] ^= 0xFF
    ds.PixelData = bytes(pixels)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / source.name
    ds.save_as(path)
    return path


def _send(files: list[Path], node: RunningNode) -> None:
    result = storescu(
        files, "127.0.0.1", node.port, aec=NODE_AET, extra_args=["-to", "5"], timeout_s=30
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.sent == [(path, SUCCESS) for path in files]


def test_node_catalogs_into_postgres(
    tmp_path: Path, database_url: str, start_node: Callable[..., RunningNode]
) -> None:
    files = ct_small_copies(5, tmp_path / "ct")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)
    replaced_uid = str(pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
    replacement = _changed_pixel_copy(files[1], tmp_path / "changed")
    node = start_node(database_url=database_url)

    _send(files, node)
    [done] = node.publisher.wait_for(1, timeout_s=10)
    assert (done.study_instance_uid, done.reason, done.reanalysis) == (
        study_uid,
        "association_released",
        False,
    )

    # One identical resend and one changed object under a known SOP Instance UID.
    _send([files[0], replacement], node)
    [_, reopened] = node.publisher.wait_for(2, timeout_s=10)
    assert (reopened.study_instance_uid, reopened.reason) == (study_uid, "association_released")
    assert reopened.reanalysis  # the replacement reopened the completed study

    with node.sessions() as session:
        assert session.get_bind().dialect.name == "postgresql"
        detail = repository.study_detail(session, study_uid)
        assert detail is not None
        assert detail["instances"] == 5
        assert detail["state"] == "complete"
        assert detail["needs_reanalysis"] is True
        events = {
            name: [e.sop_instance_uid for e in repository.audit_events(session, event=name)]
            for name in ("stored", "duplicate", "replaced")
        }
        versions = session.scalars(text("SELECT version_num FROM alembic_version")).all()
    assert len(events["stored"]) == 5
    assert set(events["stored"]) == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
    }
    assert events["duplicate"] == [str(first.SOPInstanceUID)]
    assert events["replaced"] == [replaced_uid]

    [row] = [
        i for s in detail["series"] for i in s["instances"] if i["sop_instance_uid"] == replaced_uid
    ]
    spooled = (node.settings.spool_dir / row["path"]).read_bytes()
    assert row["sha256"] == hashlib.sha256(spooled).hexdigest()  # the newest copy won
    assert pydicom.dcmread(BytesIO(spooled)).PixelData == pydicom.dcmread(replacement).PixelData

    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert head is not None
    assert versions == [head]  # the node migrated the database to the newest revision

    pacsclip = Path(sys.executable).with_name("pacsclip")
    listed = subprocess.run(
        [
            str(pacsclip),
            "--database-url",
            database_url,
            "--data-dir",
            str(tmp_path / "cli-data"),
            "studies",
            "list",
            "--json",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    studies = json.loads(listed.stdout)
    assert isinstance(studies, list)
    assert all(isinstance(s, dict) and s.keys() >= STUDY_FIELDS for s in studies)
    [study] = studies
    assert study["study_instance_uid"] == study_uid
    assert (study["state"], study["instances"]) == ("complete", 5)
    assert study["site"] == done.site_key
    assert study["priority"] == done.priority


def test_the_access_log_on_postgres_is_appended_to_never_updated(database_url: str) -> None:
    catalog = open_catalog(database_url)
    entry = AccessEntry("rita", "Rita", "radiologist", "oidc", "view_study", "GET", "/s", 200)
    with catalog.sessions.begin() as session:
        record_access(session, [entry])
    with pytest.raises(DBAPIError, match="never changed"), catalog.engine.begin() as connection:
        connection.execute(text("UPDATE access_event SET subject = 'someone else'"))
    with catalog.sessions() as session:
        assert [e["subject"] for e in access_events(session)] == ["rita"]
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    with catalog.sessions.begin() as session:
        assert delete_older_than(session, later) == 1
    catalog.engine.dispose()
