"""The DICOM node: composition root of the receiving process, and its ``main``."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from io import BytesIO
from types import FrameType

from pydicom import dcmread
from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import handlers
from dicom_node.ae import build_ae
from dicom_node.completion import CompletionMonitor, CompletionReason, CompletionTracker
from dicom_node.publish import CompletionPublisher, LoggingPublisher, StudyCompleted
from dicom_node.received import InvalidObject, inspect_dataset
from dicom_node.receiver import Receiver
from dicom_node.routing import RoutingInput, RuleSet, default_rules, load_rules
from dicom_node.scu import AssociationFailed, QueryFailed, query_study_instance_count
from dicom_node.security import CallerPolicy, server_ssl_context
from dicom_node.spool import Quarantine, Spool
from plugin.catalog import repository
from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.records import Peer
from plugin.catalog.writer import CatalogWriter
from plugin.metrics import PacsclipMetrics, Stage
from plugin.settings import Settings
from plugin.study_state import StudyState

logger = logging.getLogger(__name__)


class DicomNode:
    """Receives, catalogs and assembles studies; publishes each complete study once."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        *,
        publisher: CompletionPublisher | None = None,
        rules: RuleSet | None = None,
        metrics: PacsclipMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or PacsclipMetrics()
        self.sessions = catalog.sessions
        self.publisher = publisher or LoggingPublisher()
        self.rules = rules or (
            load_rules(settings.rules_file) if settings.rules_file else default_rules()
        )
        self.clock = time.monotonic
        self.spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_disk_mb * 2**20)
        self.tracker = CompletionTracker(
            quiet_period_s=settings.quiet_period_s, max_wait_s=settings.max_wait_s
        )
        self.monitor = CompletionMonitor(
            self.tracker,
            self.complete_study,
            interval_s=settings.completion_check_interval_s,
            clock=self.clock,
            periodic=self.requeue_stale,
            periodic_interval_s=min(30.0, settings.requeue_after_s / 2),
        )
        self._queries = ThreadPoolExecutor(max_workers=2, thread_name_prefix="count-query")
        self.receiver = Receiver(
            spool=self.spool,
            quarantine=Quarantine(settings.quarantine_dir),
            catalog=CatalogWriter(catalog.engine),
            sessions=catalog.sessions,
            tracker=self.tracker,
            site_tags=settings.site_tags,
            clock=self.clock,
            on_new_study=self._ask_expected_count if settings.count_query_peer else None,
            on_stored=lambda: self.metrics.observe_stage(Stage.RECEIVED),
        )
        self.policy = CallerPolicy(tuple(settings.allowed_callers))
        self.ae = build_ae(settings)
        self.server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("the node is not running")
        return int(self.server.server_address[1])

    def start(self) -> None:
        if self.policy.open_to_all:
            logger.warning(
                "PACSCLIP_ALLOWED_CALLERS is empty: any calling AE is accepted; "
                "set it to the PACS AE titles in production"
            )
        self.recover()
        self.monitor.start()
        try:
            self.server = self.ae.start_server(
                (self.settings.dicom_host, self.settings.dicom_port),
                block=False,
                evt_handlers=self._handlers(),
                ssl_context=server_ssl_context(self.settings),
            )
        except BaseException:
            self.stop()
            raise
        logger.info(
            "DICOM node %s listening on %s:%d%s",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.port,
            " (TLS)" if self.settings.tls_enabled else "",
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.monitor.stop()
        self._queries.shutdown(wait=True, cancel_futures=True)

    def _handlers(self) -> list[evt.EventHandlerType]:
        return [
            (evt.EVT_C_ECHO, handlers.handle_echo),
            (evt.EVT_C_STORE, handlers.handle_store, [self.receiver]),
            (
                evt.EVT_REQUESTED,
                handlers.handle_association_request,
                [self.policy, self._audit_rejected_association],
            ),
            (evt.EVT_CONN_OPEN, handlers.handle_connection_open, [self.tracker]),
            (evt.EVT_CONN_CLOSE, handlers.handle_connection_close, [self.tracker, self.clock]),
        ]

    def _audit_rejected_association(self, peer: Peer) -> None:
        with self.sessions() as session:
            repository.audit(session, "association_rejected", peer, detail="calling AE not allowed")
            session.commit()

    def recover(self) -> None:
        """After a restart: drop unacknowledged temp files, catalog spooled files the
        catalog lost, and resume tracking studies that were still receiving."""
        dropped = self.spool.discard_incomplete()
        if dropped:
            logger.info("discarded %d incomplete transfers (never acknowledged)", dropped)
        with self.sessions() as session:
            known = repository.cataloged_paths(session)
        missing = [rel for rel in self.spool.files() if rel not in known]
        for rel in missing:
            self._recatalog(rel)
        if missing:
            logger.info("re-cataloged %d spooled files missing from the catalog", len(missing))
        now_wall, now = datetime.now(UTC), self.clock()
        with self.sessions() as session:
            receiving = repository.receiving_studies(session)
        for study in receiving:
            received_at = study.received_at
            if received_at.tzinfo is None:  # SQLite returns naive UTC datetimes
                received_at = received_at.replace(tzinfo=UTC)
            age = (now_wall - received_at).total_seconds()
            self.tracker.resume(
                study.study_instance_uid, first_seen=now - age, instances=study.instances, now=now
            )

    def _recatalog(self, rel: str) -> None:
        data = self.spool.read(rel)
        try:
            ds = dcmread(BytesIO(data), stop_before_pixels=True)
            obj = inspect_dataset(
                lambda: ds,
                requested_sop_class_uid=str(ds.SOPClassUID),
                requested_sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
        except (InvalidObject, AttributeError) as exc:
            logger.error("spooled file %s cannot be re-cataloged: %s", rel, exc)
            return
        self.receiver.accept(obj, data, Peer(calling_ae_title="", host=None), association=None)

    def _ask_expected_count(self, study_uid: str) -> None:
        self._queries.submit(self._query_expected_count, study_uid)

    def _query_expected_count(self, study_uid: str) -> None:
        peer = self.settings.count_query_peer
        if peer is None:
            return
        try:
            count = query_study_instance_count(
                peer, study_uid, calling_ae_title=self.settings.ae_title
            )
        except (AssociationFailed, QueryFailed, OSError, RuntimeError) as exc:
            logger.warning("instance count query to %s failed: %s", peer.ae_title, exc)
            return
        if count is None:
            return
        self.tracker.set_expected(study_uid, count)
        with self.sessions() as session:
            repository.set_expected_instances(session, study_uid, count)
            session.commit()

    def requeue_stale(self) -> None:
        """Publish again the studies whose analysis task was lost (see stale_queued)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.requeue_after_s)
        with self.sessions() as session:
            stale = repository.stale_queued(session, cutoff)
            for study in stale:
                # Back to complete so the publisher's move to queued is a valid transition.
                repository.force_state(session, study.study_instance_uid, StudyState.COMPLETE)
            session.commit()
        for study in stale:
            with self.sessions() as session:
                facts = repository.study_facts(session, study.study_instance_uid)
            if facts is None:
                continue
            logger.warning(
                "study %s generation %d: no analysis after %.0f s, sending it again",
                study.study_instance_uid,
                study.generation,
                self.settings.requeue_after_s,
            )
            self.publisher.publish(
                StudyCompleted(
                    study_instance_uid=study.study_instance_uid,
                    site_key=facts.site_key,
                    reason="requeued",
                    reanalysis=facts.needs_reanalysis,
                    generation=study.generation,
                    priority=study.priority,
                    pipelines=tuple(facts.pipelines) or ("triage",),
                    destinations=tuple(facts.destinations),
                )
            )

    def complete_study(self, study_uid: str, reason: CompletionReason) -> None:
        with self.sessions() as session:
            facts = repository.study_facts(session, study_uid)
            if facts is None:
                return
            decision = self.rules.decide(
                RoutingInput(
                    modalities=facts.modalities,
                    body_parts=facts.body_parts,
                    calling_ae_title=facts.calling_ae_title,
                    institution_name=facts.institution_name,
                    series_descriptions=facts.series_descriptions,
                )
            )
            generation = repository.mark_complete(
                session,
                study_uid,
                reason=reason.value,
                routing=decision.as_dict(),
                priority=decision.priority,
            )
            session.commit()
        if generation is None:
            return
        logger.info("study %s complete (%s)", study_uid, reason.value)
        self.metrics.observe_stage(Stage.COMPLETE, seconds=facts.age_s)
        self.publisher.publish(
            StudyCompleted(
                study_instance_uid=study_uid,
                site_key=facts.site_key,
                reason=reason.value,
                reanalysis=facts.needs_reanalysis,
                generation=generation,
                priority=decision.priority,
                pipelines=decision.pipelines,
                destinations=decision.destinations,
            )
        )


def main(settings: Settings, metrics: PacsclipMetrics | None = None) -> None:
    """Run the node until SIGINT or SIGTERM."""
    from dicom_node.celery_publisher import CeleryPublisher
    from worker.app import make_celery

    catalog = open_catalog(settings.effective_database_url)
    publisher = CeleryPublisher(make_celery(settings), catalog.sessions)
    node = DicomNode(settings, catalog, publisher=publisher, metrics=metrics)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d received, stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    node.start()
    try:
        stop.wait()
    finally:
        node.stop()
        logger.info("DICOM node stopped")
