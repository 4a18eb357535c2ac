"""The DICOM node: composition root of the receiving process, and its ``main``."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from io import BytesIO
from itertools import islice

from pydicom import dcmread
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.celery_publisher import CeleryPublisher
from dicom_node.completion import CompletionMonitor, CompletionReason, CompletionTracker
from dicom_node.intake_events import InstanceSpooled, IntakeEvent
from dicom_node.intake_recorder import MAX_BATCH, IntakeRecorder
from dicom_node.object_checks import InvalidObject, inspect_dataset
from dicom_node.publish import CompletionPublisher, LoggingPublisher, StudyCompleted
from dicom_node.receiver_processes import ReceiverProcesses
from dicom_node.receiving import (
    ReusePortAssociationServer,
    dicom_port_speaks_tls,
    drain,
    reserve_port,
    start_receiving,
)
from dicom_node.routing import RoutingInput, RuleSet, default_rules, load_rules
from dicom_node.scu import AssociationFailed, QueryFailed, query_study_instance_count
from dicom_node.security import CallerPolicy
from dicom_node.spool import Spool
from dicom_node.stop_signal import StopSignal
from plugin.catalog import repository
from plugin.catalog.db import Catalog, open_catalog, ping
from plugin.catalog.records import Peer
from plugin.catalog.writer import CatalogWriter
from plugin.delivery.recovery import DestinationRecovery, RecoveryMetrics
from plugin.metrics import PacsclipMetrics, Stage
from plugin.probes import Health, ProbeServer
from plugin.retention import RetentionMetrics, RetentionSchedule
from plugin.settings import Settings
from plugin.study_state import StudyState
from plugin.task_queue import make_celery

logger = logging.getLogger(__name__)
# How soon the main loop notices a signal (and a dead receiver process).
SIGNAL_POLL_S = 0.2


class DicomNode:
    """Receives, catalogs and assembles studies; publishes each complete study once.

    Receiving runs in ``settings.receiver_processes`` processes on one port, or in this
    process when that is 0; either way the receivers answer once a file is durable in the
    spool and this process's recorder catalogs what they report.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        *,
        publisher: CompletionPublisher | None = None,
        rules: RuleSet | None = None,
        metrics: PacsclipMetrics | None = None,
        enqueue_dispatch: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or PacsclipMetrics()
        self.sessions = catalog.sessions
        # With a dispatch queue: dead letters are replayed when their destination is back
        # (one node per deployment, so one checker).
        self.recovery = (
            DestinationRecovery(
                settings,
                catalog.sessions,
                enqueue_dispatch,
                RecoveryMetrics(self.metrics.registry),
            )
            if enqueue_dispatch is not None
            else None
        )
        self.publisher = publisher or LoggingPublisher()
        self.rules = rules or (
            load_rules(settings.rules_file) if settings.rules_file else default_rules()
        )
        self.clock = time.monotonic
        self.spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_disk_mb * 2**20)
        self.tracker = CompletionTracker(
            quiet_period_s=settings.quiet_period_s,
            max_wait_s=settings.max_wait_s,
            release_grace_s=settings.release_grace_s if settings.complete_on_release else None,
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
        processes = settings.effective_receiver_processes
        self.receivers = (
            ReceiverProcesses(settings, processes, drain_timeout_s=settings.drain_timeout_s)
            if processes
            else None
        )
        # In process, the receiving server and the recorder share a plain queue.
        self.events: queue.Queue[IntakeEvent] = queue.Queue()
        self.recorder = IntakeRecorder(
            events=self.events if self.receivers is None else self.receivers.events,
            writer=CatalogWriter(catalog.engine),
            sessions=catalog.sessions,
            tracker=self.tracker,
            site_tags=settings.site_tags,
            clock=self.clock,
            on_new_study=self._ask_expected_count if settings.count_query_peer else None,
            on_stored=lambda: self.metrics.observe_stage(Stage.RECEIVED),
        )
        self._recording_stop = threading.Event()
        self._recording = threading.Thread(
            target=self.recorder.run, args=(self._recording_stop,), name="intake-recorder"
        )
        self.policy = CallerPolicy.from_settings(settings)
        self.server: ReusePortAssociationServer | None = None
        # With dicom_tls_port: the TLS server beside the plain one (in process only).
        self.tls_server: ReusePortAssociationServer | None = None
        self._port: int | None = None
        self._tls_port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the node is not running")
        return self._port

    @property
    def tls_port(self) -> int | None:
        """The port that speaks TLS beside the plain one (``dicom_tls_port``), else None."""
        return self._tls_port

    def start(self) -> None:
        if self.policy.open_to_all:
            logger.warning(
                "PACSCLIP_ALLOWED_CALLERS is empty: any calling AE is accepted; "
                "set it to the PACS AE titles in production"
            )
        self.recover()
        self._recording.start()
        self.monitor.start()
        if self.recovery is not None:
            self.recovery.start()
        try:
            self._port = self._listen()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "DICOM node %s listening on %s:%d%s%s (%s)",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.port,
            " (TLS)" if dicom_port_speaks_tls(self.settings) else "",
            f" and {self.tls_port} (TLS)" if self.tls_port is not None else "",
            f"{self.receivers.count} receiver processes" if self.receivers else "in process",
        )

    def _listen(self) -> int:
        host, port = self.settings.dicom_host, self.settings.dicom_port
        tls_port = self.settings.dicom_tls_port
        if self.receivers is None:
            assert self.events is not None
            open_connections = multiprocessing.Value("i", 0)  # one cap for both ports
            self.server = start_receiving(
                self.settings,
                self.events,
                port=port,
                open_connections=open_connections,
                tls=dicom_port_speaks_tls(self.settings),
            )
            if tls_port is not None:
                self.tls_server = start_receiving(
                    self.settings,
                    self.events,
                    port=tls_port,
                    open_connections=open_connections,
                    tls=True,
                )
                self._tls_port = int(self.tls_server.server_address[1])
            return int(self.server.server_address[1])
        # Port 0 becomes one number, held until every receiver process listens on it.
        with ExitStack() as reservations:
            port = _reserved(reservations.enter_context(reserve_port(host, port)))
            if tls_port is not None:
                self._tls_port = _reserved(reservations.enter_context(reserve_port(host, tls_port)))
            self.receivers.start(port, self._tls_port)
        return port

    def healthy(self) -> bool:
        """False when a receiver process has died."""
        return self.receivers is None or self.receivers.alive()

    def health(self) -> Health:
        """Ready when it listens, its receivers live and its catalog answers (``/health``)."""
        if self._port is None:
            return Health(False, "not listening (starting or stopping)")
        if not self.healthy():
            return Health(False, "a receiver process died")
        try:
            with self.sessions() as session:
                ping(session)
        except SQLAlchemyError as exc:
            return Health(False, f"catalog unreachable: {type(exc).__name__}")
        return Health(True, f"listening on port {self._port}")

    def stop(self) -> None:
        """Stop accepting, let open associations finish, catalog what they sent, then stop
        completing studies."""
        if self.receivers is not None:
            self.receivers.stop()
        servers = [s for s in (self.server, self.tls_server) if s is not None]
        for server in servers:  # stop accepting on every port before waiting for any
            server.shutdown()
        for server in servers:
            drain(server, self.settings.drain_timeout_s)
        self.server = self.tls_server = None
        self._recording_stop.set()
        if self._recording.is_alive():
            self._recording.join(timeout=self.settings.drain_timeout_s)
        self.monitor.stop()
        if self.recovery is not None:
            self.recovery.stop()
        self._queries.shutdown(wait=True, cancel_futures=True)
        self._port = self._tls_port = None

    def recover(self) -> None:
        """After a restart: drop unacknowledged temp files, catalog spooled files the
        catalog lacks (acknowledged, but not yet recorded when the node stopped), and resume
        tracking studies that were still receiving."""
        dropped = self.spool.discard_incomplete()
        if dropped:
            logger.info("discarded %d incomplete transfers (never acknowledged)", dropped)
        with self.sessions() as session:
            known = repository.cataloged_paths(session)
        missing = (rel for rel in self.spool.files() if rel not in known)
        recataloged = 0
        for chunk in _chunks(filter(None, map(self._spooled_event, missing)), MAX_BATCH):
            self.recorder.record(chunk)
            recataloged += len(chunk)
        if recataloged:
            logger.info("cataloged %d spooled files missing from the catalog", recataloged)
        now_wall, now = datetime.now(UTC), self.clock()
        with self.sessions() as session:
            receiving = repository.receiving_studies(session)
        for study in receiving:
            age = (now_wall - study.received_at).total_seconds()
            self.tracker.resume(
                study.study_instance_uid, first_seen=now - age, instances=study.instances, now=now
            )

    def _spooled_event(self, rel: str) -> InstanceSpooled | None:
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
            return None
        return InstanceSpooled(
            obj=obj,
            peer=Peer(calling_ae_title="", host=None),
            association=None,
            path=rel,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

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
            decision = self.rules.decide(RoutingInput.of_study(facts))
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


def main(
    settings: Settings,
    metrics: PacsclipMetrics | None = None,
    *,
    on_signal: Callable[[], None] | None = None,
) -> None:
    """Run the node until SIGINT or SIGTERM (then ``on_signal``, and drain); exit 1 if a
    receiver process dies (so that the supervisor restarts the node)."""
    catalog = open_catalog(settings.effective_database_url)
    publisher = CeleryPublisher(make_celery(settings), catalog.sessions)
    publisher.connect()
    node = DicomNode(
        settings,
        catalog,
        publisher=publisher,
        metrics=metrics,
        enqueue_dispatch=publisher.dispatch,
    )
    stopping = StopSignal().install()
    probes = None
    if settings.node_metrics_port is not None:
        # Up before the node listens, so that a probe sees why it is not ready yet.
        probes = ProbeServer(
            settings.node_metrics_host,
            settings.node_metrics_port,
            node.metrics.registry,
            node.health,
        ).start()
    try:
        node.start()
    except BaseException:
        if probes is not None:
            probes.stop()
        raise
    # Retention (when configured) deletes on its own thread, never in the receiving path.
    retention = RetentionSchedule(settings, catalog, RetentionMetrics(node.metrics.registry))
    retention.start()
    failed = False
    try:
        while not stopping.received:
            if not node.healthy():
                logger.error("a receiver process died; stopping the node")
                failed = True
                break
            time.sleep(SIGNAL_POLL_S)
        if stopping.signum is not None:
            logger.info("signal %d received, stopping", stopping.signum)
            if on_signal is not None:
                on_signal()
    finally:
        retention.stop()
        node.stop()
        if probes is not None:
            probes.stop()
        logger.info("DICOM node stopped")
    if failed:
        sys.exit(1)


def _reserved(reservation: socket.socket) -> int:
    return int(reservation.getsockname()[1])


def _chunks(items: Iterable[IntakeEvent], size: int) -> Iterator[list[IntakeEvent]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
