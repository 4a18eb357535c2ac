"""Soak with chaos: a node, N workers on RabbitMQ, the API, a private PostgreSQL catalog and
Orthanc as the PACS, under load from three sites while processes are killed.

    .venv/bin/python -m tests.soak.run --studies 1000 --minutes 10 --workers 4 [--seed 0]

Chaos (seeded): kill -9 a random worker every 20 s and the node every 60 s, each restarted at
once (as systemd would); Orthanc stopped for 30 s once; PostgreSQL restarted once. Then it
checks: every instance answered Success is spooled and cataloged; every study has exactly one
SR and one overlay set per analysis in Orthanc and one analysis per generation; no study or
dispatch job is left unfinished (dead letters are replayed once Orthanc is back, as an
operator would); no log line holds a patient name or ID that was sent. It prints the figures
and exits 1 on any violation. Every process it starts is stopped by PID, also on failure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from plugin.catalog.models import Analysis, DispatchJob, Instance, ResultObject, Study
from tests.peers.orthanc import OrthancServer
from tests.peers.pacsclip_process import PACSCLIP, PacsclipProcess, pacsclip_env
from tests.peers.ports import free_port, wait_for_port
from tests.peers.postgres import PrivatePostgres
from tests.peers.rabbitmq import rabbitmq_vhost
from tests.soak.load import PHI_MARK, SITES, Sender, StudyLoad, make_studies

HOST = "127.0.0.1"
AET = "PACSCLIP"
ORTHANC_AET = "SOAKPACS"
RULES = """version: 1
rules:
  - name: emergency-is-stat
    match:
      calling_ae_title: [{er}]
    priority: stat
"""
FINISHED_STATES = {"delivered"}


@dataclass(frozen=True)
class SoakConfig:
    studies: int = 1000
    minutes: float = 10.0
    workers: int = 4
    seed: int = 0
    senders: int = 3
    worker_kill_every_s: float = 20.0
    node_kill_every_s: float = 60.0
    orthanc_outage_s: float = 30.0
    settle_timeout_s: float = 600.0


@dataclass
class ChaosLog:
    worker_kills: int = 0
    node_kills: int = 0
    orthanc_stops: int = 0
    postgres_restarts: int = 0
    events: list[str] = field(default_factory=list)

    def note(self, started: float, what: str) -> None:
        self.events.append(f"{time.monotonic() - started:6.1f} s  {what}")


class Deployment:
    """The processes of the soak; each one stopped by PID when the deployment closes."""

    def __init__(self, config: SoakConfig, workdir: Path, stack: ExitStack) -> None:
        self.config = config
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True)
        self.postgres = PrivatePostgres()
        stack.callback(self.postgres.stop)
        self.postgres.start()
        broker = stack.enter_context(rabbitmq_vhost())
        self.orthanc = OrthancServer(
            aet=ORTHANC_AET, workdir=workdir / "orthanc", http_port=free_port(),
            dicom_port=free_port(),
        )  # fmt: skip
        stack.callback(self.orthanc.__exit__, None, None, None)
        self.orthanc.__enter__()
        self.node_port, self.api_port = free_port(), free_port()
        self.token = "soak-token"
        rules = workdir / "rules.yaml"
        rules.write_text(RULES.format(er=SITES[0].ae_title))
        destination = {"name": "pacs", "ae_title": ORTHANC_AET, "host": HOST,
                       "port": self.orthanc.dicom_port}  # fmt: skip
        self.env = pacsclip_env(
            {
                "PACSCLIP_DATA_DIR": str(workdir / "data"),
                "PACSCLIP_DATABASE_URL": self.postgres.url(),
                "PACSCLIP_BROKER_URL": broker,
                "PACSCLIP_RESULT_BACKEND_URL": "db+" + self.postgres.url(),
                "PACSCLIP_DICOM_HOST": HOST,
                "PACSCLIP_DICOM_PORT": str(self.node_port),
                "PACSCLIP_API_HOST": HOST,
                "PACSCLIP_API_PORT": str(self.api_port),
                "PACSCLIP_API_TOKEN": self.token,
                "PACSCLIP_ALLOWED_CALLERS": json.dumps([s.ae_title for s in SITES]),
                "PACSCLIP_DESTINATIONS": json.dumps([destination]),
                "PACSCLIP_RULES_FILE": str(rules),
                "PACSCLIP_MIN_FREE_DISK_MB": "0",
                "PACSCLIP_INFERENCE_THREADS": "1",
                "PACSCLIP_REQUEUE_AFTER_S": "120",
                "PACSCLIP_LOG_LEVEL": "INFO",
            }
        )
        self.node = PacsclipProcess(["node"], self.env, self.logs / "node.log")
        self.api = PacsclipProcess(["api"], self.env, self.logs / "api.log")
        self.workers = [
            PacsclipProcess(["worker"], self.env, self.logs / f"worker{n}.log")
            for n in range(config.workers)
        ]
        for process in (self.node, self.api, *self.workers):
            stack.callback(process.stop)
        # The node creates the schema; the others start once it listens.
        self.node.start()
        wait_for_port(HOST, self.node_port, 120)
        self.api.start()
        for worker in self.workers:
            worker.start()
        wait_for_port(HOST, self.api_port, 120)

    def restart_node(self) -> None:
        self.node.kill9()
        self.node.start()

    def restart_worker(self, worker: PacsclipProcess) -> None:
        worker.kill9()
        worker.start()


def chaos(deployment: Deployment, config: SoakConfig, stop: threading.Event, log: ChaosLog) -> None:
    """Kill and restart at seeded random moments until ``stop``."""
    rng = random.Random(config.seed)
    started = time.monotonic()
    duration = config.minutes * 60
    next_worker = rng.uniform(5, config.worker_kill_every_s)
    next_node = rng.uniform(15, config.node_kill_every_s)
    orthanc_at = rng.uniform(0.2, 0.5) * duration
    postgres_at = rng.uniform(0.55, 0.8) * duration
    orthanc_back_at: float | None = None
    while not stop.wait(0.2):
        now = time.monotonic() - started
        if now >= next_worker:
            worker = rng.choice(deployment.workers)
            deployment.restart_worker(worker)
            log.worker_kills += 1
            log.note(started, f"kill -9 worker {worker.log.stem}, restarted")
            next_worker += config.worker_kill_every_s
        if now >= next_node:
            deployment.restart_node()
            log.node_kills += 1
            log.note(started, "kill -9 node, restarted")
            next_node += config.node_kill_every_s
        if log.orthanc_stops == 0 and now >= orthanc_at:
            deployment.orthanc.__exit__(None, None, None)
            log.orthanc_stops += 1
            orthanc_back_at = now + config.orthanc_outage_s
            log.note(started, f"Orthanc stopped for {config.orthanc_outage_s:.0f} s")
        if orthanc_back_at is not None and now >= orthanc_back_at:
            deployment.orthanc.__enter__()
            orthanc_back_at = None
            log.note(started, "Orthanc started again")
        if log.postgres_restarts == 0 and now >= postgres_at:
            deployment.postgres.restart()
            log.postgres_restarts += 1
            log.note(started, "PostgreSQL restarted")
    if orthanc_back_at is not None:
        deployment.orthanc.__enter__()


@contextmanager
def catalog_session(url: str) -> Iterator[Session]:
    engine = create_engine(url, pool_pre_ping=True)
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


@dataclass
class Findings:
    violations: list[str] = field(default_factory=list)
    lost: int = 0
    duplicates: int = 0
    replayed: int = 0
    latencies_s: list[float] = field(default_factory=list)


def unfinished(session: Session, sent: Sequence[StudyLoad] = ()) -> tuple[int, int]:
    """Studies not delivered, and dispatch jobs not delivered.

    A study is unfinished from its first acknowledged instance, before it has a row: the node
    answers Success once the file is in the spool and catalogs it a moment later (after a
    kill, only when the restarted node reconciles its spool). Until then no row says so."""
    studies = set(
        session.scalars(select(Study.study_instance_uid).where(Study.state.not_in(FINISHED_STATES)))
    )
    acknowledged = [uid for s in sent for uid in s.acknowledged]
    cataloged = set(
        session.scalars(
            select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(acknowledged))
        )
    )
    studies |= {s.study_uid for s in sent if not s.acknowledged <= cataloged}
    jobs = session.scalar(
        select(func.count(DispatchJob.id)).where(DispatchJob.state != "delivered")
    )
    return len(studies), int(jobs or 0)


def settle(
    deployment: Deployment, timeout_s: float, findings: Findings, sent: Sequence[StudyLoad]
) -> None:
    """Wait until every study sent is cataloged and delivered; replay dead letters once
    Orthanc is back."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with catalog_session(deployment.postgres.url()) as session:
            studies, jobs = unfinished(session, sent)
            failed = session.scalars(
                select(DispatchJob.id).where(DispatchJob.state == "failed")
            ).all()
        for job_id in failed:  # the operator's replay (pacsclip jobs retry ID)
            replay = PacsclipProcess(["jobs", "retry", str(job_id)], deployment.env,
                                     deployment.logs / "cli.log")  # fmt: skip
            replay.start()
            replay.process.wait(timeout=60)  # type: ignore[union-attr]
            findings.replayed += 1
        if studies == 0 and jobs == 0:
            return
        time.sleep(2)
    findings.violations.append(f"not settled after {timeout_s:.0f} s: {studies} studies and "
                               f"{jobs} dispatch jobs unfinished")  # fmt: skip


def check(deployment: Deployment, studies: list[StudyLoad], findings: Findings) -> None:
    spool = deployment.workdir / "data" / "spool"
    acknowledged = {uid: s for s in studies for uid in s.acknowledged}
    with catalog_session(deployment.postgres.url()) as session:
        cataloged = set(session.scalars(select(Instance.sop_instance_uid)).all())
        for uid, study in acknowledged.items():
            on_disk = any(spool.glob(f"{study.study_uid}/*/{uid}.dcm"))
            if not on_disk or uid not in cataloged:
                findings.lost += 1
                where = "not cataloged" if on_disk else "not on disk"
                findings.violations.append(f"instance {uid} answered Success but {where}")
        for study in studies:
            if not study.acknowledged:
                findings.violations.append(f"study {study.index} never acknowledged")
                continue
            check_results(deployment, session, study, findings)
    for log in sorted(deployment.logs.glob("*.log")):
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            if PHI_MARK in line:
                findings.violations.append(f"patient data in {log.name} line {number}")


def check_results(
    deployment: Deployment, session: Session, study: StudyLoad, findings: Findings
) -> None:
    row = session.scalar(select(Study).where(Study.study_instance_uid == study.study_uid))
    if row is None:
        findings.violations.append(f"study {study.index} not in the catalog")
        return
    analyses = session.scalars(select(Analysis).where(Analysis.study_id == row.id)).all()
    generations = [a.generation for a in analyses]
    extra = len(generations) - len(set(generations))
    if extra:
        findings.duplicates += extra
        findings.violations.append(f"study {study.index}: {extra} duplicate analyses")
    expected: dict[str, set[str]] = {"SR": set(), "OT": set()}
    for analysis in analyses:
        objects = session.scalars(
            select(ResultObject).where(ResultObject.analysis_id == analysis.id)
        ).all()
        kinds = [o.kind for o in objects]
        if kinds.count("SR") != 1:
            findings.violations.append(
                f"study {study.index} generation {analysis.generation}: results {kinds}"
            )
        for o in objects:
            expected["SR" if o.kind == "SR" else "OT"].add(o.sop_instance_uid)
    orthanc_id = deployment.orthanc.find_study(study.study_uid)
    held: dict[str, list[str]] = {"SR": [], "OT": []}
    for instance in deployment.orthanc.study_instances(orthanc_id) if orthanc_id else []:
        tags = deployment.orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        if tags.get("Modality") in held:
            held[tags["Modality"]].append(tags["SOPInstanceUID"])
    for modality, uids in held.items():
        if sorted(uids) != sorted(expected[modality]):
            surplus = len(uids) - len(set(uids) & expected[modality])
            findings.duplicates += max(0, surplus)
            findings.violations.append(
                f"study {study.index}: Orthanc holds {len(uids)} {modality}, the catalog made "
                f"{len(expected[modality])}"
            )
    sr_delivered = session.scalar(
        select(func.min(DispatchJob.delivered_at))
        .join(Analysis, DispatchJob.analysis_id == Analysis.id)
        .where(Analysis.study_id == row.id)
    )
    if sr_delivered is not None and study.pushed_at is not None:
        delivered = sr_delivered if sr_delivered.tzinfo else sr_delivered.replace(tzinfo=UTC)
        findings.latencies_s.append((delivered - study.pushed_at).total_seconds())


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def report(
    config: SoakConfig, sender: Sender, studies: list[StudyLoad], log: ChaosLog, f: Findings
) -> str:
    sent_minutes = (sender.finished - sender.started) / 60
    done = sum(1 for s in studies if s.complete)
    lat = f.latencies_s or [float("nan")]
    lines = [
        f"soak: {config.studies} studies from {len(SITES)} sites over {config.minutes:g} min, "
        f"{config.workers} workers, seed {config.seed}",
        f"studies acknowledged: {done}/{len(studies)} in {sent_minutes:.1f} min "
        f"({done / sent_minutes:.0f} studies/min held); "
        f"instances {sum(len(s.acknowledged) for s in studies)}; "
        f"pushes {sum(s.pushes for s in studies)} (resent after a refused or cut push)",
        f"push -> SR delivered: p50 {statistics.median(lat):.1f} s, "
        f"p95 {percentile(lat, 95):.1f} s, max {max(lat):.1f} s (n={len(f.latencies_s)})",
        f"kills survived: {log.worker_kills} workers, {log.node_kills} node; Orthanc stops "
        f"{log.orthanc_stops}; PostgreSQL restarts {log.postgres_restarts}; "
        f"dead letters replayed {f.replayed}",
        f"instances lost: {f.lost}; duplicates: {f.duplicates}",
        f"violations: {len(f.violations)}",
        *(f"  {v}" for v in f.violations[:40]),
        "chaos:",
        *(f"  {e}" for e in log.events),
    ]
    return "\n".join(lines)


def run_soak(config: SoakConfig, workdir: Path) -> tuple[str, bool]:
    """Run the soak in ``workdir``; returns the report and whether it passed."""
    rng = random.Random(config.seed)
    studies = make_studies(config.studies, workdir / "studies", rng)
    log, findings = ChaosLog(), Findings()
    with ExitStack() as stack:
        deployment = Deployment(config, workdir, stack)
        stop = threading.Event()
        stack.callback(stop.set)
        sender = Sender(studies, deployment.node_port, AET, config.minutes * 60, config.senders)
        chaos_thread = threading.Thread(
            target=chaos, args=(deployment, config, stop, log), name="chaos"
        )
        chaos_thread.start()
        try:
            sender.run(threading.Event())
        finally:
            stop.set()
            chaos_thread.join()
        for process in (deployment.node, deployment.api, *deployment.workers):
            if not process.alive():
                findings.violations.append(f"{process.log.stem} was not running at the end")
        settle(deployment, config.settle_timeout_s, findings, studies)
        check(deployment, studies, findings)
    text = report(config, sender, studies, log, findings)
    return text, not findings.violations


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="work directory to keep (logs, spool)")
    args = parser.parse_args(argv)
    if not Path(PACSCLIP).is_file():
        raise SystemExit(f"{PACSCLIP} not found: run with the project's virtualenv python")
    config = SoakConfig(args.studies, args.minutes, args.workers, args.seed)
    with tempfile.TemporaryDirectory(prefix="pacsclip-soak-") as tmp:
        workdir = args.keep or Path(tmp)
        text, passed = run_soak(config, workdir)
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
