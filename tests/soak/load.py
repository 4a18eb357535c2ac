"""The soak's studies: three simulated sites sending small CR and CT studies with storescu.

Every study carries a distinctive patient name and ID, so that the logs can be searched for
them afterwards. A study whose push did not get Success for every instance is sent again a
moment later, as a PACS would retry it.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

from plugin import dicom_status as status
from tests.peers.dcmtk import storescu

PHI_MARK = "SOAKPHI"  # in every patient name and ID sent: a log line containing it leaks PHI


@dataclass(frozen=True)
class Site:
    ae_title: str
    institution: str
    stat: bool  # the routing rules make this site's studies STAT


SITES = (
    Site("SOAK_ER", "Soak Emergency Hospital", stat=True),
    Site("SOAK_WARD", "Soak General Hospital", stat=False),
    Site("SOAK_CLINIC", "Soak Outpatient Clinic", stat=False),
)


@dataclass
class StudyLoad:
    index: int
    study_uid: str
    site: Site
    modality: str
    files: list[Path]
    sop_uids: list[str]
    pushed_at: datetime | None = None  # start of the first push
    acknowledged: set[str] = field(default_factory=set)  # SOP instance UIDs answered Success
    pushes: int = 0

    @property
    def complete(self) -> bool:
        return len(self.acknowledged) == len(self.sop_uids)


def patient_name(index: int) -> str:
    return f"{PHI_MARK}^PATIENT{index:05d}"


def patient_id(index: int) -> str:
    return f"{PHI_MARK}{index:06d}"


def make_studies(count: int, out_dir: Path, rng: random.Random) -> list[StudyLoad]:
    """``count`` studies spread over the sites: a 1-image chest CR or a 2-4 image CT."""
    source = get_testdata_file("CT_small.dcm")
    if source is None:
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not installed")
    template = pydicom.dcmread(source)
    studies = []
    for index in range(count):
        site = SITES[index % len(SITES)]
        modality = rng.choice(["CR", "CT"])
        ds = template.copy()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName = patient_name(index)
        ds.PatientID = patient_id(index)
        ds.InstitutionName = site.institution
        ds.AccessionNumber = f"SOAK{index:06d}"
        if modality == "CR":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
            ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
        study_dir = out_dir / f"study{index:05d}"
        study_dir.mkdir(parents=True)
        files, uids = [], []
        for number in range(1, (1 if modality == "CR" else rng.randint(2, 4)) + 1):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = number
            path = study_dir / f"{number}.dcm"
            ds.save_as(path)
            files.append(path)
            uids.append(str(ds.SOPInstanceUID))
        studies.append(StudyLoad(index, str(ds.StudyInstanceUID), site, modality, files, uids))
    return studies


class Sender:
    """Pushes the studies over ``duration_s`` with ``concurrency`` storescu at a time."""

    def __init__(
        self, studies: list[StudyLoad], port: int, aec: str, duration_s: float, concurrency: int
    ) -> None:
        self.studies = studies
        self.port = port
        self.aec = aec
        self.duration_s = duration_s
        self.concurrency = concurrency
        self._next = 0
        self._lock = threading.Lock()
        self.started = 0.0
        self.finished = 0.0

    def run(self, stop: threading.Event) -> None:
        self.started = time.monotonic()
        threads = [
            threading.Thread(target=self._lane, args=(stop,), name=f"sender-{n}")
            for n in range(self.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.finished = time.monotonic()

    def _take(self) -> StudyLoad | None:
        with self._lock:
            if self._next >= len(self.studies):
                return None
            study = self.studies[self._next]
            self._next += 1
            return study

    def _lane(self, stop: threading.Event) -> None:
        interval = self.duration_s / max(1, len(self.studies))
        while not stop.is_set():
            study = self._take()
            if study is None:
                return
            # Paced: study k is due k * interval after the start.
            due = self.started + study.index * interval
            stop.wait(max(0.0, due - time.monotonic()))
            self.push_until_acknowledged(study, stop)

    def push_until_acknowledged(self, study: StudyLoad, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.duration_s + 300
        while not study.complete and not stop.is_set() and time.monotonic() < deadline:
            if study.pushed_at is None:
                study.pushed_at = datetime.now(UTC)
            study.pushes += 1
            result = storescu(
                study.files, "127.0.0.1", self.port, aec=self.aec, aet=study.site.ae_title,
                extra_args=["-nh"], timeout_s=60,
            )  # fmt: skip
            for path, code in result.sent:
                if code == status.SUCCESS:
                    study.acknowledged.add(study.sop_uids[study.files.index(path)])
            if not study.complete:
                stop.wait(1.0)  # the node is restarting: try again, as a PACS would
