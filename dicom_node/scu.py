"""Outgoing DICOM requests the node makes: C-ECHO, and C-FIND for a study's instance count."""

from __future__ import annotations

import logging
import ssl

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from plugin.settings import DicomPeer

logger = logging.getLogger(__name__)


PENDING, PENDING_WARNING = 0xFF00, 0xFF01


class AssociationFailed(Exception):
    """The peer did not accept an association; the message says which peer."""


class QueryFailed(Exception):
    """The peer accepted the association but the query did not succeed."""


def echo(
    peer: DicomPeer,
    *,
    calling_ae_title: str,
    timeout_s: float = 10,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> int:
    """C-ECHO the peer, over TLS when ``tls`` is given (the peer's certificate checked against
    ``server_name``, default its host); returns the DIMSE status (0x0000 is success)."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    tls_args = None if tls is None else (tls, server_name or peer.host)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        how = " (or the TLS handshake failed)" if tls is not None else ""
        raise AssociationFailed(
            f"{peer.ae_title}@{peer.host}:{peer.port} refused the association{how}"
        )
    try:
        response = assoc.send_c_echo()
        return int(response.Status) if "Status" in response else -1
    finally:
        assoc.release()


def query_study_instance_count(
    peer: DicomPeer, study_uid: str, *, calling_ae_title: str, timeout_s: float = 10
) -> int | None:
    """Ask a PACS for NumberOfStudyRelatedInstances; None when it does not say."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedInstances = ""
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise AssociationFailed(f"{peer.ae_title}@{peer.host}:{peer.port} refused the association")
    count: int | None = None
    final: int | None = None
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            final = int(status.Status) if "Status" in status else None
            if final in (PENDING, PENDING_WARNING) and identifier is not None:
                value = identifier.get("NumberOfStudyRelatedInstances")
                if value not in (None, ""):
                    count = int(value)
    finally:
        assoc.release()
    if final is None:
        raise QueryFailed(f"C-FIND to {peer.ae_title} got no response (aborted or timed out)")
    if final != 0x0000:
        raise QueryFailed(f"C-FIND to {peer.ae_title} failed with status 0x{final:04X}")
    return count
