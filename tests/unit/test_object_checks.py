from __future__ import annotations

import copy
from io import BytesIO

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.errors import BytesLengthException
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.object_checks import InvalidObject, Problem, inspect_dataset, read_header


@pytest.fixture
def ct() -> Dataset:
    return dcmread(get_testdata_file("CT_small.dcm"))


def encoded(ds: Dataset, implicit: bool = False) -> BytesIO:
    ds = copy.deepcopy(ds)
    ds.preamble = None
    ds.file_meta = Dataset()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
    return BytesIO(buffer.getvalue())


def inspect(ds: Dataset, sop_class: str | None = None, sop_instance: str | None = None) -> object:
    return inspect_dataset(
        lambda: read_header(encoded(ds), ExplicitVRLittleEndian),
        requested_sop_class_uid=sop_class or str(ds.SOPClassUID),
        requested_sop_instance_uid=sop_instance or str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def test_reads_the_tags_the_node_needs_and_stops_before_the_pixels(ct: Dataset) -> None:
    header = read_header(encoded(ct, implicit=True), ImplicitVRLittleEndian)

    assert header.StudyInstanceUID == ct.StudyInstanceUID
    assert header.SeriesNumber == ct.SeriesNumber
    assert "PixelData" not in header
    assert "Rows" not in header


def test_a_valid_object_is_described(ct: Dataset) -> None:
    obj = inspect(ct)

    assert obj == inspect(ct)
    assert getattr(obj, "modality") == "CT"  # noqa: B009
    assert getattr(obj, "institution_name") == "JFK IMAGING CENTER"  # noqa: B009
    # The header fields the dashboard shows a logged-in reader (never logged).
    assert getattr(obj, "patient_name") == "CompressedSamples^CT1"  # noqa: B009
    assert getattr(obj, "patient_id") == "1CT1"  # noqa: B009
    assert getattr(obj, "study_date") == "20040119"  # noqa: B009


@pytest.mark.parametrize(
    ("change", "problem", "detail"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), Problem.MISSING_UID, "StudyInstanceUID"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", ""), Problem.MISSING_UID, "Series"),
        (lambda ds: setattr(ds, "SOPInstanceUID", "1.2.03"), Problem.INVALID_UID, "SOPInst"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "../../etc"), Problem.INVALID_UID, "Study"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1." * 40), Problem.INVALID_UID, "Study"),
    ],
)
def test_missing_or_invalid_uids_are_named(
    ct: Dataset, change: object, problem: Problem, detail: str
) -> None:
    bad = copy.deepcopy(ct)
    sop_instance = str(bad.SOPInstanceUID)
    change(bad)  # type: ignore[operator]

    with pytest.raises(InvalidObject) as raised:
        inspect(bad, sop_instance=sop_instance)

    assert raised.value.problem is problem
    assert detail in raised.value.detail


def test_sop_class_and_instance_must_match_the_request(ct: Dataset) -> None:
    with pytest.raises(InvalidObject) as wrong_class:
        inspect(ct, sop_class="1.2.840.10008.5.1.4.1.1.4")
    with pytest.raises(InvalidObject) as wrong_instance:
        inspect(ct, sop_instance="1.2.3.4")

    assert wrong_class.value.problem is Problem.SOP_CLASS_MISMATCH
    assert wrong_instance.value.problem is Problem.INSTANCE_UID_MISMATCH


def test_an_element_longer_than_the_data_is_unparsable() -> None:
    truncated = BytesIO(b"\x08\x00\x16\x00UI\xff\x7fgarbage")

    with pytest.raises(InvalidObject) as raised:
        inspect_dataset(
            lambda: read_header(truncated, ExplicitVRLittleEndian),
            requested_sop_class_uid=CTImageStorage,
            requested_sop_instance_uid="1.2.3",
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )

    assert raised.value.problem is Problem.UNPARSABLE


# Found by the receive-path fuzzer (tests/fuzz): both were answered Success before, and the
# spooled files could not be read back.


def _whole(data: bytes, syntax: str = ExplicitVRLittleEndian) -> object:
    from pydicom.uid import UID

    from dicom_node.object_checks import read_whole

    return read_whole(BytesIO(data), UID(syntax))


def test_a_bogus_vr_after_the_header_is_unparsable(ct: Dataset) -> None:
    data = encoded(ct).getvalue()
    at = data.index(b"\x28\x00\x11\x00US")  # Columns, past the tags the header check reads
    broken = data[: at + 4] + b"ZZ" + data[at + 6 :]

    with pytest.raises(NotImplementedError, match="ZZ"):
        _whole(broken)
    _whole(data)  # the unbroken bytes read


@pytest.mark.parametrize("implicit", [False, True])
def test_a_number_whose_length_does_not_fit_its_vr_is_unparsable(
    ct: Dataset, implicit: bool
) -> None:
    data = encoded(ct, implicit=implicit).getvalue()
    header = b"\x28\x00\x11\x00" + (b"\x02\x00\x00\x00" if implicit else b"US\x02\x00")
    at = data.index(header)  # Columns (US), 2 bytes; made 3
    longer = header[:-4] + (b"\x03\x00\x00\x00" if implicit else b"US\x03\x00")
    broken = data[:at] + longer + data[at + len(header) : at + len(header) + 2] + b"\x00"
    broken += data[at + len(header) + 2 :]
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian

    with pytest.raises(BytesLengthException):
        _whole(broken, syntax)
    _whole(data, syntax)  # the unbroken bytes read


@pytest.mark.parametrize("keyword", ["Rows", "BitsAllocated"])
def test_pixel_data_shorter_than_the_image_attributes_say_is_refused(
    ct: Dataset, keyword: str
) -> None:
    ct[keyword].value = 4096 if keyword == "Rows" else 32

    with pytest.raises(InvalidObject, match="pixel data does not fit") as raised:
        _whole(encoded(ct).getvalue())
    assert raised.value.problem is Problem.UNPARSABLE
