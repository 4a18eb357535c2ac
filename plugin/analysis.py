"""Analysing a complete study: triage, result objects, catalog rows, dispatch jobs.

Idempotent per (study, generation, model name, model version): the result UIDs are derived
from those, and a second run finds the first one's rows, so a redelivered task never makes a
second SR in the PACS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plugin.catalog.db import Catalog
from plugin.catalog.models import (
    Analysis,
    DispatchJob,
    ImageEmbedding,
    Instance,
    ResultObject,
    Series,
    Study,
    utcnow,
)
from plugin.durable import write_durably
from plugin.inference import TriageModel, TriageReport
from plugin.results import (
    AlgorithmIdentity,
    FindingResult,
    ResultUids,
    StudyResult,
    build_measurement_report,
    build_overlay,
)
from plugin.settings import DestinationConfig, Settings
from plugin.study_state import StudyState

logger = logging.getLogger(__name__)

# Series numbers of pacsclip's result series: high, so they sort after the acquisitions.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
ALL_DESTINATIONS = "*"


@dataclass(frozen=True)
class AnalysisOutcome:
    analysis_id: int
    job_ids: list[int]
    priority: str
    created: bool  # False when an earlier run of the same generation had done it
    duration_s: float = 0.0
    since_complete_s: float | None = None


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # SR | SC
    dataset: Dataset


class StudyAnalyser:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        model: TriageModel,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.model = model
        self.now = now
        self.algorithm = AlgorithmIdentity(
            name=model.bundle.name,
            version=model.bundle.version,
            synthetic=model.bundle.is_synthetic,
        )

    def analyse(self, study_uid: str, generation: int) -> AnalysisOutcome:
        started = time.monotonic()
        with self.catalog.sessions() as session:
            study = _study(session, study_uid)
            done = self._existing(session, study.id, generation)
            if done is not None:
                return done
            paths = _instance_paths(session, study.id)
            destinations = self._destinations(study.routing)
            predecessor = self._predecessor(session, study.id, generation)
            site = study.site.key  # picks the site's promoted head, if it has one
        datasets = [dcmread(self.settings.spool_dir / p) for p in paths]
        report = self.model.triage(datasets, site=site)
        built = self._build(datasets, report, generation, predecessor)
        stored = [self._write(study_uid, obj) for obj in built]
        outcome = self._record(
            study_uid, generation, report, stored, destinations, time.monotonic() - started
        )
        logger.info(
            "study %s generation %d analysed by %s %s: priority %s, %d objects, %d jobs",
            study_uid,
            generation,
            self.algorithm.name,
            self.algorithm.version,
            report.priority,
            len(stored),
            len(outcome.job_ids),
        )
        return outcome

    def _existing(self, session: Session, study_id: int, generation: int) -> AnalysisOutcome | None:
        analysis = session.scalar(
            select(Analysis).where(
                Analysis.study_id == study_id,
                Analysis.generation == generation,
                Analysis.algorithm_name == self.algorithm.name,
                Analysis.algorithm_version == self.algorithm.version,
            )
        )
        if analysis is None:
            return None
        return AnalysisOutcome(
            analysis.id, [j.id for j in analysis.jobs], analysis.priority, created=False
        )

    def _destinations(self, routing: dict[str, object] | None) -> list[DestinationConfig]:
        named = list((routing or {}).get("destinations", [ALL_DESTINATIONS]))  # type: ignore[call-overload]
        configured = {d.name: d for d in self.settings.destinations}
        if ALL_DESTINATIONS in named:
            return list(configured.values())
        missing = [n for n in named if n not in configured]
        if missing:
            logger.warning("routing names destinations that are not configured: %s", missing)
        return [configured[n] for n in named if n in configured]

    def _predecessor(self, session: Session, study_id: int, generation: int) -> Dataset | None:
        """The SR of the latest earlier generation by the same model, for re-analysis."""
        previous = session.scalar(
            select(ResultObject)
            .join(Analysis)
            .where(
                Analysis.study_id == study_id,
                Analysis.generation < generation,
                Analysis.algorithm_name == self.algorithm.name,
                ResultObject.kind == "SR",
            )
            .order_by(Analysis.generation.desc())
            .limit(1)
        )
        if previous is None:
            return None
        return dcmread(self.settings.results_dir / previous.path)

    def _build(
        self,
        datasets: Sequence[Dataset],
        report: TriageReport,
        generation: int,
        predecessor: Dataset | None,
    ) -> list[BuiltObject]:
        study_uid = str(datasets[0].StudyInstanceUID)
        uids = ResultUids(study_uid, self.algorithm, generation)
        regions = {s.finding: s.region for s in report.saliency}
        result = StudyResult(
            findings=[
                FindingResult(
                    name=f.name,
                    display=f.display,
                    code=None,
                    probability=f.probability,
                    decision=f.decision,  # type: ignore[arg-type]
                    threshold=f.threshold,
                    region=regions.get(f.name),
                    source_sop_instance_uid=f.source_sop_instance_uid,
                )
                for f in report.findings
            ],
            priority=report.priority,  # type: ignore[arg-type]
            triggered_by=report.triggered_by,
            algorithm=self.algorithm,
        )
        when = self.now()
        scored = [ds for ds in datasets if str(ds.SOPInstanceUID) in set(report.images)]
        sr = build_measurement_report(
            scored,
            result,
            series_uid=uids.sr_series,
            sop_uid=uids.sr_instance,
            series_number=SR_SERIES_NUMBER,
            instance_number=1,
            content_datetime=when,
            predecessor=predecessor,
        )
        objects = [BuiltObject("SR", sr)]
        by_uid = {str(ds.SOPInstanceUID): ds for ds in scored}
        for n, saliency in enumerate(report.saliency):
            source = by_uid[saliency.sop_instance_uid]
            objects.append(
                BuiltObject(
                    "SC",
                    build_overlay(
                        source,
                        saliency.heatmap,
                        result,
                        self.model.display(source),
                        series_uid=uids.sc_series,
                        sop_uid=uids.sc_instance(n),
                        series_number=SC_SERIES_NUMBER,
                        instance_number=n + 1,
                        content_datetime=when,
                    ),
                )
            )
        return objects

    def _write(self, study_uid: str, obj: BuiltObject) -> ResultObject:
        ds = obj.dataset
        relative = f"{study_uid}/{ds.SOPInstanceUID}.dcm"
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = self.settings.results_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.settings.results_dir / ".incoming").mkdir(exist_ok=True)
        write_durably(path, buffer.getvalue(), self.settings.results_dir / ".incoming")
        return ResultObject(
            kind=obj.kind,
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            path=relative,
        )

    def _record(
        self,
        study_uid: str,
        generation: int,
        report: TriageReport,
        objects: list[ResultObject],
        destinations: list[DestinationConfig],
        duration_s: float,
    ) -> AnalysisOutcome:
        with self.catalog.sessions() as session:
            study = _study(session, study_uid)
            analysis = Analysis(
                study_id=study.id,
                generation=generation,
                algorithm_name=self.algorithm.name,
                algorithm_version=self.algorithm.version,
                synthetic=self.algorithm.synthetic,
                priority=report.priority,
                triggered_by=list(report.triggered_by),
                findings=[
                    {
                        "name": f.name,
                        "display": f.display,
                        "probability": f.probability,
                        "raw_probability": f.raw_probability,
                        "decision": f.decision,
                        "threshold": f.threshold,
                        "source_sop_instance_uid": f.source_sop_instance_uid,
                    }
                    for f in report.findings
                ],
                duration_s=duration_s,
                objects=objects,
                jobs=[DispatchJob(destination=d.name, state="pending") for d in destinations],
            )
            session.add(analysis)
            self._keep_embeddings(session, study, report)
            # Only the newest generation moves the study on: a study reopened by late
            # images while this ran stays receiving.
            if study.generation == generation and study.state in (
                StudyState.COMPLETE,
                StudyState.QUEUED,
            ):
                study.state = StudyState.ANALYSED
                study.needs_reanalysis = False
                study.priority = report.priority
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                done = self._existing(session, study.id, generation)
                if done is None:
                    raise
                return done
            completed = study.completed_at
            return AnalysisOutcome(
                analysis.id,
                [j.id for j in analysis.jobs],
                report.priority,
                created=True,
                duration_s=duration_s,
                since_complete_s=None
                if completed is None
                else (utcnow() - _aware(completed)).total_seconds(),
            )

    def _keep_embeddings(self, session: Session, study: Study, report: TriageReport) -> None:
        """Store each scored image's embedding once per model: the retrieval index's source."""
        model_ref = self.model.bundle.ref
        known = set(
            session.scalars(
                select(ImageEmbedding.sop_instance_uid).where(
                    ImageEmbedding.study_id == study.id, ImageEmbedding.model_ref == model_ref
                )
            )
        )
        for sop_uid, vector in zip(report.images, report.embeddings, strict=True):
            if sop_uid in known:
                continue
            session.add(
                ImageEmbedding(
                    sop_instance_uid=sop_uid,
                    study_id=study.id,
                    site_id=study.site_id,
                    model_ref=model_ref,
                    dim=int(vector.shape[0]),
                    vector=vector.astype("<f4").tobytes(),
                )
            )


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise LookupError(f"no study {study_uid} in the catalog")
    return study


def _instance_paths(session: Session, study_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Instance.path)
            .join(Series)
            .where(Series.study_id == study_id)
            .order_by(Instance.id)
        )
    )


@dataclass(frozen=True)
class JobFiles:
    job_id: int
    destination: DestinationConfig | None
    files: list[Path]
    state: str


def job_files(catalog: Catalog, settings: Settings, job_id: int) -> JobFiles:
    """What one dispatch job sends, and where."""
    with catalog.sessions() as session:
        job = session.get(DispatchJob, job_id)
        if job is None:
            raise LookupError(f"no dispatch job {job_id}")
        destination = next((d for d in settings.destinations if d.name == job.destination), None)
        files = [settings.results_dir / o.path for o in job.analysis.objects]
        return JobFiles(job.id, destination, files, job.state)


def finish_job(
    catalog: Catalog, job_id: int, *, delivered: bool, error: str | None
) -> tuple[int, float]:
    """Record a job's outcome; the study is delivered once every job of its analysis is.

    Returns the number of objects of the job and the seconds since its analysis."""
    with catalog.sessions() as session:
        job = session.get(DispatchJob, job_id)
        if job is None:
            raise LookupError(f"no dispatch job {job_id}")
        job.attempts += 1
        job.updated_at = utcnow()
        job.last_error = error
        job.state = "delivered" if delivered else "failed"
        if delivered:
            job.delivered_at = job.updated_at
        analysis = job.analysis
        study = session.get(Study, analysis.study_id)
        if (
            study is not None
            and study.state == StudyState.ANALYSED
            and study.generation == analysis.generation
            and all(j.state == "delivered" for j in analysis.jobs)
        ):
            study.state = StudyState.DELIVERED
        session.commit()
        return len(analysis.objects), (utcnow() - _aware(analysis.created_at)).total_seconds()


def note_attempt(catalog: Catalog, job_id: int, error: str) -> None:
    """A failed attempt that will be retried: counted and explained, still pending."""
    with catalog.sessions() as session:
        job = session.get(DispatchJob, job_id)
        if job is None:
            raise LookupError(f"no dispatch job {job_id}")
        job.attempts += 1
        job.updated_at = utcnow()
        job.last_error = error
        session.commit()


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; the catalog stores UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
