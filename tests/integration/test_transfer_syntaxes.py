"""Every accepted transfer syntax arrives as sent: same syntax, same pixel data bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from plugin import dicom_status as status
from tests.integration.conftest import RunningNode
from tests.peers.data import pydicom_data_dir
from tests.peers.dcmtk import storescu


def sample_file(name: str, tmp_path: Path) -> Path:
    """A copy of a pydicom sample file, given the UIDs a few samples lack."""
    found = get_testdata_file(name)
    if found is None:  # files of the pydicom-data package are not indexed offline
        found = str(pydicom_data_dir() / name)
    ds = dcmread(found)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    copy = tmp_path / name
    ds.save_as(copy)
    return copy


CASES = [
    ("MR_small_implicit.dcm", "-xi", "1.2.840.10008.1.2"),
    ("image_dfl.dcm", "-xd", "1.2.840.10008.1.2.1.99"),
    ("MR_small_RLE.dcm", "-xr", "1.2.840.10008.1.2.5"),
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"),
    ("JPGExtended.dcm", "-xx", "1.2.840.10008.1.2.4.51"),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "-xs", "1.2.840.10008.1.2.4.70"),
    ("MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),
    ("JPEGLSNearLossless_16.dcm", "-xu", "1.2.840.10008.1.2.4.81"),
    ("MR_small_jp2klossless.dcm", "-xv", "1.2.840.10008.1.2.4.90"),
    ("693_J2KI.dcm", "-xw", "1.2.840.10008.1.2.4.91"),
]


@pytest.mark.parametrize(("name", "propose", "transfer_syntax"), CASES)
def test_transfer_syntax_is_stored_as_received(
    start_node: Callable[..., RunningNode],
    tmp_path: Path,
    name: str,
    propose: str,
    transfer_syntax: str,
) -> None:
    source = sample_file(name, tmp_path)
    sent = dcmread(source)
    assert sent.file_meta.TransferSyntaxUID == transfer_syntax
    node = start_node()

    result = storescu([source], "127.0.0.1", node.port, aec="PACSCLIP", extra_args=[propose])

    assert result.statuses == [status.SUCCESS]
    [path] = list(node.settings.spool_dir.glob("*/*/*.dcm"))
    stored = dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.PixelData == sent.PixelData
