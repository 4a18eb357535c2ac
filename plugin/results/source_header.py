"""The source header a result is built from, with the Type 2 attributes highdicom copies.

A result object repeats the patient and study of its source. Those attributes are Type 2
(present, possibly empty) in a conforming object, but some devices and converters leave
them out, and highdicom reads them unconditionally: the result would fail to build.
"""

from __future__ import annotations

from pydicom import Dataset

# Patient and General Study module attributes that highdicom reads from the source.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip


def with_type2_present(source: Dataset) -> Dataset:
    """``source`` itself when nothing is missing, else a copy with the missing ones empty."""
    missing = [keyword for keyword in _TYPE2_COPIED if keyword not in source]
    if not missing:
        return source
    header = Dataset()
    for element in source:
        header.add(element)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    for keyword in missing:
        setattr(header, keyword, "")
    return header
