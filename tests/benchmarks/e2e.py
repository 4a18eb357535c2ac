"""End-to-end latency as an operator runs pacsclip: Orthanc pushes a study, the SR comes back.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/e2e.py [--studies 20] [--quiet-studies 5] [--broker sqlite|redis|both]
                                   [--json]

Debian's Orthanc is the PACS; ``pacsclip serve`` (DICOM node, one worker process, HTTP API)
runs as a subprocess with a fresh data directory, Orthanc as its only allowed caller and its
only destination. Single-image studies (CT_small copies with fresh UIDs) are sent one at a
time: uploaded to Orthanc over REST, then pushed to pacsclip with Orthanc's synchronous
``/modalities/pacsclip/store``. t0 is when that call returns (Orthanc has the C-STORE response
of the study's last, here only, instance); t1 is when an SR instance of the study can be read
from Orthanc's REST API (polled every 50 ms). Latency = t1 - t0.

Scenarios, per broker (the SQLite defaults, Redis):
- "expected count": Orthanc is also the count query peer, so a study is complete as soon as
  the number of instances Orthanc reports has arrived; the quiet period does not apply.
- "quiet period": no count query peer, so a study is complete only after the quiet period
  (default 2 s) without new images: what that wait costs.

Everything listens on 127.0.0.1; every process is stopped by its PID. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom

# Run as a script, this file's folder is on sys.path, not the repository root with tests.peers.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from plugin.models.bundle import read_manifest  # noqa: E402
from plugin.models.registry import builtin_bundle_dirs  # noqa: E402
from plugin.settings import Settings  # noqa: E402
from tests.peers.data import ct_small_copies  # noqa: E402
from tests.peers.dcmtk import ECHOSCU, dcmtk_env  # noqa: E402
from tests.peers.orthanc import OrthancServer  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402

HOST = "127.0.0.1"
NODE_AET = "PACSCLIP"
ORTHANC_AET = "ORTHANC"
REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of its own, flushed before each run
TARGET_P95_S = 3.0
POLL_S = 0.05
SR_TIMEOUT_S = 60.0
DELIVERED_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
COMPARISON = (
    "For comparison: mercure waits 60 s per series before it treats a series as complete,"
    " Orthanc's StableAge is 60 s by default."
)


@dataclass(frozen=True)
class ModelChoice:
    """The model pacsclip serve runs: the built-in demo, or a tiny bundle built here."""

    name: str
    version: str
    demo: bool
    bundle_dir: Path | None  # passed as PACSCLIP_MODEL_BUNDLE; None: serve's own default

    def describe(self) -> str:
        kind = "the built-in demo model" if self.demo else "NOT the demo model"
        where = f" (PACSCLIP_MODEL_BUNDLE={self.bundle_dir})" if self.bundle_dir else ""
        return f"{self.name}@{self.version}, {kind}{where}"


@dataclass(frozen=True)
class Scenario:
    name: str
    count_peer: bool
    studies: int
    warmup: int  # studies sent first after each start, reported apart (cold worker)


@dataclass(frozen=True)
class StudyTiming:
    """One study: latency from t0 to the SR in Orthanc, split with the server's timestamps."""

    study_uid: str
    store_s: float  # Orthanc's synchronous store call, upload excluded
    latency_s: float  # t0 (store call returned) -> SR readable in Orthanc
    completion_s: float | None  # t0 -> study completed_at (server clock)
    analysis_s: float | None  # completed_at -> analysis recorded (queue + inference + SR/SC)
    dispatch_s: float | None  # analysis recorded -> SR readable in Orthanc
    completion_reason: str | None
    algorithm: str | None
    state: str | None


@dataclass
class ScenarioResult:
    broker: str
    scenario: str
    count_peer: bool
    timings: list[StudyTiming] = field(default_factory=list)
    warmup: list[StudyTiming] = field(default_factory=list)  # first studies after start, apart
    serve_exit: str = "not stopped yet"
    error: str | None = None

    @property
    def latencies(self) -> list[float]:
        return [t.latency_s for t in self.timings]


# --- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: int) -> float:
    """Linear interpolation between order statistics (statistics.quantiles 'inclusive')."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "max": round(max(values), 3),
    }


def stage_values(timings: Sequence[StudyTiming], stage: str) -> list[float]:
    values = (getattr(t, stage) for t in timings)
    return [v for v in values if v is not None]


# --- model ------------------------------------------------------------------------------------


def choose_model(tmp: Path) -> ModelChoice:
    """The built-in demo when it exists (a fresh data directory has no active bundle), else a
    tiny random-weight bundle from tests/models_fixtures.py."""
    builtin = builtin_bundle_dirs()
    if builtin:
        manifest = read_manifest(builtin[0])
        return ModelChoice(manifest.name, manifest.version, demo=True, bundle_dir=None)
    from tests.models_fixtures import TinyImageTower, build_bundle, export_image_tower

    onnx = export_image_tower(TinyImageTower(), tmp / "tiny_image_tower.onnx")
    bundle = build_bundle(tmp / "tiny-bundle", onnx, name="bench-tiny-clip", version="0.0.1")
    manifest = read_manifest(bundle)
    return ModelChoice(manifest.name, manifest.version, demo=False, bundle_dir=bundle)


# --- pacsclip serve ---------------------------------------------------------------------------


def pacsclip_command() -> Path:
    """The pacsclip console script of the virtualenv running this script."""
    script = Path(sys.executable).parent / "pacsclip"
    if not script.is_file():
        raise SystemExit(f"{script} not found: run this with the project's virtualenv python")
    return script


@dataclass(frozen=True)
class ServeConfig:
    data_dir: Path
    node_port: int
    api_port: int
    token: str
    orthanc_dicom_port: int
    count_peer: bool
    broker_url: str | None
    model: ModelChoice

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"


def serve_env(config: ServeConfig) -> dict[str, str]:
    """TCP_NODELAY=1, no inherited PACSCLIP_* settings, and the benchmark's settings."""
    env = {k: v for k, v in dcmtk_env().items() if not k.startswith("PACSCLIP_")}
    orthanc = {"ae_title": ORTHANC_AET, "host": HOST, "port": config.orthanc_dicom_port}
    env |= {
        "PACSCLIP_DATA_DIR": str(config.data_dir),
        "PACSCLIP_DICOM_HOST": HOST,
        "PACSCLIP_DICOM_PORT": str(config.node_port),
        "PACSCLIP_API_PORT": str(config.api_port),
        "PACSCLIP_API_TOKEN": config.token,
        "PACSCLIP_LOG_LEVEL": "WARNING",
        "PACSCLIP_MIN_FREE_DISK_MB": "0",
        "PACSCLIP_ALLOWED_CALLERS": json.dumps([ORTHANC_AET]),
        "PACSCLIP_DESTINATIONS": json.dumps([{"name": "pacs", **orthanc}]),
        "PACSCLIP_INFERENCE_THREADS": "1",
    }
    if config.count_peer:
        env["PACSCLIP_COUNT_QUERY_PEER"] = json.dumps(orthanc)
    if config.broker_url:
        env["PACSCLIP_BROKER_URL"] = config.broker_url
        env["PACSCLIP_RESULT_BACKEND_URL"] = config.broker_url
    if config.model.bundle_dir is not None:
        env["PACSCLIP_MODEL_BUNDLE"] = str(config.model.bundle_dir)
    return env


def log_tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def echo_ok(port: int) -> bool:
    """One C-ECHO to the node, calling as Orthanc (the only allowed caller)."""
    try:
        done = subprocess.run(
            [ECHOSCU, "-aet", ORTHANC_AET, "-aec", NODE_AET, HOST, str(port)],
            env=dcmtk_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def health_ok(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(api_url + "/api/health", timeout=2) as response:
            return bool(json.loads(response.read()).get("status") == "ok")
    except (OSError, ValueError):
        return False


def wait_ready(process: subprocess.Popen[bytes], config: ServeConfig, log: Path) -> float:
    """Block until the node answers C-ECHO and the API its health check; return the seconds."""
    started = time.monotonic()
    deadline = started + READY_TIMEOUT_S
    echoed = healthy = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"pacsclip serve exited with {process.returncode} before it was ready; log {log}"
            )
        echoed = echoed or echo_ok(config.node_port)
        healthy = healthy or health_ok(config.api_url)
        if echoed and healthy:
            return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError(
        f"pacsclip serve not ready after {READY_TIMEOUT_S:.0f} s (C-ECHO ok: {echoed}, "
        f"health ok: {healthy}); log {log}"
    )


def stop_serve(process: subprocess.Popen[bytes], log: Path) -> str:
    """SIGTERM by PID; report whether it exited with 0 within STOP_TIMEOUT_S.

    serve runs in a session of its own: whatever of that process group is left afterwards
    (its worker child) is killed by the group id and reported.
    """
    if process.poll() is not None:
        return f"had already exited with {process.returncode}" + kill_leftovers(process.pid)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        code = process.wait(timeout=STOP_TIMEOUT_S)
        verdict = f"exited with {code} {time.monotonic() - started:.1f} s after SIGTERM"
        if code != 0:
            verdict += f" (expected 0); log tail:\n{log_tail(log, 15)}"
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        verdict = f"did NOT exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM; killed"
    return verdict + kill_leftovers(process.pid)


def kill_leftovers(pgid: int) -> str:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return ""
    os.killpg(pgid, signal.SIGKILL)
    return "; processes of its group were still running and were killed"


@contextmanager
def running_serve(config: ServeConfig, log: Path, result: ScenarioResult) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(pacsclip_command()), "serve"],
            cwd=config.data_dir.parent,
            env=serve_env(config),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready_s = wait_ready(process, config, log)
        progress(f"  pacsclip serve (PID {process.pid}) ready in {ready_s:.1f} s")
        yield
    finally:
        result.serve_exit = stop_serve(process, log)
        progress(f"  pacsclip serve {result.serve_exit}")


# --- one study --------------------------------------------------------------------------------


def api_get(config: ServeConfig, path: str) -> Any:
    request = urllib.request.Request(
        config.api_url + path, headers={"Authorization": f"Bearer {config.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def has_sr(orthanc: OrthancServer, orthanc_study_id: str) -> bool:
    series: list[dict[str, Any]] = orthanc.get(f"/studies/{orthanc_study_id}/series")
    return any(s["MainDicomTags"].get("Modality") == "SR" and s["Instances"] for s in series)


def wait_for_sr(orthanc: OrthancServer, orthanc_study_id: str, study_uid: str) -> float:
    """Poll Orthanc every 50 ms until the study has an SR instance; return that moment."""
    deadline = time.monotonic() + SR_TIMEOUT_S
    while time.monotonic() < deadline:
        if has_sr(orthanc, orthanc_study_id):
            return time.monotonic()
        time.sleep(POLL_S)
    raise TimeoutError(f"no SR of study {study_uid} in Orthanc after {SR_TIMEOUT_S:.0f} s")


def wait_delivered(config: ServeConfig, study_uid: str) -> dict[str, Any]:
    """The study as the API shows it once delivered (so the next study starts on an idle
    worker); after DELIVERED_TIMEOUT_S, as it is then."""
    deadline = time.monotonic() + DELIVERED_TIMEOUT_S
    while True:
        detail: dict[str, Any] = api_get(config, f"/api/studies/{study_uid}")
        if detail.get("state") == "delivered" or time.monotonic() > deadline:
            return detail
        time.sleep(POLL_S)


def server_time(value: str | None) -> float | None:
    """A catalog timestamp as epoch seconds; SQLite gives them back without zone (UTC)."""
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def difference(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else later - earlier


def timing_from(
    study_uid: str, store_s: float, t0: float, t1: float, t0_wall: float, detail: dict[str, Any]
) -> StudyTiming:
    results = detail.get("results") or []
    newest = results[0] if results else {}
    algorithm = newest.get("algorithm") or {}
    completed = server_time(detail.get("completed_at"))
    analysed = server_time(newest.get("created_at"))
    t1_wall = t0_wall + (t1 - t0)
    return StudyTiming(
        study_uid=study_uid,
        store_s=store_s,
        latency_s=t1 - t0,
        completion_s=difference(completed, t0_wall),
        analysis_s=difference(analysed, completed),
        dispatch_s=difference(t1_wall, analysed),
        completion_reason=detail.get("completion_reason"),
        algorithm=f"{algorithm['name']}@{algorithm['version']}" if algorithm else None,
        state=detail.get("state"),
    )


def run_study(orthanc: OrthancServer, config: ServeConfig, source_dir: Path) -> StudyTiming:
    [source] = ct_small_copies(1, source_dir)
    study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    orthanc_study_id = orthanc.upload(source)["ParentStudy"]
    started = time.monotonic()
    orthanc.store_to_modality("pacsclip", [orthanc_study_id])
    t0, t0_wall = time.monotonic(), time.time()
    t1 = wait_for_sr(orthanc, orthanc_study_id, study_uid)
    detail = wait_delivered(config, study_uid)
    return timing_from(study_uid, t0 - started, t0, t1, t0_wall, detail)


# --- one scenario -----------------------------------------------------------------------------


def flush_redis() -> str | None:
    """Empty the benchmark's Redis database; the reason when Redis cannot be reached."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        return f"Redis on 127.0.0.1:6379 not reachable ({exc}): Redis runs skipped"
    return None


def run_scenario(
    orthanc: OrthancServer, broker: str, scenario: Scenario, model: ModelChoice, root: Path
) -> ScenarioResult:
    result = ScenarioResult(broker, scenario.name, scenario.count_peer)
    workdir = root / f"{broker}-{scenario.name.replace(' ', '-')}"
    workdir.mkdir()
    config = ServeConfig(
        data_dir=workdir / "data",
        node_port=free_port(),
        api_port=free_port(),
        token=secrets.token_urlsafe(24),
        orthanc_dicom_port=orthanc.dicom_port,
        count_peer=scenario.count_peer,
        broker_url=REDIS_URL if broker == "redis" else None,
        model=model,
    )
    orthanc.add_modality("pacsclip", NODE_AET, HOST, config.node_port)
    progress(f"{broker}, {scenario.name}: {scenario.warmup} + {scenario.studies} studies")
    try:
        with running_serve(config, workdir / "serve.log", result):
            for number in range(1, scenario.warmup + scenario.studies + 1):
                timing = run_study(orthanc, config, workdir / f"study-{number:03d}")
                warm = number > scenario.warmup
                (result.timings if warm else result.warmup).append(timing)
                progress(
                    f"  study {number:3d}{'' if warm else ' (warm-up)'}: {timing.latency_s:6.3f} s"
                    f" ({timing.completion_reason}, {timing.state})"
                )
    except (RuntimeError, TimeoutError, OSError) as exc:
        result.error = (
            f"{type(exc).__name__}: {exc}\nserve log tail:\n{log_tail(workdir / 'serve.log')}"
        )
        progress(f"  FAILED: {result.error}")
    return result


# --- report -----------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def stats_line(label: str, values: Sequence[float]) -> str:
    figures = summary(values)
    if figures is None:
        return f"    {label:<28} no data"
    return (
        f"    {label:<28} p50 {fmt(figures['p50'])}  p95 {fmt(figures['p95'])}"
        f"  max {fmt(figures['max'])}  (n={len(values)})"
    )


def warmup_line(warmup: Sequence[StudyTiming]) -> str:
    if not warmup:
        return "    warm-up: none"
    each = ", ".join(f"{t.latency_s:.3f} s" for t in warmup)
    return f"    warm-up (first after start, not in the figures above): {each}"


def scenario_block(result: ScenarioResult) -> list[str]:
    reasons = sorted({str(t.completion_reason) for t in result.timings}) or ["-"]
    algorithms = sorted({str(t.algorithm) for t in result.timings}) or ["-"]
    lines = [
        f"  [{result.broker}] {result.scenario}: {len(result.timings)} studies measured;"
        f" completion reason {', '.join(reasons)}; model in results {', '.join(algorithms)}",
        stats_line("latency t0 -> SR in Orthanc", result.latencies),
        stats_line("  t0 -> complete", stage_values(result.timings, "completion_s")),
        stats_line("  complete -> analysed", stage_values(result.timings, "analysis_s")),
        stats_line("  analysed -> SR in Orthanc", stage_values(result.timings, "dispatch_s")),
        stats_line("(Orthanc store call)", [t.store_s for t in result.timings]),
        warmup_line(result.warmup),
        f"    pacsclip serve stop: {result.serve_exit}",
    ]
    if result.error:
        lines.append(f"    ERROR: {result.error}")
    return lines


def target_line(results: Sequence[ScenarioResult], model: ModelChoice) -> str:
    redis_runs = [
        r for r in results if r.broker == "redis" and r.count_peer and r.latencies and not r.error
    ]
    target = f"Target p95 <= {TARGET_P95_S:.0f} s on Redis with the demo model:"
    if not redis_runs:
        return f"{target} NOT MEASURED (no complete Redis run with the count peer)"
    p95 = percentile(redis_runs[0].latencies, 95)
    met = p95 <= TARGET_P95_S
    verdict = "MET" if met else "NOT MET"
    if not model.demo:
        verdict = (
            f"not assessable: the demo model is absent, {model.name}@{model.version} ran"
            f" (p95 {'<=' if met else '>'} {TARGET_P95_S:.0f} s with it)"
        )
    return f"{target} Redis p95 {p95:.3f} s -> {verdict}"


def header(args: argparse.Namespace, model: ModelChoice, orthanc: OrthancServer) -> str:
    defaults = Settings.model_fields
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join(
        [
            "End-to-end latency: Orthanc (PACS) -> pacsclip serve -> SR back in Orthanc",
            f"CPUs: {os.cpu_count()}; load average at start: {load}",
            f"Model: {model.describe()}",
            f"Orthanc {orthanc.get('/system').get('Version')} (TCP_NODELAY=1);"
            " pacsclip serve: solo worker, PACSCLIP_INFERENCE_THREADS=1, all on 127.0.0.1",
            f"Workload: single-image studies (CT_small, fresh UIDs), one at a time, the next"
            f" once the previous is delivered; per run {args.warmup} warm-up, then"
            f" {args.studies} with the count query peer ({args.quiet_studies} without).",
            "Each run (broker x scenario) starts pacsclip serve afresh with an empty data"
            " directory and is ready when the node answers C-ECHO and GET /api/health is ok.",
            "t0: Orthanc's synchronous C-STORE to pacsclip returned (C-STORE response received);"
            " t1: an SR of the study readable over Orthanc's REST API (polled every 50 ms).",
            "Split by the catalog's timestamps (same machine clock): completed_at, analysis"
            " created_at.",
            f"Quiet period setting: {defaults['quiet_period_s'].default:g} s (applies only without"
            f" an expected count); completion check every"
            f" {defaults['completion_check_interval_s'].default:g} s.",
        ]
    )


def report(
    results: Sequence[ScenarioResult],
    model: ModelChoice,
    notes: Sequence[str],
) -> str:
    lines: list[str] = []
    for result in results:
        lines += scenario_block(result)
    lines += [f"  {note}" for note in notes]
    count_runs = {r.broker: r for r in results if r.count_peer}
    quiet_runs = {r.broker: r for r in results if not r.count_peer}
    for broker, quiet in quiet_runs.items():
        base = count_runs.get(broker)
        if base and base.latencies and quiet.latencies:
            cost = statistics.median(quiet.latencies) - statistics.median(base.latencies)
            lines.append(f"  [{broker}] quiet period cost (p50 difference): {cost:+.3f} s")
    lines += [target_line(results, model), COMPARISON]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines.append(f"load average at end: {load}")
    return "\n".join(lines)


def rounded(data: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in data.items()}


def as_json(results: Sequence[ScenarioResult], model: ModelChoice) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "model": {"name": model.name, "version": model.version, "demo": model.demo},
        "target_p95_s": TARGET_P95_S,
        "quiet_period_s": Settings.model_fields["quiet_period_s"].default,
        "runs": [
            {
                "broker": r.broker,
                "scenario": r.scenario,
                "count_query_peer": r.count_peer,
                "latency_s": summary(r.latencies),
                "t0_to_complete_s": summary(stage_values(r.timings, "completion_s")),
                "complete_to_analysed_s": summary(stage_values(r.timings, "analysis_s")),
                "analysed_to_sr_s": summary(stage_values(r.timings, "dispatch_s")),
                "serve_exit": r.serve_exit,
                "error": r.error,
                "studies": [rounded(asdict(t)) for t in r.timings],
                "warmup": [rounded(asdict(t)) for t in r.warmup],
            }
            for r in results
        ],
    }


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--studies", type=int, default=20, help="studies with the count peer")
    parser.add_argument(
        "--quiet-studies", type=int, default=5, help="studies without it (quiet period; 0: none)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="studies first after each start, reported apart"
    )
    parser.add_argument("--broker", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where work directories go")
    args = parser.parse_args(argv)
    if args.studies < 1 or min(args.quiet_studies, args.warmup) < 0:
        parser.error("--studies must be at least 1, --quiet-studies and --warmup at least 0")
    return args


def check_tools() -> None:
    from tests.peers.orthanc import ORTHANC

    missing = [tool for tool in (ORTHANC, ECHOSCU) if not Path(tool).is_file()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install orthanc dcmtk)")
    pacsclip_command()


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    planned = [Scenario("expected count", True, args.studies, args.warmup)]
    if args.quiet_studies:
        planned.append(Scenario("quiet period", False, args.quiet_studies, args.warmup))
    return planned


def brokers(args: argparse.Namespace, notes: list[str]) -> list[str]:
    wanted = ["sqlite", "redis"] if args.broker == "both" else [args.broker]
    if "redis" in wanted and (reason := flush_redis()) is not None:
        notes.append(reason)
        progress(reason)
        wanted.remove("redis")
    return wanted


def run_all(
    orthanc: OrthancServer, args: argparse.Namespace, model: ModelChoice, root: Path
) -> tuple[list[ScenarioResult], list[str]]:
    notes: list[str] = []
    results: list[ScenarioResult] = []
    for broker in brokers(args, notes):
        for scenario in scenarios(args):
            if broker == "redis" and (reason := flush_redis()) is not None:
                notes.append(reason)
                break
            results.append(run_scenario(orthanc, broker, scenario, model, root))
    return results, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    with tempfile.TemporaryDirectory(prefix="pacsclip-e2e-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        model = choose_model(root)
        placeholder = {"pacsclip": (NODE_AET, HOST, free_port())}  # re-pointed per serve run
        with OrthancServer(modalities=placeholder, workdir=root / "orthanc") as orthanc:
            print(header(args, model, orthanc), flush=True)
            results, notes = run_all(orthanc, args, model, root)
    print(report(results, model, notes), flush=True)
    if args.json:
        print(json.dumps(as_json(results, model), indent=2))
    failed = any(r.error or not r.serve_exit.startswith("exited with 0") for r in results)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
