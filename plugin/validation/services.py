"""The validation services built from a process's settings (the CLI, the API, the worker)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog.report_labels import monitored_studies, study_labels
from plugin.catalog.repository import audit
from plugin.models.bundle import Bundle
from plugin.models.registry import live_model_ref, resolve_bundle
from plugin.retrieval.index import RetrievalError
from plugin.settings import Settings
from plugin.validation.golive import GateDecision, golive_decision
from plugin.validation.intake import ReportIntake
from plugin.validation.monitoring import (
    Alert,
    MonitorStore,
    Window,
    WindowFigure,
    alert_payload,
    now_utc,
    window_figures,
)
from plugin.validation.report_labeler import ReportLabeler
from plugin.validation.site_validation import validate
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
    return _labeler(site_vocabulary(settings, bundle))


@functools.lru_cache(maxsize=4)
def _labeler(vocabulary: Vocabulary) -> ReportLabeler:
    """One labeler per vocabulary and process: building one takes seconds (medspacy), and a
    labeler keeps no state between reports."""
    return ReportLabeler(vocabulary)


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


def live_ref(settings: Settings) -> str | None:
    """``name@version`` of the live model; None when no model is live."""
    return live_model_ref(settings.data_dir, settings.model_bundle, settings.demo_model)


def floors_of(settings: Settings) -> Floors:
    return Floors(
        min_positives=settings.validation_min_positives,
        min_negatives=settings.validation_min_negatives,
        auroc_floor=settings.golive_auroc_floor,
    )


def check_golive(
    settings: Settings,
    sessions: sessionmaker[Session],
    candidate: str,
    *,
    has_ood_reference: bool,
    site: str | None = None,
    forced_reason: str | None = None,
) -> GateDecision:
    """The gate's decision on the newest labels, written to the audit log (with the reason
    when an operator overrides a refusal)."""
    intake = intake_for(settings, sessions, embed=False)
    version = intake.catch_up()
    live = live_ref(settings)
    floors = floors_of(settings)
    validation = validate(sessions, version, live_model=live, site=site, floors=floors)
    decision = golive_decision(
        validation, candidate, floors=floors, has_ood_reference=has_ood_reference
    )
    record_decision(sessions, decision, live, forced_reason)
    return decision


def record_decision(
    sessions: sessionmaker[Session],
    decision: GateDecision,
    live: str | None,
    forced_reason: str | None,
) -> None:
    """The gate's decision in the audit log, with the reason when an operator overrides."""
    candidate = decision.candidate
    replaces = f"replaces {live}" if live else "goes live (no model was live)"
    if decision.allowed:
        event, detail = "golive", f"{candidate} {replaces}: every check passed"
    elif forced_reason is not None:
        event = "golive_forced"
        detail = (
            f"{candidate} {replaces} by override: {forced_reason}; refused because: "
            + "; ".join(decision.reasons)
        )
    else:
        event, detail = "golive_refused", f"{candidate}: " + "; ".join(decision.reasons)
    with sessions() as session:
        audit(session, event, None, detail=detail)
        session.commit()
    logger.info("go-live gate for %s: %s", candidate, event)


def monitor_store(settings: Settings) -> MonitorStore:
    return MonitorStore(settings.data_dir / "monitoring")


def run_monitoring(
    settings: Settings, sessions: sessionmaker[Session], intake: ReportIntake | None = None
) -> tuple[list[WindowFigure], list[Alert]]:
    """Recompute the window figures, keep them, and raise the alerts that start or end."""
    intake = intake or intake_for(settings, sessions, embed=False)
    version = intake.catch_up()
    window = Window(
        studies=settings.monitor_window_studies,
        days=settings.monitor_window_days,
        alert_rate_tolerance=settings.monitor_alert_rate_tolerance,
    )
    with sessions() as session:
        rows = monitored_studies(session, version, newest=window.history)
        labels = study_labels(session, sorted({r.study_id for r in rows}), version)
    now = now_utc()
    figures = window_figures(rows, labels, window=window, floors=floors_of(settings), now=now)
    alerts = monitor_store(settings).record(figures, now)
    for alert in alerts:
        logger.warning("%s", alert.message())
        if settings.webhook_url:
            _post_alert(settings, alert)
    return figures, alerts


def _post_alert(settings: Settings, alert: Alert) -> None:
    from plugin.notify import NotificationError
    from plugin.notify.webhook import notify_stat as post_webhook

    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    try:
        post_webhook(settings.webhook_url or "", alert_payload(alert), secret=secret)
    except NotificationError as exc:
        logger.error("validation alert webhook failed: %s", exc)
