"""Synthetic demo studies on disk: DICOM radiographs, their reports and their ground truth.

For a newcomer with no DICOM of their own: ``pacsclip demo studies`` writes ``count`` cases of
the demo generator (:mod:`plugin.demo.sites`) as one study each, ready to send to the node with
``storescu``, with the generator's report for each case (held-out phrasings, which the demo
model never trained on) and its ground truth per finding. Everything is synthetic, not patient
data and not for clinical use.

Case ``i`` depends only on (seed, site, shift, i): the same arguments write byte-identical
files. A shift keeps the site's patients (same phantoms, same truth, same reports) and
acquires them with the shifted profile instead, so only the pixels and the site change.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from plugin.demo.phantom import DEFAULT_SIZE, FINDINGS
from plugin.demo.radiographs import synthetic_radiograph
from plugin.demo.reports import HELDOUT, SentenceIndex, build_sentence_bank, report_text
from plugin.demo.sites import SHIFTED_SITE, SITES, Case, SiteProfile, simulate_case
from plugin.errors import PacsclipError

logger = logging.getLogger(__name__)

# The demo streams of plugin.demo.train and plugin.demo.radiographs use 1 to 4 and the
# fine-tuning benchmark 31 to 33; these studies are none of their cases.
STREAM_DEMO_STUDIES: Final = 5
STREAM_DEMO_REPORTS: Final = 6
# The bundled demo model split its sentence bank with seed 0 (DemoConfig.seed): held-out
# phrasings of that split are sentences the model never read.
SENTENCE_BANK_SEED: Final = 0
MAX_COUNT: Final = 100_000
MAX_SEED: Final = 9_999_999  # AccessionNumber DEMO{seed:02d}{index:05d} stays within 16 chars
DEFAULT_SITE: Final = SITES[0].name
SHIFTS: Final[dict[str, SiteProfile]] = {SHIFTED_SITE.name: SHIFTED_SITE}
STUDY_DATE: Final = "20240101"
STUDY_TIME: Final = "120000"
PATIENT_NAME: Final = "Synthetic^Demo"
MANUFACTURER: Final = "pacsclip demo generator"
STUDY_DESCRIPTION: Final = "synthetic demo - not for clinical use"
STUDIES_FOLDER: Final = "studies"
REPORTS_FILE: Final = "reports.csv"
TRUTH_FILE: Final = "truth.csv"
README_FILE: Final = "README.txt"
_UID_NAMESPACE: Final = "pacsclip-demo-studies"


class DemoStudiesError(PacsclipError):
    """The demo studies cannot be written as asked; the message says what to change."""


@dataclass(frozen=True)
class DemoStudiesSummary:
    """What :func:`write_demo_studies` wrote."""

    out: Path
    count: int
    seed: int
    site: str  # the case mix's site
    shift: str | None  # the shifted acquisition profile, if any
    institution: str  # InstitutionName of every study: the acquiring profile's name
    studies_dir: Path
    reports_csv: Path
    truth_csv: Path
    readme: Path
    positives: dict[str, int]  # studies with each finding present

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "count": self.count,
            "seed": self.seed,
            "site": self.site,
            "shift": self.shift,
            "institution": self.institution,
            "studies_dir": str(self.studies_dir),
            "reports_csv": str(self.reports_csv),
            "truth_csv": str(self.truth_csv),
            "readme": str(self.readme),
            "positives": dict(self.positives),
        }


def site_names() -> list[str]:
    return [site.name for site in SITES]


def shift_names() -> list[str]:
    return list(SHIFTS)


def acquisition_profile(site: str | None, shift: str | None) -> SiteProfile:
    """The site's profile, or the shifted profile acquiring the site's case mix."""
    by_name = {profile.name: profile for profile in SITES}
    chosen = by_name.get(site or DEFAULT_SITE)
    if chosen is None:
        raise DemoStudiesError(
            f"unknown demo site {site!r}; choose one of {', '.join(site_names())}"
        )
    if shift is None:
        return chosen
    shifted = SHIFTS.get(shift)
    if shifted is None:
        raise DemoStudiesError(
            f"unknown demo shift {shift!r}; choose one of {', '.join(shift_names())}"
        )
    return replace(shifted, prevalence=chosen.prevalence)


def accession_number(seed: int, index: int) -> str:
    return f"DEMO{seed:02d}{index:05d}"


def write_demo_studies(
    out: Path,
    count: int,
    seed: int,
    site: str | None = None,
    shift: str | None = None,
    size: int = DEFAULT_SIZE,
) -> DemoStudiesSummary:
    """Write ``count`` synthetic studies under ``out/studies``, with reports, truth and a README."""
    if not 1 <= count <= MAX_COUNT:
        raise DemoStudiesError(f"count must be between 1 and {MAX_COUNT}, not {count}")
    if not 0 <= seed <= MAX_SEED:
        raise DemoStudiesError(f"seed must be between 0 and {MAX_SEED}, not {seed}")
    profile = acquisition_profile(site, shift)
    site_name = site or DEFAULT_SITE
    studies_dir = out / STUDIES_FOLDER
    if studies_dir.is_dir() and any(studies_dir.iterdir()):
        raise DemoStudiesError(
            f"{studies_dir} already holds files; choose another --out or empty it first"
        )
    studies_dir.mkdir(parents=True, exist_ok=True)

    index = SentenceIndex(build_sentence_bank(SENTENCE_BANK_SEED).select(HELDOUT))
    positives = dict.fromkeys(FINDINGS, 0)
    reports: list[tuple[str, str]] = []
    truths: list[list[str | int]] = []
    entropy = [_UID_NAMESPACE, str(seed), site_name, shift or ""]
    for i in range(count):
        case = simulate_case(
            np.random.SeedSequence(seed, spawn_key=(STREAM_DEMO_STUDIES, i)),
            sites=(profile,),
            size=size,
        )
        ds = demo_radiograph(case, [*entropy, str(i)], accession_number(seed, i), i)
        study_uid, sop_uid = ds.StudyInstanceUID, ds.SOPInstanceUID
        study_dir = studies_dir / study_uid
        study_dir.mkdir()
        ds.save_as(study_dir / f"{sop_uid}.dcm", enforce_file_format=True)

        truth = case.phantom.truth
        rng = np.random.default_rng([seed, STREAM_DEMO_REPORTS, i])
        reports.append(
            (study_uid, report_text(index.sentences[j] for j in index.compose(truth, rng)))
        )
        present = [int(bool(truth[name]["present"])) for name in FINDINGS]
        truths.append([study_uid, ds.AccessionNumber, case.site, *present])
        for name, value in zip(FINDINGS, present, strict=True):
            positives[name] += value

    reports_csv, truth_csv, readme = out / REPORTS_FILE, out / TRUTH_FILE, out / README_FILE
    _write_csv(reports_csv, ["study_uid", "text"], reports)
    _write_csv(truth_csv, ["study_uid", "accession", "site", *FINDINGS], truths)
    readme.write_text(readme_text(count, profile.name), encoding="utf-8")
    logger.info(
        "demo studies written count=%d seed=%d site=%s shift=%s", count, seed, site_name, shift
    )
    return DemoStudiesSummary(
        out=out,
        count=count,
        seed=seed,
        site=site_name,
        shift=shift,
        institution=profile.name,
        studies_dir=studies_dir,
        reports_csv=reports_csv,
        truth_csv=truth_csv,
        readme=readme,
        positives=positives,
    )


def demo_radiograph(case: Case, uid_sources: list[str], accession: str, index: int) -> Dataset:
    """The case's radiograph (plugin.demo.radiographs) as one demo study, UIDs from the sources.

    Nothing in it depends on the clock, so the same inputs give the same bytes; the patient
    attributes are synthetic placeholders.
    """
    ds = synthetic_radiograph(case, generate_uid(entropy_srcs=[*uid_sources, "study"]))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[*uid_sources, "instance"]
    )
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*uid_sources, "series"])
    ds.AccessionNumber = accession
    ds.InstitutionName = case.site
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "SYN"  # synthetic image
    ds.PatientID = f"DEMO-{accession.removeprefix('DEMO')}"
    ds.PatientName = PATIENT_NAME
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ""
    ds.PatientOrientation = ""
    ds.StudyDescription = STUDY_DESCRIPTION
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.StudyID = str(index + 1)
    ds.SeriesNumber = ds.InstanceNumber = 1
    return ds


def readme_text(count: int, institution: str) -> str:
    return (
        f"These {count} studies are synthetic demo studies made by `pacsclip demo studies` "
        f"from the demo generator's phantoms, acquired as simulated site {institution!r}: they "
        "are not patient data and not for clinical use. From this folder, send them to a "
        "running pacsclip node with `TCP_NODELAY=1 /usr/bin/storescu +sd +r -aec PACSCLIP "
        f"127.0.0.1 11112 {STUDIES_FOLDER}/`, then import their reports with `pacsclip report "
        f"import {REPORTS_FILE}`; {TRUTH_FILE} holds each study's ground truth per finding "
        "(1 present, 0 absent) to check the results against.\n"
    )


def _write_csv(path: Path, header: list[str], rows: list[Any]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
