"""Similar-case retrieval and text search over the catalog, for the CLI and the HTTP API.

Queries: a study's images -> similar images (split into the same patient's priors and other
patients' cases) and nearest reports; free text -> images and reports. Every answer names the
model version whose embeddings it compared. Results that point at other patients' studies go
only to the authenticated API and to the operator's CLI on the server; nothing here is sent to
the PACS.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog import reports as stored_reports
from plugin.catalog.embeddings import sop_instance_uids_of, study_vectors
from plugin.catalog.repository import latest_findings
from plugin.catalog.studies import studies_matching, study_attributes, study_id_of, study_patient
from plugin.errors import PacsclipError
from plugin.models.bundle import Bundle
from plugin.retrieval.index import Hit, RetrievalError, VectorIndex, Vectors
from plugin.retrieval.store import IndexStore, Kind
from plugin.settings import Settings

logger = logging.getLogger(__name__)

REPORT_SOURCES = ("sr", "hl7", "api", "csv")
MAX_K = 200
# A study has several images and each may hit; image hits are over-fetched per wanted study.
IMAGES_PER_STUDY = 4
EXCERPT_CHARS = 160


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> Vectors: ...


class UnknownStudy(RetrievalError):
    """The study named in a query is not in the catalog."""


class NoTextTower(RetrievalError):
    """The active model cannot embed text."""


@dataclass(frozen=True)
class Filters:
    """Which studies a query may return. Dates are DICOM DA strings (YYYYMMDD), inclusive."""

    modality: str | None = None
    site: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    finding: str | None = None
    present: bool = True  # finding present (probability >= threshold) or absent (below it)
    threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"\d{8}", value):
                raise ValueError(f"{name} must be a date as YYYYMMDD, got {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")

    @property
    def active(self) -> bool:
        return any(
            v is not None
            for v in (self.modality, self.site, self.date_from, self.date_to, self.finding)
        )


@dataclass
class StudyMatch:
    study_instance_uid: str
    similarity: float
    best_image: str | None
    same_patient: bool
    site: str
    modality: str | None
    study_date: str | None
    priority: str | None
    findings: dict[str, float] = field(default_factory=dict)


@dataclass
class ReportMatch:
    study_instance_uid: str
    similarity: float
    source: str
    excerpt: str
    same_patient: bool


def sentences(text: str) -> list[str]:
    """A report cut into sentences: the demo model pools per-sentence embeddings."""
    parts = [p.strip() for p in re.split(r"(?<=[.;:!?])\s+|\n+", text)]
    return [p for p in parts if p] or [text.strip()]


def embed_text(encoder: TextEncoder, text: str) -> Vectors:
    """One unit vector for a text: the re-normalised mean of its sentences' embeddings."""
    vectors = np.asarray(encoder.encode(sentences(text)), dtype=np.float32)
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm == 0.0:
        raise RetrievalError("the text embeds to a zero vector: give words the model knows")
    result: Vectors = (mean / norm).astype(np.float32)
    return result


class RetrievalService:
    """Queries against the active model's indexes; one per process (the indexes are cached)."""

    def __init__(
        self,
        data_dir: Path,
        sessions: sessionmaker[Session],
        bundle: Callable[[], Bundle],
        text_encoder: Callable[[Bundle], TextEncoder | None],
        changed: Callable[[], object] | None = None,
    ) -> None:
        """``changed``: a stamp that changes when ``bundle`` may name another bundle (the
        registry's); the bundle is loaded again then. None: loaded once."""
        self.sessions = sessions
        self.store = IndexStore(data_dir / "retrieval", sessions)
        self._bundle_factory = bundle
        self._text_encoder_factory = text_encoder
        self._changed = changed
        self._stamp: object = None
        self._bundle: Bundle | None = None
        self._encoder: TextEncoder | None = None
        self._lock = threading.Lock()

    # -- model -------------------------------------------------------------------------------

    @property
    def bundle(self) -> Bundle:
        with self._lock:
            stamp = None if self._changed is None else self._changed()
            if self._bundle is None:
                self._bundle, self._stamp = self._bundle_factory(), stamp
            elif stamp != self._stamp:
                self._stamp = stamp  # one that fails is not tried again until the next change
                self._bundle = self._reloaded(self._bundle)
            return self._bundle

    def _reloaded(self, old: Bundle) -> Bundle:
        """The registry changed: search with the model it names now (its own indexes); one
        that does not load leaves ``old`` searching."""
        try:
            bundle = self._bundle_factory()
        except PacsclipError as exc:
            logger.error("search goes on with %s; the new model did not load: %s", old.ref, exc)
            return old
        if bundle.ref != old.ref:
            logger.info("search now runs on %s (was %s)", bundle.ref, old.ref)
            self._encoder = None
        return bundle

    @property
    def model(self) -> dict[str, Any]:
        b = self.bundle
        return {
            "name": b.manifest.name,
            "version": b.manifest.version,
            "synthetic": b.is_synthetic,
            **({"notice": "synthetic demo model, not for clinical use"} if b.is_synthetic else {}),
        }

    def encoder(self) -> TextEncoder:
        bundle = self.bundle
        with self._lock:
            if self._encoder is None:
                self._encoder = self._text_encoder_factory(bundle)
            if self._encoder is None:
                raise NoTextTower(
                    f"model {bundle.ref} has no text tower, so it cannot search by text or "
                    "index reports: use a bundle with a text encoder"
                )
            return self._encoder

    @property
    def _algorithm(self) -> tuple[str, str]:
        return self.bundle.manifest.name, self.bundle.manifest.version

    def _index(self, kind: Kind) -> VectorIndex:
        return self.store.current(kind, self.bundle.ref, self.bundle.manifest.embedding_dim)

    # -- queries -----------------------------------------------------------------------------

    def similar(
        self, study_uid: str, k: int = 10, filters: Filters | None = None
    ) -> dict[str, Any]:
        """Studies whose images are most like this study's, and the nearest reports."""
        k = _bounded(k)
        filters = filters or Filters()
        ref = self.bundle.ref
        with self.sessions() as session:
            found = study_patient(session, study_uid)
            if found is None:
                raise UnknownStudy(f"no study {study_uid} in the catalog")
            query_study, patient = found
            blobs = study_vectors(session, query_study, ref)
        answer: dict[str, Any] = {"model": self.model, "query": {"study": study_uid}}
        if not blobs:
            answer.update(priors=[], similar=[], reports=[])
            answer["note"] = f"the study has no image embeddings of model {ref}: analyse it first"
            return answer
        queries = np.stack([np.frombuffer(blob, dtype="<f4") for blob in blobs])
        studies = self._studies_for(queries, k, filters, exclude=query_study)
        reports = self._reports_for(queries, k, filters, exclude=query_study)
        matches = self._describe(studies, patient)
        answer["priors"] = [asdict(m) for m in matches if m.same_patient]
        answer["similar"] = [asdict(m) for m in matches if not m.same_patient]
        answer["reports"] = [asdict(r) for r in self._describe_reports(reports, patient)]
        return answer

    def search(self, text: str, k: int = 10, filters: Filters | None = None) -> dict[str, Any]:
        """Studies whose images, and reports whose text, best match a free-text query."""
        if not text.strip():
            raise RetrievalError("the search text is empty")
        k = _bounded(k)
        filters = filters or Filters()
        query = embed_text(self.encoder(), text)[None, :]
        studies = self._studies_for(query, k, filters, exclude=None)
        reports = self._reports_for(query, k, filters, exclude=None)
        return {
            "model": self.model,
            "query": {"text": text},
            "studies": [asdict(m) for m in self._describe(studies, None)],
            "reports": [asdict(r) for r in self._describe_reports(reports, None)],
        }

    # -- reports -----------------------------------------------------------------------------

    def add_report(self, study_uid: str, text: str, source: str = "api") -> dict[str, Any]:
        """Keep a report's text for a study and embed it with the active model's text tower."""
        if source not in REPORT_SOURCES:
            raise ValueError(f"source must be one of {', '.join(REPORT_SOURCES)}, got {source!r}")
        if not text.strip():
            raise RetrievalError("the report text is empty")
        digest = hashlib.sha256(text.encode()).hexdigest()
        vector = embed_text(self.encoder(), text)
        ref = self.bundle.ref
        with self.sessions() as session:
            owner = study_id_of(session, study_uid)
            if owner is None:
                raise UnknownStudy(f"no study {study_uid} in the catalog")
            report_id, created = stored_reports.keep_report(session, owner, source, digest, text)
            if not stored_reports.report_embedded(session, report_id, ref):
                stored_reports.add_report_embedding(session, report_id, owner, ref, vector)
            session.commit()
        self.store.sync(Kind.REPORTS, ref, self.bundle.manifest.embedding_dim)
        return {"report_id": report_id, "created": created, "model": self.model}

    def embed_missing_reports(self) -> int:
        """Embed every stored report that has no embedding of the active model (after a new
        model is activated); returns how many."""
        ref = self.bundle.ref
        with self.sessions() as session:
            missing = stored_reports.reports_without_embedding(session, ref)
            if not missing:
                return 0
            encoder = self.encoder()
            for report in missing:
                vector = embed_text(encoder, report.text)
                stored_reports.add_report_embedding(
                    session, report.id, report.study_id, ref, vector
                )
            session.commit()
        return len(missing)

    # -- maintenance -------------------------------------------------------------------------

    def rebuild(self) -> dict[str, Any]:
        dim = self.bundle.manifest.embedding_dim
        ref = self.bundle.ref
        reports_embedded = 0
        try:
            reports_embedded = self.embed_missing_reports()
        except NoTextTower:
            logger.info("model %s has no text tower: report index left empty", ref)
        images = self.store.rebuild(Kind.IMAGES, ref, dim)
        reports = self.store.rebuild(Kind.REPORTS, ref, dim)
        return {
            "model": self.model,
            "images": len(images),
            "reports": len(reports),
            "reports_embedded": reports_embedded,
            "path": str(images.path.parent),
        }

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        for kind in Kind:
            index = self._index(kind)
            out[kind.value] = {
                "count": len(index),
                "approximate": index.approximate,
                "path": str(index.path),
            }
        return out

    # -- internals ---------------------------------------------------------------------------

    def _allowed_studies(self, filters: Filters) -> set[int] | None:
        if not filters.active:
            return None
        with self.sessions() as session:
            allowed = studies_matching(
                session,
                site=filters.site,
                date_from=filters.date_from,
                date_to=filters.date_to,
                modality=filters.modality,
            )
            if filters.finding is not None and allowed:
                latest = latest_findings(session, list(allowed), algorithm=self._algorithm)
                allowed = {
                    study
                    for study, probabilities in latest.items()
                    if filters.finding in probabilities
                    and (probabilities[filters.finding] >= filters.threshold) == filters.present
                }
        return allowed

    def _studies_for(
        self, queries: Vectors, k: int, filters: Filters, *, exclude: int | None
    ) -> list[tuple[int, float, int]]:
        """(study id, best similarity, best image key) of the k best studies."""
        return self._best_per_study(Kind.IMAGES, queries, k, filters, exclude)

    def _reports_for(
        self, queries: Vectors, k: int, filters: Filters, *, exclude: int | None
    ) -> list[tuple[int, float, int]]:
        return self._best_per_study(Kind.REPORTS, queries, k, filters, exclude)

    def _best_per_study(
        self, kind: Kind, queries: Vectors, k: int, filters: Filters, exclude: int | None
    ) -> list[tuple[int, float, int]]:
        index = self._index(kind)
        if len(index) == 0:
            return []
        allowed_studies = self._allowed_studies(filters)
        owner = self.store.owners(kind, self.bundle.ref).study_of
        if allowed_studies is None and exclude is None:
            allowed: Callable[[int], bool] | None = None
        else:

            def allowed(key: int) -> bool:
                study = owner(key)
                if study is None or study == exclude:
                    return False
                return allowed_studies is None or study in allowed_studies

        best: dict[int, tuple[float, int]] = {}
        for row in queries:
            hits: list[Hit] = index.search(row, k * IMAGES_PER_STUDY, allowed=allowed)
            for hit in hits:
                study = owner(hit.key)
                if study is None or study == exclude:
                    continue
                if study not in best or hit.similarity > best[study][0]:
                    best[study] = (hit.similarity, hit.key)
        ranked = sorted(best.items(), key=lambda item: -item[1][0])[:k]
        return [(study, sim, key) for study, (sim, key) in ranked]

    def _describe(
        self, ranked: Sequence[tuple[int, float, int]], patient: str | None
    ) -> list[StudyMatch]:
        if not ranked:
            return []
        ids = [study for study, _, _ in ranked]
        with self.sessions() as session:
            studies = study_attributes(session, ids)
            images = sop_instance_uids_of(session, [key for _, _, key in ranked])
            findings = {
                study: {name: round(p, 4) for name, p in probabilities.items()}
                for study, probabilities in latest_findings(
                    session, ids, algorithm=self._algorithm
                ).items()
            }
        out = []
        for study_id, similarity, key in ranked:
            study = studies[study_id]
            out.append(
                StudyMatch(
                    study_instance_uid=study.study_instance_uid,
                    similarity=round(float(similarity), 4),
                    best_image=images.get(key),
                    same_patient=patient is not None and study.patient_id == patient,
                    site=study.site,
                    modality=study.modality,
                    study_date=study.study_date,
                    priority=study.priority,
                    findings=findings.get(study_id, {}),
                )
            )
        return out

    def _describe_reports(
        self, ranked: Sequence[tuple[int, float, int]], patient: str | None
    ) -> list[ReportMatch]:
        if not ranked:
            return []
        with self.sessions() as session:
            rows = stored_reports.reports_of_embeddings(session, [key for _, _, key in ranked])
        return [
            ReportMatch(
                study_instance_uid=rows[key].study_instance_uid,
                similarity=round(float(similarity), 4),
                source=rows[key].source,
                excerpt=_excerpt(rows[key].text),
                same_patient=patient is not None and rows[key].patient_id == patient,
            )
            for _, similarity, key in ranked
            if key in rows
        ]


def _bounded(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"


def service_for(settings: Settings, sessions: sessionmaker[Session]) -> RetrievalService:
    """The service on the bundle the worker runs (``model_bundle``, else active, else demo),
    following the registry when a model is activated."""
    from plugin.models.projection import text_encoder
    from plugin.models.registry import Registry, resolve_bundle

    registry = Registry.for_data_dir(settings.data_dir)
    return RetrievalService(
        settings.data_dir,
        sessions,
        lambda: resolve_bundle(settings.data_dir, settings.model_bundle),
        lambda bundle: text_encoder(bundle, threads=settings.inference_threads),
        changed=None if settings.model_bundle is not None else registry.stamp,
    )
