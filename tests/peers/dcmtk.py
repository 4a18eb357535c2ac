"""Run Debian's DCMTK tools (storescu, echoscu, storescp) against loopback peers.

Always the /usr/bin binaries: the virtualenv has pynetdicom commands with the same names.
storescu runs with ``-d`` because only the debug dump of the C-STORE-RSP carries the numeric
status ("DIMSE Status : 0x0000: Success"); ``-v`` prints a text such as "(Success)" only.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, overload

from tests.peers.ports import wait_for_port
from tests.peers.tls import TlsFiles

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"

_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response\b")
_STATUS = re.compile(r"^D: DIMSE Status\s*: 0x(?P<code>[0-9A-Fa-f]{4})\b")
_REJECTED = "Association Rejected"


@dataclass(frozen=True)
class StoreResult:
    """What one storescu run did: exit status, its output, and (path, status) per file sent.

    A status is None when storescu started sending the file but got no C-STORE response
    (unreadable file, association aborted, peer gone).
    """

    returncode: int
    stdout: str
    stderr: str
    sent: list[tuple[Path, int | None]]

    @property
    def statuses(self) -> list[int | None]:
        return [status for _, status in self.sent]

    @property
    def association_rejected(self) -> bool:
        return association_rejected(self.stdout + self.stderr)


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK tools and Orthanc: without TCP_NODELAY each image stalls ~50 ms."""
    return {**os.environ, "TCP_NODELAY": "1"}


def tls_args(tls: TlsFiles | None) -> list[str]:
    """DCMTK options for mutually authenticated TLS: own key and certificate, trusted CA."""
    if tls is None:
        return []
    return [
        "+tls", str(tls.key), str(tls.cert),
        "+cf", str(tls.ca_cert),
        "--require-peer-cert",
    ]  # fmt: skip


def association_rejected(output: str) -> bool:
    """True when a DCMTK SCU's output says the peer rejected the association (A-ASSOCIATE-RJ)."""
    return _REJECTED in output


def parse_store_output(output: str) -> list[tuple[Path, int | None]]:
    """Pair each "Sending file" line of storescu -d with the status of the response that follows."""
    sent: list[tuple[Path, int | None]] = []
    awaiting_status = False
    for line in output.splitlines():
        if match := _SENDING.match(line):
            sent.append((Path(match["path"]), None))
            awaiting_status = False
        elif _RESPONSE.match(line):
            awaiting_status = bool(sent)
        elif awaiting_status and (match := _STATUS.match(line)):
            sent[-1] = (sent[-1][0], int(match["code"], 16))
            awaiting_status = False
    return sent


def _storescu_command(
    files_or_dirs: Sequence[Path | str],
    host: str,
    port: int,
    aec: str,
    aet: str,
    tls: TlsFiles | None,
    extra_args: Sequence[str],
) -> list[str]:
    paths = [str(p) for p in files_or_dirs]
    scan = ["+sd", "+r"] if any(Path(p).is_dir() for p in paths) else []
    return [
        STORESCU, "-d", "-aet", aet, "-aec", aec, *scan, *tls_args(tls), *extra_args,
        host, str(port), *paths,
    ]  # fmt: skip


@overload
def storescu(
    files_or_dirs: Sequence[Path | str],
    host: str,
    port: int,
    *,
    aec: str,
    aet: str = ...,
    tls: TlsFiles | None = ...,
    extra_args: Sequence[str] = ...,
    timeout_s: float = ...,
    popen: Literal[False] = ...,
) -> StoreResult: ...


@overload
def storescu(
    files_or_dirs: Sequence[Path | str],
    host: str,
    port: int,
    *,
    aec: str,
    aet: str = ...,
    tls: TlsFiles | None = ...,
    extra_args: Sequence[str] = ...,
    timeout_s: float = ...,
    popen: Literal[True],
) -> tuple[subprocess.Popen[bytes], Callable[[], StoreResult]]: ...


def storescu(
    files_or_dirs: Sequence[Path | str],
    host: str,
    port: int,
    *,
    aec: str,
    aet: str = "STORESCU",
    tls: TlsFiles | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 120,
    popen: bool = False,
) -> StoreResult | tuple[subprocess.Popen[bytes], Callable[[], StoreResult]]:
    """Send files (directories are scanned recursively) with DCMTK storescu.

    storescu halts at the first unsuccessful store unless extra_args has "-nh".
    With popen=True, return the running process and a function that waits for it (bounded by
    timeout_s, killing it after that) and parses its output; the output goes to anonymous
    temporary files, so a caller that never reads it cannot block storescu on a full pipe.
    """
    command = _storescu_command(files_or_dirs, host, port, aec, aet, tls, extra_args)
    if not popen:
        done = subprocess.run(
            command,
            env=dcmtk_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return StoreResult(
            done.returncode,
            done.stdout,
            done.stderr,
            parse_store_output(done.stdout + done.stderr),
        )

    # Closed by finish(), after storescu has exited.
    out = tempfile.TemporaryFile()  # noqa: SIM115
    err = tempfile.TemporaryFile()  # noqa: SIM115
    process = subprocess.Popen(
        command, env=dcmtk_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=err
    )

    def finish() -> StoreResult:
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait(timeout=10)
        stdout, stderr = _read_and_close(out), _read_and_close(err)
        return StoreResult(returncode, stdout, stderr, parse_store_output(stdout + stderr))

    return process, finish


def _read_and_close(file: IO[bytes]) -> str:
    with file:
        file.seek(0)
        return file.read().decode(errors="replace")


def echoscu(
    host: str,
    port: int,
    *,
    aec: str,
    aet: str = "ECHOSCU",
    tls: TlsFiles | None = None,
    timeout_s: float = 30,
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO with DCMTK echoscu; returncode 0 means the peer answered Success."""
    return subprocess.run(
        [ECHOSCU, "-v", "-aet", aet, "-aec", aec, *tls_args(tls), host, str(port)],
        env=dcmtk_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@contextmanager
def storescp(
    port: int,
    output_dir: Path,
    *,
    aet: str = "STORESCP",
    tls: TlsFiles | None = None,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    start_timeout_s: float = 10,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run DCMTK storescp on 127.0.0.1:port writing received files into output_dir.

    Its verbose log goes to log_path (default: output_dir's sibling "storescp-PORT.log").
    Stopped by its PID on exit: terminate, then kill if it does not exit within 5 s.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or output_dir.parent / f"storescp-{port}.log"
    command = [
        STORESCP, "-v", "-aet", aet, "-od", str(output_dir), *tls_args(tls), *extra_args,
        str(port),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=dcmtk_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        try:
            wait_for_port("127.0.0.1", port, start_timeout_s, process=process)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"storescp did not start: {exc}; log {log_path}:\n{tail}") from exc
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 5) -> None:
    """Terminate a child we started (by its PID, via the Popen handle), kill it if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)
