"""Who may talk to the node: the calling-AE allow-list and DICOM TLS."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from plugin.settings import CallerRule, Settings


@dataclass(frozen=True)
class CallerPolicy:
    rules: tuple[CallerRule, ...]

    @property
    def open_to_all(self) -> bool:
        return not self.rules

    def allows(self, ae_title: str, host: str) -> bool:
        return self.open_to_all or any(rule.allows(ae_title, host) for rule in self.rules)


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the listening socket; with a CA configured, callers must present a certificate."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_cert, keyfile=settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
