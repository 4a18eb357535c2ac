"""Plain records passed between the DICOM node and the catalog."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class ReceivedObject:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    institution_name: str | None
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    station_name: str | None
    institutional_department_name: str | None

    def tag_values(self, calling_ae_title: str) -> dict[str, str | None]:
        """Values by DICOM keyword (plus ``calling_ae_title``) for site keys and routing."""
        return {
            "calling_ae_title": calling_ae_title,
            "InstitutionName": self.institution_name,
            "StationName": self.station_name,
            "InstitutionalDepartmentName": self.institutional_department_name,
            "Modality": self.modality,
            "BodyPartExamined": self.body_part_examined,
        }


@dataclass(frozen=True)
class Peer:
    """The other end of an association."""

    calling_ae_title: str
    host: str | None


@dataclass(frozen=True)
class SpooledInstance:
    """An instance whose file is durable in the spool, to be cataloged."""

    obj: ReceivedObject
    site_key: str
    peer: Peer
    path: str
    size_bytes: int
    sha256: str


class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


@dataclass(frozen=True)
class Recorded:
    outcome: StoreOutcome
    reopened: bool  # the study had been completed and must be analysed again
