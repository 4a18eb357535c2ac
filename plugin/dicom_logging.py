"""pynetdicom's logging, kept free of patient data for every process that speaks DICOM."""

from __future__ import annotations

from pynetdicom import _config


def quiet_identifiers() -> None:
    """Keep pynetdicom from logging datasets, which carry patient data."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
