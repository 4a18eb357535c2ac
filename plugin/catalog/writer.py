"""The catalog write path of the node: received instances, many to a transaction.

The node's recorder calls it for every batch of spooled instances, so it uses SQLAlchemy
Core statements built once (parameters bound at execution) and remembers the ids of the
sites, studies and series it has seen instead of loading ORM objects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from plugin.catalog.models import AuditEvent, Instance, Series, Site, Study, utcnow
from plugin.catalog.records import Peer, ReceivedObject, Recorded, SpooledInstance, StoreOutcome
from plugin.study_state import StudyState

_instance = cast(Table, Instance.__table__)
_study = cast(Table, Study.__table__)
_series = cast(Table, Series.__table__)
_site = cast(Table, Site.__table__)
_audit = cast(Table, AuditEvent.__table__)

_PREVIOUS_DIGEST = select(_instance.c.sha256).where(
    _instance.c.sop_instance_uid == bindparam("uid")
)
_INSERT_INSTANCE = insert(_instance)
_REPLACE_INSTANCE = update(_instance).where(_instance.c.sop_instance_uid == bindparam("uid"))
_REOPEN_STUDY = (
    update(_study)
    .where(_study.c.id == bindparam("study_id"), _study.c.state != StudyState.RECEIVING)
    .values(state=StudyState.RECEIVING, needs_reanalysis=True, completed_at=None)
)
_INSERT_AUDIT = insert(_audit)
_FIND_ID = {
    "site": select(_site.c.id).where(_site.c.key == bindparam("key")),
    "study": select(_study.c.id).where(_study.c.study_instance_uid == bindparam("key")),
    "series": select(_series.c.id).where(_series.c.series_instance_uid == bindparam("key")),
}

_Ids = dict[tuple[str, str], int]


class CatalogWriter:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids: _Ids = {}
        self._lock = threading.Lock()

    def record_instances(self, batch: Sequence[SpooledInstance]) -> list[Recorded]:
        """Catalog instances whose files are already durable in the spool, in one transaction.

        Same SOP Instance UID with the same bytes is a duplicate: audited, nothing
        changes. With other bytes the newest copy wins and the replacement is
        audited with both digests. Instances are recorded in the order given.
        """
        # Another writer (a second node on the same database) may insert the same study or
        # series first: the unique constraint fails and the second try finds its row.
        for attempt in range(2):
            learned: _Ids = {}
            try:
                with self.engine.begin() as conn:
                    recorded = [self._record(conn, learned, item) for item in batch]
            except IntegrityError:
                if attempt == 1:
                    raise
                continue
            # Ids are remembered only once their rows are committed.
            with self._lock:
                self._ids.update(learned)
            return recorded
        raise AssertionError("unreachable")

    def _record(self, conn: Connection, learned: _Ids, item: SpooledInstance) -> Recorded:
        obj, peer, sha256 = item.obj, item.peer, item.sha256
        now = utcnow()
        audit = {
            "status": 0,
            "study_instance_uid": obj.study_instance_uid,
            "sop_instance_uid": obj.sop_instance_uid,
            "detail": None,
        }
        previous = conn.scalar(_PREVIOUS_DIGEST, {"uid": obj.sop_instance_uid})
        if previous == sha256:
            conn.execute(_INSERT_AUDIT, _audit_values(StoreOutcome.DUPLICATE, peer, **audit))
            return Recorded(StoreOutcome.DUPLICATE, reopened=False)

        def new_study() -> int:
            return self._new_study(conn, learned, obj, item.site_key, peer, now)

        def new_series() -> int:
            return _insert(
                conn,
                _series,
                series_instance_uid=obj.series_instance_uid,
                study_id=study_id,
                modality=obj.modality,
                body_part_examined=obj.body_part_examined,
                series_description=obj.series_description,
                series_number=obj.series_number,
            )

        study_id = self._id(conn, learned, "study", obj.study_instance_uid, new_study)
        series_id = self._id(conn, learned, "series", obj.series_instance_uid, new_series)
        values = {
            "series_id": series_id,
            "sop_class_uid": obj.sop_class_uid,
            "transfer_syntax_uid": obj.transfer_syntax_uid,
            "path": item.path,
            "size_bytes": item.size_bytes,
            "sha256": sha256,
            "received_at": now,
            "calling_ae_title": peer.calling_ae_title,
        }
        if previous is None:
            conn.execute(_INSERT_INSTANCE, {"sop_instance_uid": obj.sop_instance_uid, **values})
            outcome = StoreOutcome.STORED
        else:
            conn.execute(_REPLACE_INSTANCE, {"uid": obj.sop_instance_uid, **values})
            outcome = StoreOutcome.REPLACED
            audit["detail"] = f"sha256 {previous} replaced by {sha256}"
        reopened = conn.execute(_REOPEN_STUDY, {"study_id": study_id}).rowcount
        conn.execute(_INSERT_AUDIT, _audit_values(outcome, peer, **audit))
        return Recorded(outcome, bool(reopened))

    def _new_study(
        self,
        conn: Connection,
        learned: _Ids,
        obj: ReceivedObject,
        site_key: str,
        peer: Peer,
        now: datetime,
    ) -> int:
        def new_site() -> int:
            return _insert(conn, _site, key=site_key, created_at=now)

        return _insert(
            conn,
            _study,
            study_instance_uid=obj.study_instance_uid,
            site_id=self._id(conn, learned, "site", site_key, new_site),
            state=StudyState.RECEIVING,
            patient_name=obj.patient_name,
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
        self, conn: Connection, learned: _Ids, kind: str, key: str, create: Callable[[], int]
    ) -> int:
        cached = self._ids.get((kind, key)) or learned.get((kind, key))
        if cached is not None:
            return cached
        found = conn.scalar(_FIND_ID[kind], {"key": key})
        row_id = int(found) if found is not None else create()
        learned[(kind, key)] = row_id
        return row_id


def _insert(conn: Connection, table: Table, **values: Any) -> int:
    key = conn.execute(insert(table), values).inserted_primary_key
    if key is None:
        raise RuntimeError(f"no primary key returned by the insert into {table.name}")
    return int(key[0])


def _audit_values(event: str, peer: Peer | None, **fields: Any) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "event": str(event),
        "calling_ae_title": peer.calling_ae_title if peer else None,
        "peer_host": peer.host if peer else None,
        **fields,
    }
