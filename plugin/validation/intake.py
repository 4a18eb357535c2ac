"""Reports into the catalog: linked to their study, labeled, embedded for search.

A report names its study by Study Instance UID or accession number. One that names no study in
the catalog (the study has not arrived yet, or never will) is kept in ``unlinked_report`` with
the reason and linked when its study arrives; nothing that was accepted is dropped. Every linked
report is labeled by the current labeler version; a new version (new rules or a site's new
vocabulary) labels every report again on the next pass.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog import report_labels as stored_labels
from plugin.catalog import reports as stored_reports
from plugin.catalog.studies import study_id_of
from plugin.errors import ConfigError
from plugin.validation.report_labeler import ReportLabeler, ReportRefused, check_report_text

logger = logging.getLogger(__name__)

INTAKE_SOURCES = ("sr", "hl7", "api", "csv")
# A CSV of reports: a key column and the text.
CSV_KEYS = ("study_uid", "accession")


@dataclass(frozen=True)
class Intake:
    """What happened to one report: linked to a study (and its report id), or kept waiting."""

    linked: bool
    study_instance_uid: str | None
    report_id: int | None = None
    created: bool = False
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "linked": self.linked,
            "study_instance_uid": self.study_instance_uid,
            "report_id": self.report_id,
            "created": self.created,
            "reason": self.reason,
        }


@dataclass
class ImportSummary:
    linked: int = 0
    already_stored: int = 0
    waiting: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)
    labeled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "linked": self.linked,
            "already_stored": self.already_stored,
            "waiting_for_study": self.waiting,
            "refused": self.refused,
            "labeled": self.labeled,
        }


Embed = Callable[[str, str, str], None]  # (study_uid, text, source): index a linked report


class ReportIntake:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        labeler: Callable[[], ReportLabeler],
        embed: Embed | None = None,
    ) -> None:
        self.sessions = sessions
        self._make_labeler = labeler
        self._embed = embed

    @cached_property
    def labeler(self) -> ReportLabeler:
        return self._make_labeler()

    def add(
        self,
        text: str,
        *,
        source: str,
        study_uid: str | None = None,
        accession: str | None = None,
        label: bool = True,
    ) -> Intake:
        """Keep one report; ReportRefused for an empty or non-text one."""
        if source not in INTAKE_SOURCES:
            raise ValueError(f"source must be one of {', '.join(INTAKE_SOURCES)}, got {source!r}")
        text = check_report_text(text)
        if not (study_uid or accession):
            raise ReportRefused(
                "the report names no study: give its Study Instance UID or accession"
            )
        digest = hashlib.sha256(text.encode()).hexdigest()
        with self.sessions() as session:
            study_id, uid, reason = _resolve(session, study_uid, accession)
            if study_id is None:
                stored_labels.keep_unlinked(
                    session,
                    source=source,
                    study_uid=study_uid,
                    accession=accession,
                    digest=digest,
                    text=text,
                    reason=reason or "",
                )
                session.commit()
                # The reason names the accession number: not for the log.
                logger.info(
                    "report from %s kept until its study (by %s) arrives",
                    source,
                    "study UID" if study_uid else "accession number",
                )
                return Intake(False, study_uid, reason=reason)
            report_id, created = stored_reports.keep_report(session, study_id, source, digest, text)
            session.commit()
        if label:
            self.label_missing()
        if created and self._embed is not None and uid is not None:
            self._embed(uid, text, source)
        return Intake(True, uid, report_id, created)

    def label_missing(self) -> int:
        """Label every stored report the current labeler version has not labeled."""
        with self.sessions() as session:
            todo = stored_labels.reports_without_labels(session, self.labeler.version)
            for report in todo:
                try:
                    labels = self.labeler.label(report.text).as_json()
                except ReportRefused as exc:
                    # Stored before the check existed: labeled as saying nothing, not retried.
                    logger.warning("report %d not labeled: %s", report.id, exc)
                    labels = dict.fromkeys(self.labeler.vocabulary.names)
                stored_labels.store_labels(
                    session, report.id, report.study_id, self.labeler.version, labels
                )
            session.commit()
        if todo:
            logger.info("%d reports labeled by labeler %s", len(todo), self.labeler.version)
        return len(todo)

    def link_waiting(self, study_uid: str | None = None) -> int:
        """Link the reports kept unlinked whose study has arrived since (only those naming
        ``study_uid``, when given); returns how many."""
        linked = 0
        with self.sessions() as session:
            owner = None if study_uid is None else study_id_of(session, study_uid)
            if study_uid is not None and owner is None:
                return 0
            for waiting in stored_labels.waiting_reports(session, owner):
                study_id, _, _ = _resolve(
                    session, waiting.study_instance_uid, waiting.accession_number
                )
                if study_id is None:
                    continue
                source = waiting.source
                stored_reports.keep_report(session, study_id, source, waiting.digest, waiting.text)
                stored_labels.mark_linked(session, waiting.id)
                linked += 1
            session.commit()
        if linked:
            self.label_missing()
        return linked

    def catch_up(self) -> str:
        """Link the reports whose study has arrived and label what is not labeled yet, before
        reading labels; returns the labeler version they carry."""
        self.link_waiting()
        self.label_missing()
        return self.labeler.version

    def import_csv(self, path: Path) -> ImportSummary:
        """Reports from a CSV with ``study_uid,text`` or ``accession,text`` columns."""
        rows, key = read_reports_csv(path)
        summary = ImportSummary()
        for line, row in rows:
            try:
                intake = self.add(
                    row.get("text") or "",
                    source="csv",
                    label=False,
                    **{("study_uid" if key == "study_uid" else "accession"): row[key].strip()},
                )
            except ReportRefused as exc:
                summary.refused.append({"line": line, "reason": str(exc)})
                continue
            if not intake.linked:
                summary.waiting += 1
            elif intake.created:
                summary.linked += 1
            else:
                summary.already_stored += 1
        summary.labeled = self.label_missing()
        return summary


def read_reports_csv(path: Path) -> tuple[list[tuple[int, dict[str, str]]], str]:
    """The rows (with their line numbers) and the key column of a reports CSV."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or ())
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read reports {path}: {exc}") from exc
    keys = [k for k in CSV_KEYS if k in columns]
    if len(keys) != 1 or "text" not in columns:
        raise ConfigError(
            f"{path}: needs a 'text' column and exactly one of 'study_uid' or 'accession' "
            f"(found {columns})"
        )
    return rows, keys[0]


def _resolve(
    session: Session, study_uid: str | None, accession: str | None
) -> tuple[int | None, str | None, str | None]:
    """(study row id, its UID, None) or (None, None, why not)."""
    if study_uid:
        found = study_id_of(session, study_uid)
        if found is None:
            return None, None, f"no study {study_uid} in the catalog"
        return found, study_uid, None
    ids = stored_labels.studies_by_accession(session, accession or "")
    if not ids:
        return None, None, f"no study with accession number {accession} in the catalog"
    if len(ids) > 1:
        return None, None, f"accession number {accession} names {len(ids)} studies"
    return ids[0], stored_labels.study_uid_of(session, ids[0]), None
