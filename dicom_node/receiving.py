"""A receiving DICOM server: the AE, its handlers and the listening socket.

The node runs one in its own process, or several receiver processes each run one on the
same port (``SO_REUSEPORT``: the kernel spreads the incoming connections over them).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
import warnings
from multiprocessing.sharedctypes import Synchronized
from typing import cast

from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.ae import build_ae
from dicom_node.association_limit import AssociationLimit, reactor_died
from dicom_node.handlers import store_handlers
from dicom_node.intake import Receiver
from dicom_node.intake_events import EventSink
from dicom_node.security import CallerPolicy, server_ssl_context
from dicom_node.spool import Quarantine, Spool
from plugin.settings import Settings

logger = logging.getLogger(__name__)
# After the drain period: how long aborted associations get to send their A-ABORT.
ABORT_WAIT_S = 1.0


class ReusePortAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with ``SO_REUSEPORT``."""

    def server_bind(self) -> None:
        cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        # Stop accepting and close the socket; pynetdicom's own shutdown also unregisters
        # the server from an AE that started it, which this one was not.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def dicom_port_speaks_tls(settings: Settings) -> bool:
    """``dicom_port`` speaks TLS when TLS is configured and no ``dicom_tls_port`` takes it."""
    return settings.tls_enabled and settings.dicom_tls_port is None


def start_receiving(
    settings: Settings,
    sink: EventSink,
    *,
    port: int,
    open_connections: Synchronized[int],
    tls: bool,
) -> ReusePortAssociationServer:
    """Listen on ``(settings.dicom_host, port)``, with DICOM TLS when ``tls``; returns once the
    socket listens.

    ``open_connections`` counts the connections of every receiver of the node, for the cap
    on concurrent associations."""
    # pydicom reports each odd value it reads as a warning that names the value, and the
    # warnings module keeps every distinct message it has shown (once per location) for the
    # life of the process: a node fed malformed objects would grow without bound. pydicom
    # logs the same message to its logger, so nothing is lost.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    receiver = Receiver(
        spool=Spool(settings.spool_dir, min_free_bytes=settings.min_free_disk_mb * 2**20),
        quarantine=Quarantine(settings.quarantine_dir),
        events=sink,
    )
    ae = build_ae(settings)
    limit = AssociationLimit(settings.max_associations, open_connections)
    policy = CallerPolicy.from_settings(settings)
    server = cast(
        ReusePortAssociationServer,
        ae.make_server(
            (settings.dicom_host, port),
            evt_handlers=store_handlers(receiver, policy, limit, sink),
            ssl_context=server_ssl_context(settings) if tls else None,
            server_class=ReusePortAssociationServer,
        ),
    )
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    return server


def drain(server: ReusePortAssociationServer, timeout_s: float) -> int:
    """Stop accepting, then wait for the open associations to end; returns how many were
    still open at the deadline."""
    server.shutdown()
    deadline = time.monotonic() + timeout_s
    while (open_now := _served(server)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if open_now:
        logger.warning("%d associations still open at shutdown; they are aborted", len(open_now))
        # Not blocking: a blocking abort waits 0.1 s per association.
        for assoc in open_now:
            assoc.abort(block=False)
        abort_deadline = time.monotonic() + ABORT_WAIT_S
        while _served(server) and time.monotonic() < abort_deadline:
            time.sleep(0.05)
    return len(open_now)


def _served(server: ReusePortAssociationServer) -> list[Association]:
    """The open associations that still have a reactor: one whose reactor died on a
    malformed PDU serves nobody (its thread ends by itself at the ACSE timeout)."""
    return [a for a in server.active_associations if not reactor_died(a)]


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``SO_REUSEPORT`` on the port, so a port 0 resolves to one number that
    every receiver process then binds too."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
