"""What a received C-STORE carries, checked before anything is written to the spool."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from io import BytesIO

from pydicom import Dataset
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.errors import BytesLengthException
from pydicom.filereader import read_dataset
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from plugin import dicom_status as status
from plugin.catalog.records import ReceivedObject


class Problem(Enum):
    """Why an object is refused; each maps to one status code."""

    UNPARSABLE = status.CANNOT_UNDERSTAND
    MISSING_UID = status.MISSING_UID
    INVALID_UID = status.INVALID_UID
    SOP_CLASS_MISMATCH = status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    INSTANCE_UID_MISMATCH = status.INSTANCE_UID_MISMATCH


class InvalidObject(Exception):
    def __init__(self, problem: Problem, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


# Every tag ``inspect_dataset`` reads sits at or before SeriesNumber (0020,0011), so
# parsing stops there: the image module and pixel data are never walked.
LAST_TAG_READ_INT = 0x00200011


def _past_last_tag(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) > LAST_TAG_READ_INT


class TruncatedElement(ValueError):
    """Not an EOFError on purpose: pydicom turns those into a warning and goes on."""


class _ExactReader:
    """The received bytes, read in place (no copy of a large image), refusing short reads:
    pydicom accepts them, but here one means an element's length runs past the data the
    sender gave, i.e. a dataset that cannot be parsed. An empty read is the normal end of
    the dataset."""

    def __init__(self, raw: BytesIO) -> None:
        self._raw = raw
        raw.seek(0)

    def read(self, size: int | None = -1, /) -> bytes:
        data = self._raw.read(size)
        if size is not None and size > 0 and 0 < len(data) < size:
            raise TruncatedElement(f"element needs {size} bytes, {len(data)} left")
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def read_header(raw: BytesIO, transfer_syntax: UID, *, whole: bool = False) -> Dataset:
    """The leading elements of a received dataset (every element when ``whole``), as
    received (no meta header)."""
    if transfer_syntax.is_deflated:
        raw.seek(0)
        return decode(raw, is_implicit_vr=False, is_little_endian=True, deflated=True)
    return read_dataset(
        _ExactReader(raw),  # type: ignore[arg-type]
        transfer_syntax.is_implicit_VR,
        transfer_syntax.is_little_endian,
        stop_when=None if whole else _past_last_tag,
    )


def read_whole(raw: BytesIO, transfer_syntax: UID) -> Dataset:
    """The whole received dataset, each element decoded once, its pixel data checked against
    the image attributes: what is answered Success must read back.

    Raises on the first problem. Compressed pixel data is checked by its framing (offset
    table, one fragment or more per frame), not decompressed: that would cost a decode of
    every image on the receive path.
    """
    ds = read_header(raw, transfer_syntax, whole=True)
    _convert_binary_values(ds)
    if "PixelData" in ds:
        _check_pixel_data(ds, transfer_syntax)
    return ds


# Text values are left raw: decoding them is most of the cost of a full read, and a text
# value pydicom cannot decode is a warning when it is read back, not an error.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
     "UI", "UR", "UT"}
)  # fmt: skip


# pydicom converts these to the bytes as received, whatever their length.
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
# pydicom's conversion of these fails only on a length that is not a multiple of the value
# size; checking the length is the same test without unpacking every value (most of the
# cost of a full read).
_VALUE_SIZES = {"AT": 4, "FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}


def _convert_binary_values(ds: Dataset) -> None:
    """Convert every element that is not text, sequences included (recursively): an unknown
    VR, or a binary value whose length does not fit its VR, fails here. The converted values
    are not kept: the dataset is only read."""
    for raw_element in ds._dict.values():
        vr = raw_element.VR
        if vr in _TEXT_VRS or vr in _BYTES_VRS:
            continue
        size = _VALUE_SIZES.get(vr or "")
        if size is not None and isinstance(raw_element, RawDataElement):
            length = len(raw_element.value or b"")
            if length % size:
                raise BytesLengthException(f"{vr} value of {length} bytes")
            continue
        element = (
            convert_raw_data_element(raw_element, ds=ds)
            if isinstance(raw_element, RawDataElement)
            else raw_element
        )
        if element.VR == "SQ":
            for item in element.value:
                _convert_binary_values(item)


def _check_pixel_data(ds: Dataset, transfer_syntax: UID) -> None:
    runner = DecodeRunner(transfer_syntax)
    try:
        runner.set_source(ds)
        runner.validate()  # pydicom's own checks before a decode: attributes, buffer length
        if transfer_syntax.is_encapsulated:
            fragments = BytesIO(ds.PixelData)
            parse_basic_offsets(fragments)
            count, _ = parse_fragments(fragments)
            if count < runner.number_of_frames:
                raise ValueError(f"{count} fragments for {runner.number_of_frames} frames")
    except (AttributeError, ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise InvalidObject(
            Problem.UNPARSABLE, "pixel data does not fit the image attributes"
        ) from exc


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise InvalidObject(Problem.MISSING_UID, f"{keyword} missing")
    uid = UID(str(value).strip().rstrip("\0"))
    if not uid.is_valid:
        raise InvalidObject(Problem.INVALID_UID, f"{keyword} is not a valid UID")
    return str(uid)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def inspect_dataset(
    load: Callable[[], Dataset],
    *,
    requested_sop_class_uid: str,
    requested_sop_instance_uid: str,
    transfer_syntax_uid: str,
) -> ReceivedObject:
    """Read the tags pacsclip needs and check them; raise ``InvalidObject`` saying what is wrong.

    Pixel data is never decoded here.

    ``load`` decodes the dataset lazily (pydicom defers element values), so a
    failure while reading any of the tags below is an unparsable dataset too.
    """
    try:
        ds = load()
        obj = ReceivedObject(
            sop_class_uid=_uid(ds, "SOPClassUID"),
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            study_instance_uid=_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_uid(ds, "SeriesInstanceUID"),
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(ds, "Modality"),
            body_part_examined=_text(ds, "BodyPartExamined"),
            series_description=_text(ds, "SeriesDescription"),
            series_number=_int(ds, "SeriesNumber"),
            institution_name=_text(ds, "InstitutionName"),
            patient_name=_text(ds, "PatientName"),
            patient_id=_text(ds, "PatientID"),
            accession_number=_text(ds, "AccessionNumber"),
            study_date=_text(ds, "StudyDate"),
            study_description=_text(ds, "StudyDescription"),
            station_name=_text(ds, "StationName"),
            institutional_department_name=_text(ds, "InstitutionalDepartmentName"),
        )
    except InvalidObject:
        raise
    except Exception as exc:  # any decoder failure means "cannot understand"
        detail = f"dataset cannot be parsed: {type(exc).__name__}"
        raise InvalidObject(Problem.UNPARSABLE, detail) from exc
    if obj.sop_class_uid != requested_sop_class_uid:
        raise InvalidObject(
            Problem.SOP_CLASS_MISMATCH, "SOPClassUID differs from AffectedSOPClassUID"
        )
    if obj.sop_instance_uid != requested_sop_instance_uid:
        raise InvalidObject(
            Problem.INSTANCE_UID_MISMATCH, "SOPInstanceUID differs from AffectedSOPInstanceUID"
        )
    return obj
