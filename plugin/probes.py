"""``/metrics`` and ``/health`` of a process that has no HTTP API of its own (a standalone DICOM
node, a worker), on one port of its own.

``/health`` answers 200 ``{"status": "ok", ...}`` when the process is ready and 503
``{"status": "unavailable", "reason": ...}`` otherwise, so that a probe and an operator both see
why. Every other path serves the Prometheus registry.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

logger = logging.getLogger(__name__)

HEALTH_PATH = "/health"


@dataclass(frozen=True)
class Health:
    ready: bool
    reason: str  # why not ready; what the process is doing when ready

    def as_dict(self) -> dict[str, str]:
        return {"status": "ok" if self.ready else "unavailable", "reason": self.reason}


class Readiness:
    """A readiness that the process sets as it starts (thread-safe); not ready at first."""

    def __init__(self, reason: str) -> None:
        self._health = Health(False, reason)
        self._lock = threading.Lock()

    def set_ready(self, reason: str = "ready") -> None:
        with self._lock:
            self._health = Health(True, reason)

    def set_not_ready(self, reason: str) -> None:
        with self._lock:
            self._health = Health(False, reason)

    def check(self) -> Health:
        with self._lock:
            return self._health


Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def probe_app(
    registry: CollectorRegistry, health: Callable[[], Health]
) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """The WSGI app: ``/health`` from ``health``, anything else the registry."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        result = health()
        start_response(
            "200 OK" if result.ready else "503 Service Unavailable",
            [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        )
        return [json.dumps(result.as_dict()).encode()]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


class ProbeServer:
    """``probe_app`` served from a thread on ``host:port`` until ``stop()``."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, health: Callable[[], Health]
    ) -> None:
        try:
            self._server = make_server(
                host,
                port,
                probe_app(registry, health),
                server_class=_ThreadingServer,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"metrics and health port {host}:{port}: {exc.strerror}"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> ProbeServer:
        self._thread.start()
        logger.info("metrics and health on %s:%d", self._server.server_address[0], self.port)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
