"""Receiving throughput, side by side: DCMTK storescp, a plain pynetdicom SCP, pacsclip node.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/receive.py [--count 500] [--rg1-count 100] [--repeats 2] [--json]

One DCMTK storescu association sends a directory of files to each receiver in turn; each
receiver starts fresh on a free 127.0.0.1 port with an empty output directory and is stopped by
its PID afterwards. The receivers run alternately (storescp, pacsclip, pynetdicom, storescp, ...)
so that slow drifts of the machine hit all of them alike. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

# Run as a script, this file's folder is on sys.path, not the repository root with tests.peers.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.peers.data import ct_small_copies, rg1  # noqa: E402
from tests.peers.dcmtk import ECHOSCU, STORESCP, STORESCU, dcmtk_env, stop_process  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402

HOST = "127.0.0.1"
MB = 1_000_000

# The floor references: a plain pynetdicom C-STORE SCP that fsyncs each file and its
# directory, and (argv[3] == "noop") one that stores nothing and only counts, which is the
# most any pynetdicom-based receiver can reach on this machine.
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
    (out / "received.count").write_text(str(len(received)))

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
    """A flat directory of DICOM files that storescu sends in one association."""

    name: str
    description: str
    directory: Path
    count: int
    total_bytes: int


@dataclass(frozen=True)
class Receiver:
    """How to start one kind of receiver in a fresh work directory, and count what it stored."""

    name: str
    aet: str
    start: Callable[[Path, int, Path], subprocess.Popen[bytes]]  # (workdir, port, log) -> process
    count_stored: Callable[[Path], int]  # workdir -> number of files stored


@dataclass(frozen=True)
class Figures:
    """One receiver's timings on one data set, in seconds per run."""

    receiver: str
    seconds: list[float]
    count: int
    total_bytes: int

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
        return {
            "receiver": self.receiver,
            "runs_s": [round(s, 4) for s in self.seconds],
            "best_images_per_s": round(self.images_per_s(self.best_s), 1),
            "median_images_per_s": round(self.images_per_s(self.median_s), 1),
            "best_mb_per_s": round(self.mb_per_s(self.best_s), 1),
            "median_mb_per_s": round(self.mb_per_s(self.median_s), 1),
        }


# --- data -------------------------------------------------------------------------------------


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def make_ct_small(count: int, root: Path) -> DataSet:
    directory = root / "ct_small"
    ct_small_copies(count, directory)
    return DataSet(
        "ct_small",
        "pydicom CT_small (128x128 CT), one study and series",
        directory,
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


def make_rg1(count: int, root: Path) -> DataSet:
    directory = root / "rg1"
    rg1_copies(count, directory)
    return DataSet(
        "rg1",
        "pydicom-data RG1 chest CR 1955x1841 uncompressed, one study per image",
        directory,
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


def start_storescp(workdir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    out = workdir / "out"
    out.mkdir()
    command = [STORESCP, "-aet", "STORESCP", "+xa", "-od", str(out), str(port)]
    return spawn(command, workdir, log, receiver_env())


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


def pacsclip_command() -> Path:
    """The pacsclip console script of the virtualenv running this script."""
    script = Path(sys.executable).parent / "pacsclip"
    if not script.is_file():
        raise SystemExit(f"{script} not found: run this with the project's virtualenv python")
    return script


def start_pacsclip(workdir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = receiver_env(
        {
            "PACSCLIP_DATA_DIR": str(workdir / "data"),
            "PACSCLIP_DICOM_HOST": HOST,
            "PACSCLIP_DICOM_PORT": str(port),
            "PACSCLIP_LOG_LEVEL": "WARNING",
            "PACSCLIP_MIN_FREE_DISK_MB": "0",
        }
    )
    return spawn([str(pacsclip_command()), "node"], workdir, log, env)


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


RECEIVERS = [
    Receiver("storescp", "STORESCP", start_storescp, count_flat),
    Receiver("pacsclip", "PACSCLIP", start_pacsclip, count_spool),
    Receiver("pynetdicom+fsync", "FLOORSCP", start_floor_scp, count_flat),
    Receiver("pynetdicom no-op", "FLOORSCP", start_noop_scp, count_acknowledged),
]


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


def send(directory: Path, port: int, aet: str, timeout_s: float) -> float:
    """Send every file of directory in one storescu association; return the wall time."""
    command = [STORESCU, "+sd", "-aec", aet, HOST, str(port), str(directory)]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        env=dcmtk_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed


def log_tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def run_once(receiver: Receiver, data: DataSet, work_root: Path, args: argparse.Namespace) -> float:
    """Start the receiver fresh, send the data set, check every file arrived, stop it by PID."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=work_root))
    log = workdir / "receiver.log"
    port = free_port()
    process = receiver.start(workdir, port, log)
    try:
        wait_for_echo(process, port, receiver.aet, args.start_timeout)
        seconds = send(data.directory, port, receiver.aet, args.send_timeout)
        stored = receiver.count_stored(workdir)
        if stored != data.count:
            raise RuntimeError(f"{receiver.name} stored {stored} of {data.count} files")
        return seconds
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{receiver.name} on {data.name}: {exc}\n{log_tail(log)}") from exc
    finally:
        stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)
        # Write back whatever a receiver left unsynced, so that it does not slow the next one.
        os.sync()


def measure(data: DataSet, work_root: Path, args: argparse.Namespace) -> list[Figures]:
    seconds: dict[str, list[float]] = {r.name: [] for r in RECEIVERS}
    for round_number in range(1, args.repeats + 1):
        for receiver in RECEIVERS:
            elapsed = run_once(receiver, data, work_root, args)
            seconds[receiver.name].append(elapsed)
            print(
                f"  {data.name} round {round_number}: {receiver.name:<17} {elapsed:7.2f} s",
                file=sys.stderr,
                flush=True,
            )
    return [Figures(name, s, data.count, data.total_bytes) for name, s in seconds.items()]


# --- report -----------------------------------------------------------------------------------


def header(data_sets: Sequence[DataSet], args: argparse.Namespace, work_root: Path) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "Receiving throughput: one DCMTK storescu association (TCP_NODELAY=1) on 127.0.0.1",
        f"CPUs: {os.cpu_count()}; load average at start: {load}; files under {work_root}",
        f"Runs per receiver and data set: {args.repeats}, alternating receivers; best and median.",
        "storescp (DCMTK, +xa) does NOT fsync. pacsclip node fsyncs each file and its directory",
        "and commits the catalog before answering. pynetdicom+fsync: a plain pynetdicom SCP",
        "that writes the received bytes and fsyncs file and directory (pynetdicom's own floor).",
        "Timed: storescu start to exit, receivers already answering C-ECHO. MB = 10^6 bytes.",
    ]
    for data in data_sets:
        each = data.total_bytes / data.count / MB
        lines.append(
            f"- {data.name}: {data.count} images x {each:.3f} MB = {data.total_bytes / MB:.1f} MB;"
            f" {data.description}"
        )
    if args.rg1_count < args.count:
        lines.append(
            f"  (RG1: {args.rg1_count} images, fewer than CT_small's {args.count}: its default is"
            " 100 so that the run stays within a few minutes on 2 cores; --rg1-count sets it.)"
        )
    return "\n".join(lines)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(data: DataSet, figures: list[Figures]) -> str:
    by_name = {f.receiver: f for f in figures}
    lines = [
        f"{data.name} ({data.count} images, {data.total_bytes / MB:.1f} MB)",
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
    for numerator, denominator in ratio_pairs():
        top, bottom = by_name[numerator], by_name[denominator]
        best = ratio(bottom.best_s, top.best_s)
        median = ratio(bottom.median_s, top.median_s)
        lines.append(f"  {numerator}/{denominator} (img/s): best {best:.2f}, median {median:.2f}")
    return "\n".join(lines)


def ratio_pairs() -> list[tuple[str, str]]:
    return [
        ("pacsclip", "storescp"),
        ("pynetdicom+fsync", "storescp"),
        ("pynetdicom no-op", "storescp"),
        ("pacsclip", "pynetdicom+fsync"),
    ]


def as_json(results: list[tuple[DataSet, list[Figures]]]) -> dict[str, object]:
    out: dict[str, object] = {"cpus": os.cpu_count()}
    for data, figures in results:
        by_name = {f.receiver: f for f in figures}
        ratios = {
            f"{a}/{b}": {
                "best": round(ratio(by_name[b].best_s, by_name[a].best_s), 3),
                "median": round(ratio(by_name[b].median_s, by_name[a].median_s), 3),
            }
            for a, b in ratio_pairs()
        }
        out[data.name] = {
            "count": data.count,
            "total_mb": round(data.total_bytes / MB, 2),
            "receivers": [f.as_dict() for f in figures],
            "ratios_images_per_s": ratios,
        }
    return out


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=500, help="CT_small copies (default 500)")
    parser.add_argument("--rg1-count", type=int, default=100, help="RG1 copies (default 100)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per receiver and data set")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where data and output go")
    parser.add_argument("--start-timeout", type=float, default=60, help="seconds to answer echo")
    parser.add_argument("--send-timeout", type=float, default=600, help="seconds per storescu")
    args = parser.parse_args(argv)
    if min(args.count, args.rg1_count, args.repeats) < 1:
        parser.error("--count, --rg1-count and --repeats must be at least 1")
    return args


def check_tools() -> None:
    missing = [tool for tool in (STORESCU, STORESCP, ECHOSCU) if not Path(tool).is_file()]
    if missing:
        raise SystemExit(f"DCMTK tools missing: {', '.join(missing)} (apt-get install dcmtk)")
    pacsclip_command()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    with tempfile.TemporaryDirectory(prefix="pacsclip-bench-", dir=args.tmp_dir) as tmp:
        work_root = Path(tmp)
        print("preparing data ...", file=sys.stderr, flush=True)
        data_sets = [make_ct_small(args.count, work_root), make_rg1(args.rg1_count, work_root)]
        os.sync()
        print(header(data_sets, args, work_root), flush=True)
        results = [(data, measure(data, work_root, args)) for data in data_sets]
    for data, figures in results:
        print()
        print(table(data, figures))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end: {load}")
    if args.json:
        print(json.dumps(as_json(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
