"""From a configured destination to its sender: C-STORE (optionally over TLS) or STOW-RS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from plugin.delivery.dimse import Destination, send_files
from plugin.delivery.outcome import SendReport
from plugin.delivery.stow import StowDestination, stow_files
from plugin.settings import DestinationConfig, Settings


def stow_destination(d: DestinationConfig) -> StowDestination:
    """A configured STOW-RS destination (``d.url`` set) with its own credentials."""
    if d.url is None:
        raise ValueError(f"destination {d.name} has no DICOMweb url")
    return StowDestination(
        name=d.name,
        url=d.url,
        bearer_token=d.bearer_token.get_secret_value() if d.bearer_token else None,
        tls_ca=d.tls_ca,
        client_cert=d.tls_cert,
        client_key=d.tls_key,
    )


def send(d: DestinationConfig, files: Sequence[Path], settings: Settings) -> SendReport:
    """Send files to d by the protocol it is configured for; DispatchError unless all stored."""
    timeout = settings.dispatch_timeout_s
    if d.url is not None:
        return stow_files(stow_destination(d), files, timeout_s=timeout)
    if d.ae_title is None or d.host is None or d.port is None:  # the settings validator forbids it
        raise ValueError(f"destination {d.name} has no DICOM address")
    destination = Destination(
        name=d.name,
        ae_title=d.ae_title,
        host=d.host,
        port=d.port,
        tls=d.tls,
        tls_ca=d.tls_ca,
        tls_cert=d.tls_cert,
        tls_key=d.tls_key,
    )
    return send_files(destination, files, calling_ae_title=settings.ae_title, timeout_s=timeout)
