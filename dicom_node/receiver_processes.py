"""Receiver processes: several on one port, so receiving scales across cores.

Each process runs the receiving server (``dicom_node.receiving``) and sends its events to the
node over one queue. A receiver stops with its node: on SIGTERM (or the node's stop) it stops
accepting and lets its open associations finish; if the node dies it is killed with it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.synchronize
import signal
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from dicom_node.intake_events import IntakeEvent
from dicom_node.receiving import dicom_port_speaks_tls, drain, start_receiving
from dicom_node.stop_signal import StopSignal
from plugin.logs import configure_logging
from plugin.settings import Settings

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 60.0
STOP_POLL_S = 0.2


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the node that started it dies (kill -9 included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("receiver cannot follow its node's death (prctl failed)")


def receiver_main(
    settings_values: dict[str, Any],
    port: int,
    tls_port: int | None,
    open_connections: Synchronized[int],
    events: Queue[IntakeEvent],
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    drain_timeout_s: float,
) -> None:
    _die_with_parent()
    # The node's settings as values: the class it built them with may be local to
    # load_settings and cannot be pickled; validation here reads no environment or file.
    settings = Settings.model_validate(settings_values)
    configure_logging(settings.log_level)
    # The node coordinates shutdown: Ctrl-C reaches the whole process group; SIGTERM may come
    # from a supervisor, to this process alone or with the node.
    terminated = StopSignal().install(sigint=False)
    servers = [
        start_receiving(
            settings,
            events,
            port=port,
            open_connections=open_connections,
            tls=dicom_port_speaks_tls(settings),
        )
    ]
    if tls_port is not None:
        servers.append(
            start_receiving(
                settings, events, port=tls_port, open_connections=open_connections, tls=True
            )
        )
    ready.set()
    while not terminated.received and not stop.wait(STOP_POLL_S):
        pass
    for server in servers:  # stop accepting on every port before waiting for any
        server.shutdown()
    for server in servers:
        drain(server, drain_timeout_s)
    events.close()
    events.join_thread()  # every event is handed to the node before the process ends


class ReceiverProcesses:
    def __init__(self, settings: Settings, count: int, *, drain_timeout_s: float) -> None:
        self.settings = settings
        self.count = count
        self.drain_timeout_s = drain_timeout_s
        # Spawned, not forked: the node has threads and database connections by now.
        self._context = multiprocessing.get_context("spawn")
        self.events: Queue[IntakeEvent] = self._context.Queue()
        self.open_connections: Synchronized[int] = self._context.Value("i", 0)
        self._stop = self._context.Event()
        self._processes: list[SpawnProcess] = []

    def start(self, port: int, tls_port: int | None = None) -> None:
        """Every process listens on ``port`` (and on ``tls_port``, with TLS, when given)."""
        readies = []
        for n in range(self.count):
            ready = self._context.Event()
            process = self._context.Process(
                target=receiver_main,
                args=(
                    self.settings.model_dump(),
                    port,
                    tls_port,
                    self.open_connections,
                    self.events,
                    ready,
                    self._stop,
                    self.drain_timeout_s,
                ),
                name=f"pacsclip-receiver-{n}",
                daemon=False,
            )
            process.start()
            self._processes.append(process)
            readies.append(ready)
        for process, ready in zip(self._processes, readies, strict=True):
            if not ready.wait(START_TIMEOUT_S):
                self.stop()
                raise RuntimeError(
                    f"receiver process {process.pid} did not start listening on port {port}"
                )
        logger.info("%d receiver processes listening on port %d", self.count, port)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._processes)

    def stop(self) -> None:
        """Stop accepting everywhere, wait for open associations, then for the processes."""
        self._stop.set()
        for process in self._processes:
            process.join(self.drain_timeout_s + 2)
            if process.is_alive():
                logger.warning("receiver process %d did not stop; killing it", process.pid)
                process.kill()
                process.join()
        self._processes.clear()
