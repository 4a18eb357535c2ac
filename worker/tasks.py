"""The worker's tasks: ids in, ids out; the work is done in ``plugin``.

Each worker process keeps one ``WorkerContext`` (settings, catalog, model loaded once),
attached to the Celery app by ``worker.main``.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import sqlalchemy.exc
from celery import Celery, Task
from pydicom import dcmread

from plugin.analysis import StudyAnalyser
from plugin.catalog.analyses import mark_shadow_only, study_to_analyse
from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.studies import instance_paths_of_classes
from plugin.errors import PacsclipError
from plugin.inference import TriageModel
from plugin.metrics import PacsclipMetrics, Stage
from plugin.models.bundle import Bundle
from plugin.models.projection import text_encoder
from plugin.models.registry import Registry, live_bundle, live_model_ref
from plugin.pipelines import RETRIEVAL, TRIAGE, pipelines_of
from plugin.probes import Readiness
from plugin.retrieval.service import NoTextTower, RetrievalService
from plugin.retrieval.sr_text import REPORT_SR_CLASSES, is_foreign_report, report_text
from plugin.retrieval.store import IndexStore, Kind
from plugin.settings import Settings
from plugin.task_queue import ANALYSE_STUDY, DISPATCH_QUEUE, DISPATCH_RESULT, FINETUNE_BUNDLE
from plugin.triage.site_heads import load_active_site_heads, site_heads_stamp
from plugin.validation.intake import ReportIntake
from plugin.validation.report_labeler import ReportRefused
from plugin.validation.services import labeler_for, run_monitoring
from plugin.validation.shadow import ShadowAnalyser

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    metrics: PacsclipMetrics = field(default_factory=PacsclipMetrics)
    monitored_at: float | None = None  # monotonic time of the last monitoring run
    # What the worker's /health answers: not ready until the model loaded and ran once and
    # the worker consumes (``worker.main`` says when).
    readiness: Readiness = field(default_factory=lambda: Readiness("starting"))
    # The registry's state when the models were loaded (None: not loaded yet); a study finds
    # the models reloaded first when it changed (``refresh_models``).
    models_stamp: object = None

    @cached_property
    def catalog(self) -> Catalog:
        return open_catalog(self.settings.effective_database_url)

    @cached_property
    def live(self) -> Bundle | None:
        """The live model's bundle; None when no model is live (the built-in demo runs in
        shadow, ``demo_model = "shadow"``, and nothing was made live yet)."""
        settings = self.settings
        self.models_stamp = self.registry_stamp()  # before reading: a change meanwhile shows
        bundle = live_bundle(settings.data_dir, settings.model_bundle, settings.demo_model)
        if bundle is None:
            logger.warning(
                "no model is live: studies are scored by shadow models only and nothing is "
                "sent; make one live with pacsclip model promote"
            )
        return bundle

    @cached_property
    def analyser(self) -> StudyAnalyser:
        bundle = self.live
        if bundle is None:
            raise PacsclipError("no model is live")  # callers look at self.live first
        return self.analyser_for(bundle)

    def analyser_for(self, bundle: Bundle) -> StudyAnalyser:
        # Site heads promoted with `pacsclip adapt promote`; read with the model.
        site_heads = load_active_site_heads(self.settings.data_dir, bundle.ref)
        model = TriageModel(
            bundle,
            threads=self.settings.inference_threads,
            site_heads=site_heads,
            ood_guard=self.settings.ood_guard,
        )
        logger.info("model %s loaded", bundle.ref)
        return StudyAnalyser(self.settings, self.catalog, model)

    @cached_property
    def shadows(self) -> list[ShadowAnalyser]:
        return self.load_shadows()

    def load_shadows(self) -> list[ShadowAnalyser]:
        """The candidates `pacsclip model shadow` names. One that cannot load is logged and
        left out: a shadow never holds up the live results."""
        registry = Registry.for_data_dir(self.settings.data_dir, self.settings.demo_model)
        loaded = []
        for shadow in registry.shadows():
            try:
                bundle = registry.shadow_bundle(shadow.ref)
                model = TriageModel(
                    bundle,
                    threads=self.settings.inference_threads,
                    site_heads=load_active_site_heads(self.settings.data_dir, bundle.ref),
                    ood_guard=self.settings.ood_guard,
                )
            except PacsclipError as exc:
                logger.error("shadow model %s not loaded: %s", shadow.ref, exc)
                continue
            loaded.append(ShadowAnalyser(self.settings, self.catalog, model, shadow))
            logger.info("shadow model %s loaded for %s", shadow.ref, shadow.site or "every site")
        return loaded

    @cached_property
    def reports(self) -> ReportIntake:
        """Reports that came with a study: linked, labeled and indexed for search."""

        def index(study_uid: str, text: str, source: str) -> None:
            if self.live is None:
                return  # search runs on the live model's index; reports are indexed once one is
            try:
                self.retrieval.add_report(study_uid, text, source)
            except NoTextTower as exc:
                logger.info("report text not indexed: %s", exc)

        return ReportIntake(self.catalog.sessions, lambda: labeler_for(self.settings), index)

    @cached_property
    def indexes(self) -> IndexStore:
        return self.retrieval.store

    @cached_property
    def retrieval(self) -> RetrievalService:
        # The analyser's bundle, loaded and checksummed once: indexes and triage must agree.
        return RetrievalService(
            self.settings.data_dir,
            self.catalog.sessions,
            lambda: self.analyser.model.bundle,
            lambda bundle: text_encoder(bundle, threads=self.settings.inference_threads),
        )

    def warm_up(self) -> str | None:
        """Load the model, score and build results once, and import the delivery code before
        the first task, not during it.

        Returns what the worker is ready with; None when the model did not load or run, and
        ``readiness`` then says why. Such a bundle is logged here and fails each analysis with
        its reason; the worker still delivers results already made.
        """
        self.readiness.set_not_ready("loading the model")
        ready_with: str | None = None
        try:
            bundle = self.live
            if bundle is not None:
                self.analyser.warm_up()
                ready_with = f"model {bundle.ref} loaded and ran once"
            else:
                ready_with = "no model is live (shadow models only)"
        except PacsclipError as exc:
            logger.error("model not loaded at start: %s", exc)
            self.readiness.set_not_ready(f"model failed to load: {exc}")
        except Exception as exc:
            # The model loaded; only the rehearsal failed, and the first study will say why.
            logger.exception("warm-up study failed; the first study is built cold")
            self.readiness.set_not_ready(f"model failed its warm-up run: {exc}")
        # Imported by the first dispatch otherwise (pynetdicom and the STOW client with it).
        importlib.import_module("plugin.delivery.jobs")
        warm_up_shadows(self.shadows)
        if ready_with is not None:
            self.readiness.set_not_ready(f"{ready_with}; not consuming yet")
        return ready_with

    def registry_stamp(self) -> object:
        """What changes when the live model, the shadow list or a site head changes: the
        stamps of the registry file and of the site-head indexes (a ``stat`` each)."""
        data_dir = self.settings.data_dir
        return (
            Registry.for_data_dir(data_dir, self.settings.demo_model).stamp(),
            site_heads_stamp(data_dir),
        )

    def refresh_models(self) -> None:
        """Before each analysis: when the registry changed since the models were loaded
        (``pacsclip model install --activate``, ``model activate``, ``model promote``,
        ``model shadow``, ``adapt promote``), load what it names now, so a running worker
        follows it without a restart.

        The new live model is loaded and run once before it replaces the old one. One that
        fails keeps the old one analysing; it is logged, ``/health`` says so (503), and it
        is tried again at the registry's next change. Shadows are reloaded as at start.
        """
        if self.models_stamp is None:
            return  # nothing loaded yet: the first use loads what the registry names then
        stamp = self.registry_stamp()
        if stamp == self.models_stamp:
            return
        self.models_stamp = stamp  # a change that failed is not tried again at every study
        settings = self.settings
        old = self.__dict__.get("live")  # None too when the model failed at start
        new_ref: str | None = None
        try:
            new_ref = live_model_ref(settings.data_dir, settings.model_bundle, settings.demo_model)
            bundle = live_bundle(settings.data_dir, settings.model_bundle, settings.demo_model)
            analyser = None if bundle is None else self.analyser_for(bundle)
            if analyser is not None:
                analyser.warm_up()
        except Exception as exc:
            # PacsclipError: it did not load (checksums, manifest); anything else: its run.
            what = f"model {new_ref}" if new_ref else "the registry's live model"
            logger.exception("%s not taken up; the model loaded before goes on", what)
            still = "no live model loaded" if old is None else f"still analysing with {old.ref}"
            self.readiness.set_not_ready(f"{what} failed to load: {exc}; {still}")
            return
        shadows = self.load_shadows()
        warm_up_shadows(shadows)
        self.live, self.shadows = bundle, shadows
        if analyser is None:
            self.__dict__.pop("analyser", None)
            ready_with = "no model is live (shadow models only)"
        else:
            self.analyser = analyser
            ready_with = f"model {analyser.model.bundle.ref} loaded and ran once"
        # Retrieval reads the live model's indexes: open them anew (each catches up with
        # the catalog when opened).
        self.__dict__.pop("retrieval", None)
        self.__dict__.pop("indexes", None)
        logger.info("registry changed: now %s, %d shadow model(s)", ready_with, len(shadows))
        self.readiness.set_ready(ready_with)

    def keep_reports(self, study_uid: str) -> None:
        """Store, label and index the text of reports (SRs from the PACS) that came with the
        study, and link reports that were waiting for it.

        Failures are logged: a report that cannot be kept must not hold up the results.
        """
        with self.catalog.sessions() as session:
            paths = instance_paths_of_classes(session, study_uid, REPORT_SR_CLASSES)
        for path in paths:
            try:
                ds = dcmread(self.settings.spool_dir / path)
                text = report_text(ds) if is_foreign_report(ds) else ""
                if text:
                    self.reports.add(text, source="sr", study_uid=study_uid)
                    self.monitor()
            except ReportRefused as exc:
                logger.info("a report of the study was not kept: %s", exc)
            except Exception:
                logger.exception("a report of the study could not be kept")
        try:
            self.reports.link_waiting(study_uid)
        except Exception:
            logger.exception("reports waiting for their study were not linked")

    def monitor(self) -> None:
        """Recompute the monitoring window after new labels, at most every
        ``monitor_interval_s``; failures are logged (monitoring never holds up results)."""
        now = time.monotonic()
        interval = self.settings.monitor_interval_s
        if self.monitored_at is not None and now - self.monitored_at < interval:
            return
        self.monitored_at = now
        try:
            run_monitoring(self.settings, self.catalog.sessions, self.reports)
        except Exception:
            logger.exception("monitoring not updated")

    def pipelines(self, study_uid: str) -> tuple[str, ...]:
        """What the study's routing decision asks for (plugin.pipelines)."""
        with self.catalog.sessions() as session:
            return pipelines_of(study_to_analyse(session, study_uid).routing)

    def score_in_shadow(self, study_uid: str, generation: int) -> None:
        """Every shadow model that covers the study's site scores it; failures are logged."""
        for shadow in self.shadows:
            try:
                shadow.analyse(study_uid, generation)
            except Exception:
                logger.exception("shadow model %s failed on a study", shadow.shadow.ref)

    def update_index(self) -> None:
        """Add the embeddings just committed to this model's image index and save it.

        A failure is logged, not raised: the analysis and its embeddings are committed, and
        the next update, search or rebuild reads them from the catalog.
        """
        bundle = self.analyser.model.bundle
        try:
            self.indexes.sync(Kind.IMAGES, bundle.ref, bundle.manifest.embedding_dim)
        except Exception:
            logger.exception("retrieval index of %s not updated", bundle.ref)


def warm_up_shadows(shadows: list[ShadowAnalyser]) -> None:
    for shadow in shadows:
        try:
            shadow.model.warm_up()
        except PacsclipError as exc:
            logger.error("shadow model %s not warmed up: %s", shadow.shadow.ref, exc)


def context_of(task: Task) -> WorkerContext:
    context = getattr(task.app, "pacsclip", None)
    if not isinstance(context, WorkerContext):
        raise RuntimeError("the Celery app has no pacsclip WorkerContext: start it with main()")
    return context


def analyse_study(task: Task, study_uid: str, generation: int) -> dict[str, Any]:
    context = context_of(task)
    context.refresh_models()
    pipelines = context.pipelines(study_uid)
    if TRIAGE not in pipelines:
        return retrieval_only(context, study_uid, generation)
    if context.live is None:
        return score_without_live_model(context, study_uid, generation)
    outcome = context.analyser.analyse(study_uid, generation)
    if outcome.created:
        context.metrics.observe_stage(Stage.ANALYSED, seconds=outcome.since_complete_s)
        context.metrics.observe_analysis_duration(outcome.duration_s)
        context.metrics.observe_analysis_steps(outcome.steps)
        if outcome.images_outside and outcome.site is not None:
            model = context.analyser.model.bundle.ref
            context.metrics.observe_ood_inputs(outcome.site, model, outcome.images_outside)
        # Enqueued after the analysis is committed, so a dispatch never finds no rows.
        for job_id in outcome.job_ids:
            task.app.send_task(DISPATCH_RESULT, args=[job_id], queue=DISPATCH_QUEUE)
        if outcome.priority == "stat":
            notify_stat(task, context, outcome.analysis_id)
        # Last: the results are on their way before the index is touched.
        context.update_index()
        context.keep_reports(study_uid)
    # Also when an earlier delivery made the live analysis: a shadow run it missed is made up.
    context.score_in_shadow(study_uid, generation)
    return {"analysis_id": outcome.analysis_id, "jobs": outcome.job_ids, "created": outcome.created}


def retrieval_only(context: WorkerContext, study_uid: str, generation: int) -> dict[str, Any]:
    """Routing runs retrieval only (the node publishes no study that runs nothing): the live
    model's image embeddings go to the catalog and the similar-case index; no triage, by the
    live model or a shadow, and nothing is sent."""
    if context.live is not None:
        context.analyser.embed_only(study_uid, generation)
        context.update_index()
    else:
        with context.catalog.sessions() as session:
            mark_shadow_only(session, study_uid, generation)
    context.keep_reports(study_uid)
    return {"analysis_id": None, "jobs": [], "created": False, "pipelines": [RETRIEVAL]}


def score_without_live_model(
    context: WorkerContext, study_uid: str, generation: int
) -> dict[str, Any]:
    """No model is live: the shadows score the study, its reports are kept, and the study
    ends ``shadow_only`` (not left queued, where the node would send it again)."""
    context.score_in_shadow(study_uid, generation)
    with context.catalog.sessions() as session:
        ended = mark_shadow_only(session, study_uid, generation)
    if ended:
        logger.info(
            "study %s generation %d: no live model, scored in shadow only", study_uid, generation
        )
    context.keep_reports(study_uid)
    return {"analysis_id": None, "jobs": [], "created": False, "live": False}


def notify_stat(task: Task, context: WorkerContext, analysis_id: int) -> list[int]:
    """Tell the worklist about a STAT result: a delivery job for the webhook and one for the
    HL7 ORU, where configured, queued like the results' jobs (retried, dead-lettered,
    replayable). The ids of the new jobs."""
    from plugin.catalog.dispatch_jobs import add_notification_jobs
    from plugin.delivery.notifications import configured_kinds

    kinds = configured_kinds(context.settings)
    if not kinds:
        return []
    with context.catalog.sessions.begin() as session:
        job_ids = add_notification_jobs(session, analysis_id, kinds)
    # Enqueued after the commit, so a dispatch never finds no row.
    for job_id in job_ids:
        task.app.send_task(DISPATCH_RESULT, args=[job_id], queue=DISPATCH_QUEUE)
    return job_ids


def dispatch_result(task: Task, job_id: int, early: bool = False) -> dict[str, Any]:
    """One attempt of a dispatch job; ``early``: brought forward by the node's destination
    probe, and not retried itself (the job's scheduled retry stays)."""
    from plugin.delivery.jobs import DeadLettered, Delivered, RetryLater, StillWaiting, deliver

    context = context_of(task)
    outcome = deliver(
        context.catalog.sessions,
        context.settings,
        job_id,
        attempt=task.request.retries,
        early=early,
    )
    if isinstance(outcome, RetryLater):
        context.metrics.observe_dispatch(outcome.kind, "retried")
        raise task.retry(exc=outcome.error, countdown=outcome.countdown_s)
    if isinstance(outcome, StillWaiting):
        context.metrics.observe_dispatch(outcome.kind, "retried")
        return {"job": job_id, "state": "pending"}
    if isinstance(outcome, DeadLettered):
        context.metrics.observe_dispatch(outcome.kind, "failed")
        context.metrics.observe_stage(Stage.FAILED)
        return {"job": job_id, "state": "failed"}
    if isinstance(outcome, Delivered):
        context.metrics.observe_dispatch(outcome.kind, "delivered")
        for _ in range(outcome.objects):
            context.metrics.observe_stage(Stage.DELIVERED, seconds=outcome.since_analysed_s)
        return {"job": job_id, "state": "delivered"}
    return {"job": job_id, "state": outcome.state}  # not sent: redelivered, or no destination


def finetune_bundle(task: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune a bundle (plugin.finetune.job); progress goes to the task's state, where
    ``pacsclip model finetune --queue`` reads it. A bad request fails the task with its reason."""
    from plugin.finetune.job import FinetuneRequest, run_finetune

    def progress(stage: str, done: int, total: int) -> None:
        task.update_state(state="PROGRESS", meta={"stage": stage, "done": done, "total": total})

    context = context_of(task)
    outcome = run_finetune(context.settings, FinetuneRequest.from_message(request), progress)
    return outcome.as_dict()


# The catalog restarting or failing over is an outage to wait out, not a task failure: a task
# that failed on it would be acknowledged, and its study left unanalysed or its job unsent.
# Both tasks are idempotent (an analysis per study generation; result UIDs are fixed).
CATALOG_OUTAGE_RETRY: Final[dict[str, Any]] = {
    "autoretry_for": (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": False,
}


def register(app: Celery) -> None:
    """Bind the tasks to ``app`` under the names the node sends."""
    # 20 retries wait out about 8 minutes; after that the node queues the study again.
    app.task(name=ANALYSE_STUDY, bind=True, max_retries=20, **CATALOG_OUTAGE_RETRY)(analyse_study)
    # No limit: a job's own retries and dead letter are counted by plugin.delivery.
    app.task(name=DISPATCH_RESULT, bind=True, max_retries=None, **CATALOG_OUTAGE_RETRY)(
        dispatch_result
    )
    app.task(name=FINETUNE_BUNDLE, bind=True)(finetune_bundle)
