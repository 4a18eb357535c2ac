"""Who may talk to the node: the calling-AE allow-list and DICOM TLS."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Any

from plugin.settings import CallerRule, Settings


@dataclass(frozen=True)
class CallerPolicy:
    """``called_ae_title``: the AE title callers must address, or None to accept any."""

    rules: tuple[CallerRule, ...]
    called_ae_title: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> CallerPolicy:
        called = settings.ae_title if settings.check_called_ae_title else None
        return cls(tuple(settings.allowed_callers), called)

    @property
    def open_to_all(self) -> bool:
        return not self.rules

    def allows(self, ae_title: str, host: str) -> bool:
        return self.open_to_all or any(rule.allows(ae_title, host) for rule in self.rules)

    def recognises_called(self, ae_title: str) -> bool:
        return self.called_ae_title is None or ae_title == self.called_ae_title


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose handshake happens in the association's own thread.

    pynetdicom wraps each accepted socket inside its accept loop; a handshake there
    would let one silent client block every other caller. Deferred, the handshake
    runs on the first read, bounded by ``handshake_timeout_s``.
    """

    handshake_timeout_s: float = 30.0

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False, **kwargs: Any
    ) -> ssl.SSLSocket:
        sock.settimeout(self.handshake_timeout_s)
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side=server_side, **kwargs)


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the listening socket; with a CA configured, callers must present a certificate."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_cert, keyfile=settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
