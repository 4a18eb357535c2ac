"""STAT flags as dispatch jobs (webhook and HL7 ORU: retried, dead-lettered, replayable) and
the replay of dead letters when their destination answers again."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from plugin.catalog import dispatch_jobs
from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import Analysis, DispatchJob, Site, Study
from plugin.catalog.repository import audit_events
from plugin.delivery.jobs import (
    DeadLettered,
    Delivered,
    NotSent,
    RetryLater,
    StillWaiting,
    deliver,
    replay_all,
)
from plugin.delivery.recovery import (
    DestinationRecovery,
    RecoveryMetrics,
    destinations_to_probe,
    probe,
)
from plugin.errors import ConfigError
from plugin.metrics import PacsclipMetrics
from plugin.notify.webhook import SIGNATURE_HEADER, sign
from plugin.settings import Settings

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def add_analysis(catalog: Catalog, uid: str, jobs: list[tuple[str, str, str, bool]]) -> list[int]:
    """A STAT analysis of a new study with jobs (kind, destination, state, replayable)."""
    with catalog.sessions.begin() as session:
        site = session.scalar(select(Site)) or Site(key="site")
        study = Study(
            study_instance_uid=uid, site=site, state="analysed", calling_ae_title="PACS",
            received_at=datetime.now(UTC), generation=1, accession_number="ACC-1",
        )  # fmt: skip
        analysis = Analysis(
            study=study, generation=1, algorithm_name="demo", algorithm_version="1",
            synthetic=True, priority="stat", triggered_by=["pneumothorax"],
            findings=[{"name": "pneumothorax", "probability": 0.9, "decision": "present"}],
        )  # fmt: skip
        analysis.jobs = [
            DispatchJob(kind=kind, destination=name, state=state, replayable=replayable)
            for kind, name, state, replayable in jobs
        ]
        session.add(analysis)
        session.flush()
        return [job.id for job in analysis.jobs]


def job(catalog: Catalog, job_id: int) -> DispatchJob:
    with catalog.sessions() as session:
        found = session.get(DispatchJob, job_id)
        assert found is not None
        session.expunge(found)
        return found


@pytest.fixture
def setup(make_settings: Callable[..., Settings]) -> Callable[..., tuple[Settings, Catalog]]:
    def make(**overrides: Any) -> tuple[Settings, Catalog]:
        settings = make_settings(**overrides)
        return settings, open_catalog(settings.effective_database_url)

    return make


# --- the replay decision -----------------------------------------------------------------


def test_a_destination_is_probed_at_once_then_at_most_every_interval() -> None:
    waiting = {"pacs": 2, "webhook": 1, "archive": 0}

    assert destinations_to_probe(waiting, {}, now=100.0, interval_s=60) == ["pacs", "webhook"]
    probed = {"pacs": 100.0, "webhook": 100.0}
    assert destinations_to_probe(waiting, probed, now=159.9, interval_s=60) == []
    assert destinations_to_probe(waiting, {**probed, "pacs": 90.0}, 150.0, 60) == ["pacs"]
    assert destinations_to_probe(waiting, probed, now=160.0, interval_s=60) == ["pacs", "webhook"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_dead_letters_are_replayed_only_when_their_destination_answers(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup(destinations=[PACS], destination_probe_interval_s=60)
    down_then_up = add_analysis(catalog, "1.2.1", [("results", "pacs", "failed", True)])[0]
    refused = add_analysis(catalog, "1.2.2", [("results", "pacs", "failed", False)])[0]
    [hook, done] = add_analysis(
        catalog,
        "1.2.3",
        [("webhook", "webhook", "failed", True), ("results", "pacs", "delivered", False)],
    )
    answering = {"pacs": False, "webhook": False}
    probes: list[str] = []
    enqueued: list[tuple[int, bool]] = []
    clock = Clock()
    registry = CollectorRegistry()

    def answers_now(name: str) -> bool:
        probes.append(name)
        return answering[name]

    recovery = DestinationRecovery(
        settings,
        catalog.sessions,
        lambda job_id, early: enqueued.append((job_id, early)),
        RecoveryMetrics(registry),
        answers_now=answers_now,
        clock=clock,
    )

    assert recovery.check() == {}  # both probed, neither answers
    clock.now += 30
    assert recovery.check() == {}  # not probed again within the interval
    assert probes == ["pacs", "webhook"]
    answering["pacs"] = True
    clock.now += 30
    assert recovery.check() == {"pacs": [down_then_up]}
    assert enqueued == [(down_then_up, False)]
    assert job(catalog, down_then_up).state == "pending"
    # Dead-lettered for a reason a resend cannot fix: it waits for an operator.
    assert (job(catalog, refused).state, job(catalog, hook).state) == ("failed", "failed")
    assert job(catalog, done).state == "delivered"
    answered = {"destination": "pacs", "answered": "true"}
    assert registry.get_sample_value("pacsclip_destination_probes_total", answered) == 1
    assert (
        registry.get_sample_value(
            "pacsclip_replayed_dispatch_jobs_total", {"destination": "pacs", "was": "failed"}
        )
        == 1
    )
    with catalog.sessions() as session:
        [entry] = audit_events(session, event="dispatch_replayed")
    assert entry.detail == (
        "destination pacs answers again: 1 dead-lettered jobs queued again, "
        "0 waiting jobs brought forward"
    )
    # The operator's replay takes the rest, through the same function.
    assert replay_all(catalog.sessions, lambda job_id: None, "pacs") == [refused]


def test_probe_names_what_the_settings_configure(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        settings, _ = setup(
            webhook_url=f"http://127.0.0.1:{port}/flags",
            hl7_host="127.0.0.1",
            hl7_port=closed_port(),
            destinations=[{**PACS, "port": closed_port()}],
            dispatch_timeout_s=2,
        )
        assert probe("webhook", settings)  # something listens
        assert not probe("hl7", settings)  # nothing does
        assert not probe("pacs", settings)  # no C-ECHO answer
        assert not probe("gone", settings)  # no longer configured
    finally:
        server.close()


def test_a_destination_cannot_take_a_notification_name() -> None:
    from plugin.settings import load_settings

    with pytest.raises(ConfigError, match="taken by the STAT notifications"):
        load_settings(destinations=[{**PACS, "name": "webhook"}])


# --- STAT flags as jobs ------------------------------------------------------------------


class Hook(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HookHandler)
        self.statuses: list[int] = []  # answered in order; 204 once used up
        self.received: list[tuple[bytes, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/flags"


class HookHandler(BaseHTTPRequestHandler):
    server: Hook

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((body, self.headers.get(SIGNATURE_HEADER)))
        self.send_response(self.server.statuses.pop(0) if self.server.statuses else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def serve(server: socketserver.BaseServer) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def hook() -> Iterator[Hook]:
    yield from serve(Hook())


class Mllp(socketserver.TCPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), MllpHandler)
        self.ack_code = "AA"
        self.received: list[str] = []


class MllpHandler(socketserver.BaseRequestHandler):
    server: Mllp

    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        while b"\x1c\r" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            data += chunk
        message = data[1 : data.index(b"\x1c\r")].decode()
        self.server.received.append(message)
        control_id = message.split("\r")[0].split("|")[9]
        header = "MSH|^~\\&|RIS||PACSCLIP||20250304||ACK|A1|P|2.5\r"
        ack = f"{header}MSA|{self.server.ack_code}|{control_id}\r"
        self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")


@pytest.fixture
def mllp() -> Iterator[Mllp]:
    yield from serve(Mllp())


def test_a_stat_flag_becomes_one_job_per_configured_receiver(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    _, catalog = setup()
    [results] = add_analysis(catalog, "1.2.1", [("results", "pacs", "pending", False)])
    analysis_id = job(catalog, results).analysis_id
    with catalog.sessions.begin() as session:
        first = dispatch_jobs.add_notification_jobs(session, analysis_id, ["webhook", "hl7"])
    with catalog.sessions.begin() as session:
        again = dispatch_jobs.add_notification_jobs(session, analysis_id, ["webhook", "hl7"])
    with catalog.sessions() as session:
        listed = dispatch_jobs.recent_jobs(session)

    assert again == []  # a redelivered analysis adds none
    assert sorted((r["kind"], r["destination"], r["state"]) for r in listed) == [
        ("hl7", "hl7", "pending"),
        ("results", "pacs", "pending"),
        ("webhook", "webhook", "pending"),
    ]
    assert len(first) == 2
    with catalog.sessions.begin() as session, pytest.raises(ValueError):
        dispatch_jobs.add_notification_jobs(session, analysis_id, ["email"])


def test_the_webhook_job_is_retried_then_delivered_signed_and_the_study_follows_its_results(
    setup: Callable[..., tuple[Settings, Catalog]], hook: Hook
) -> None:
    settings, catalog = setup(webhook_url=hook.url, webhook_secret="s3cret")
    [flag_job, results] = add_analysis(
        catalog,
        "1.2.1",
        [("webhook", "webhook", "pending", False), ("results", "pacs", "pending", False)],
    )
    hook.statuses = [503]

    first = deliver(catalog.sessions, settings, flag_job, attempt=0)
    # The results arrive while the flag waits for its retry: the study is delivered.
    with catalog.sessions.begin() as session:
        dispatch_jobs.record_delivered(session, results)
    with catalog.sessions() as session:
        assert session.scalars(select(Study.state)).one() == "delivered"
    second = deliver(catalog.sessions, settings, flag_job, attempt=1)

    assert isinstance(first, RetryLater) and first.kind == "webhook"
    assert "503" in str(first.error)
    assert isinstance(second, Delivered)
    assert (second.objects, second.kind) == (0, "webhook")
    assert len(hook.received) == 2  # one POST per attempt: the job retries, not the client
    body, signature = hook.received[-1]
    assert signature == sign(body, "s3cret")
    assert (job(catalog, flag_job).state, job(catalog, flag_job).attempts) == ("delivered", 2)
    assert deliver(catalog.sessions, settings, flag_job, attempt=0) == NotSent("delivered")


def test_a_webhook_down_past_its_retries_is_dead_lettered_for_replay(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup(
        webhook_url=f"http://127.0.0.1:{closed_port()}/flags", dispatch_max_retries=1
    )
    [flag_job] = add_analysis(catalog, "1.2.1", [("webhook", "webhook", "pending", False)])

    assert isinstance(deliver(catalog.sessions, settings, flag_job, attempt=0), RetryLater)
    outcome = deliver(catalog.sessions, settings, flag_job, attempt=1)

    assert isinstance(outcome, DeadLettered) and outcome.kind == "webhook"
    stored = job(catalog, flag_job)
    assert (stored.state, stored.replayable, stored.attempts) == ("failed", True, 2)


def test_a_webhook_refusal_is_dead_lettered_at_once_and_waits_for_an_operator(
    setup: Callable[..., tuple[Settings, Catalog]], hook: Hook
) -> None:
    settings, catalog = setup(webhook_url=hook.url)
    [flag_job] = add_analysis(catalog, "1.2.1", [("webhook", "webhook", "pending", False)])
    hook.statuses = [401]

    outcome = deliver(catalog.sessions, settings, flag_job, attempt=0)

    assert isinstance(outcome, DeadLettered)
    assert "refused" in str(outcome.error)
    assert (job(catalog, flag_job).state, job(catalog, flag_job).replayable) == ("failed", False)


def test_the_hl7_job_is_delivered_retried_or_dead_lettered_by_the_ack(
    setup: Callable[..., tuple[Settings, Catalog]], mllp: Mllp
) -> None:
    settings, catalog = setup(hl7_host="127.0.0.1", hl7_port=mllp.server_address[1])
    [accepted, erred, rejected] = [
        add_analysis(catalog, f"1.2.{n}", [("hl7", "hl7", "pending", False)])[0] for n in (1, 2, 3)
    ]

    assert isinstance(deliver(catalog.sessions, settings, accepted, attempt=0), Delivered)
    with catalog.sessions() as session:  # a flag is no delivery of results
        assert (
            session.scalars(select(Study.state).where(Study.study_instance_uid == "1.2.1")).one()
            == "analysed"
        )
    mllp.ack_code = "AE"
    assert isinstance(deliver(catalog.sessions, settings, erred, attempt=0), RetryLater)
    mllp.ack_code = "AR"
    assert isinstance(deliver(catalog.sessions, settings, rejected, attempt=0), DeadLettered)

    assert [job(catalog, j).state for j in (accepted, erred, rejected)] == [
        "delivered",
        "pending",
        "failed",
    ]
    # Every attempt of one flag carries the same control id, so a resend can be recognised.
    control_ids = {m.split("\r")[0].split("|")[9] for m in mllp.received}
    assert len(control_ids) == 3 and all(c.startswith("PACSCLIP") for c in control_ids)


def test_a_notification_no_longer_configured_is_dead_lettered(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup()
    [flag_job] = add_analysis(catalog, "1.2.1", [("hl7", "hl7", "pending", False)])

    assert deliver(catalog.sessions, settings, flag_job, attempt=0) == NotSent("failed")
    assert job(catalog, flag_job).last_error == "hl7 destination not configured"


def test_dispatch_attempts_are_counted_by_kind_and_outcome() -> None:
    metrics = PacsclipMetrics()
    metrics.observe_dispatch("webhook", "retried")
    metrics.observe_dispatch("webhook", "delivered")
    metrics.observe_dispatch("results", "failed")

    def value(kind: str, outcome: str) -> float | None:
        return metrics.registry.get_sample_value(
            "pacsclip_dispatch_attempts_total", {"kind": kind, "outcome": outcome}
        )

    assert (value("webhook", "retried"), value("webhook", "delivered")) == (1, 1)
    assert value("results", "failed") == 1
    with pytest.raises(ValueError):
        metrics.observe_dispatch("results", "lost")


def test_a_replay_the_broker_does_not_take_goes_back_to_the_dead_letters(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    _, catalog = setup()
    jobs = [
        add_analysis(catalog, f"1.2.{n}", [("results", "pacs", "failed", False)])[0] for n in (1, 2)
    ]
    queued: list[int] = []

    def enqueue(job_id: int) -> None:
        if queued:
            raise ConnectionError("broker unreachable")
        queued.append(job_id)

    with pytest.raises(ConnectionError):
        replay_all(catalog.sessions, enqueue, "pacs")

    assert [(job(catalog, j).state, job(catalog, j).replayable) for j in jobs] == [
        ("pending", False),  # queued: its task sends it
        ("failed", True),  # not queued: the next replay takes it
    ]


def test_a_job_on_a_long_backoff_is_tried_early_once_its_destination_answers(
    setup: Callable[..., tuple[Settings, Catalog]],
) -> None:
    settings, catalog = setup(
        webhook_url=f"http://127.0.0.1:{closed_port()}/flags", destination_probe_interval_s=60
    )
    [soon, later] = [
        add_analysis(catalog, f"1.2.{n}", [("webhook", "webhook", "pending", False)])[0]
        for n in (1, 2)
    ]
    with catalog.sessions.begin() as session:
        dispatch_jobs.record_retry(session, soon, "refused", retry_in_s=30)
        dispatch_jobs.record_retry(session, later, "refused", retry_in_s=200)
    enqueued: list[tuple[int, bool]] = []
    recovery = DestinationRecovery(
        settings,
        catalog.sessions,
        lambda job_id, early: enqueued.append((job_id, early)),
        RecoveryMetrics(CollectorRegistry()),
        answers_now=lambda name: True,
    )

    assert recovery.check() == {"webhook": [later]}
    assert enqueued == [(later, True)]  # the retry due in 30 s needs no help
    assert recovery.check() == {}  # brought forward once
    assert job(catalog, later).state == "pending"
    # The early attempt fails (the receiver is still closed): the scheduled retry stays.
    outcome = deliver(catalog.sessions, settings, later, attempt=0, early=True)
    assert isinstance(outcome, StillWaiting)
    assert (job(catalog, later).state, job(catalog, later).attempts) == ("pending", 2)
