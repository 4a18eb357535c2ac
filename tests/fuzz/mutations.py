"""Hypothesis strategies for broken C-STORE datasets, made from real DICOM files.

A case is the dataset bytes exactly as they go on the wire (no file meta header), the
transfer syntax of the presentation context they are sent on, and the SOP class and instance
the request names. Mutations work on the encoded bytes, so invalid encodings really reach the
node: wrong tags, VRs and lengths, truncation, pixel data that does not match the image,
undefined-length garbage, deflate garbage and a transfer syntax that does not fit the bytes.
"""

from __future__ import annotations

import copy
import itertools
import secrets
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from io import BytesIO

import pydicom
from hypothesis import strategies as st
from pydicom import Dataset, FileMetaDataset
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

# Small real files, one per encoding family the node accepts (native, deflate, RLE, JPEG
# lossless, JPEG-LS, JPEG 2000); pydicom ships them.
SEED_FILES = (
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "image_dfl.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
)
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
PIXEL_DATA = 0x7FE00010
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
BOGUS_VRS = [b"\x00\x00", b"ZZ", b"ob", b"\xff\xff", b"UN", b"SQ", b"OB", b"US", b"UI", b"  "]
SPECIAL_LENGTHS = [0, 1, 2, 3, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


@dataclass(frozen=True)
class Element:
    """Where one top-level element sits in the encoded dataset."""

    tag: int
    header_offset: int
    value_offset: int
    length: int
    long_header: bool  # explicit VR with a 4-byte length (OB, SQ, ...)


@dataclass(frozen=True)
class Seed:
    name: str
    sop_class_uid: str
    transfer_syntax: UID
    template: Dataset  # without file meta; UIDs replaced for each case


@dataclass(frozen=True)
class Case:
    mutation: str
    seed: str
    transfer_syntax: UID
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes
    valid: bool  # an unmutated control: must be answered Success and read back


@cache
def seeds() -> tuple[Seed, ...]:
    out = []
    for name in SEED_FILES:
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"pydicom test file {name} is not installed")
        ds = pydicom.dcmread(path)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        out.append(Seed(name, str(ds.SOPClassUID), syntax, ds))
    return tuple(out)


def encode(ds: Dataset, syntax: UID) -> bytes:
    """The dataset as it goes on the wire in ``syntax`` (deflated when that syntax is)."""
    buffer = BytesIO()
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=implicit, little_endian=little)
    data = buffer.getvalue()
    if syntax.is_deflated:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


class UidSource:
    """Fresh UIDs of one fixed length: the encoded size of a case then does not depend on
    them, which Hypothesis needs (its draws must not depend on state outside them)."""

    def __init__(self) -> None:
        self._run = 10**11 + secrets.randbelow(9 * 10**11)  # 12 digits, no leading zero
        self._next = itertools.count(10**19)

    def __call__(self) -> str:
        return f"2.25.{self._run}{next(self._next)}"


def with_fresh_uids(seed: Seed, study_uid: str, uids: UidSource) -> tuple[Dataset, str]:
    ds = copy.deepcopy(seed.template)  # element values are shared by a shallow copy
    sop_instance_uid = uids()
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = f"{study_uid}.{seed.name.split('.')[0].count('_') + 1}"
    return ds, sop_instance_uid


def elements(data: bytes, syntax: UID) -> list[Element]:
    """Top-level elements of an encoded (not deflated) dataset."""
    implicit = syntax == ImplicitVRLittleEndian
    found = []
    for raw in data_element_generator(BytesIO(data), implicit, True, defer_size=1):
        assert isinstance(raw, RawDataElement)  # the generator yields raw elements
        value_offset = raw.value_tell
        long_header = not implicit and (raw.VR or "").encode() in LONG_VRS
        header = 8 if implicit or not long_header else 12
        length = raw.length if raw.length != 0xFFFFFFFF else len(data) - value_offset
        found.append(
            Element(int(raw.tag), value_offset - header, value_offset, length, long_header)
        )
    return found


def _set_length(data: bytes, element: Element, length: int, implicit: bool) -> bytes:
    if implicit or element.long_header:
        at = element.value_offset - 4
        return data[:at] + struct.pack("<I", length) + data[at + 4 :]
    at = element.value_offset - 2
    return data[:at] + struct.pack("<H", length & 0xFFFF) + data[at + 2 :]


@st.composite
def cases(draw: st.DrawFn, uids: UidSource, study_uids: tuple[str, ...]) -> Case:
    """One C-STORE case: a control, or a seed file broken in one (or a few) ways."""
    seed = draw(st.sampled_from(seeds()))
    ds, sop_instance_uid = with_fresh_uids(seed, draw(st.sampled_from(study_uids)), uids)
    mutation = draw(
        st.sampled_from(
            [
                "valid",
                "flip_bytes",
                "truncate",
                "element_length",
                "bogus_vr",
                "bogus_tag",
                "splice_garbage",
                "pixel_data",
                "geometry",
                "undefined_length_garbage",
                "deflate_garbage",
                "wrong_transfer_syntax",
                "big_endian",
                "stacked",
            ]
        )
    )
    syntax = seed.transfer_syntax
    # Mutations work on plain (not deflated) bytes; a deflated seed is re-deflated after.
    plain_syntax = ExplicitVRLittleEndian if syntax.is_deflated else syntax
    implicit = plain_syntax == ImplicitVRLittleEndian
    if mutation == "geometry":
        # Image attributes that no longer fit the pixel data it carries.
        keyword = draw(st.sampled_from(["Rows", "Columns", "BitsAllocated", "SamplesPerPixel"]))
        ds[keyword].value = draw(st.sampled_from([0, 1, 3, 7, 64, 4096, 65535]))
        if keyword == "SamplesPerPixel" and "PlanarConfiguration" not in ds:
            ds.PlanarConfiguration = 0
        if draw(st.booleans()):
            ds.NumberOfFrames = draw(st.sampled_from([0, 2, 1000]))
    data = encode(ds, plain_syntax)
    found = elements(data, plain_syntax)
    send_syntax = syntax

    def pick() -> Element:
        return draw(st.sampled_from(found))

    def position(low: int, high: int) -> int:
        """A position in [low, high): drawn as a fraction, so that the draw itself does not
        depend on the size of the bytes (deflated sizes vary with the UIDs)."""
        fraction = draw(st.floats(0, 1, exclude_max=True))
        return low + min(high - low - 1, int(fraction * (high - low)))

    def one_mutation(kind: str, data: bytes) -> bytes:
        nonlocal send_syntax
        if kind == "flip_bytes":
            out = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                out[position(0, len(out))] = draw(st.integers(0, 255))
            return bytes(out)
        if kind == "truncate":
            return data[: position(0, len(data))]
        if kind == "element_length":
            element = pick()
            special = draw(st.sampled_from(SPECIAL_LENGTHS))
            nudged = max(0, element.length + draw(st.integers(-3, 3)))
            return _set_length(data, element, draw(st.sampled_from([special, nudged])), implicit)
        if kind == "bogus_vr":
            if implicit:
                send_syntax = ExplicitVRLittleEndian  # implicit bytes read as explicit
                return data
            element = pick()
            at = element.header_offset + 4
            return data[:at] + draw(st.sampled_from(BOGUS_VRS)) + data[at + 2 :]
        if kind == "bogus_tag":
            element = pick()
            tag = draw(
                st.sampled_from([0x00020010, 0xFFFEE000, 0xFFFEE0DD, 0x00000000, 0xFFFFFFFF])
                | st.integers(0, 0xFFFFFFFF)
            )
            at = element.header_offset
            return data[:at] + struct.pack("<HH", tag >> 16, tag & 0xFFFF) + data[at + 4 :]
        if kind == "splice_garbage":
            at = pick().header_offset
            return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
        if kind == "pixel_data":
            pixel = next((e for e in found if e.tag == PIXEL_DATA), None)
            if pixel is None:
                return data[:-1]
            action = draw(st.sampled_from(["cut_value", "shorter", "longer", "odd", "empty"]))
            end = pixel.value_offset + pixel.length
            if action == "cut_value":  # the header still promises the full length
                return data[: position(pixel.value_offset, end)]
            if action == "empty":
                return _set_length(data[: pixel.value_offset], pixel, 0, implicit)
            delta = {"shorter": -draw(st.integers(1, 4096)), "longer": 2, "odd": 1}[action]
            length = max(0, pixel.length + delta)
            head = _set_length(data[: pixel.value_offset], pixel, length, implicit)
            return head + data[pixel.value_offset : pixel.value_offset + length]
        if kind == "undefined_length_garbage":
            # A sequence of undefined length whose items are garbage and never delimited.
            item = b"\xfe\xff\x00\xe0" + draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x10\x00\x00\x00"])
            )
            garbage = draw(st.binary(min_size=0, max_size=48))
            header = (
                b"\x08\x00\x15\x11" + (b"" if implicit else b"SQ\x00\x00") + b"\xff\xff\xff\xff"
            )
            at = draw(st.sampled_from([e.header_offset for e in found] + [len(data)]))
            return data[:at] + header + item + garbage + data[at:]
        if kind == "wrong_transfer_syntax":
            others = [s for s in (*NATIVE, DeflatedExplicitVRLittleEndian) if s != plain_syntax]
            send_syntax = draw(st.sampled_from(others))
            return data
        if kind == "big_endian":
            send_syntax = ExplicitVRBigEndian
            return data
        return data

    if mutation == "deflate_garbage":
        send_syntax = DeflatedExplicitVRLittleEndian
        garbage = draw(
            st.sampled_from(["random", "truncated_stream", "zlib_header", "deflated_junk"])
        )
        deflated = encode(ds, DeflatedExplicitVRLittleEndian)
        wire = {
            "random": draw(st.binary(min_size=0, max_size=256)),
            "truncated_stream": deflated[: position(0, len(deflated))],
            "zlib_header": zlib.compress(encode(ds, ExplicitVRLittleEndian)),  # not raw deflate
            "deflated_junk": _raw_deflate(draw(st.binary(min_size=1, max_size=512))),
        }[garbage]
        return Case(
            f"deflate_garbage/{garbage}", seed.name, send_syntax, seed.sop_class_uid,
            sop_instance_uid, wire, valid=False,
        )  # fmt: skip
    if mutation == "stacked":
        kinds = draw(
            st.lists(
                st.sampled_from(
                    ["flip_bytes", "element_length", "bogus_vr", "bogus_tag", "splice_garbage"]
                ),
                min_size=2,
                max_size=4,
            )
        )
        for kind in kinds:
            data = one_mutation(kind, data)
        mutation = "stacked/" + "+".join(kinds)
    elif mutation not in ("valid", "geometry"):
        data = one_mutation(mutation, data)
    if syntax.is_deflated and send_syntax == syntax:
        data = _raw_deflate(data)
    return Case(
        mutation, seed.name, send_syntax, seed.sop_class_uid, sop_instance_uid, data,
        valid=mutation == "valid",
    )  # fmt: skip


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()
