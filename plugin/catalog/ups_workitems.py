"""The task performer's claims journal and heartbeat (IHE AIW-I, ``dicom_node.performer``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plugin.catalog.models import UpsPerformer, UpsWorkitem, utcnow

CLAIMING: Final = "claiming"  # Transaction UID journaled, claim not yet confirmed
CLAIMED: Final = "claimed"
QUEUED: Final = "queued"  # inputs in the catalog, analysis asked for
ANALYSED: Final = "analysed"
STORED: Final = "stored"  # outputs stored at the Output Destination
CANCELLING: Final = "cancelling"  # to be cancelled with ``reason``
COMPLETED: Final = "completed"
CANCELED: Final = "canceled"
TAKEN: Final = "taken"  # another performer claimed it first
GONE: Final = "gone"  # finished or cancelled at the Task Manager by someone else
FINAL_STEPS: Final = frozenset({COMPLETED, CANCELED, TAKEN, GONE})


@dataclass(frozen=True)
class JournaledWorkitem:
    id: int
    workitem_uid: str
    transaction_uid: str
    task_code: str
    step: str
    study_instance_uid: str | None
    generation: int | None
    task_id: str | None
    analysis_id: int | None
    output_url: str | None
    outputs: list[list[str]] | None
    attempts: int
    next_try_at: datetime | None
    reason: str | None
    claimed_at: datetime | None
    queued_at: datetime | None


def _snapshot(row: UpsWorkitem) -> JournaledWorkitem:
    return JournaledWorkitem(
        id=row.id,
        workitem_uid=row.workitem_uid,
        transaction_uid=row.transaction_uid,
        task_code=row.task_code,
        step=row.step,
        study_instance_uid=row.study_instance_uid,
        generation=row.generation,
        task_id=row.task_id,
        analysis_id=row.analysis_id,
        output_url=row.output_url,
        outputs=row.outputs,
        attempts=row.attempts,
        next_try_at=row.next_try_at,
        reason=row.reason,
        claimed_at=row.claimed_at,
        queued_at=row.queued_at,
    )


def journal_claim(
    session: Session, workitem_uid: str, performer: str, transaction_uid: str, task_code: str
) -> JournaledWorkitem | None:
    """Write down the claim about to be made and commit; None when this performer journaled
    the workitem before (it is being worked on, or was finished)."""
    row = UpsWorkitem(
        workitem_uid=workitem_uid,
        performer=performer,
        transaction_uid=transaction_uid,
        task_code=task_code,
        step=CLAIMING,
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return _snapshot(row)


def journaled(session: Session, performer: str, workitem_uids: Iterable[str]) -> set[str]:
    """Which of these workitems this performer has journaled, in any step."""
    uids = list(workitem_uids)
    if not uids:
        return set()
    return set(
        session.scalars(
            select(UpsWorkitem.workitem_uid).where(
                UpsWorkitem.performer == performer, UpsWorkitem.workitem_uid.in_(uids)
            )
        )
    )


def open_workitems(session: Session, performer: str) -> list[JournaledWorkitem]:
    """This performer's workitems that are not finished, oldest first."""
    rows = session.scalars(
        select(UpsWorkitem)
        .where(UpsWorkitem.performer == performer, UpsWorkitem.step.not_in(FINAL_STEPS))
        .order_by(UpsWorkitem.id)
    )
    return [_snapshot(row) for row in rows]


def workitem(session: Session, row_id: int) -> JournaledWorkitem:
    row = session.get(UpsWorkitem, row_id)
    if row is None:
        raise LookupError(f"no journaled workitem {row_id}")
    return _snapshot(row)


def set_workitem(session: Session, row_id: int, **values: Any) -> None:
    """Change a journaled workitem and commit; a new step ends the previous step's retries,
    and a final step records when it finished."""
    if "step" in values:
        values.setdefault("attempts", 0)
        values.setdefault("next_try_at", None)
        if values["step"] in FINAL_STEPS:
            values["finished_at"] = utcnow()
    session.execute(
        update(UpsWorkitem).where(UpsWorkitem.id == row_id).values(updated_at=utcnow(), **values)
    )
    session.commit()


def heartbeat(
    session: Session,
    performer: str,
    *,
    host: str,
    pid: int,
    task_manager: str,
    error: str | None,
    started: bool = False,
) -> None:
    """Record that the performer is alive and whether its Task Manager answered (``error``
    None) or not; the first failure after success sets ``down_since``."""
    now = utcnow()
    row = session.get(UpsPerformer, performer)
    if row is None:
        row = UpsPerformer(performer=performer, host=host, pid=pid, task_manager=task_manager)
        session.add(row)
    if started:
        row.host, row.pid, row.task_manager, row.started_at = host, pid, task_manager, now
    row.heartbeat_at = now
    if error is None:
        row.reachable, row.down_since, row.last_error = True, None, None
    else:
        if row.reachable or row.down_since is None:
            row.down_since = now
        row.reachable, row.last_error = False, error[:500]
    session.commit()


@dataclass(frozen=True)
class PerformerStatus:
    performer: str
    host: str
    pid: int
    task_manager: str
    started_at: datetime
    heartbeat_at: datetime
    reachable: bool
    down_since: datetime | None
    last_error: str | None
    steps: dict[str, int]  # journaled workitems per step

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items() if not isinstance(v, datetime)},
            **{k: v.isoformat() for k, v in self.__dict__.items() if isinstance(v, datetime)},
        }


def performer_statuses(session: Session) -> list[PerformerStatus]:
    """Every performer that ever ran against this catalog, with its workitems per step."""
    counts: dict[str, dict[str, int]] = {}
    for performer, step, count in session.execute(
        select(UpsWorkitem.performer, UpsWorkitem.step, func.count()).group_by(
            UpsWorkitem.performer, UpsWorkitem.step
        )
    ):
        counts.setdefault(performer, {})[step] = count
    return [
        PerformerStatus(
            performer=row.performer,
            host=row.host,
            pid=row.pid,
            task_manager=row.task_manager,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            reachable=row.reachable,
            down_since=row.down_since,
            last_error=row.last_error,
            steps=counts.get(row.performer, {}),
        )
        for row in session.scalars(select(UpsPerformer).order_by(UpsPerformer.performer))
    ]


def recent_workitems(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    """The journal's newest rows, as plain values (UIDs, steps and reasons; no patient data)."""
    rows = session.scalars(select(UpsWorkitem).order_by(UpsWorkitem.id.desc()).limit(limit))
    return [
        {
            "workitem_uid": r.workitem_uid,
            "performer": r.performer,
            "task_code": r.task_code,
            "step": r.step,
            "study_instance_uid": r.study_instance_uid,
            "generation": r.generation,
            "outputs": len(r.outputs or []),
            "attempts": r.attempts,
            "reason": r.reason,
            "claimed_at": r.claimed_at.isoformat() if r.claimed_at else None,
            "finished_at": r.finished_at.isoformat() if r.finished_at else None,
        }
        for r in rows
    ]
