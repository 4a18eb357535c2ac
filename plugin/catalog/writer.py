"""The catalog write path of the receiver: one short transaction per received instance.

This runs between the fsync and the C-STORE response of every instance, so it
uses SQLAlchemy Core statements and remembers the ids of sites, studies and
series it has seen instead of loading ORM objects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, insert, select, update
from sqlalchemy.exc import IntegrityError

from plugin.catalog.models import AuditEvent, Instance, Series, Site, Study, utcnow
from plugin.catalog.records import Peer, ReceivedObject, Recorded, StoreOutcome
from plugin.study_state import StudyState

_instance = cast(Table, Instance.__table__)
_study = cast(Table, Study.__table__)
_series = cast(Table, Series.__table__)
_site = cast(Table, Site.__table__)
_audit = cast(Table, AuditEvent.__table__)


class CatalogWriter:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def digest(self, sop_instance_uid: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(
                select(_instance.c.sha256).where(_instance.c.sop_instance_uid == sop_instance_uid)
            )

    def audit(self, event: str, peer: Peer | None, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(_audit).values(_audit_values(event, peer, **fields)))

    def record_instance(
        self,
        obj: ReceivedObject,
        *,
        site_key: str,
        peer: Peer,
        path: str,
        size_bytes: int,
        sha256: str,
    ) -> Recorded:
        """Catalog an instance whose file is already durable in the spool.

        Same SOP Instance UID with other bytes: the newest copy wins and the
        replacement is audited with both digests.
        """
        # A concurrent association may insert the same study or series first: the
        # unique constraint fails, the cache is dropped and the second try finds it.
        for attempt in range(2):
            learned: dict[tuple[str, str], int] = {}
            try:
                with self.engine.begin() as conn:
                    recorded = self._record(
                        conn, learned, obj, site_key, peer, path, size_bytes, sha256
                    )
            except IntegrityError:
                if attempt == 1:
                    raise
                continue
            # Ids are remembered only once their rows are committed.
            with self._lock:
                self._ids.update(learned)
            return recorded
        raise AssertionError("unreachable")

    def _record(
        self,
        conn: Connection,
        learned: dict[tuple[str, str], int],
        obj: ReceivedObject,
        site_key: str,
        peer: Peer,
        path: str,
        size_bytes: int,
        sha256: str,
    ) -> Recorded:
        now = utcnow()
        study_id = self._id(
            conn,
            learned,
            "study",
            obj.study_instance_uid,
            lambda: self._new_study(conn, learned, obj, site_key, peer, now),
        )
        series_id = self._id(
            conn,
            learned,
            "series",
            obj.series_instance_uid,
            lambda: _insert(
                conn,
                _series,
                series_instance_uid=obj.series_instance_uid,
                study_id=study_id,
                modality=obj.modality,
                body_part_examined=obj.body_part_examined,
                series_description=obj.series_description,
                series_number=obj.series_number,
            ),
        )
        values = {
            "series_id": series_id,
            "sop_class_uid": obj.sop_class_uid,
            "transfer_syntax_uid": obj.transfer_syntax_uid,
            "path": path,
            "size_bytes": size_bytes,
            "sha256": sha256,
            "received_at": now,
            "calling_ae_title": peer.calling_ae_title,
        }
        previous = conn.scalar(
            select(_instance.c.sha256).where(_instance.c.sop_instance_uid == obj.sop_instance_uid)
        )
        if previous is None:
            conn.execute(insert(_instance).values(sop_instance_uid=obj.sop_instance_uid, **values))
            outcome, detail = StoreOutcome.STORED, None
        else:
            conn.execute(
                update(_instance)
                .where(_instance.c.sop_instance_uid == obj.sop_instance_uid)
                .values(**values)
            )
            outcome, detail = StoreOutcome.REPLACED, f"sha256 {previous} replaced by {sha256}"
        reopened = conn.execute(
            update(_study)
            .where(_study.c.id == study_id, _study.c.state != StudyState.RECEIVING)
            .values(state=StudyState.RECEIVING, needs_reanalysis=True, completed_at=None)
        ).rowcount
        conn.execute(
            insert(_audit).values(
                _audit_values(
                    outcome.value,
                    peer,
                    status=0,
                    study_instance_uid=obj.study_instance_uid,
                    sop_instance_uid=obj.sop_instance_uid,
                    detail=detail,
                )
            )
        )
        return Recorded(outcome, bool(reopened))

    def _new_study(
        self,
        conn: Connection,
        learned: dict[tuple[str, str], int],
        obj: ReceivedObject,
        site_key: str,
        peer: Peer,
        now: Any,
    ) -> int:
        site_id = self._id(
            conn,
            learned,
            "site",
            site_key,
            lambda: _insert(conn, _site, key=site_key, created_at=now),
        )
        return _insert(
            conn,
            _study,
            study_instance_uid=obj.study_instance_uid,
            site_id=site_id,
            state=StudyState.RECEIVING,
            patient_id=obj.patient_id,
            accession_number=obj.accession_number,
            study_date=obj.study_date,
            study_description=obj.study_description,
            institution_name=obj.institution_name,
            calling_ae_title=peer.calling_ae_title,
            received_at=now,
            needs_reanalysis=False,
        )

    def _id(
        self,
        conn: Connection,
        learned: dict[tuple[str, str], int],
        kind: str,
        key: str,
        create: Callable[[], int],
    ) -> int:
        cached = self._ids.get((kind, key)) or learned.get((kind, key))
        if cached is not None:
            return cached
        table, column = {
            "site": (_site, _site.c.key),
            "study": (_study, _study.c.study_instance_uid),
            "series": (_series, _series.c.series_instance_uid),
        }[kind]
        found = conn.scalar(select(table.c.id).where(column == key))
        row_id = int(found) if found is not None else create()
        learned[(kind, key)] = row_id
        return row_id


def _insert(conn: Connection, table: Table, **values: Any) -> int:
    key = conn.execute(insert(table).values(**values)).inserted_primary_key
    if key is None:
        raise RuntimeError(f"no primary key returned by the insert into {table.name}")
    return int(key[0])


def _audit_values(event: str, peer: Peer | None, **fields: Any) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "event": event,
        "calling_ae_title": peer.calling_ae_title if peer else None,
        "peer_host": peer.host if peer else None,
        **fields,
    }
