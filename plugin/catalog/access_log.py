"""Rows of the access log: written once per access, read by patient, study or person."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from plugin.catalog.models import AccessEvent, Study


@dataclass(frozen=True)
class AccessEntry:
    subject: str
    display_name: str
    roles: str
    via: str
    action: str
    method: str
    route: str
    status: int
    study_instance_uid: str | None = None
    client_host: str | None = None
    detail: str | None = None


def record_access(session: Session, entries: Sequence[AccessEntry]) -> None:
    """Insert ``entries``, each with the Patient ID its study has now."""
    uids = {e.study_instance_uid for e in entries if e.study_instance_uid}
    patients: dict[str, str | None] = {}
    if uids:
        found = session.execute(
            select(Study.study_instance_uid, Study.patient_id).where(
                Study.study_instance_uid.in_(uids)
            )
        )
        patients = {uid: patient for uid, patient in found}
    for entry in entries:
        uid = entry.study_instance_uid
        session.add(
            AccessEvent(
                subject=entry.subject[:255],
                display_name=entry.display_name[:255],
                roles=entry.roles[:100],
                via=entry.via,
                action=entry.action,
                method=entry.method,
                route=entry.route[:200],
                status=entry.status,
                study_instance_uid=uid[:64] if uid else None,
                patient_id=patients.get(uid) if uid else None,
                client_host=(entry.client_host or None) and entry.client_host[:64],
                detail=entry.detail,
            )
        )


def access_events(
    session: Session,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    subject: str | None = None,
    actions: Sequence[str] = (),
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The newest entries first, as plain data (``pacsclip audit list``, the auditor's page)."""
    query = select(AccessEvent).order_by(AccessEvent.id.desc()).limit(limit).offset(offset)
    if patient_id:
        query = query.where(AccessEvent.patient_id == patient_id)
    if study_uid:
        query = query.where(AccessEvent.study_instance_uid == study_uid)
    if subject:
        query = query.where(AccessEvent.subject == subject)
    if actions:
        query = query.where(AccessEvent.action.in_(list(actions)))
    return [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "subject": e.subject,
            "name": e.display_name,
            "roles": e.roles,
            "via": e.via,
            "action": e.action,
            "method": e.method,
            "route": e.route,
            "status": e.status,
            "study_instance_uid": e.study_instance_uid,
            "patient_id": e.patient_id,
            "client_host": e.client_host,
            "detail": e.detail,
        }
        for e in session.scalars(query)
    ]


def count_older_than(session: Session, before: datetime) -> int:
    return int(
        session.scalar(select(func.count()).select_from(AccessEvent).where(AccessEvent.at < before))
        or 0
    )


def delete_older_than(session: Session, before: datetime) -> int:
    """Retention's only way to remove entries: by age."""
    result = session.execute(delete(AccessEvent).where(AccessEvent.at < before))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
