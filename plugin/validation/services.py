"""The validation services built from a process's settings (the CLI, the API, the worker)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from plugin.models.bundle import Bundle
from plugin.models.registry import resolve_bundle
from plugin.retrieval.index import RetrievalError
from plugin.settings import Settings
from plugin.validation.intake import ReportIntake
from plugin.validation.report_labeler import ReportLabeler
from plugin.validation.statistics import Floors
from plugin.validation.vocabulary import (
    DEFAULT_TERMS,
    Vocabulary,
    build_vocabulary,
    read_vocabulary_file,
)

logger = logging.getLogger(__name__)


def site_vocabulary(settings: Settings, bundle: Bundle) -> Vocabulary:
    """The defaults, the bundle's findings with their report terms, and the site's file.

    A bundle finding that no list names cannot be labeled: it is left out with a warning, and
    validation shows it as unlabeled.
    """
    extra = (
        read_vocabulary_file(settings.report_vocabulary_file)
        if settings.report_vocabulary_file is not None
        else {}
    )
    bundle_terms = {f.name: f.report_terms for f in bundle.findings if f.report_terms}
    known = {t.finding for t in DEFAULT_TERMS} | set(extra) | set(bundle_terms)
    names = [t.finding for t in DEFAULT_TERMS]
    names += [f.name for f in bundle.findings if f.name in known and f.name not in names]
    names += [name for name in extra if name not in names]
    for finding in bundle.findings:
        if finding.name not in known:
            logger.warning(
                "finding %s of %s has no report terms: reports cannot label it "
                "(add report_terms to the bundle or the site's report vocabulary)",
                finding.name,
                bundle.ref,
            )
    return build_vocabulary(names, extra, bundle_terms=bundle_terms)


def labeler_for(settings: Settings) -> ReportLabeler:
    bundle = resolve_bundle(settings.data_dir, settings.model_bundle)
    return ReportLabeler(site_vocabulary(settings, bundle))


def intake_for(
    settings: Settings, sessions: sessionmaker[Session], *, embed: bool = True
) -> ReportIntake:
    """Reports in: linked, labeled and (where the model has a text tower) indexed for search."""
    index: Callable[[str, str, str], None] | None = None
    if embed:
        from plugin.retrieval.service import service_for

        retrieval = service_for(settings, sessions)

        def index(study_uid: str, text: str, source: str) -> None:
            try:
                retrieval.add_report(study_uid, text, source)
            except RetrievalError as exc:
                logger.info("report not indexed for search: %s", exc)

    return ReportIntake(sessions, lambda: labeler_for(settings), index)


def floors_of(settings: Settings) -> Floors:
    return Floors(
        min_positives=settings.validation_min_positives,
        min_negatives=settings.validation_min_negatives,
        auroc_floor=settings.golive_auroc_floor,
    )
