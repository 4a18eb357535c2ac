"""The application entity: which SOP classes and transfer syntaxes the node accepts."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from plugin.dicom_logging import quiet_identifiers
from plugin.settings import Settings

PYNETDICOM_THREAD_CEILING = 1000

# Stored exactly as received: the node never transcodes.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]


def build_ae(settings: Settings) -> AE:
    quiet_identifiers()
    ae = AE(ae_title=settings.ae_title)
    # The cap is the node's own (AssociationLimit: open connections across all receiver
    # processes). pynetdicom's counts association threads, and the thread of a connection
    # that sent garbage lives on for the ARTIM timeout (acse_timeout) after the socket is
    # closed: a few such connections would make it refuse every sender for that long.
    ae.maximum_associations = max(settings.max_associations, PYNETDICOM_THREAD_CEILING)
    ae.require_called_aet = False
    # pynetdicom's default (16 KiB) splits a 0.5 MB image into 32 PDUs, each decoded apart.
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.network_timeout = 60
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    for context in StoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae
