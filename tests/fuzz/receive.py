"""Fuzz the receive path of a running ``pacsclip node``: broken datasets over C-STORE, and raw
bytes on the DICOM socket.

    .venv/bin/python -m tests.fuzz.receive --cases 10000 [--seed 0] [--keep DIR]

Checks, for every case: a status the node documents (or, for raw bytes, a PDU or a close);
after a Success, the spooled file reads back with pydicom and its pixel data decodes; after a
failure status, the object is in the quarantine with its reason; unmutated controls succeed.
At the end: the node is still up, its RSS (node and receiver processes) is within 10 % of
the figure after the warm-up, and it holds no more file descriptors than then. Violations
are printed, their bytes kept under ``--keep``; the exit status is 1 when there is any.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from pydicom import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.association import Association

from plugin import dicom_status as status
from plugin.settings import Settings
from tests.fuzz.mutations import NATIVE, Case, UidSource, cases, seeds
from tests.fuzz.raw_pdu import RawCase, raw_cases, send_raw
from tests.peers.pacsclip_process import (
    PacsclipProcess,
    fd_count,
    pacsclip_env,
    process_tree,
    rss_kib,
)
from tests.peers.ports import free_port

HOST = "127.0.0.1"
AET = "PACSCLIP"
DOCUMENTED = {
    status.SUCCESS, status.OUT_OF_RESOURCES, status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    status.CANNOT_UNDERSTAND, status.MISSING_UID, status.INVALID_UID,
    status.INSTANCE_UID_MISMATCH, status.PROCESSING_FAILURE,
}  # fmt: skip
RSS_TOLERANCE = 0.10
PDU_BUFFERS_KEPT = 2
MAX_PDU_KIB = Settings.model_fields["max_pdu_bytes"].default // 1024
# pynetdicom lets go of a connection whose PDU never completes when its ARTIM timer
# (the node's acse_timeout, 30 s) runs out; held longer, it is held for good.
RAW_TIMEOUT_S = 40.0
# The catalog's connection pool opens database files as load needs them: not a leak.
DATABASE_FILES = (".sqlite3", ".sqlite3-wal", ".sqlite3-journal")
START_TIMEOUT_S = 60.0
CODEC_CORRUPT = "(of the Successes: compressed, framing sound, codec stream corrupt)"
DEFAULT_WARMUP = 1000
RSS_SAMPLE_EVERY = 50  # cases, during the warm-up
SETTLE_S = 40.0  # the node's acse_timeout (30 s) and a margin


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    cases: int = 0

    def add(self, mutation: str, outcome: str, violation: str | None = None) -> None:
        self.cases += 1
        self.outcomes[f"{mutation.split('/')[0]} -> {outcome}"] += 1
        if violation:
            self.violations.append(f"{mutation}: {violation}")


class FuzzTarget:
    """A ``pacsclip node`` subprocess and one SCU association to it, renewed when lost."""

    def __init__(self, workdir: Path, receiver_processes: int) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.port = free_port()
        env = pacsclip_env(
            {
                "PACSCLIP_DATA_DIR": str(self.data_dir),
                "PACSCLIP_DICOM_HOST": HOST,
                "PACSCLIP_DICOM_PORT": str(self.port),
                "PACSCLIP_MIN_FREE_DISK_MB": "0",
                "PACSCLIP_RECEIVER_PROCESSES": str(receiver_processes),
                "PACSCLIP_LOG_LEVEL": "WARNING",
            }
        )
        self.node = PacsclipProcess(["node"], env, workdir / "node.log")
        self.scu = AE(ae_title="FUZZER")
        self.scu.acse_timeout = self.scu.dimse_timeout = self.scu.network_timeout = 30
        for sop_class in sorted({s.sop_class_uid for s in seeds()}):
            for syntax in sorted({*NATIVE, *(s.transfer_syntax for s in seeds())}):
                self.scu.add_requested_context(sop_class, syntax)
            self.scu.add_requested_context(sop_class, "1.2.840.10008.1.2.1.99")  # deflate
            self.scu.add_requested_context(sop_class, "1.2.840.10008.1.2.2")  # big endian
        self.assoc: Association | None = None
        self.file = workdir / "case.dcm"
        self.quarantined = 0
        self.codec_corrupt = 0

    def start(self) -> None:
        self.node.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.node.alive():
                raise RuntimeError(f"pacsclip node exited at start; see {self.node.log}")
            if self._connect():
                return
            time.sleep(0.2)
        raise TimeoutError(f"pacsclip node not accepting associations; see {self.node.log}")

    def _connect(self) -> bool:
        self.assoc = self.scu.associate(HOST, self.port, ae_title=AET)
        return bool(self.assoc.is_established)

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None

    def stop(self) -> int | None:
        """Stop the node as a supervisor does (SIGTERM); its exit status (0: it drained)."""
        self.release()
        return self.node.stop()

    def pids(self) -> list[int]:
        return process_tree(self.node.pid)

    # one case

    def store(self, case: Case) -> tuple[str, str | None]:
        """Send a dataset case; returns (outcome, violation or None)."""
        if (self.assoc is None or not self.assoc.is_established) and not self._connect():
            assert self.assoc is not None
            how = "rejected" if self.assoc.is_rejected else "aborted or not answered"
            return "association refused", f"a new association was {how}"
        assert self.assoc is not None
        self.file.write_bytes(part10(case))
        try:
            answer = self.assoc.send_c_store(self.file)
        except Exception:
            # No accepted context (e.g. big endian), or a dataset starting with group 0002
            # elements that pynetdicom takes for its file meta: the fuzzer's side, not the node's.
            return "not sent by the SCU", None
        if "Status" not in answer:
            self.release()
            return "no answer", "no C-STORE response (association aborted or timed out)"
        code = int(answer.Status)
        outcome = f"0x{code:04X}"
        if code not in DOCUMENTED:
            return outcome, f"status 0x{code:04X} is not one the node documents"
        if code == status.SUCCESS:
            return outcome, self._check_stored(case)
        if case.valid:
            return outcome, f"an unmutated {case.seed} was refused: {answer.get('ErrorComment')}"
        if code in (status.OUT_OF_RESOURCES, status.PROCESSING_FAILURE):
            return outcome, None
        return outcome, self._check_quarantined()

    def _check_stored(self, case: Case) -> str | None:
        found = list((self.data_dir / "spool").glob(f"*/*/{case.sop_instance_uid}.dcm"))
        if len(found) != 1:
            return f"Success, but {len(found)} spooled files for the instance"
        try:
            ds = pydicom.dcmread(found[0])
            for element in ds.iterall():
                _ = element.value
        except Exception as exc:
            return f"Success, but the stored file cannot be read back: {type(exc).__name__}: {exc}"
        if "PixelData" not in ds:
            return None
        try:
            ds.pixel_array  # noqa: B018 - decoding is the check
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a codec's Rust panic is a BaseException
            if UID(ds.file_meta.TransferSyntaxUID).is_encapsulated:
                self.codec_corrupt += 1  # framing checked at receive, the codec stream not
                return None
            return f"Success, but the pixel data does not decode: {type(exc).__name__}: {exc}"
        return None

    def _check_quarantined(self) -> str | None:
        sidecars = sorted((self.data_dir / "quarantine").glob("*.json"))
        if len(sidecars) != self.quarantined + 1:
            count = len(sidecars) - self.quarantined
            self.quarantined = len(sidecars)
            return f"refused, but {count} quarantine entries were added (expected 1)"
        self.quarantined = len(sidecars)
        reason = json.loads(sidecars[-1].read_text()).get("reason")
        return None if reason else "quarantined without a reason"

    def raw(self, case: RawCase) -> tuple[str, str | None]:
        self.release()  # raw cases use their own connection; keep the count of open ones low
        try:
            return send_raw(HOST, self.port, case, RAW_TIMEOUT_S), None
        except TimeoutError as exc:
            return "held open", str(exc)
        except OSError as exc:
            return "connect failed", f"{type(exc).__name__}: {exc}"


def settle_after_run(target: FuzzTarget, fds_before: int) -> None:
    """Wait (bounded) for connections that sent garbage to be let go: pynetdicom keeps such
    an association's thread and socket until its ARTIM timer (acse_timeout) runs out."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and target.node.alive():
        if fd_count(target.pids(), ignore_suffixes=DATABASE_FILES) <= fds_before:
            return
        time.sleep(1.0)


def part10(case: Case) -> bytes:
    """A file pynetdicom sends as it is (chunked mode): meta header, then the case's bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(case.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(case.sop_instance_uid)
    meta.TransferSyntaxUID = UID(case.transfer_syntax)
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + case.data


def keep(case: Case | RawCase, index: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(case, Case):
        (directory / f"{index:05d}-{case.mutation.replace('/', '_')}.dcm").write_bytes(part10(case))
    else:
        (directory / f"{index:05d}-raw-{case.mutation}.bin").write_bytes(case.data)


@dataclass(frozen=True)
class Report:
    cases: int  # the warm-up's included
    warmup: int
    seconds: float
    outcomes: dict[str, int]
    violations: list[str]
    rss_after_warmup_kib: int
    rss_end_kib: int
    fds_after_warmup: int
    fds_end: int
    node_alive: bool
    exit_status: int | None = None  # of the node on SIGTERM at the end

    @property
    def rss_change(self) -> float:
        return self.rss_end_kib / self.rss_after_warmup_kib - 1.0

    @property
    def rss_limit_kib(self) -> float:
        # A receiver thread's PDU buffer, freed, may stay with the allocator: with the node's
        # maximum PDU (4 MiB) a couple of those move RSS without anything growing per case.
        return RSS_TOLERANCE * self.rss_after_warmup_kib + PDU_BUFFERS_KEPT * MAX_PDU_KIB

    @property
    def problems(self) -> list[str]:
        out = list(self.violations)
        if not self.node_alive:
            out.append("the node died")
        if self.node_alive and self.exit_status != 0:
            out.append(f"the node exited with {self.exit_status} on SIGTERM (not drained)")
        if self.rss_end_kib - self.rss_after_warmup_kib > self.rss_limit_kib:
            out.append(
                f"RSS grew {self.rss_change:+.1%} after the warm-up "
                f"(limit 10 % and {PDU_BUFFERS_KEPT} PDUs of {MAX_PDU_KIB} KiB)"
            )
        if self.fds_end > self.fds_after_warmup:
            out.append(f"file descriptors {self.fds_after_warmup} -> {self.fds_end}")
        return out

    def text(self) -> str:
        lines = [
            f"fuzz cases: {self.cases} (the first {self.warmup} a warm-up, checked too) in "
            f"{self.seconds:.0f} s ({self.cases / self.seconds:.0f} per s)",
            f"node RSS: warm-up peak {self.rss_after_warmup_kib / 1024:.1f} MiB, at the end "
            f"{self.rss_end_kib / 1024:.1f} MiB ({self.rss_change:+.1%}); "
            f"file descriptors {self.fds_after_warmup} -> {self.fds_end}; "
            f"node alive: {self.node_alive}, exit status on SIGTERM: {self.exit_status}",
            "outcomes (mutation -> status or reaction):",
            *(f"  {n:6d}  {k}" for k, n in sorted(self.outcomes.items())),
            f"violations: {len(self.problems)}",
            *(f"  {p}" for p in self.problems[:50]),
        ]
        return "\n".join(lines)


def run_fuzz(
    cases_total: int,
    *,
    seed: int = 0,
    workdir: Path,
    keep_dir: Path | None = None,
    warmup: int | None = None,
    receiver_processes: int = 1,
) -> Report:
    """Start a node in ``workdir``, send a warm-up then ``cases_total`` cases, stop it; the
    figures. The node's RSS climbs to its working set while it meets its first few hundred
    cases (the largest objects, a thread per connection, glibc keeping what was freed) and
    is flat after that. The RSS baseline is that working set: the highest RSS seen during
    the warm-up (sampled every 50 cases, and once idle at its end); the end of the run must
    stay within 10 % of it. Warm-up: 1,000 cases, or the run's size when smaller."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, never re-encoded
    for name in ("pynetdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warmup = min(cases_total, DEFAULT_WARMUP) if warmup is None else warmup
    target = FuzzTarget(workdir, receiver_processes)
    tally = Tally()
    uids = UidSource()
    study_uids = tuple(uids() for _ in range(4))
    baseline: dict[str, int] = {}
    warmup_peak = [0]
    started = time.monotonic()
    target.start()
    try:

        def one(case: Case | RawCase) -> None:
            if 0 < tally.cases < warmup and tally.cases % RSS_SAMPLE_EVERY == 0:
                warmup_peak[0] = max(warmup_peak[0], rss_kib(target.pids()))
            if tally.cases == warmup:
                target.release()
                time.sleep(0.5)
                pids = target.pids()
                baseline.update(
                    rss=max(warmup_peak[0], rss_kib(pids)),
                    fds=fd_count(pids, ignore_suffixes=DATABASE_FILES),
                )
            if isinstance(case, Case):
                outcome, violation = target.store(case)
            else:
                outcome, violation = target.raw(case)
            if violation and keep_dir is not None:
                keep(case, tally.cases, keep_dir)
            tally.add(case.mutation if isinstance(case, Case) else f"raw_{case.mutation}",
                      outcome, violation)  # fmt: skip

        dataset_cases = cases(uids, study_uids)
        strategy = st.one_of(dataset_cases, dataset_cases, dataset_cases, raw_cases())
        test = settings(
            max_examples=warmup + cases_total,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )(hypothesis_seed(seed)(given(strategy)(one)))
        try:
            test()
        except Exception as exc:  # a failure of the fuzzer itself: say what, not the bytes
            raise RuntimeError(
                f"fuzzer failed at case {tally.cases}: {type(exc).__name__}"
            ) from None
        target.release()
        settle_after_run(target, baseline.get("fds", 0))
        alive = target.node.alive()
        pids = target.pids() if alive else []
        report = Report(
            cases=tally.cases,
            warmup=warmup,
            seconds=time.monotonic() - started,
            outcomes={
                **tally.outcomes,
                CODEC_CORRUPT: target.codec_corrupt,
            },
            violations=tally.violations,
            rss_after_warmup_kib=baseline.get("rss", 1),
            rss_end_kib=rss_kib(pids) if alive else 0,
            fds_after_warmup=baseline.get("fds", 0),
            fds_end=fd_count(pids, ignore_suffixes=DATABASE_FILES) if alive else 0,
            node_alive=alive,
        )
        return dataclasses.replace(report, exit_status=target.stop())
    finally:
        target.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--receiver-processes", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help="cases sent (and checked) before the RSS and fd baseline")  # fmt: skip
    parser.add_argument("--keep", type=Path, help="write the bytes of each violating case here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacsclip-fuzz-") as tmp:
        report = run_fuzz(
            args.cases,
            seed=args.seed,
            workdir=Path(tmp),
            keep_dir=args.keep,
            warmup=args.warmup,
            receiver_processes=args.receiver_processes,
        )
        print(report.text())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
