"""OHIF, the open web viewer, as a test peer: its npm build and Orthanc's DICOMweb on one origin.

``scripts/bootstrap`` unpacks the npm package ``@ohif/app`` into ``.cache/ohif/`` once; its
``dist/`` folder is a single-page app. :class:`OhifServer` starts this module as a process
(``python -m tests.peers.ohif``) that listens on 127.0.0.1 and answers

- ``/dicom-web/...``: forwarded to Orthanc's DICOMweb plugin (the Host header kept, so the bulk
  data URIs Orthanc writes into WADO-RS metadata point back at this origin);
- ``/app-config.js``: a configuration whose only data source is this origin's ``/dicom-web``,
  with the settings Orthanc's own OHIF integration uses;
- a file of ``dist/`` when one matches the path, else ``index.html`` (OHIF's router then
  reads ``/viewer?StudyInstanceUIDs=...`` in the browser).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import urllib.parse
from collections.abc import Sequence
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from tests.peers.dcmtk import stop_process
from tests.peers.ports import free_port, wait_for_port

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
OHIF_VERSION: Final = "3.13.2"
# Where scripts/bootstrap unpacks `npm pack @ohif/app@OHIF_VERSION` (ignored by git).
OHIF_DIST: Final = REPO_ROOT / ".cache" / "ohif" / OHIF_VERSION / "package" / "dist"
DICOMWEB_PREFIX: Final = "/dicom-web"

# Response headers not passed on from Orthanc: hop-by-hop ones, and those this proxy sets.
_NOT_FORWARDED: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}
)
_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
}


def ohif_installed(dist: Path = OHIF_DIST) -> bool:
    return (dist / "index.html").is_file() and (dist / "app-config.js").is_file()


def app_config(dicomweb_root: str = DICOMWEB_PREFIX) -> str:
    """OHIF's ``app-config.js`` with one DICOMweb data source at ``dicomweb_root``.

    The data source settings are those of Orthanc's OHIF integration: Orthanc's QIDO-RS
    ignores ``includefield``, thumbnails and frames come over WADO-RS, and the pixel data of
    SR-referenced and SEG instances is read through the bulk data URIs of the metadata.
    """
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc DICOMweb",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [data_source],
    }
    # The viewer's onboarding tour would cover the viewport: mark it as seen already.
    skip_tour = "window.localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
    return f"{skip_tour}\nwindow.config = {json.dumps(config, indent=2)};\n"


class OhifHandler(BaseHTTPRequestHandler):
    """One request: a DICOMweb call to forward, the generated config, or a file of the app."""

    protocol_version = "HTTP/1.1"

    def __init__(self, *args: object, dist: Path, orthanc: str, config: bytes) -> None:
        self.dist, self.orthanc, self.config = dist, urllib.parse.urlsplit(orthanc), config
        super().__init__(*args)  # type: ignore[arg-type]

    def _is_dicomweb(self) -> bool:
        path = urllib.parse.urlsplit(self.path).path
        return path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/")

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if self._is_dicomweb():
            self._forward()
        elif path == "/app-config.js":
            self._answer(200, _CONTENT_TYPES[".js"], self.config)
        else:
            self._serve_file(path)

    def do_POST(self) -> None:
        """STOW-RS and other DICOMweb posts go to Orthanc; nothing else of its API is exposed."""
        if self._is_dicomweb():
            self._forward()
        else:
            self.close_connection = True  # its body is left unread
            self._answer(404, _CONTENT_TYPES[".txt"], b"not found\n")

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            name: value
            for name in ("Accept", "Content-Type", "Host", "Range")
            if (value := self.headers.get(name)) is not None
        }
        connection = http.client.HTTPConnection(
            self.orthanc.hostname or "127.0.0.1", self.orthanc.port, timeout=60
        )
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            forwarded = [
                (name, value)
                for name, value in response.getheaders()
                if name.lower() not in _NOT_FORWARDED
            ]
            status = response.status
        finally:
            connection.close()
        self.send_response(status)
        for name, value in forwarded:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve_file(self, path: str) -> None:
        relative = urllib.parse.unquote(path).lstrip("/")
        candidate = (self.dist / relative).resolve() if relative else self.dist / "index.html"
        inside = candidate.is_relative_to(self.dist)
        if not (inside and candidate.is_file()):
            if Path(relative).suffix:  # a missing asset, not a route of the app
                self._answer(404, _CONTENT_TYPES[".txt"], b"not found\n")
                return
            candidate = self.dist / "index.html"
        content_type = _CONTENT_TYPES.get(candidate.suffix, "application/octet-stream")
        self._answer(200, content_type, candidate.read_bytes())

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")


def serve(dist: Path, orthanc: str, port: int) -> None:
    """Answer on 127.0.0.1:port until terminated."""
    handler = partial(
        OhifHandler, dist=dist.resolve(), orthanc=orthanc, config=app_config().encode()
    )
    with ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        server.daemon_threads = True
        server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OHIF's build and Orthanc's DICOMweb, one origin")
    parser.add_argument("--dist", type=Path, default=OHIF_DIST)
    parser.add_argument("--orthanc", required=True, help="Orthanc's HTTP URL on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.dist, args.orthanc, args.port)


class OhifServer:
    """Start the one-origin server as a child process on a free port; stop it by PID on exit.

    Its log (one line per request) is ``log_path``.
    """

    def __init__(
        self,
        orthanc_url: str,
        log_path: Path,
        *,
        dist: Path = OHIF_DIST,
        start_timeout_s: float = 15,
    ) -> None:
        self.orthanc_url, self.log_path, self.dist = orthanc_url, log_path, dist
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def viewer_url(self, study_instance_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_instance_uid)}"

    def __enter__(self) -> Self:
        if not ohif_installed(self.dist):
            raise RuntimeError(f"OHIF's build is not in {self.dist} (scripts/bootstrap puts it)")
        self.port = free_port()
        command = [sys.executable, "-m", "tests.peers.ohif", "--dist", str(self.dist)]
        command += ["--orthanc", self.orthanc_url, "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            wait_for_port("127.0.0.1", self.port, self.start_timeout_s, process=self._process)
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


if __name__ == "__main__":
    main()
