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
from multiprocessing.sharedctypes import Synchronized
from typing import cast

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.ae import build_ae
from dicom_node.association_limit import AssociationLimit
from dicom_node.handlers import store_handlers
from dicom_node.intake import Receiver
from dicom_node.intake_events import EventSink
from dicom_node.security import CallerPolicy, server_ssl_context
from dicom_node.spool import Quarantine, Spool
from plugin.settings import Settings

logger = logging.getLogger(__name__)


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


def start_receiving(
    settings: Settings, sink: EventSink, *, port: int, open_connections: Synchronized[int]
) -> ReusePortAssociationServer:
    """Listen on ``(settings.dicom_host, port)``; returns once the socket listens.

    ``open_connections`` counts the connections of every receiver of the node, for the cap
    on concurrent associations."""
    receiver = Receiver(
        spool=Spool(settings.spool_dir, min_free_bytes=settings.min_free_disk_mb * 2**20),
        quarantine=Quarantine(settings.quarantine_dir),
        events=sink,
    )
    ae = build_ae(settings)
    limit = AssociationLimit(settings.max_associations, open_connections)
    policy = CallerPolicy(tuple(settings.allowed_callers))
    server = cast(
        ReusePortAssociationServer,
        ae.make_server(
            (settings.dicom_host, port),
            evt_handlers=store_handlers(receiver, policy, limit, sink),
            ssl_context=server_ssl_context(settings),
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
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    left = len(server.active_associations)
    if left:
        logger.warning("%d associations still open at shutdown; they are aborted", left)
        for assoc in server.active_associations:
            assoc.abort()
    return left


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``SO_REUSEPORT`` on the port, so a port 0 resolves to one number that
    every receiver process then binds too."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
