"""pacsclip's results as DICOM: a TID 1500 SR and a secondary-capture overlay per study.

Pure code (datasets, arrays and the dataclasses of `model` in, highdicom objects out); the
worker writes and dispatches them. UIDs come from `uids`, derived from the study and the
model version, so a redelivered task rebuilds identical objects.
"""

from plugin.disclaimers import NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL
from plugin.results.overlay import build_overlay, overlay_text_lines, render_overlay
from plugin.results.sr import build_measurement_report
from plugin.results.study_result import (
    AlgorithmIdentity,
    Decision,
    DistributionCheck,
    FindingCode,
    FindingResult,
    Priority,
    ResultBuildError,
    StudyResult,
)
from plugin.results.uids import ResultUids, device_uid, result_uid, tracking_uid

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "SYNTHETIC_MODEL",
    "AlgorithmIdentity",
    "Decision",
    "DistributionCheck",
    "FindingCode",
    "FindingResult",
    "Priority",
    "ResultBuildError",
    "ResultUids",
    "StudyResult",
    "build_measurement_report",
    "build_overlay",
    "device_uid",
    "overlay_text_lines",
    "render_overlay",
    "result_uid",
    "tracking_uid",
]
