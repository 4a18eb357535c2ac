"""Synthetic demo cases as DICOM radiographs, and the demo model's out-of-distribution reference.

A case is stored as its simulated site would store it (bit depth, MONOCHROME1 inversion), so
the images reach the model through the same DICOM decoding, windowing and resizing as a study
sent by a PACS. Each stream is its own seeded sequence of cases: training uses stream 1 and
evaluation stream 2 (:mod:`plugin.demo.train`); the reference is fitted on stream 3 and its
threshold set on stream 4, so none of the four overlap.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from plugin.bundle_ood import FittedReference, fit_ood
from plugin.demo.sites import Case, simulate_case
from plugin.errors import ConfigError
from plugin.models.bundle import load_bundle
from plugin.triage.ood import DEFAULT_QUANTILE

STREAM_OOD_FIT: Final = 3
STREAM_OOD_HELDOUT: Final = 4
DEMO_OOD_FIT: Final = 2000
DEMO_OOD_HELDOUT: Final = 2000


def synthetic_radiograph(case: Case, study_uid: str | None = None) -> Dataset:
    """A case's image as its site stores it: a chest CR with fresh UIDs, no patient data."""
    acquisition = case.acquisition
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "synthetic demo phantom - not a patient"
    pixels = acquisition.stored_pixels()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = acquisition.photometric_interpretation
    ds.BitsAllocated, ds.BitsStored = 16, acquisition.bits_stored
    ds.HighBit, ds.PixelRepresentation = acquisition.bits_stored - 1, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def demo_cases(n: int, seed: int, stream: int, size: int) -> Iterator[Case]:
    """Case ``i`` of a stream depends only on (seed, stream, i), as in plugin.demo.train."""
    for index in range(n):
        yield simulate_case(np.random.SeedSequence(seed, spawn_key=(stream, index)), size=size)


def demo_radiographs(n: int, seed: int, stream: int, size: int) -> Iterator[Dataset]:
    for case in demo_cases(n, seed, stream, size):
        yield synthetic_radiograph(case)


def fit_demo_ood(
    bundle_dir: Path,
    *,
    seed: int = 0,
    n_fit: int = DEMO_OOD_FIT,
    n_heldout: int = DEMO_OOD_HELDOUT,
    quantile: float = DEFAULT_QUANTILE,
    threads: int | None = None,
) -> FittedReference:
    """Fit a synthetic bundle's reference on fresh phantoms of the demo generator."""
    manifest = load_bundle(bundle_dir).manifest
    if not manifest.synthetic:
        raise ConfigError(
            f"{manifest.ref} is not a synthetic bundle: the demo phantoms describe only the demo "
            "model's training data; fit its reference with --images DIR of the site's images"
        )
    size = manifest.image.size
    description = (
        f"synthetic demo phantoms (plugin.demo generator, seed {seed}): {n_fit} to fit "
        f"(stream {STREAM_OOD_FIT}), {n_heldout} held out for the threshold "
        f"(stream {STREAM_OOD_HELDOUT}), {size}x{size}, all six simulated sites"
    )
    return fit_ood(
        bundle_dir,
        demo_radiographs(n_fit, seed, STREAM_OOD_FIT, size),
        demo_radiographs(n_heldout, seed, STREAM_OOD_HELDOUT, size),
        description=description,
        quantile=quantile,
        threads=threads,
    )
