"""A study's analyses as the analyser reads and writes them: the study to analyse, the run of
a generation already recorded, the SR of an earlier generation, and a new run recorded with
its result objects, dispatch jobs and image embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plugin.catalog.embeddings import keep_image_embeddings
from plugin.catalog.models import Analysis, DispatchJob, ResultObject, Study
from plugin.catalog.studies import instance_paths
from plugin.study_state import StudyState

LIVE, SHADOW = "live", "shadow"


@dataclass(frozen=True)
class StudyToAnalyse:
    id: int
    site_key: str
    routing: dict[str, object] | None
    instance_paths: list[str]  # relative to the spool directory, in the order cataloged


def study_to_analyse(session: Session, study_uid: str) -> StudyToAnalyse:
    """The study with its site and instances; LookupError when it is not in the catalog."""
    study = _study(session, study_uid)
    return StudyToAnalyse(
        id=study.id,
        site_key=study.site.key,
        routing=study.routing,
        instance_paths=instance_paths(session, study.id),
    )


@dataclass(frozen=True)
class RecordedAnalysis:
    analysis_id: int
    job_ids: list[int]
    priority: str
    created: bool  # False when it had been recorded by an earlier run
    completed_at: datetime | None = None  # when the study was completed, for a new record


def find_analysis(
    session: Session,
    study_id: int,
    generation: int,
    algorithm_name: str,
    algorithm_version: str,
    role: str | None = None,
) -> RecordedAnalysis | None:
    """The analysis of this generation by this model name and version (in ``role``, any
    when None), if one is recorded."""
    query = select(Analysis).where(
        Analysis.study_id == study_id,
        Analysis.generation == generation,
        Analysis.algorithm_name == algorithm_name,
        Analysis.algorithm_version == algorithm_version,
    )
    analysis = session.scalar(query if role is None else query.where(Analysis.role == role))
    if analysis is None:
        return None
    return RecordedAnalysis(
        analysis.id, [j.id for j in analysis.jobs], analysis.priority, created=False
    )


@dataclass(frozen=True)
class StudyProgress:
    state: str
    generation: int
    priority: str | None


def study_progress(session: Session, study_uid: str) -> StudyProgress | None:
    """A study's state, latest generation and priority; None when it is not in the catalog."""
    row = session.execute(
        select(Study.state, Study.generation, Study.priority).where(
            Study.study_instance_uid == study_uid
        )
    ).first()
    return None if row is None else StudyProgress(row.state, row.generation, row.priority)


def live_results(
    session: Session, study_uid: str, generation: int
) -> tuple[int, list[ResultFile]] | None:
    """The live analysis of a study's generation (by whichever model was live then) and its
    result objects; None while there is none. The latest one when models changed between
    two runs of the same generation."""
    analysis = session.scalar(
        select(Analysis)
        .join(Study, Study.id == Analysis.study_id)
        .where(
            Study.study_instance_uid == study_uid,
            Analysis.generation == generation,
            Analysis.role == LIVE,
        )
        .order_by(Analysis.id.desc())
        .limit(1)
    )
    if analysis is None:
        return None
    files = [
        ResultFile(o.kind, o.sop_instance_uid, o.series_instance_uid, o.path)
        for o in analysis.objects
    ]
    return analysis.id, files


def predecessor_report_path(
    session: Session, study_id: int, generation: int, algorithm_name: str
) -> str | None:
    """Where the SR of the latest earlier generation by the same model is kept (relative to
    the results folder); None when there is none."""
    return session.scalar(
        select(ResultObject.path)
        .join(Analysis)
        .where(
            Analysis.study_id == study_id,
            Analysis.generation < generation,
            Analysis.algorithm_name == algorithm_name,
            Analysis.role == LIVE,
            ResultObject.kind == "SR",
        )
        .order_by(Analysis.generation.desc())
        .limit(1)
    )


@dataclass(frozen=True)
class ResultFile:
    """A result object written to the results folder."""

    kind: str  # SR | SC
    sop_instance_uid: str
    series_instance_uid: str
    path: str  # relative to the results directory


@dataclass(frozen=True)
class NewAnalysis:
    generation: int
    algorithm_name: str
    algorithm_version: str
    synthetic: bool
    priority: str
    triggered_by: list[str]
    findings: list[dict[str, object]]
    duration_s: float
    objects: list[ResultFile]
    destinations: list[str]  # one pending dispatch job each
    ood: dict[str, object] | None = None  # out-of-distribution status, when checked


@dataclass(frozen=True)
class ScoredImages:
    """The embeddings of the images a model scored, one row per SOP Instance UID."""

    model_ref: str  # name@version
    sop_instance_uids: Sequence[str]
    vectors: npt.NDArray[np.float32]


def record_analysis(
    session: Session, study_uid: str, new: NewAnalysis, scored: ScoredImages
) -> RecordedAnalysis:
    """Record a run and commit it; the newest generation moves the study to analysed.

    When another run recorded the same analysis first, that one is returned (``created``
    False); LookupError when the study is not in the catalog.
    """
    study = _study(session, study_uid)
    _drop_shadow_run(session, study.id, new)
    analysis = _analysis_row(study.id, new, LIVE)
    analysis.objects = [
        ResultObject(
            kind=o.kind,
            sop_instance_uid=o.sop_instance_uid,
            series_instance_uid=o.series_instance_uid,
            path=o.path,
        )
        for o in new.objects
    ]
    analysis.jobs = [DispatchJob(destination=name, state="pending") for name in new.destinations]
    session.add(analysis)
    _keep_embeddings(session, study, scored)
    # Only the newest generation moves the study on: a study reopened by late
    # images while this ran stays receiving.
    if _still_to_analyse(study, new.generation):
        study.state = StudyState.ANALYSED
        study.needs_reanalysis = False
        study.priority = new.priority
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        done = find_analysis(
            session, study.id, new.generation, new.algorithm_name, new.algorithm_version, LIVE
        )
        if done is None:
            raise
        return done
    return RecordedAnalysis(
        analysis.id,
        [j.id for j in analysis.jobs],
        new.priority,
        created=True,
        completed_at=study.completed_at,
    )


def record_shadow_analysis(session: Session, study_uid: str, new: NewAnalysis) -> bool:
    """Record a shadow model's run and commit it: scores only, no result objects, no jobs,
    and the study's state and priority are the live model's alone. False when an earlier run
    recorded it."""
    study = _study(session, study_uid)
    if find_analysis(session, study.id, new.generation, new.algorithm_name, new.algorithm_version):
        return False
    session.add(_analysis_row(study.id, new, SHADOW))
    try:
        session.commit()
    except IntegrityError:  # a redelivered task recorded it at the same time
        session.rollback()
        return False
    return True


def _drop_shadow_run(session: Session, study_id: int, new: NewAnalysis) -> None:
    """The same model scored this generation in shadow before it went live (a study queued
    again with ``pacsclip studies requeue``): the live run replaces that record, which holds
    the same scores and nothing else."""
    session.execute(
        delete(Analysis).where(
            Analysis.study_id == study_id,
            Analysis.generation == new.generation,
            Analysis.algorithm_name == new.algorithm_name,
            Analysis.algorithm_version == new.algorithm_version,
            Analysis.role == SHADOW,
        )
    )


def record_embeddings_only(
    session: Session, study_uid: str, generation: int, scored: ScoredImages
) -> bool:
    """Keep the embeddings of a study that routing sends to retrieval only, and move its
    newest generation to analysed (no findings, objects or jobs); commit. False when late
    images reopened it meanwhile."""
    study = _study(session, study_uid)
    _keep_embeddings(session, study, scored)
    moved = _still_to_analyse(study, generation)
    if moved:
        study.state = StudyState.ANALYSED
        study.needs_reanalysis = False
    session.commit()
    return moved


def mark_shadow_only(session: Session, study_uid: str, generation: int) -> bool:
    """End the study as ``shadow_only`` (no model was live) and commit; False when late images
    reopened it meanwhile or a live analysis already moved it on."""
    study = _study(session, study_uid)
    if not _still_to_analyse(study, generation):
        return False
    study.state = StudyState.SHADOW_ONLY
    study.needs_reanalysis = False
    session.commit()
    return True


def _keep_embeddings(session: Session, study: Study, scored: ScoredImages) -> None:
    keep_image_embeddings(
        session,
        study_id=study.id,
        site_id=study.site_id,
        model_ref=scored.model_ref,
        sop_instance_uids=scored.sop_instance_uids,
        vectors=scored.vectors,
    )


def _still_to_analyse(study: Study, generation: int) -> bool:
    """Whether a run of ``generation`` may move the study on: late images may have reopened
    it (a newer generation, back to receiving) while the run went on."""
    return study.generation == generation and study.state in (
        StudyState.COMPLETE,
        StudyState.QUEUED,
    )


def _analysis_row(study_id: int, new: NewAnalysis, role: str) -> Analysis:
    return Analysis(
        study_id=study_id,
        generation=new.generation,
        algorithm_name=new.algorithm_name,
        algorithm_version=new.algorithm_version,
        synthetic=new.synthetic,
        priority=new.priority,
        triggered_by=new.triggered_by,
        findings=new.findings,
        ood=new.ood,
        duration_s=new.duration_s,
        role=role,
    )


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise LookupError(f"no study {study_uid} in the catalog")
    return study
