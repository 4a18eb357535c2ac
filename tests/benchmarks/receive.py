"""Receiving throughput: pacsclip node against Orthanc (the peer) and DCMTK storescp (the ceiling).

Run from the repository root with the project's virtualenv:

    .venv/bin/python tests/benchmarks/receive.py [--count 100] [--rg1-count 20] [--repeats 3]
        [--associations 4] [--pacsclip-processes N] [--variant LABEL:PACSCLIP_NAME=VALUE]
        [--json]

Two data sets, made by the script: CT images of 512 x 512 x 16 bit (pydicom's CT_small upscaled
4x with noise, 0.53 MB each, one series) and copies of RG1 (the real chest CR of pydicom-data,
7.2 MB each, one study each). They are sent with DCMTK's /usr/bin/storescu (TCP_NODELAY=1) over
127.0.0.1 in three cases:

- both data sets over one association: one storescu sends the whole data set to Debian's
  Orthanc (its default configuration: SQLite index, storage fsynced), to DCMTK ``storescp``,
  to ``pacsclip node`` and, as references, to two pynetdicom floor SCPs (one that writes and
  fsyncs each file, one that stores nothing);
- the CT over N concurrent associations (``--associations``, default 4): N storescu processes
  started together, each sending its own quarter (1/N) of the files, to Orthanc, to
  ``storescp --fork`` (one child process per association) and to ``pacsclip node`` (several
  receiver processes on one port); timed from the first start to the last exit.

Each receiver starts fresh on a free port with an empty output directory, answers a C-ECHO
before the clock starts, and is stopped by its PID afterwards (with any child process it left).
The receivers alternate within each round, so that slow drifts of the machine hit all alike.
After each run the script checks that the receiver stored every file, and, for pacsclip, waits
(outside the timed window) until its catalog has a row for every instance, since pacsclip
answers C-STORE once the file is durable in the spool and catalogs asynchronously; that lag is
reported. Each ``--variant`` adds pacsclip with other settings to the same rounds (e.g.
``pdu16k:PACSCLIP_MAX_PDU_BYTES=16384``: the node's maximum PDU before it was raised), so a
change is measured before and after in one run. The table gives img/s and MB/s (best and
median of ``--repeats``), the ratios pacsclip/Orthanc and pacsclip/storescp, and whether the
target (pacsclip at least as fast as Orthanc) is met. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

# Run as a script, this file's folder is on sys.path, not the repository root with tests.peers.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.peers.data import ct_512_copies, rg1  # noqa: E402
from tests.peers.dcmtk import ECHOSCU, STORESCP, STORESCU, dcmtk_env, stop_process  # noqa: E402
from tests.peers.orthanc import ORTHANC, OrthancServer  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402

HOST = "127.0.0.1"
MB = 1_000_000
# pacsclip's throughput relative to Orthanc's (img/s), the server a site would use instead.
TARGET_VS_ORTHANC = 1.0

# The floor references: a plain pynetdicom C-STORE SCP that fsyncs each file and its
# directory, and (argv[3] == "noop") one that stores nothing and only counts, which is the
# most any single-process pynetdicom-based receiver can reach on this machine. Both announce
# the same maximum PDU as pacsclip's default.
# argv: port, output directory[, "noop"].
FLOOR_SCP = """
import os, socket, sys
from pathlib import Path
from pynetdicom import AE, StoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"
port, out = int(sys.argv[1]), Path(sys.argv[2])
noop = sys.argv[3:] == ["noop"]
received = []

def on_open(event):
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

def on_close(event):
    # Only the no-op SCP counts, and only the association that stored (not the C-ECHO);
    # written under a temporary name, then renamed, so a reader never sees it half written.
    if noop and received:
        (out / "received.tmp").write_text(str(len(received)))
        os.replace(out / "received.tmp", out / "received.count")

def on_store(event):
    if noop:
        received.append(1)
        return 0x0000
    path = out / (str(event.request.AffectedSOPInstanceUID) + ".dcm")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(event.encoded_dataset(include_meta=True))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return 0x0000

ae = AE(ae_title="FLOORSCP")
ae.maximum_pdu_size = 4 * 2**20  # as pacsclip announces by default (max_pdu_bytes)
ae.require_called_aet = False
for context in StoragePresentationContexts:
    ae.add_supported_context(context.abstract_syntax)
ae.add_supported_context(Verification)
handlers = [
    (evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store), (evt.EVT_CONN_CLOSE, on_close)
]
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)
"""


@dataclass(frozen=True)
class DataSet:
    """A flat directory of DICOM files, and the same files split into parts (hard links)."""

    name: str
    description: str
    directory: Path
    parts: list[Path]  # one directory per concurrent association
    count: int
    total_bytes: int


@dataclass(frozen=True)
class Receiver:
    """How to start one kind of receiver in a fresh work directory, and count what it stored."""

    name: str
    aet: str
    start: Callable[[Path, int, Path], subprocess.Popen[bytes]]  # (workdir, port, log) -> process
    count_stored: Callable[[Path], int]  # workdir -> number of files stored
    catalogs: bool = False  # wait for data/catalog.sqlite3 to list every instance
    stop_timeout_s: float = 5


@dataclass(frozen=True)
class Scenario:
    """A way of sending: how many concurrent associations, to which receivers, compared how."""

    key: str  # JSON key
    title: str
    associations: int
    receivers: list[Receiver]
    ratio_pairs: list[tuple[str, str]]  # (numerator, denominator) receiver names, img/s
    target: tuple[str, str, float]  # (numerator, denominator, at least)
    data_sets: tuple[str, ...]  # DataSet names sent in this scenario


@dataclass
class Figures:
    """One receiver's timings on one data set in one scenario, in seconds per run."""

    receiver: str
    count: int
    total_bytes: int
    seconds: list[float] = field(default_factory=list)
    catalog_lag_s: list[float] = field(default_factory=list)  # last storescu exit to catalog

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def images_per_s(self, seconds: float) -> float:
        return self.count / seconds

    def mb_per_s(self, seconds: float) -> float:
        return self.total_bytes / MB / seconds

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "receiver": self.receiver,
            "runs_s": [round(s, 4) for s in self.seconds],
            "best_images_per_s": round(self.images_per_s(self.best_s), 1),
            "median_images_per_s": round(self.images_per_s(self.median_s), 1),
            "best_mb_per_s": round(self.mb_per_s(self.best_s), 1),
            "median_mb_per_s": round(self.mb_per_s(self.median_s), 1),
        }
        if self.catalog_lag_s:
            out["catalog_lag_s"] = [round(s, 3) for s in self.catalog_lag_s]
        return out


@dataclass(frozen=True)
class RunResult:
    seconds: float
    catalog_lag_s: float | None


# --- data -------------------------------------------------------------------------------------


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def split_into_parts(directory: Path, parts: int) -> list[Path]:
    """Hard-link the files of directory into `parts` sibling directories, in contiguous runs
    whose sizes differ by at most one file."""
    files = sorted(path for path in directory.iterdir() if path.is_file())
    root = directory.parent / f"{directory.name}_parts"
    out = []
    for number in range(parts):
        part = root / f"part{number}"
        part.mkdir(parents=True)
        for path in files[number * len(files) // parts : (number + 1) * len(files) // parts]:
            os.link(path, part / path.name)
        out.append(part)
    return out


def make_ct512(count: int, root: Path, parts: int) -> DataSet:
    directory = root / "ct512"
    ct_512_copies(count, directory)
    return DataSet(
        "ct512",
        "CT 512x512x16 bit (pydicom CT_small upscaled 4x, noise), one study and series",
        directory,
        split_into_parts(directory, parts),
        count,
        directory_bytes(directory),
    )


def rg1_copies(count: int, out_dir: Path) -> None:
    """Write count copies of RG1 uncompressed, each its own study and series (fresh UIDs)."""
    ds = pydicom.dcmread(rg1("uncompressed"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for number in range(1, count + 1):
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out_dir / f"rg1_{number:04d}.dcm")


def make_rg1(count: int, root: Path, parts: int) -> DataSet:
    directory = root / "rg1"
    rg1_copies(count, directory)
    return DataSet(
        "rg1",
        "pydicom-data RG1 chest CR 1955x1841 uncompressed, one study per image",
        directory,
        split_into_parts(directory, parts),
        count,
        directory_bytes(directory),
    )


# --- receivers --------------------------------------------------------------------------------


def receiver_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """TCP_NODELAY=1 and no inherited PACSCLIP_* settings, plus extra."""
    env = {k: v for k, v in dcmtk_env().items() if not k.startswith("PACSCLIP_")}
    return {**env, **(extra or {})}


def spawn(
    command: Sequence[str], workdir: Path, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            list(command),
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def storescp_starter(*options: str) -> Callable[[Path, int, Path], subprocess.Popen[bytes]]:
    def start(workdir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
        out = workdir / "out"
        out.mkdir()
        command = [STORESCP, *options, "-aet", "STORESCP", "+xa", "-od", str(out), str(port)]
        return spawn(command, workdir, log, receiver_env())

    return start


def start_floor_scp(workdir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    out = workdir / "out"
    out.mkdir()
    command = [sys.executable, "-c", FLOOR_SCP, str(port), str(out)]
    return spawn(command, workdir, log, receiver_env())


def start_noop_scp(workdir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    out = workdir / "out"
    out.mkdir()
    command = [sys.executable, "-c", FLOOR_SCP, str(port), str(out), "noop"]
    return spawn(command, workdir, log, receiver_env())


def start_orthanc(workdir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Orthanc in workdir/orthanc (its own log there), DICOM on port; returns once its REST
    API answers."""
    server = OrthancServer(workdir=workdir / "orthanc", dicom_port=port)
    server.__enter__()  # stopped by PID like the other receivers; the workdir is removed
    assert server.process is not None
    return server.process


def count_orthanc(workdir: Path) -> int:
    config = json.loads((workdir / "orthanc" / "orthanc.json").read_text())
    url = f"http://127.0.0.1:{config['HttpPort']}/statistics"
    with urllib.request.urlopen(url, timeout=30) as response:
        return int(json.load(response)["CountInstances"])


def pacsclip_command() -> Path:
    """The pacsclip console script of the virtualenv running this script."""
    script = Path(sys.executable).parent / "pacsclip"
    if not script.is_file():
        raise SystemExit(f"{script} not found: run this with the project's virtualenv python")
    return script


def pacsclip_starter(
    processes: int | None, settings: dict[str, str] | None = None
) -> Callable[[Path, int, Path], subprocess.Popen[bytes]]:
    """pacsclip node; processes sets PACSCLIP_RECEIVER_PROCESSES (None: pacsclip's default),
    settings adds PACSCLIP_* variables (a variant)."""

    def start(workdir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
        extra = {
            "PACSCLIP_DATA_DIR": str(workdir / "data"),
            "PACSCLIP_DICOM_HOST": HOST,
            "PACSCLIP_DICOM_PORT": str(port),
            "PACSCLIP_LOG_LEVEL": "WARNING",
            "PACSCLIP_MIN_FREE_DISK_MB": "0",
            **(settings or {}),
        }
        if processes is not None:
            extra["PACSCLIP_RECEIVER_PROCESSES"] = str(processes)
        return spawn([str(pacsclip_command()), "node"], workdir, log, receiver_env(extra))

    return start


def pacsclip_processes(args: argparse.Namespace) -> int:
    """How many receiver processes pacsclip node runs: the option, or its default (one per
    core, at most 4; see Settings.effective_receiver_processes)."""
    if args.pacsclip_processes is not None:
        return int(args.pacsclip_processes)
    return min(4, os.cpu_count() or 1)


def count_flat(workdir: Path) -> int:
    return sum(1 for path in (workdir / "out").iterdir() if path.is_file())


def count_acknowledged(workdir: Path) -> int:
    """The no-op SCP writes its count when the association closes, just after storescu exits."""
    counter = workdir / "out" / "received.count"
    deadline = time.monotonic() + 5
    while not counter.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(counter.read_text()) if counter.is_file() else 0


def count_spool(workdir: Path) -> int:
    return sum(1 for _ in (workdir / "data" / "spool").glob("*/*/*.dcm"))


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    pacsclip = Receiver(
        "pacsclip",
        "PACSCLIP",
        pacsclip_starter(args.pacsclip_processes),
        count_spool,
        catalogs=True,
        stop_timeout_s=30,
    )
    orthanc = Receiver("Orthanc", "ORTHANC", start_orthanc, count_orthanc, stop_timeout_s=30)
    # Each variant: pacsclip with other settings, measured in the same rounds (before/after).
    variants = [
        Receiver(
            label,
            "PACSCLIP",
            pacsclip_starter(args.pacsclip_processes, settings),
            count_spool,
            catalogs=True,
            stop_timeout_s=30,
        )
        for label, settings in args.variant
    ]
    variant_ratios = [(v.name, "Orthanc") for v in variants]
    n = args.associations
    return [
        Scenario(
            "one_association",
            "1 association",
            1,
            [
                orthanc,
                Receiver("storescp", "STORESCP", storescp_starter(), count_flat),
                pacsclip,
                *variants,
                Receiver("pynetdicom+fsync", "FLOORSCP", start_floor_scp, count_flat),
                Receiver("pynetdicom no-op", "FLOORSCP", start_noop_scp, count_acknowledged),
            ],
            [
                ("pacsclip", "Orthanc"),
                *variant_ratios,
                ("pacsclip", "storescp"),
                ("Orthanc", "storescp"),
                ("pynetdicom+fsync", "storescp"),
                ("pynetdicom no-op", "storescp"),
                ("pacsclip", "pynetdicom+fsync"),
            ],
            ("pacsclip", "Orthanc", TARGET_VS_ORTHANC),
            ("ct512", "rg1"),
        ),
        Scenario(
            f"{n}_associations",
            f"{n} concurrent associations",
            n,
            [
                orthanc,
                Receiver("storescp --fork", "STORESCP", storescp_starter("--fork"), count_flat),
                pacsclip,
                *variants,
            ],
            [
                ("pacsclip", "Orthanc"),
                *variant_ratios,
                ("pacsclip", "storescp --fork"),
                ("Orthanc", "storescp --fork"),
            ],
            ("pacsclip", "Orthanc", TARGET_VS_ORTHANC),
            ("ct512",),
        ),
    ]


# --- processes --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            fields = _stat_fields(child)
            if fields and fields[0] != "Z":
                found.append((child, fields[19]))
                stack.append(child)
    return found


def _alive(pid: int, start_time: str) -> bool:
    """True while the process of that pid and start time exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[19] == start_time and fields[0] != "Z"


def stop_receiver(process: subprocess.Popen[bytes], timeout_s: float) -> list[int]:
    """Stop the receiver by its PID, then any child it started that outlives it (by PID,
    checked against its start time). Returns the pids of children that had to be signalled."""
    children = descendants(process.pid)
    stop_process(process, timeout_s)
    deadline = time.monotonic() + 5
    while any(_alive(*c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    signalled = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start_time in children:
            if _alive(pid, start_time):
                try:
                    os.kill(pid, sig)
                    signalled.append(pid)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        while any(_alive(*c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
    return sorted(set(signalled))


# --- one run ----------------------------------------------------------------------------------


def wait_for_echo(process: subprocess.Popen[bytes], port: int, aet: str, timeout_s: float) -> None:
    """Block until the receiver answers a C-ECHO; raise if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode} before answering")
        try:
            done = subprocess.run(
                [ECHOSCU, "-aec", aet, HOST, str(port)],
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=5,
                check=False,
            )
            if done.returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no C-ECHO answer on {HOST}:{port} within {timeout_s:.0f} s")


def send(directories: Sequence[Path], port: int, aet: str, timeout_s: float) -> float:
    """Start one storescu association per directory, all at once; return the wall time from
    the first start to the last exit."""
    outputs = [tempfile.TemporaryFile() for _ in directories]  # noqa: SIM115 (closed below)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        for directory, output in zip(directories, outputs, strict=True):
            command = [STORESCU, "+sd", "-aec", aet, HOST, str(port), str(directory)]
            processes.append(
                subprocess.Popen(
                    command,
                    env=dcmtk_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = started + timeout_s
        for process in processes:
            process.wait(timeout=max(0.1, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - started
        failed = [
            (number, process.returncode, output)
            for number, (process, output) in enumerate(zip(processes, outputs, strict=True))
            if process.returncode != 0
        ]
        if failed:
            number, returncode, output = failed[0]
            output.seek(0)
            tail = output.read().decode(errors="replace")[-2000:]
            raise RuntimeError(
                f"{len(failed)} of {len(processes)} storescu failed; #{number} exited with"
                f" {returncode}:\n{tail}"
            )
        return elapsed
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for output in outputs:
            output.close()


def catalog_instances(database: Path) -> int:
    """Rows in pacsclip's instance table (0 while the catalog or the table does not exist)."""
    if not database.is_file():
        return 0
    try:
        connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return int(connection.execute("SELECT COUNT(*) FROM instance").fetchone()[0])
        finally:
            connection.close()
    except sqlite3.OperationalError:
        return 0


def wait_for_catalog(database: Path, expected: int, since: float, timeout_s: float) -> float:
    """Poll the catalog until it lists expected instances; return seconds since `since`."""
    deadline = time.perf_counter() + timeout_s
    while True:
        found = catalog_instances(database)
        if found == expected:
            return time.perf_counter() - since
        if found > expected:
            raise RuntimeError(f"catalog lists {found} instances, {expected} were sent")
        if time.perf_counter() > deadline:
            raise RuntimeError(
                f"catalog lists {found} of {expected} instances {timeout_s:.0f} s after the"
                " last C-STORE"
            )
        time.sleep(0.05)


def log_tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def run_once(
    receiver: Receiver,
    data: DataSet,
    associations: int,
    work_root: Path,
    args: argparse.Namespace,
) -> RunResult:
    """Start the receiver fresh, send the data set, check every file arrived (and, for pacsclip,
    was cataloged), stop it and its children by PID."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{receiver.name.replace(' ', '')}-", dir=work_root))
    log = workdir / "receiver.log"
    port = free_port()
    directories = [data.directory] if associations == 1 else data.parts
    process = receiver.start(workdir, port, log)
    try:
        wait_for_echo(process, port, receiver.aet, args.start_timeout)
        seconds = send(directories, port, receiver.aet, args.send_timeout)
        sent_at = time.perf_counter()
        stored = receiver.count_stored(workdir)
        if stored != data.count:
            raise RuntimeError(f"{receiver.name} stored {stored} of {data.count} files")
        lag = None
        if receiver.catalogs:
            database = workdir / "data" / "catalog.sqlite3"
            lag = wait_for_catalog(database, data.count, sent_at, args.catalog_timeout)
        if process.poll() is not None:
            raise RuntimeError(f"{receiver.name} exited with {process.returncode} during the run")
        return RunResult(seconds, lag)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(
            f"{receiver.name} on {data.name} ({associations} associations): {exc}\n"
            f"--- receiver log tail ({log}) ---\n{log_tail(log)}"
        ) from exc
    finally:
        signalled = stop_receiver(process, receiver.stop_timeout_s)
        if signalled:
            print(
                f"  warning: {receiver.name} left child processes {signalled}; stopped by PID",
                file=sys.stderr,
                flush=True,
            )
        shutil.rmtree(workdir, ignore_errors=True)
        # Write back whatever a receiver left unsynced, so that it does not slow the next one.
        os.sync()


def measure(
    data: DataSet, plan: list[Scenario], work_root: Path, args: argparse.Namespace
) -> dict[str, list[Figures]]:
    """The receivers of the scenarios that send this data set, one after the other, in each of
    args.repeats rounds."""
    plan = [s for s in plan if data.name in s.data_sets]
    figures = {
        s.key: [Figures(r.name, data.count, data.total_bytes) for r in s.receivers] for s in plan
    }
    for round_number in range(1, args.repeats + 1):
        for scenario in plan:
            for receiver, figure in zip(scenario.receivers, figures[scenario.key], strict=True):
                result = run_once(receiver, data, scenario.associations, work_root, args)
                figure.seconds.append(result.seconds)
                catalog = ""
                if result.catalog_lag_s is not None:
                    figure.catalog_lag_s.append(result.catalog_lag_s)
                    catalog = f"  (catalog complete +{result.catalog_lag_s:.2f} s)"
                print(
                    f"  {data.name} round {round_number}, {scenario.associations} assoc:"
                    f" {receiver.name:<17} {result.seconds:7.2f} s"
                    f" {data.count / result.seconds:7.1f} img/s{catalog}",
                    file=sys.stderr,
                    flush=True,
                )
    return figures


# --- report -----------------------------------------------------------------------------------


def header(data_sets: Sequence[DataSet], args: argparse.Namespace, work_root: Path) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    processes = pacsclip_processes(args)
    how = (
        f"PACSCLIP_RECEIVER_PROCESSES={args.pacsclip_processes}"
        if args.pacsclip_processes is not None
        else "pacsclip's default, one per core up to 4"
    )
    lines = [
        "Receiving throughput: DCMTK storescu (TCP_NODELAY=1) on 127.0.0.1, one association and"
        f" {args.associations} concurrent ones",
        f"CPUs: {os.cpu_count()}; load average at start: {load}; files under {work_root}",
        f"Runs per receiver, data set and scenario: {args.repeats}, alternating receivers;"
        " best and median.",
        "Orthanc (Debian, default configuration: SQLite index, fsynced storage) is the peer;"
        " pacsclip/Orthanc >= 1.0 is the target.",
        "storescp (DCMTK, +xa) does NOT fsync; --fork: one child process per association.",
        f"pacsclip node: {processes} receiver processes on one port ({how}; 0 = in process);"
        " answers C-STORE once",
        "the file and its directory are fsynced in the spool, catalogs asynchronously in"
        " batches. Checked after each",
        "run, outside the timed window: spool/*/*/*.dcm count, then the catalog's instance rows"
        " (lag reported).",
        "pynetdicom+fsync: a plain pynetdicom SCP that writes the received bytes and fsyncs file"
        " and directory;",
        "pynetdicom no-op: stores nothing (pynetdicom's ceiling). Both are references only.",
        f"Timed: first storescu start to last storescu exit ({args.associations} storescu"
        " processes started together,",
        f"each with 1/{args.associations} of the files), receivers already answering C-ECHO."
        " MB = 10^6 bytes.",
    ]
    for data in data_sets:
        each = data.total_bytes / data.count / MB
        lines.append(
            f"- {data.name}: {data.count} images x {each:.3f} MB = {data.total_bytes / MB:.1f} MB;"
            f" {data.description}"
        )
    return "\n".join(lines)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def throughput_ratios(figures: list[Figures], numerator: str, denominator: str) -> dict[str, float]:
    """numerator's img/s over denominator's, of the best and of the median runs."""
    by_name = {f.receiver: f for f in figures}
    top, bottom = by_name[numerator], by_name[denominator]
    return {
        "best": ratio(bottom.best_s, top.best_s),
        "median": ratio(bottom.median_s, top.median_s),
    }


def table(data: DataSet, scenario: Scenario, figures: list[Figures]) -> str:
    lines = [
        f"{data.name} ({data.count} images, {data.total_bytes / MB:.1f} MB), {scenario.title}",
        f"  {'receiver':<17} {'img/s best':>10} {'img/s med':>10} {'MB/s best':>10}"
        f" {'MB/s med':>10}  runs (s)",
    ]
    for f in figures:
        runs = " ".join(f"{s:.2f}" for s in f.seconds)
        best, median = f.best_s, f.median_s
        lines.append(
            f"  {f.receiver:<17} {f.images_per_s(best):10.1f} {f.images_per_s(median):10.1f}"
            f" {f.mb_per_s(best):10.1f} {f.mb_per_s(median):10.1f}  {runs}"
        )
    for f in figures:
        if f.catalog_lag_s:
            lags = " ".join(f"{s:.2f}" for s in f.catalog_lag_s)
            lines.append(f"  {f.receiver} catalog complete after the last C-STORE (s): {lags}")
    for numerator, denominator in scenario.ratio_pairs:
        r = throughput_ratios(figures, numerator, denominator)
        lines.append(
            f"  {numerator}/{denominator} (img/s): best {r['best']:.2f}, median {r['median']:.2f}"
        )
    return "\n".join(lines)


def targets(
    results: list[tuple[DataSet, dict[str, list[Figures]]]], plan: list[Scenario]
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for data, by_scenario in results:
        for scenario in plan:
            if scenario.key not in by_scenario:
                continue
            numerator, denominator, at_least = scenario.target
            r = throughput_ratios(by_scenario[scenario.key], numerator, denominator)
            rows.append(
                {
                    "data_set": data.name,
                    "scenario": scenario.key,
                    "title": scenario.title,
                    "ratio": f"{numerator}/{denominator}",
                    "at_least": at_least,
                    "best": round(r["best"], 3),
                    "median": round(r["median"], 3),
                    "met_by_median": r["median"] >= at_least,
                }
            )
    return rows


def targets_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "Targets (img/s ratios; met = the median run's ratio reaches the target)",
        f"  {'data set':<9} {'scenario':<27} {'ratio':<25} {'best':>5} {'median':>6}"
        f" {'target':>7}  result",
    ]
    for row in rows:
        lines.append(
            f"  {row['data_set']:<9} {row['title']:<27} {row['ratio']:<25} {row['best']:5.2f}"
            f" {row['median']:6.2f}   >= {row['at_least']:<4}  "
            + ("met" if row["met_by_median"] else "NOT met")
        )
    return "\n".join(lines)


def as_json(
    results: list[tuple[DataSet, dict[str, list[Figures]]]],
    plan: list[Scenario],
    args: argparse.Namespace,
) -> dict[str, object]:
    out: dict[str, object] = {
        "cpus": os.cpu_count(),
        "pacsclip_receiver_processes": pacsclip_processes(args),
        "associations": args.associations,
        "repeats": args.repeats,
    }
    for data, by_scenario in results:
        entry: dict[str, object] = {
            "count": data.count,
            "total_mb": round(data.total_bytes / MB, 2),
        }
        for scenario in plan:
            if scenario.key not in by_scenario:
                continue
            figures = by_scenario[scenario.key]
            ratios = {}
            for a, b in scenario.ratio_pairs:
                r = throughput_ratios(figures, a, b)
                ratios[f"{a}/{b}"] = {k: round(v, 3) for k, v in r.items()}
            entry[scenario.key] = {
                "associations": scenario.associations,
                "receivers": [f.as_dict() for f in figures],
                "ratios_images_per_s": ratios,
            }
        out[data.name] = entry
    out["targets"] = targets(results, plan)
    return out


# --- main -------------------------------------------------------------------------------------


def variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, assignments = text.partition(":")
    pairs = [a.partition("=") for a in assignments.split(",") if a]
    if (
        not label
        or not pairs
        or any(not name.startswith("PACSCLIP_") or not eq for name, eq, _ in pairs)
    ):
        raise argparse.ArgumentTypeError("expected LABEL:PACSCLIP_NAME=VALUE[,PACSCLIP_NAME=VALUE]")
    return f"pacsclip {label}", {name: value for name, _, value in pairs}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100, help="512x512 CT images (default 100)")
    parser.add_argument("--rg1-count", type=int, default=20, help="RG1 copies (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver and data set")
    parser.add_argument(
        "--associations", type=int, default=4, help="concurrent storescu (default 4)"
    )
    parser.add_argument(
        "--pacsclip-processes",
        type=int,
        default=None,
        help="PACSCLIP_RECEIVER_PROCESSES for pacsclip node (default: pacsclip's own default)",
    )
    parser.add_argument(
        "--variant",
        type=variant,
        action="append",
        default=[],
        metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
        help="also run pacsclip with these PACSCLIP_* settings, e.g."
        " 'pdu16k:PACSCLIP_MAX_PDU_BYTES=16384' (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where data and output go")
    parser.add_argument("--start-timeout", type=float, default=60, help="seconds to answer echo")
    parser.add_argument("--send-timeout", type=float, default=600, help="seconds per sending")
    parser.add_argument(
        "--catalog-timeout",
        type=float,
        default=120,
        help="seconds for pacsclip's catalog to list every instance after the last C-STORE",
    )
    args = parser.parse_args(argv)
    if min(args.count, args.rg1_count, args.repeats) < 1:
        parser.error("--count, --rg1-count and --repeats must be at least 1")
    if not 2 <= args.associations <= args.count:
        parser.error("--associations must be at least 2 and at most --count")
    if args.pacsclip_processes is not None and args.pacsclip_processes < 0:
        parser.error("--pacsclip-processes must be 0 or more")
    return args


def check_tools() -> None:
    missing = [tool for tool in (STORESCU, STORESCP, ECHOSCU, ORTHANC) if not Path(tool).is_file()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install dcmtk orthanc)")
    pacsclip_command()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    plan = scenarios(args)
    with tempfile.TemporaryDirectory(prefix="pacsclip-bench-", dir=args.tmp_dir) as tmp:
        work_root = Path(tmp)
        print("preparing data ...", file=sys.stderr, flush=True)
        data_sets = [
            make_ct512(args.count, work_root, args.associations),
            make_rg1(args.rg1_count, work_root, args.associations),
        ]
        os.sync()
        print(header(data_sets, args, work_root), flush=True)
        results = [(data, measure(data, plan, work_root, args)) for data in data_sets]
    for data, by_scenario in results:
        for scenario in plan:
            if scenario.key in by_scenario:
                print()
                print(table(data, scenario, by_scenario[scenario.key]))
    print()
    print(targets_table(targets(results, plan)))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end: {load}")
    if args.json:
        print(json.dumps(as_json(results, plan, args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
