"""End-to-end latency as an operator runs pacsclip: Orthanc pushes a study, results come back.

Run from the repository root with the project's virtualenv:

    .venv/bin/python tests/benchmarks/e2e.py [--runs 20] [--warmup 1]
        [--scenarios default,no-regions,vit-b16] [--broker sqlite|redis|both]
        [--datasets cr,ct] [--extra quiet-period|expected-count] [--extra-runs 5]
        [--ood-guard] [--model-bundle DIR] [--model-cache DIR] [--tmp-dir DIR] [--json]

Debian's Orthanc is the PACS. ``pacsclip serve`` (DICOM node, one worker child, HTTP API) runs
as a subprocess with a fresh data directory and default settings: completion when the pushing
association is released (plus the release grace), no count query peer, the embedded SQLite
broker or Redis, regions in the SR and a DICOM SEG. The harness only sets what it must (ports
on 127.0.0.1, the API token, Orthanc as the only caller and destination, the worker's metrics
port, log level WARNING, no free-disk floor) and turns the out-of-distribution guard off
(PACSCLIP_OOD_GUARD=false; ``--ood-guard`` keeps it on): the demo model's guard does not score
RG1, a real radiograph, so with it on no finding, region, overlay or SEG would be made.

Scenarios (``--scenarios``, comma-separated; each its own ``pacsclip serve`` per broker):
- "default": the built-in demo model (or ``--model-bundle``), regions and SEG on (defaults);
- "no-regions": the same with PACSCLIP_RESULT_REGIONS=false and PACSCLIP_RESULT_SEG=false.
  With "default", both serves run side by side: each run of a data set goes to one and then
  the other (the order alternating), so that a busy neighbour slows both alike; the ratio of
  their p95s (regions and SEG on / off) is printed;
- "vit-b16": a model of real size, a ViT-B/16 CLIP of BiomedCLIP's image tower size (224 x 224,
  patch 16, width 768, 12 layers, 12 heads; text tower CLIP ViT-B/16's: width 512, 12 layers)
  with random weights (``torch.manual_seed(0)``), built offline with transformers'
  ``CLIPConfig`` / ``CLIPModel`` and a byte-level CLIP tokenizer, saved with
  ``save_pretrained`` and imported with ``pacsclip model import-hf`` (so its ONNX image tower
  exports the patch tokens and each map comes from the same forward pass), then run with
  PACSCLIP_MODEL_BUNDLE, fp32, regions and SEG on. Built once into ``--model-cache`` (default:
  a folder under ``--tmp-dir`` or the system's temporary directory) and reused while the
  cache holds it. Random weights leave every finding undetermined (near 0.5), so the
  import's prompts file sets the calibration instead: three of the six default chest findings
  present, three absent, as the demo model scores RG1 (three overlays, regions, a SEG). Its
  findings and maps are meaningless: only its times count.
``--extra`` adds the old completion scenarios (CR only, demo model).

Data sets, one study at a time, each with fresh Study/Series/SOP Instance UIDs per run:
- "cr": 1 image, RG1 (the real PA chest radiograph of pydicom-data, uncompressed);
- "ct": 50 images, copies of pydicom's CT_small as one series.
Each study is uploaded to Orthanc over REST first (not timed), then pushed to pacsclip with
Orthanc's synchronous ``POST /modalities/pacsclip/store``.

Latency: from the start of that push call to the moment the SR, every overlay (secondary
capture, modality OT) and every SEG (modality SEG) of the study's analysis are readable in
Orthanc's REST API (polled every 50 ms); which objects to wait for comes from the API's
record of the analysis. The next study starts once the study is delivered and the metrics
have settled. The first study after ``pacsclip serve`` is ready (the first run of its first
data set: a warm-up run unless ``--warmup 0``) is printed beside the warm p95 of that data set,
with its stages; the goal is at most 1.2 times the warm p95.

Per-stage breakdown, per run, from Prometheus metrics (the delta of _sum/_count over the run):
- receive: the push call's duration (harness clock);
- completion wait: push call returned -> study complete: the first image's arrival (the API's
  received_at) + pacsclip_received_to_complete_seconds (node, API /metrics) - receive;
- queue wait: pacsclip_complete_to_analysed_seconds - pacsclip_analysis_duration_seconds
  (worker /metrics on PACSCLIP_WORKER_METRICS_PORT);
- analysis and its steps: pacsclip_analysis_duration_seconds and
  pacsclip_analysis_step_seconds{step=...} (summed over the images of the study; "n/a" where
  the worker does not report the step histogram);
- dispatch: pacsclip_analysed_to_delivered_seconds, the MEAN over the study's delivered
  objects (an object count per observation; the objects of one dispatch job share one value,
  so with the single destination here the mean is also the max);
- Orthanc: delivered -> readable in Orthanc, the remainder of the latency.

Everything listens on 127.0.0.1; every wait is bounded; serve and Orthanc are stopped by PID.
Nothing is downloaded. Not a pytest test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

# Run as a script, this file's folder is on sys.path, not the repository root with tests.peers.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from plugin.models.bundle import read_manifest  # noqa: E402
from plugin.models.registry import builtin_bundle_dirs  # noqa: E402
from plugin.settings import Settings  # noqa: E402
from tests.peers.data import ct_small_copies, rg1  # noqa: E402
from tests.peers.dcmtk import ECHOSCU, dcmtk_env  # noqa: E402
from tests.peers.orthanc import OrthancError, OrthancServer  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402

HOST = "127.0.0.1"
NODE_AET = "PACSCLIP"
ORTHANC_AET = "ORTHANC"
# Databases of their own, one per serve of a group (side by side, two workers must not take
# each other's tasks), flushed before each serve.
REDIS_URL = "redis://127.0.0.1:6379/{}"
REDIS_FIRST_DB = 13
# RG1, regions and SEG on, guard off, warm: demo model per broker (issue 20: 2.0 s on the
# embedded default, the SQLite broker; issue 4: 1.5 s on Redis); the ViT-B/16 on the default.
TARGETS_P95_S = {"sqlite": 2.0, "redis": 1.5}
VIT_TARGET_P95_S = 3.0
FIRST_PUSH_TARGET = 1.2  # the first push after serve starts, at most this times the warm p95
POLL_S = 0.05
READY_TIMEOUT_S = 120.0
DELIVERED_TIMEOUT_S = 30.0
METRICS_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0

# Metric names (histograms; _sum and _count are read).
RECEIVED_TO_COMPLETE = "pacsclip_received_to_complete_seconds"  # node: API /metrics
COMPLETE_TO_ANALYSED = "pacsclip_complete_to_analysed_seconds"  # worker
ANALYSED_TO_DELIVERED = "pacsclip_analysed_to_delivered_seconds"  # worker, per object
ANALYSIS_DURATION = "pacsclip_analysis_duration_seconds"  # worker
ANALYSIS_STEP = "pacsclip_analysis_step_seconds"  # worker, label step
STEPS = ("read", "decode", "inference", "saliency", "build", "write", "record")

COMPARISON = (
    "For comparison: mercure waits 60 s per series before it treats a series as complete,"
    " Orthanc's StableAge is 60 s by default."
)


# --- data sets and scenarios ------------------------------------------------------------------


@functools.cache
def rg1_template() -> pydicom.Dataset:
    return pydicom.dcmread(rg1("uncompressed"))


def write_rg1_copy(out_dir: Path) -> list[Path]:
    """RG1 with fresh Study/Series/SOP Instance UIDs, as one file in out_dir."""
    ds = rg1_template()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "rg1.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


@dataclass(frozen=True)
class DataSet:
    key: str
    label: str
    images: int
    write: Callable[[Path], list[Path]]
    result_timeout_s: float  # push start -> all results readable in Orthanc


DATASETS = {
    "cr": DataSet("cr", "CR, 1 image (RG1 chest radiograph)", 1, write_rg1_copy, 60.0),
    "ct": DataSet(
        "ct", "CT, 50 images (CT_small copies)", 50, lambda d: ct_small_copies(50, d), 180.0
    ),
}


DEMO, VIT = "demo", "vit-b16"  # which model a scenario runs


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    model: str  # DEMO (the built-in demo, or --model-bundle) or VIT
    env: tuple[tuple[str, str], ...] = ()  # PACSCLIP_* settings beside the harness's own
    cr_only: bool = False


DEFAULT_SCENARIO = "default"
NO_REGIONS = "no-regions"
SCENARIOS = {
    DEFAULT_SCENARIO: Scenario(DEFAULT_SCENARIO, "default settings (regions and SEG on)", DEMO),
    NO_REGIONS: Scenario(
        NO_REGIONS,
        "regions and SEG off (PACSCLIP_RESULT_REGIONS=false, PACSCLIP_RESULT_SEG=false)",
        DEMO,
        (("PACSCLIP_RESULT_REGIONS", "false"), ("PACSCLIP_RESULT_SEG", "false")),
    ),
    VIT: Scenario(
        VIT, "ViT-B/16 CLIP of real size, random weights, fp32 (regions and SEG on)", VIT
    ),
}
# Optional extras (CR only): the old scenarios, against the default completion on release.
EXTRAS = {
    "quiet-period": Scenario(
        "quiet-period",
        "quiet period only (PACSCLIP_COMPLETE_ON_RELEASE=false)",
        DEMO,
        (("PACSCLIP_COMPLETE_ON_RELEASE", "false"),),
        cr_only=True,
    ),
    "expected-count": Scenario(
        "expected-count",
        "Orthanc as count query peer (PACSCLIP_COUNT_QUERY_PEER)",
        DEMO,
        cr_only=True,
    ),
}


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


def median_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# --- Prometheus metrics -----------------------------------------------------------------------

MetricKey = tuple[str, str]  # (sample name, value of the step label or "")


def scrape(url: str, token: str | None = None) -> dict[MetricKey, float]:
    """The _sum and _count samples of one /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        text = response.read().decode()
    samples: dict[MetricKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                samples[(sample.name, sample.labels.get("step", ""))] = sample.value
    return samples


@dataclass(frozen=True)
class Snapshot:
    node: dict[MetricKey, float]
    worker: dict[MetricKey, float]


def delta(
    before: dict[MetricKey, float], after: dict[MetricKey, float], name: str, step: str = ""
) -> tuple[float, float] | None:
    """(delta of _sum, delta of _count) of a histogram; None where it is not exported."""
    total, count = (name + "_sum", step), (name + "_count", step)
    if total not in after:
        return None
    return after[total] - before.get(total, 0.0), after.get(count, 0.0) - before.get(count, 0.0)


def delta_sum(
    before: dict[MetricKey, float], after: dict[MetricKey, float], name: str, step: str = ""
) -> float | None:
    found = delta(before, after, name, step)
    return None if found is None or found[1] <= 0 else found[0]


def step_names(snapshot: dict[MetricKey, float]) -> list[str]:
    """STEPS first, then any other step label the worker reports."""
    seen = {step for (name, step) in snapshot if name == ANALYSIS_STEP + "_sum" and step}
    return [*STEPS, *sorted(seen - set(STEPS))]


# --- models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    label: str  # for the report
    bundle: Path | None  # PACSCLIP_MODEL_BUNDLE; None: unset, the built-in demo model
    demo: bool


# A ViT-B/16 CLIP of BiomedCLIP's image tower size; the text tower is CLIP ViT-B/16's.
VIT_NAME, VIT_VERSION = "vit-b16-random", "1"
VIT_CACHE = "vit-b16-random-v1"  # a new name for any change to the configuration below
VIT_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "image_size": 224,
    "patch_size": 16,
}
VIT_TEXT = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
}
VIT_PROJECTION = 512
# Random weights put every finding near 0.5, undetermined: no finding would be present, so no
# region or SEG would be made. The bundle's calibration fixes the decisions instead, like the
# demo model's on RG1 (three overlays): the first VIT_PRESENT of the six default chest findings
# present (threshold 0.01), the others absent (threshold 0.99); no undetermined band.
VIT_PRESENT = 3
BUILD_TIMEOUT_S = 600.0


def write_vit_folder(folder: Path) -> None:
    """The Hugging Face folder: random ``CLIPModel`` weights, a byte-level CLIP tokenizer and
    CLIP's image processor; offline (run in a child process: it imports torch)."""
    import torch
    import transformers

    from tests.open_clip_reference import clip_tokenizer

    folder.mkdir(parents=True)
    tokenizer = clip_tokenizer(folder)
    config = transformers.CLIPConfig(
        text_config={
            **VIT_TEXT,
            "vocab_size": len(tokenizer.get_vocab()),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=VIT_VISION,
        projection_dim=VIT_PROJECTION,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder))
    size = VIT_VISION["image_size"]
    transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(str(folder))


def write_vit_prompts(path: Path) -> None:
    """The default chest prompts of import-hf, with the fixed decisions of VIT_PRESENT."""
    from plugin.models.importers.default_prompts import chest_radiograph_prompts

    prompts = chest_radiograph_prompts().model_dump(mode="json", exclude_unset=True)
    for n, finding in enumerate(prompts["findings"]):
        threshold = 0.01 if n < VIT_PRESENT else 0.99
        finding["calibration"] = {"threshold": threshold, "indeterminate_band": 0.0}
    path.write_text(json.dumps(prompts, indent=2), encoding="utf-8")


def installed_vit(data_dir: Path) -> Path | None:
    from plugin.models.registry import Registry

    if not (data_dir / "models").is_dir():
        return None
    for entry in Registry.for_data_dir(data_dir).list():
        if (entry.name, entry.version) == (VIT_NAME, VIT_VERSION):
            return entry.path
    return None


def run_step(command: list[str], env: dict[str, str], what: str) -> float:
    """Run one build step with a bounded wait; its seconds."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"{what} took more than {BUILD_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def vit_model(cache: Path) -> Model:
    """The ViT-B/16 bundle: built and imported into ``cache`` once, then reused."""
    root = cache / VIT_CACHE
    data_dir = root / "data"
    bundle = installed_vit(data_dir)
    how = "from the cache"
    if bundle is None:
        folder = root / "hf"
        shutil.rmtree(folder, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
        env |= {"PACSCLIP_DATA_DIR": str(data_dir), "PACSCLIP_LOG_LEVEL": "WARNING"}
        progress(f"building the ViT-B/16 CLIP (random weights) in {root}")
        command = [sys.executable, str(Path(__file__).resolve()), "--build-vit-folder"]
        built = run_step([*command, str(folder)], env, "building the ViT-B/16 folder")
        write_vit_prompts(root / "prompts.json")
        identity = ["--name", VIT_NAME, "--version", VIT_VERSION]
        identity += ["--prompts", str(root / "prompts.json")]
        import_hf = [str(pacsclip_command()), "model", "import-hf", str(folder), *identity]
        imported = run_step(import_hf, env, "pacsclip model import-hf")
        shutil.rmtree(folder)  # the bundle holds what serve needs
        bundle = installed_vit(data_dir)
        if bundle is None:
            raise SystemExit(f"import-hf did not install {VIT_NAME}@{VIT_VERSION}")
        how = f"built in {built:.0f} s, imported with import-hf in {imported:.0f} s"
    manifest = read_manifest(bundle)
    return Model(
        f"{manifest.name}@{manifest.version}: ViT-B/16 CLIP, vision 224 x 224 patch 16 width"
        f" {VIT_VISION['hidden_size']} {VIT_VISION['num_hidden_layers']} layers"
        f" {VIT_VISION['num_attention_heads']} heads, text width {VIT_TEXT['hidden_size']}"
        f" {VIT_TEXT['num_hidden_layers']} layers, random weights, fp32; {VIT_PRESENT} of"
        f" its {len(read_manifest(bundle).findings)} findings present by calibration ({how};"
        f" PACSCLIP_MODEL_BUNDLE={bundle})",
        bundle,
        demo=False,
    )


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
    worker_metrics_port: int
    token: str
    orthanc_dicom_port: int
    scenario: Scenario
    broker_url: str | None
    model_bundle: Path | None
    ood_guard: bool

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def worker_metrics_url(self) -> str:
        return f"http://{HOST}:{self.worker_metrics_port}/metrics"

    def snapshot(self) -> Snapshot:
        return Snapshot(
            scrape(self.api_url + "/metrics", self.token), scrape(self.worker_metrics_url)
        )


def serve_env(config: ServeConfig) -> dict[str, str]:
    """TCP_NODELAY=1, no inherited PACSCLIP_* settings, and only what the harness needs."""
    env = {k: v for k, v in dcmtk_env().items() if not k.startswith("PACSCLIP_")}
    orthanc = {"ae_title": ORTHANC_AET, "host": HOST, "port": config.orthanc_dicom_port}
    env |= {
        "PACSCLIP_DATA_DIR": str(config.data_dir),
        "PACSCLIP_DICOM_HOST": HOST,
        "PACSCLIP_DICOM_PORT": str(config.node_port),
        "PACSCLIP_API_HOST": HOST,
        "PACSCLIP_API_PORT": str(config.api_port),
        "PACSCLIP_API_TOKEN": config.token,
        "PACSCLIP_WORKER_METRICS_PORT": str(config.worker_metrics_port),
        "PACSCLIP_LOG_LEVEL": "WARNING",
        "PACSCLIP_MIN_FREE_DISK_MB": "0",
        "PACSCLIP_ALLOWED_CALLERS": json.dumps([ORTHANC_AET]),
        "PACSCLIP_DESTINATIONS": json.dumps([{"name": "pacs", **orthanc}]),
        "PACSCLIP_OOD_GUARD": str(config.ood_guard).lower(),
        **dict(config.scenario.env),
    }
    if config.scenario.key == "expected-count":
        env["PACSCLIP_COUNT_QUERY_PEER"] = json.dumps(orthanc)
    if config.broker_url:
        env["PACSCLIP_BROKER_URL"] = config.broker_url
        env["PACSCLIP_RESULT_BACKEND_URL"] = config.broker_url
    if config.model_bundle is not None:
        env["PACSCLIP_MODEL_BUNDLE"] = str(config.model_bundle)
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


def worker_ready(metrics_url: str) -> bool:
    """The worker's /health (beside its /metrics) answers 200 once its model loaded and ran
    once and it consumes tasks; /metrics answers from the start."""
    health = metrics_url.rsplit("/", 1)[0] + "/health"
    try:
        with urllib.request.urlopen(health, timeout=2) as answer:
            return int(answer.status) == 200
    except (OSError, ValueError):
        return False


def wait_ready(process: subprocess.Popen[bytes], config: ServeConfig, log: Path) -> float:
    """Until the node answers C-ECHO, the API its health check and the worker its /metrics."""
    started = time.monotonic()
    deadline = started + READY_TIMEOUT_S
    echoed = healthy = worker = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"pacsclip serve exited with {process.returncode} before it was ready; log {log}"
            )
        echoed = echoed or echo_ok(config.node_port)
        healthy = healthy or health_ok(config.api_url)
        worker = worker or worker_ready(config.worker_metrics_url)
        if echoed and healthy and worker:
            return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError(
        f"pacsclip serve not ready after {READY_TIMEOUT_S:.0f} s (C-ECHO ok: {echoed}, "
        f"health ok: {healthy}, worker /metrics ok: {worker}); log {log}"
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


def group_members(pgid: int) -> list[str]:
    """PID, name, state and command line of each process of a process group (/proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 1 :].split()
            if int(fields[2]) == pgid:
                args = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                members.append(
                    f"PID {stat.parent.name} ({comm}, state {fields[0]}) {args.strip()[:120]}"
                )
        except (OSError, IndexError, ValueError):
            continue
    return members


LEFTOVER_GRACE_S = 2.0  # what serve leaves may take this long to go by itself


def kill_leftovers(pgid: int) -> str:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return ""
    # Zombies (exited, not yet reaped by their new parent) are not left running. A helper
    # (multiprocessing's resource tracker) ends on its own once it sees serve gone.
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while True:
        running = [m for m in group_members(pgid) if ", state Z)" not in m]
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return ""
    if not running:
        return ""
    return (
        f"; processes of its group were still running {LEFTOVER_GRACE_S:g} s later and were"
        " killed: " + "; ".join(running)
    )


@contextmanager
def running_serve(
    config: ServeConfig, log: Path, blocks: Sequence[Block]
) -> Iterator[subprocess.Popen[bytes]]:
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
        yield process
    finally:
        exit_verdict = stop_serve(process, log)
        for block in blocks:
            block.serve_exit = exit_verdict
        progress(f"  pacsclip serve {exit_verdict}")


# --- one run ----------------------------------------------------------------------------------


@dataclass
class RunTiming:
    """One study, pushed once. Seconds; None where a figure is not available."""

    study_uid: str
    latency_s: float  # push start -> SR, all overlays and all SEGs readable in Orthanc
    sr_s: float  # push start -> SR readable
    sc_s: float | None  # push start -> all overlays readable (None: the study has none)
    seg_s: float | None  # push start -> all SEGs readable (None: the analysis made none)
    receive_s: float  # Orthanc's synchronous push call
    completion_wait_s: float | None  # push call returned -> study complete
    queue_s: float | None  # complete -> analysis started (complete_to_analysed - analysis)
    analysis_s: float | None  # pacsclip_analysis_duration_seconds
    steps: dict[str, float | None]  # pacsclip_analysis_step_seconds, summed over images
    dispatch_s: float | None  # analysed -> delivered, mean per delivered object
    orthanc_s: float | None  # delivered -> readable in Orthanc (the remainder)
    first_image_s: float | None  # push start -> first image cataloged (server clock)
    received_to_complete_s: float | None
    complete_to_analysed_s: float | None
    delivered_objects: int  # delta of the analysed_to_delivered count
    result_objects: dict[str, int]  # of the study's analysis, by kind, from the API
    findings: str  # decisions, findings with regions and how maps were made, from the API
    completion_reason: str | None
    state: str | None
    algorithm: str | None
    notes: list[str] = field(default_factory=list)


def server_time(value: str | None) -> float | None:
    """A catalog timestamp as epoch seconds; SQLite gives them back without zone (UTC)."""
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def api_get(config: ServeConfig, path: str) -> Any:
    request = urllib.request.Request(
        config.api_url + path, headers={"Authorization": f"Bearer {config.token}"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def expected_objects(config: ServeConfig, study_uid: str) -> dict[str, int] | None:
    """Result objects of the study's newest analysis by kind (SR, SC, SEG); None before one."""
    detail = api_get(config, f"/api/studies/{study_uid}")
    results = detail.get("results") or []
    return kinds_of(results[0]) if results else None


def instances_by_modality(orthanc: OrthancServer, orthanc_study_id: str) -> dict[str, int]:
    series: list[dict[str, Any]] = orthanc.get(f"/studies/{orthanc_study_id}/series")
    counts: dict[str, int] = {}
    for s in series:
        modality = s["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(s["Instances"])
    return counts


def check_alive(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        raise RuntimeError(f"pacsclip serve exited with {process.returncode} during the run")


# The kind of a result object as the API records it -> its Modality in Orthanc.
MODALITY_OF_KIND = {"SR": "SR", "SC": "OT", "SEG": "SEG"}


def wait_for_results(
    orthanc: OrthancServer,
    config: ServeConfig,
    process: subprocess.Popen[bytes],
    orthanc_study_id: str,
    study_uid: str,
    deadline: float,
) -> dict[str, float]:
    """Poll Orthanc every 50 ms until every result object of the study is readable.

    Which objects to wait for (SR, overlays, SEGs) is read from the API once the first result
    shows up in Orthanc (the analysis is recorded before anything is dispatched). Returns the
    monotonic moment each kind the analysis made (all of its objects) became readable.
    """
    expected: dict[str, int] | None = None
    readable: dict[str, float] = {}
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        seen = instances_by_modality(orthanc, orthanc_study_id)
        now = time.monotonic()
        if expected is None and any(seen.get(m) for m in MODALITY_OF_KIND.values()):
            expected = expected_objects(config, study_uid)
            unknown = sorted(set(expected or {}) - set(MODALITY_OF_KIND))
            if unknown:
                raise RuntimeError(f"result objects of unknown kind {unknown}: {expected}")
        if expected is not None:
            for kind, count in expected.items():
                if kind not in readable and seen.get(MODALITY_OF_KIND[kind], 0) >= count:
                    readable[kind] = now
            if "SR" in expected and len(readable) == len(expected):
                return readable
        check_alive(process)
        time.sleep(POLL_S)
    raise TimeoutError(
        f"results of study {study_uid} not all readable in Orthanc in time: Orthanc holds"
        f" {seen}, the analysis made {expected or 'nothing yet'}"
    )


def wait_delivered(
    config: ServeConfig, process: subprocess.Popen[bytes], study_uid: str
) -> dict[str, Any]:
    """The study as the API shows it once delivered; after DELIVERED_TIMEOUT_S, as it is."""
    deadline = time.monotonic() + DELIVERED_TIMEOUT_S
    while True:
        detail: dict[str, Any] = api_get(config, f"/api/studies/{study_uid}")
        if detail.get("state") == "delivered" or time.monotonic() > deadline:
            return detail
        check_alive(process)
        time.sleep(POLL_S)


def settled_snapshot(config: ServeConfig, before: Snapshot, objects: int) -> tuple[Snapshot, bool]:
    """Metrics once the node counted a completion and the worker an analysis and every
    delivered object (observed just after the delivery is recorded); bounded."""
    deadline = time.monotonic() + METRICS_TIMEOUT_S
    while True:
        after = config.snapshot()
        r2c = delta(before.node, after.node, RECEIVED_TO_COMPLETE)
        c2a = delta(before.worker, after.worker, COMPLETE_TO_ANALYSED)
        a2d = delta(before.worker, after.worker, ANALYSED_TO_DELIVERED)
        settled = bool(
            r2c and r2c[1] >= 1 and c2a and c2a[1] >= 1 and a2d and a2d[1] >= max(objects, 1)
        )
        if settled or time.monotonic() > deadline:
            return after, settled
        time.sleep(0.1)


def minus(total: float | None, *parts: float | None) -> float | None:
    if total is None or any(p is None for p in parts):
        return None
    return total - sum(p for p in parts if p is not None)


@dataclass(frozen=True)
class Moments:
    """Harness clocks of one run: monotonic seconds, and the push start as epoch seconds."""

    start: float
    start_wall: float
    pushed: float
    readable: dict[str, float]  # kind (SR, SC, SEG) -> all of that kind readable


def kinds_of(result: dict[str, Any]) -> dict[str, int]:
    """Result objects of one analysis (from the API) by kind: SR, SC, SEG."""
    return dict(Counter(str(obj.get("kind", "")).upper() for obj in result.get("objects", [])))


def findings_summary(findings: Sequence[dict[str, Any]]) -> str:
    """E.g. "present 3, absent 3; regions 3 (patch_similarity)"."""
    decisions = Counter(str(f.get("decision")) for f in findings)
    with_regions = sum(1 for f in findings if f.get("regions"))
    methods = sorted({str(f["localisation"]) for f in findings if f.get("localisation")})
    text = ", ".join(f"{d} {n}" for d, n in sorted(decisions.items())) or "no findings"
    return f"{text}; regions {with_regions}" + (f" ({', '.join(methods)})" if methods else "")


def timing_from(
    study_uid: str, moments: Moments, detail: dict[str, Any], before: Snapshot, after: Snapshot
) -> RunTiming:
    start, pushed, readable = moments.start, moments.pushed, moments.readable
    latency = max(readable.values()) - start
    receive = pushed - start
    r2c = delta_sum(before.node, after.node, RECEIVED_TO_COMPLETE)
    c2a = delta_sum(before.worker, after.worker, COMPLETE_TO_ANALYSED)
    analysis = delta_sum(before.worker, after.worker, ANALYSIS_DURATION)
    a2d = delta(before.worker, after.worker, ANALYSED_TO_DELIVERED)
    dispatch = a2d[0] / a2d[1] if a2d and a2d[1] > 0 else None
    received_at = server_time(detail.get("received_at"))
    first_image = None if received_at is None else received_at - moments.start_wall
    push_start_to_complete = None if first_image is None or r2c is None else first_image + r2c
    steps: dict[str, float | None] = {
        step: (
            None
            if (found := delta(before.worker, after.worker, ANALYSIS_STEP, step)) is None
            else found[0]
        )
        for step in step_names(after.worker)
    }
    results = detail.get("results") or []
    newest = results[0] if results else {}
    algorithm = newest.get("algorithm") or {}
    return RunTiming(
        study_uid=study_uid,
        latency_s=latency,
        sr_s=readable["SR"] - start,
        sc_s=readable["SC"] - start if "SC" in readable else None,
        seg_s=readable["SEG"] - start if "SEG" in readable else None,
        receive_s=receive,
        completion_wait_s=minus(push_start_to_complete, receive),
        queue_s=minus(c2a, analysis),
        analysis_s=analysis,
        steps=steps,
        dispatch_s=dispatch,
        orthanc_s=minus(latency, push_start_to_complete, c2a, dispatch),
        first_image_s=first_image,
        received_to_complete_s=r2c,
        complete_to_analysed_s=c2a,
        delivered_objects=int(a2d[1]) if a2d else 0,
        result_objects=kinds_of(newest),
        findings=findings_summary(newest.get("findings") or []),
        completion_reason=detail.get("completion_reason"),
        state=detail.get("state"),
        algorithm=f"{algorithm['name']}@{algorithm['version']}" if algorithm else None,
    )


def run_once(
    orthanc: OrthancServer,
    config: ServeConfig,
    process: subprocess.Popen[bytes],
    modality: str,
    dataset: DataSet,
    workdir: Path,
) -> RunTiming:
    files = dataset.write(workdir)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc_study_id = ""
    for path in files:
        orthanc_study_id = orthanc.upload(path)["ParentStudy"]
    shutil.rmtree(workdir)
    before = config.snapshot()
    start_wall, start = time.time(), time.monotonic()
    orthanc.store_to_modality(modality, [orthanc_study_id])
    pushed = time.monotonic()
    readable = wait_for_results(
        orthanc, config, process, orthanc_study_id, study_uid, start + dataset.result_timeout_s
    )
    detail = wait_delivered(config, process, study_uid)
    objects = sum((expected_objects(config, study_uid) or {}).values())
    after, settled = settled_snapshot(config, before, objects)
    moments = Moments(start, start_wall, pushed, readable)
    timing = timing_from(study_uid, moments, detail, before, after)
    if not settled:
        timing.notes.append(f"metrics had not all settled after {METRICS_TIMEOUT_S:.0f} s")
    if timing.state != "delivered":
        timing.notes.append(f"API state {timing.state} after {DELIVERED_TIMEOUT_S:.0f} s")
    # Not timed: keep Orthanc's index and storage small over many runs.
    orthanc.request("DELETE", f"/studies/{orthanc_study_id}")
    return timing


# --- one serve: a broker and a scenario, its data sets ----------------------------------------


@dataclass
class Block:
    """The runs of one data set in one serve (broker x scenario)."""

    broker: str
    scenario: str
    dataset: str
    runs: list[RunTiming] = field(default_factory=list)
    warmup: list[RunTiming] = field(default_factory=list)
    first_push: RunTiming | None = None  # the serve's very first study (first block only)
    serve_exit: str = "not stopped yet"
    error: str | None = None

    @property
    def latencies(self) -> list[float]:
        return [t.latency_s for t in self.runs]


def redis_url(index: int) -> str:
    """The Redis database of the index-th serve of a group."""
    return REDIS_URL.format(REDIS_FIRST_DB + index)


def flush_redis(url: str) -> str | None:
    """Empty one of the benchmark's Redis databases; the reason when Redis cannot be reached."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        return f"Redis on 127.0.0.1:6379 not reachable ({exc}): Redis runs skipped"
    return None


@dataclass
class Serving:
    """One scenario's serve in a group: its settings, blocks and Orthanc's name for it."""

    scenario: Scenario
    config: ServeConfig
    blocks: list[Block]
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def modality(self) -> str:
        return f"pacsclip-{self.scenario.key}"

    @property
    def log(self) -> Path:
        return self.workdir / "serve.log"


def run_group(
    orthanc: OrthancServer,
    broker: str,
    group: Sequence[Scenario],
    models: dict[str, Model],
    args: argparse.Namespace,
    root: Path,
) -> list[Block]:
    """The scenarios of a group side by side: a serve each, all started first, then each run
    of each data set pushed to each serve in turn (the order rotating by run), so that a busy
    neighbour slows all of them alike and their ratio holds."""
    datasets = ["cr"] if all(s.cr_only for s in group) else args.datasets
    servings = []
    for index, scenario in enumerate(group):
        workdir = root / f"{broker}-{scenario.key}"
        workdir.mkdir()
        config = ServeConfig(
            data_dir=workdir / "data",
            node_port=free_port(),
            api_port=free_port(),
            worker_metrics_port=free_port(),
            token=secrets.token_urlsafe(24),
            orthanc_dicom_port=orthanc.dicom_port,
            scenario=scenario,
            broker_url=redis_url(index) if broker == "redis" else None,
            model_bundle=models[scenario.model].bundle,
            ood_guard=args.ood_guard,
        )
        blocks = [Block(broker, scenario.key, key) for key in datasets]
        servings.append(Serving(scenario, config, blocks, workdir))
        orthanc.add_modality(f"pacsclip-{scenario.key}", NODE_AET, HOST, config.node_port)
    runs = args.extra_runs if any(s.key in EXTRAS for s in group) else args.runs
    side_by_side = " | ".join(s.label for s in group)
    progress(f"[{broker}] {side_by_side}: {args.warmup} warm-up + {runs} runs per data set")
    current = servings[0]
    try:
        with ExitStack() as stack:
            for serving in servings:
                current = serving
                serving.process = stack.enter_context(
                    running_serve(serving.config, serving.log, serving.blocks)
                )
            for index, key in enumerate(datasets):
                dataset = DATASETS[key]
                for number in range(1, args.warmup + runs + 1):
                    shift = number % len(servings)
                    for serving in [*servings[shift:], *servings[:shift]]:
                        current = serving
                        block = serving.blocks[index]
                        run_numbered(orthanc, serving, block, dataset, number, args.warmup)
    except (RuntimeError, TimeoutError, OSError, ValueError, OrthancError) as exc:
        tail = log_tail(current.log)
        error = f"{type(exc).__name__}: {exc}\nserve log tail ({current.log}):\n{tail}"
        progress(f"  FAILED: {error}")
        failed = next((b for b in current.blocks if not b.error and len(b.runs) < runs), None)
        for serving in servings:
            for block in serving.blocks:
                if block is failed:
                    block.error = error
                elif len(block.runs) < runs and not block.error:
                    block.error = "not run to the end: an earlier run of this group failed"
    return [block for serving in servings for block in serving.blocks]


def run_numbered(
    orthanc: OrthancServer,
    serving: Serving,
    block: Block,
    dataset: DataSet,
    number: int,
    warmup: int,
) -> None:
    """Run number ``number`` of ``block``: warm-up or measured, and the serve's first push."""
    if serving.process is None:
        raise RuntimeError(f"the serve of {serving.scenario.key} is not running")
    workdir = serving.workdir / f"{dataset.key}-{number:03d}"
    timing = run_once(orthanc, serving.config, serving.process, serving.modality, dataset, workdir)
    warm = number > warmup
    (block.runs if warm else block.warmup).append(timing)
    if block is serving.blocks[0] and number == 1:
        block.first_push = timing
    progress(
        f"  {serving.scenario.key} {dataset.key} {number:3d}{'' if warm else ' (warm-up)'}:"
        f" {timing.latency_s:6.3f} s ({timing.completion_reason}, {timing.state}, objects"
        f" {timing.result_objects}; {timing.findings})" + "".join(f"; {n}" for n in timing.notes)
    )


# --- report -----------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def stats_line(label: str, values: Sequence[float]) -> str:
    figures = summary(values)
    if figures is None:
        return f"    {label:<46} no data"
    return (
        f"    {label:<46} p50 {fmt(figures['p50'])}  p95 {fmt(figures['p95'])}"
        f"  max {fmt(figures['max'])}  (n={len(values)})"
    )


def stage_medians(runs: Sequence[RunTiming]) -> list[tuple[str, str, float | None]]:
    """(key, label, median over the runs) per stage, in pipeline order."""

    def med(get: Callable[[RunTiming], float | None]) -> float | None:
        return median_of([get(t) for t in runs])

    steps = list(dict.fromkeys(step for t in runs for step in t.steps)) or list(STEPS)
    rows: list[tuple[str, str, float | None]] = [
        ("receive", "receive (Orthanc push call)", med(lambda t: t.receive_s)),
        (
            "completion_wait",
            "completion wait (push returned -> complete)",
            med(lambda t: t.completion_wait_s),
        ),
        ("queue_wait", "queue wait (complete -> analysis starts)", med(lambda t: t.queue_s)),
        ("analysis", "analysis (model pipeline)", med(lambda t: t.analysis_s)),
    ]
    rows += [
        (f"step_{step}", f"  step {step}", median_of([t.steps.get(step) for t in runs]))
        for step in steps
    ]
    rows += [
        (
            "dispatch",
            "dispatch (analysed -> delivered, mean/object)",
            med(lambda t: t.dispatch_s),
        ),
        ("orthanc", "Orthanc (delivered -> readable, remainder)", med(lambda t: t.orthanc_s)),
    ]
    return rows


def block_lines(block: Block, scenario_label: str) -> list[str]:
    dataset = DATASETS[block.dataset]
    reasons = sorted({str(t.completion_reason) for t in block.runs}) or ["-"]
    algorithms = sorted({str(t.algorithm) for t in block.runs}) or ["-"]
    objects = sorted({json.dumps(t.result_objects, sort_keys=True) for t in block.runs}) or ["-"]
    findings = sorted({t.findings for t in block.runs}) or ["-"]
    lines = [
        f"  [{block.broker}] {dataset.label}; {scenario_label}: {len(block.runs)} runs;"
        f" completion reason {', '.join(reasons)}; model {', '.join(algorithms)};"
        f" result objects {', '.join(objects)}; findings {' | '.join(findings)}",
        stats_line("latency push start -> SR, overlays, SEG readable", block.latencies),
        stats_line("  SR readable", [t.sr_s for t in block.runs]),
        stats_line("  overlay(s) readable", [t.sc_s for t in block.runs if t.sc_s is not None]),
        stats_line("  SEG readable", [t.seg_s for t in block.runs if t.seg_s is not None]),
        "    stage (median per stage over the runs; medians need not add up):",
    ]
    lines += [f"      {label:<48} {fmt(value)}" for _, label, value in stage_medians(block.runs)]
    if block.warmup:
        each = ", ".join(f"{t.latency_s:.3f} s" for t in block.warmup)
        lines.append(f"    warm-up (first after start, not in the figures): {each}")
    if (first := first_push_ratio(block)) is not None:
        lines.append(
            f"    first push after start {first[0]:.3f} s vs warm p95 {first[1]:.3f} s:"
            f" {first[0] / first[1]:.2f}x (goal <= {FIRST_PUSH_TARGET:g}x)"
        )
        lines += [
            f"      first push {label:<48} {fmt(value)}"
            for _, label, value in stage_medians([block.first_push] if block.first_push else [])
        ]
    notes = sorted({n for t in block.runs for n in t.notes})
    lines += [f"    note: {n}" for n in notes]
    lines.append(f"    pacsclip serve stop: {block.serve_exit}")
    if block.error:
        lines.append(f"    ERROR: {block.error}")
    return lines


def first_push_ratio(block: Block) -> tuple[float, float] | None:
    """(the serve's first push latency, the block's warm p95) when both were measured."""
    if block.first_push is None or not block.latencies:
        return None
    return block.first_push.latency_s, percentile(block.latencies, 95)


def find_block(blocks: Sequence[Block], broker: str, scenario: str, dataset: str) -> Block | None:
    """The block of these keys with warm runs and no error, if any."""
    for b in blocks:
        if (b.broker, b.scenario, b.dataset) == (broker, scenario, dataset):
            return b if b.latencies and not b.error else None
    return None


def ratio_lines(blocks: Sequence[Block]) -> list[str]:
    """p95 with regions and SEG (default) over p95 without (no-regions), same broker and data."""
    lines = []
    for on in [b for b in blocks if b.scenario == DEFAULT_SCENARIO]:
        off = find_block(blocks, on.broker, NO_REGIONS, on.dataset)
        if not on.latencies or on.error or off is None:
            continue
        p95_on, p95_off = percentile(on.latencies, 95), percentile(off.latencies, 95)
        lines.append(
            f"Regions and SEG on / off, p95 ([{on.broker}] {on.dataset}): {p95_on:.3f} s /"
            f" {p95_off:.3f} s = {p95_on / p95_off:.2f}x (p50 {percentile(on.latencies, 50):.3f}"
            f" / {percentile(off.latencies, 50):.3f} s)"
        )
    return lines


def target_lines(blocks: Sequence[Block], models: dict[str, Model], guard: bool) -> list[str]:
    lines = []
    for block in blocks:
        if (first := first_push_ratio(block)) is not None:
            verdict = "met" if first[0] <= FIRST_PUSH_TARGET * first[1] else "NOT met"
            lines.append(
                f"Target: first push after start <= {FIRST_PUSH_TARGET:g} x warm p95"
                f" ([{block.broker}] {block.scenario} {block.dataset}): {first[0]:.3f} s vs"
                f" {first[1]:.3f} s -> {verdict}"
            )
    wanted = [(DEFAULT_SCENARIO, broker, target) for broker, target in TARGETS_P95_S.items()]
    wanted.append((VIT, "sqlite", VIT_TARGET_P95_S))
    for scenario, broker, target in wanted:
        model = models.get(SCENARIOS[scenario].model)
        name = "ViT-B/16 (fp32)" if scenario == VIT else "demo model"
        label = (
            f"Target: RG1 push -> SR + SC + SEG, {name}, guard off, warm: p95 <= {target:g} s"
            f" on {broker}:"
        )
        found = find_block(blocks, broker, scenario, "cr")
        if found is None or model is None:
            lines.append(f"{label} not measured")
            continue
        p95 = percentile(found.latencies, 95)
        verdict = "met" if p95 <= target else "NOT met"
        if scenario == DEFAULT_SCENARIO and not model.demo:
            verdict += " (not the demo model: --model-bundle)"
        if guard:
            verdict += " (guard ON: --ood-guard)"
        lines.append(f"{label} p95 {p95:.3f} s over {len(found.latencies)} runs -> {verdict}")
    return lines


def header(args: argparse.Namespace, models: dict[str, Model], orthanc: OrthancServer) -> str:
    defaults = Settings.model_fields
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "End-to-end latency: Orthanc (PACS) push -> pacsclip serve -> SR, overlays and SEG"
        " back in Orthanc",
        f"CPUs: {os.cpu_count()}; load average at start: {load}",
        *(f"Model ({key}): {model.label}" for key, model in models.items()),
        f"Orthanc {orthanc.get('/system').get('Version')} (TCP_NODELAY=1); all on 127.0.0.1",
        "pacsclip serve with default settings: completion on association release"
        f" ({defaults['complete_on_release'].default}) + grace"
        f" {defaults['release_grace_s'].default:g} s, quiet period"
        f" {defaults['quiet_period_s'].default:g} s, check every"
        f" {defaults['completion_check_interval_s'].default:g} s, no count query peer,"
        f" worker pool {defaults['worker_pool'].default}"
        f" x{defaults['worker_concurrency'].default}, regions"
        f" {defaults['result_regions'].default} and SEG {defaults['result_seg'].default}"
        " unless the scenario says otherwise; log level WARNING.",
        "Out-of-distribution guard: "
        + (
            "ON (--ood-guard): the demo model does not score RG1"
            if args.ood_guard
            else "off (PACSCLIP_OOD_GUARD=false), so that RG1 is scored"
        )
        + ".",
        f"Per data set: {args.warmup} warm-up run(s), then {args.runs} runs, one study at a"
        " time (the next once the previous is delivered); fresh UIDs per run.",
        "Latency: push start (Orthanc's synchronous POST /modalities/pacsclip/store) -> SR,"
        " every overlay (modality OT) and every SEG the analysis made readable over Orthanc's"
        " REST API (50 ms polls).",
        "Stages from the node's and worker's Prometheus metrics (delta of _sum per run);"
        " dispatch is the mean per delivered object (= the max: one job, one value).",
    ]
    if VIT in models:
        lines.append(
            "The ViT-B/16 has random weights: its findings, regions and SEG are meaningless;"
            " only its times count."
        )
    return "\n".join(lines)


def report(
    blocks: Sequence[Block], notes: Sequence[str], models: dict[str, Model], guard: bool
) -> str:
    labels = {key: scenario.label for key, scenario in (SCENARIOS | EXTRAS).items()}
    lines: list[str] = []
    for block in blocks:
        lines += block_lines(block, labels[block.scenario])
    lines += [f"  {note}" for note in notes]
    lines += [*ratio_lines(blocks), *target_lines(blocks, models, guard), COMPARISON]
    if VIT in models:
        lines.append(
            "ViT-B/16: random weights, so which findings are present, their maps, regions and"
            " SEG mean nothing; the figures are times only."
        )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines.append(f"load average at end: {load}")
    return "\n".join(lines)


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def as_json(blocks: Sequence[Block], models: dict[str, Model], guard: bool) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "models": {
            key: asdict(model) | {"bundle": str(model.bundle)} for key, model in models.items()
        },
        "ood_guard": guard,
        "targets_p95_s": TARGETS_P95_S,
        "vit_target_p95_s": VIT_TARGET_P95_S,
        "blocks": [
            {
                "broker": b.broker,
                "scenario": b.scenario,
                "dataset": b.dataset,
                "latency_s": summary(b.latencies),
                "sr_s": summary([t.sr_s for t in b.runs]),
                "overlay_s": summary([t.sc_s for t in b.runs if t.sc_s is not None]),
                "seg_s": summary([t.seg_s for t in b.runs if t.seg_s is not None]),
                "stage_medians_s": {k: rounded(v) for k, _, v in stage_medians(b.runs)},
                "serve_exit": b.serve_exit,
                "error": b.error,
                "runs": [rounded(asdict(t)) for t in b.runs],
                "warmup": [rounded(asdict(t)) for t in b.warmup],
                "first_push": rounded(asdict(b.first_push)) if b.first_push else None,
            }
            for b in blocks
        ],
    }


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20, help="measured runs per data set")
    parser.add_argument(
        "--warmup", type=int, default=1, help="runs first per data set, reported apart"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, each its own serve per broker: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--broker", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument(
        "--datasets", default="cr,ct", help="comma-separated: cr (1-image RG1), ct (50 images)"
    )
    parser.add_argument(
        "--extra",
        action="append",
        choices=sorted(EXTRAS),
        default=[],
        help="also run an old scenario (CR only, its own serve per broker); repeatable",
    )
    parser.add_argument("--extra-runs", type=int, default=5, help="runs per extra scenario")
    parser.add_argument(
        "--model-bundle",
        type=Path,
        default=None,
        help="PACSCLIP_MODEL_BUNDLE for the demo-model scenarios (default: unset, the"
        " built-in demo model)",
    )
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=None,
        help="where the ViT-B/16 is built once and kept (default: pacsclip-e2e-models under"
        " --tmp-dir or the system's temporary directory)",
    )
    parser.add_argument(
        "--ood-guard",
        action="store_true",
        help="keep the out-of-distribution guard on (default: off, so that RG1 is scored)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where work directories go")
    parser.add_argument("--build-vit-folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scenarios = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown_scenarios = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown_scenarios or not (args.scenarios or args.extra):
        parser.error(
            f"--scenarios: choose from {', '.join(SCENARIOS)} (got {unknown_scenarios or 'none'})"
        )
    if args.model_cache is None:
        args.model_cache = (args.tmp_dir or Path(tempfile.gettempdir())) / "pacsclip-e2e-models"
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown or not args.datasets:
        parser.error(f"--datasets: choose from {', '.join(DATASETS)} (got {unknown or 'none'})")
    if args.runs < 1 or args.extra_runs < 1 or args.warmup < 0:
        parser.error("--runs and --extra-runs must be at least 1, --warmup at least 0")
    return args


def check_tools() -> None:
    from tests.peers.orthanc import ORTHANC

    missing = [tool for tool in (ORTHANC, ECHOSCU) if not Path(tool).is_file()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install orthanc dcmtk)")
    pacsclip_command()


def demo_model(args: argparse.Namespace) -> Model:
    if args.model_bundle is not None:
        manifest = read_manifest(args.model_bundle)
        return Model(
            f"{manifest.name}@{manifest.version}, NOT the demo model"
            f" (PACSCLIP_MODEL_BUNDLE={args.model_bundle})",
            args.model_bundle,
            demo=False,
        )
    builtin = builtin_bundle_dirs()
    if not builtin:
        raise SystemExit("the built-in demo model is missing; pass --model-bundle DIR")
    manifest = read_manifest(builtin[0])
    return Model(f"{manifest.name}@{manifest.version}, the built-in demo model", None, demo=True)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    return [SCENARIOS[key] for key in dict.fromkeys(args.scenarios)] + [
        EXTRAS[key] for key in dict.fromkeys(args.extra)
    ]


def prepare_models(planned: Sequence[Scenario], args: argparse.Namespace) -> dict[str, Model]:
    """The models the planned scenarios run, the ViT-B/16 built (or found in the cache)."""
    wanted = {scenario.model for scenario in planned}
    models: dict[str, Model] = {}
    if DEMO in wanted:
        models[DEMO] = demo_model(args)
    if VIT in wanted:
        models[VIT] = vit_model(args.model_cache)
    return models


def run_all(
    orthanc: OrthancServer,
    args: argparse.Namespace,
    planned: Sequence[Scenario],
    models: dict[str, Model],
    root: Path,
) -> tuple[list[Block], list[str]]:
    notes: list[str] = []
    blocks: list[Block] = []
    # The demo model with and without regions and SEG run side by side, for their ratio.
    paired = [s for s in planned if s.key in (DEFAULT_SCENARIO, NO_REGIONS)]
    groups = [paired] if paired else []
    groups += [[s] for s in planned if s not in paired]
    for broker in ["sqlite", "redis"] if args.broker == "both" else [args.broker]:
        for group in groups:
            reasons = (
                [flush_redis(redis_url(index)) for index in range(len(group))]
                if broker == "redis"
                else []
            )
            if (reason := next((r for r in reasons if r is not None), None)) is not None:
                notes.append(reason)
                progress(reason)
                break
            blocks += run_group(orthanc, broker, group, models, args, root)
    return blocks, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_vit_folder is not None:  # the child process of build_vit
        write_vit_folder(args.build_vit_folder)
        return 0
    check_tools()
    planned = scenarios(args)
    models = prepare_models(planned, args)
    with tempfile.TemporaryDirectory(prefix="pacsclip-e2e-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        placeholder = {"pacsclip": (NODE_AET, HOST, free_port())}  # one per serve is added
        with OrthancServer(modalities=placeholder, workdir=root / "orthanc") as orthanc:
            print(header(args, models, orthanc), flush=True)
            blocks, notes = run_all(orthanc, args, planned, models, root)
    print(report(blocks, notes, models, args.ood_guard), flush=True)
    if args.json:
        print(json.dumps(as_json(blocks, models, args.ood_guard), indent=2))
    failed = any(b.error or not b.serve_exit.startswith("exited with 0") for b in blocks)
    return 1 if failed or not blocks else 0


if __name__ == "__main__":
    sys.exit(main())
