"""Real DICOM test objects: copies of pydicom's CT_small (as is and upscaled to 512 x 512) and
the RG1 chest radiograph."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

# pydicom-data names its RG1 files by encoding; *R is the lossless reference, *I the lossy one.
RG1_FILES = {
    "uncompressed": "RG1_UNCR.dcm",
    "j2k": "RG1_J2KR.dcm",
    "j2k_lossy": "RG1_J2KI.dcm",
}
Rg1Encoding = Literal["uncompressed", "j2k", "j2k_lossy"]


def ct_small_copies(n: int, out_dir: Path, study_uid: str | None = None) -> list[Path]:
    """Write n copies of CT_small.dcm as one new series of one study (fresh UIDs) into out_dir."""
    source = get_testdata_file("CT_small.dcm")
    if source is None:
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not installed")
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, n + 1):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        path = out_dir / f"ct_small_{number:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def ct_512_copies(n: int, out_dir: Path, seed: int = 0) -> list[Path]:
    """Write n CT images of 512 x 512 x 16 bit (about 0.53 MB each) as one new series of one
    study: CT_small upscaled 4x, each with its own noise (so no two carry the same pixels)."""
    source = get_testdata_file("CT_small.dcm")
    if source is None:
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not installed")
    ds = pydicom.dcmread(source)
    small = ds.pixel_array
    base = np.kron(small.astype(np.int32), np.ones((4, 4), dtype=np.int32))
    info = np.iinfo(small.dtype)
    ds.Rows, ds.Columns = base.shape
    ds.PixelSpacing = [float(v) / 4 for v in ds.PixelSpacing]
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, n + 1):
        noisy = base + rng.integers(-20, 21, size=base.shape, dtype=np.int32)
        pixels = np.clip(noisy, info.min, info.max).astype(small.dtype)
        ds.PixelData = pixels.tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        path = out_dir / f"ct512_{number:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def pydicom_data_dir() -> Path:
    """The data folder of the installed pydicom-data package (module ``data_store``).

    Found without pydicom's get_testdata_files("*"), which tries to download an index offline.
    """
    spec = importlib.util.find_spec("data_store")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pydicom-data is not installed: pip install pydicom-data")
    return Path(spec.origin).parent / "data"


def rg1(encoding: Rg1Encoding = "uncompressed") -> Path:
    """The real PA chest CR RG1 (1955x1841, MONOCHROME1): explicit VR LE or JPEG 2000.

    To send a JPEG 2000 file with storescu, propose its transfer syntax (extra_args "-xv" for
    "j2k", "-xw" for "j2k_lossy"), and the receiver must accept it (storescp "+xa").
    """
    path = pydicom_data_dir() / RG1_FILES[encoding]
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in pydicom-data")
    return path
