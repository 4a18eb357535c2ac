"""SQLAlchemy models of the catalog: what pacsclip received, from whom, and in what state."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from plugin.catalog.column_types import UtcDateTime

# DICOM UIDs are at most 64 characters; AE titles 16.
UID = String(64)
AE_TITLE = String(16)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    # Every moment is stored in UTC and read back timezone-aware, on SQLite as on PostgreSQL.
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime()}


class Site(Base):
    __tablename__ = "site"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="site")


class Study(Base):
    __tablename__ = "study"
    # Keyset pagination of the worklist, newest first, optionally within a state or priority.
    __table_args__ = (
        Index("ix_study_received_at_id", "received_at", "id"),
        Index("ix_study_state_received_at_id", "state", "received_at", "id"),
        Index("ix_study_priority_received_at_id", "priority", "received_at", "id"),
        Index("ix_study_patient_id", "patient_id"),  # a study's priors (migration 0009)
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("site.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[str | None] = mapped_column(String(16), index=True)
    # Patient-level fields stay in the catalog (the PACS holds them too); they never reach a log.
    patient_name: Mapped[str | None] = mapped_column(Text)  # DICOM PN, as received
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    institution_name: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]
    expected_instances: Mapped[int | None]
    needs_reanalysis: Mapped[bool] = mapped_column(default=False)
    completion_reason: Mapped[str | None] = mapped_column(String(32))
    routing: Mapped[dict[str, object] | None] = mapped_column(JSON)
    # Counts completions: each one is analysed as its own generation (re-analysis after
    # late images gets new result UIDs; a redelivered task reuses its generation's).
    generation: Mapped[int] = mapped_column(default=0)
    # When retention deleted the received originals (migration 0010): never analysed again.
    originals_pruned_at: Mapped[datetime | None]

    site: Mapped[Site] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None]

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.id"
    )


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(300))  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)

    series: Mapped[Series] = relationship(back_populates="instances")


class AuditEvent(Base):
    """Who sent what, when, and which status was answered."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(AE_TITLE)
    peer_host: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    status: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)


class AccessEvent(Base):
    """Who saw or changed what: one person's (or machine token's) access to patient data, a
    state-changing action, a refusal. Only ever inserted by the application; retention
    (``retention_access_log_days``) removes old entries, a purge of the data never does."""

    __tablename__ = "access_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    subject: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str] = mapped_column(String(255))
    roles: Mapped[str] = mapped_column(String(100))
    via: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(48), index=True)
    method: Mapped[str] = mapped_column(String(8))
    route: Mapped[str] = mapped_column(String(200))  # as declared: UIDs stay parameters
    status: Mapped[int] = mapped_column(Integer)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    # Copied when the access happens, so the entry still answers after the study is purged.
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    client_host: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class QuarantineEntry(Base):
    """An object that was refused, kept on disk with the reason the operator reads."""

    __tablename__ = "quarantine_entry"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    path: Mapped[str] = mapped_column(String(300))  # relative to the quarantine directory
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str | None] = mapped_column(AE_TITLE)
    peer_host: Mapped[str | None] = mapped_column(String(64))
    # Copied from the request, not validated: may be anything the sender put there.
    sop_class_uid: Mapped[str | None] = mapped_column(String(200))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(BigInteger)


class Analysis(Base):
    """One model's results for one generation of a study."""

    __tablename__ = "analysis"
    __table_args__ = (
        UniqueConstraint("study_id", "generation", "algorithm_name", "algorithm_version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    generation: Mapped[int]
    algorithm_name: Mapped[str] = mapped_column(String(64))
    algorithm_version: Mapped[str] = mapped_column(String(64))
    synthetic: Mapped[bool]
    priority: Mapped[str] = mapped_column(String(16))
    triggered_by: Mapped[list[str]] = mapped_column(JSON)
    findings: Mapped[list[dict[str, object]]] = mapped_column(JSON)
    # Out-of-distribution status (distance, threshold, model); None when the model has no
    # reference. A study out of distribution has no findings and priority "not_scored".
    ood: Mapped[dict[str, object] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_s: Mapped[float | None]
    # "live": the model whose results go out; "shadow": a candidate scored for validation
    # only, with no result objects, jobs or flags.
    role: Mapped[str] = mapped_column(String(8), default="live", server_default="live")

    study: Mapped[Study] = relationship()
    objects: Mapped[list[ResultObject]] = relationship(
        back_populates="analysis", order_by="ResultObject.id"
    )
    jobs: Mapped[list[DispatchJob]] = relationship(
        back_populates="analysis", order_by="DispatchJob.id"
    )


class ResultObject(Base):
    """A DICOM object pacsclip made (SR or secondary capture), kept in the results folder."""

    __tablename__ = "result_object"

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analysis.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # SR | SC
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(300))  # relative to the results directory

    analysis: Mapped[Analysis] = relationship(back_populates="objects")


class DispatchJob(Base):
    """Delivery of one analysis's objects to one destination, or of its STAT flag to the
    webhook or the HL7 receiver (``kind``); failed = dead-lettered."""

    __tablename__ = "dispatch_job"
    __table_args__ = (UniqueConstraint("analysis_id", "destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analysis.id"), index=True)
    # results (SR, overlay, SEG to a destination) | webhook | hl7 (the STAT flag); for the
    # last two the destination is the kind itself, a name no configured destination may take.
    kind: Mapped[str] = mapped_column(String(16), default="results", server_default="results")
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Dead-lettered because its retries ran out on an error that sending again could fix
    # (the destination was down): replayed when the destination answers again.
    replayable: Mapped[bool] = mapped_column(default=False, server_default=false())
    # When the retry scheduled after a failed attempt is due; None when none is, or once the
    # destination answered again and an early attempt was queued.
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    analysis: Mapped[Analysis] = relationship(back_populates="jobs")


class ImageEmbedding(Base):
    """An analysed image's embedding: the source of truth the vector index is built from."""

    __tablename__ = "image_embedding"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "model_ref"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("site.id"), index=True)
    model_ref: Mapped[str] = mapped_column(String(130), index=True)  # name@version
    dim: Mapped[int]
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little endian
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship()


class StudyReport(Base):
    """A radiology report's text linked to a study (an incoming SR, HL7 ORU or the API)."""

    __tablename__ = "study_report"
    __table_args__ = (UniqueConstraint("study_id", "source", "digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # sr | hl7 | api
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the text: the same text once
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship()


class ReportLabels(Base):
    """What one labeler version read in a report: finding -> present | absent | uncertain | null."""

    __tablename__ = "report_label"
    __table_args__ = (UniqueConstraint("report_id", "labeler_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("study_report.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    labeler_version: Mapped[str] = mapped_column(String(64), index=True)
    labels: Mapped[dict[str, str | None]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UnlinkedReport(Base):
    """A report that names no study in the catalog (yet): kept with the reason, never dropped."""

    __tablename__ = "unlinked_report"
    __table_args__ = (UniqueConstraint("source", "digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # csv | hl7 | api
    study_instance_uid: Mapped[str | None] = mapped_column(String(200))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    linked_at: Mapped[datetime | None]


class ReportEmbedding(Base):
    """A report's text-tower embedding under one model version: the report index's source."""

    __tablename__ = "report_embedding"
    __table_args__ = (UniqueConstraint("report_id", "model_ref"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("study_report.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    model_ref: Mapped[str] = mapped_column(String(130), index=True)  # name@version
    dim: Mapped[int]
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little endian
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    report: Mapped[StudyReport] = relationship()


class RevisitScore(Base):
    """A 7-day ER revisit risk for an encounter linked to a study (no note text is kept)."""

    __tablename__ = "revisit_score"
    __table_args__ = (UniqueConstraint("study_id", "encounter_id", "algorithm_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    encounter_id: Mapped[str] = mapped_column(String(128))
    risk: Mapped[float]
    flagged: Mapped[bool] = mapped_column(index=True)
    threshold: Mapped[float]
    algorithm_name: Mapped[str] = mapped_column(String(64))
    algorithm_version: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    triage_linked: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UpsWorkitem(Base):
    """A UPS workitem this deployment's task performer took (IHE AIW-I): the claims journal.

    The Transaction UID is written here before the claim is sent, so a performer that dies at
    any point finds its claim again at restart and finishes or cancels the workitem once.
    """

    __tablename__ = "ups_workitem"
    __table_args__ = (UniqueConstraint("workitem_uid", "performer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    workitem_uid: Mapped[str] = mapped_column(UID, index=True)
    performer: Mapped[str] = mapped_column(AE_TITLE, index=True)
    transaction_uid: Mapped[str] = mapped_column(UID)
    task_code: Mapped[str] = mapped_column(String(64))
    # claiming|claimed|queued|analysed|stored|cancelling, then completed|canceled|taken|gone
    step: Mapped[str] = mapped_column(String(16), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    generation: Mapped[int | None]
    task_id: Mapped[str | None] = mapped_column(String(64))  # the analysis task sent
    analysis_id: Mapped[int | None]
    output_url: Mapped[str | None] = mapped_column(Text)
    # The outputs stored: [study, series, SOP class, SOP instance] UIDs, for the completion.
    outputs: Mapped[list[list[str]] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(default=0)  # failed tries of the current step
    next_try_at: Mapped[datetime | None]
    # Why it was cancelled, or the last error of the current step (never patient data).
    reason: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class UpsPerformer(Base):
    """A task performer's heartbeat and what it last heard from its Task Manager, for the
    operations page."""

    __tablename__ = "ups_performer"

    performer: Mapped[str] = mapped_column(AE_TITLE, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    task_manager: Mapped[str] = mapped_column(Text)  # its URL, without credentials
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    reachable: Mapped[bool] = mapped_column(default=True)
    down_since: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
