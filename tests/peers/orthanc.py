"""Debian's Orthanc as a throwaway DICOM peer with a REST client built on urllib."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.peers.dcmtk import dcmtk_env, stop_process
from tests.peers.ports import free_port

ORTHANC = "/usr/sbin/Orthanc"
# Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS under /dicom-web/ (a web viewer's API).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web/"


def dicomweb_installed() -> bool:
    return DICOMWEB_PLUGIN.is_file()


class OrthancError(RuntimeError):
    """Orthanc answered an HTTP error; the message carries its JSON explanation."""


class OrthancServer:
    """Start Orthanc on free ports from a config in a work directory; stop it by PID on exit.

    ``modalities`` maps a name to (AET, host, port) of DICOM peers Orthanc may C-STORE to.
    ``dicomweb`` loads Debian's DICOMweb plugin, which serves the studies under ``/dicom-web/``.
    The work directory (storage, index, config, orthanc.log) is ``workdir`` when given and kept,
    else a temporary directory removed on exit.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        stable_age_s: int = 1,
        workdir: Path | None = None,
        start_timeout_s: float = 30,
        http_port: int | None = None,
        dicom_port: int | None = None,
        dicomweb: bool = False,
    ) -> None:
        self.aet = aet
        self.dicomweb = dicomweb
        self.modalities = dict(modalities or {})
        self.stable_age_s = stable_age_s
        self.start_timeout_s = start_timeout_s
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # Fixed ports let a test stop Orthanc and start it again where its peers expect it.
        self.fixed_ports = (http_port, dicom_port)
        self.http_port = 0
        self.dicom_port = 0
        self.log_path = Path()

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running Orthanc, for a caller that stops it by its PID itself."""
        return self._process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> Self:
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="orthanc-")
            self._workdir = Path(self._tempdir.name)
        workdir = self._workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = (
            self.fixed_ports[0] or free_port(),
            (self.fixed_ports[1] or free_port()),
        )
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.log_path = workdir / "orthanc.log"
        config = workdir / "orthanc.json"
        config.write_text(json.dumps(self._config(workdir), indent=2))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [ORTHANC, str(config)],
                cwd=workdir,
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            self._wait_until_up(self._process)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            stop_process(self._process, timeout_s=10)
            self._process = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._workdir = None

    def _config(self, workdir: Path) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": "pacsclip-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": self.stable_age_s,
            "Plugins": [],
            "DicomModalities": {
                name: {"AET": aet, "Host": host, "Port": port}
                for name, (aet, host, port) in self.modalities.items()
            },
        }
        if self.dicomweb:
            if not dicomweb_installed():
                raise RuntimeError(f"Orthanc's DICOMweb plugin is not installed: {DICOMWEB_PLUGIN}")
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            # No "Host": the bulk data URIs in WADO-RS metadata name the host the request came
            # to, so a proxy in front of Orthanc (one origin for a viewer) gets its own URIs.
            config["DicomWeb"] = {
                "Enable": True,
                "Root": DICOMWEB_ROOT,
                "EnableWado": False,
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
        return config

    def _wait_until_up(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {process.returncode} at start; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise TimeoutError(
            f"Orthanc REST API not up on {self.url} after {self.start_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    # REST

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float = 60
    ) -> bytes:
        """One REST call; HTTP errors become OrthancError with Orthanc's explanation."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body) or b"null")

    def upload(self, path_or_bytes: Path | str | bytes) -> dict[str, Any]:
        """POST /instances with one Part 10 file; returns Orthanc's answer (ID, Status, ...)."""
        data = (
            path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        )
        answer: dict[str, Any] = self.post("/instances", data)
        return answer

    def studies(self) -> list[str]:
        studies: list[str] = self.get("/studies")
        return studies

    def study(self, orthanc_id: str) -> dict[str, Any]:
        study: dict[str, Any] = self.get(f"/studies/{orthanc_id}")
        return study

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc id of the study with this StudyInstanceUID, or None."""
        matches = self.post("/tools/lookup", study_instance_uid.encode())
        return next((m["ID"] for m in matches if m["Type"] == "Study"), None)

    def study_instances(self, orthanc_id: str) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = self.get(f"/studies/{orthanc_id}/instances")
        return instances

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM peer after start (PUT /modalities/NAME)."""
        body = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
        self.request("PUT", f"/modalities/{name}", body)
        self.modalities[name] = (aet, host, port)

    def store_to_modality(
        self, modality_name: str, resources: list[str], synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE Orthanc resources (any level) to a declared modality."""
        answer: dict[str, Any] = self.post(
            f"/modalities/{modality_name}/store",
            {"Resources": resources, "Synchronous": synchronous},
        )
        return answer

    def echo(self, modality_name: str) -> bool:
        """C-ECHO a declared modality; False when it does not answer Success."""
        try:
            self.request("POST", f"/modalities/{modality_name}/echo", b"{}")
        except OrthancError:
            return False
        return True

    def wait_for_instances(self, study_instance_uid: str, count: int, timeout_s: float) -> str:
        """Wait until Orthanc holds at least count instances of the study; return its Orthanc id."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            orthanc_id = self.find_study(study_instance_uid)
            if orthanc_id is not None:
                seen = len(self.study_instances(orthanc_id))
                if seen >= count:
                    return orthanc_id
            time.sleep(0.1)
        raise TimeoutError(
            f"Orthanc holds {seen} of {count} instances of study {study_instance_uid} "
            f"after {timeout_s:.1f} s"
        )
