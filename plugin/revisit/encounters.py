"""Encounter files for training and scoring the revisit model: CSV (Parquet with pyarrow).

Columns (docs/revisit.md): ``encounter_id``, ``site``, ``note_text``, and ``revisit_7d`` (0/1)
for training; extra columns are ignored, except ``triage_<finding>``, the linked imaging
study's triage probability for that finding (empty when no study is linked). The same
columns arrive as JSON objects through the API (:func:`encounters_from_records`).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from plugin.revisit.cohort import CohortFileError

FloatArray = npt.NDArray[np.float64]

TRIAGE_PREFIX: Final = "triage_"
TRAINING_COLUMNS: Final = ("encounter_id", "site", "note_text", "revisit_7d")
SCORING_COLUMNS: Final = ("encounter_id", "note_text")


@dataclass(frozen=True, eq=False)
class Encounters:
    """Encounters column by column; ``labels`` is None when the file has no outcome column.

    ``triage`` maps each ``triage_<finding>`` column to its values, NaN where no study is
    linked; ``sites`` holds "" where a scoring file has no site.
    """

    ids: tuple[str, ...]
    sites: tuple[str, ...]
    notes: tuple[str, ...]
    labels: FloatArray | None
    triage: Mapping[str, FloatArray]
    source: str

    def __len__(self) -> int:
        return len(self.ids)

    def site_names(self) -> list[str]:
        return sorted(set(self.sites) - {""})


def read_encounters(path: Path, *, require_labels: bool) -> Encounters:
    """Read a CSV or Parquet encounter file; errors name the file, line and column to fix."""
    path = Path(path)
    if not path.is_file():
        raise CohortFileError(f"{path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        records, columns = _read_parquet(path)
        first = 1
    else:
        records, columns = _read_csv(path)
        first = 2  # line 1 is the header
    return _table(records, columns, require_labels=require_labels, source=str(path), first=first)


def encounters_from_records(
    records: Sequence[Mapping[str, Any]], *, require_labels: bool, source: str = "request"
) -> Encounters:
    """The same checks as :func:`read_encounters` for rows given as mappings (JSON)."""
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    return _table(records, list(columns), require_labels=require_labels, source=source, first=1)


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or ())
            return [dict(row) for row in reader], columns
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortFileError(f"{path}: cannot read as a UTF-8 CSV ({exc})") from exc


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if importlib.util.find_spec("pyarrow") is None:
        raise CohortFileError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or export the "
            "encounters as CSV"
        )
    parquet = importlib.import_module("pyarrow.parquet")
    try:
        table = parquet.read_table(path)
    except (OSError, ValueError) as exc:
        raise CohortFileError(f"{path}: cannot read as Parquet ({exc})") from exc
    return list(table.to_pylist()), [str(name) for name in table.column_names]


def _table(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    require_labels: bool,
    source: str,
    first: int,
) -> Encounters:
    required = TRAINING_COLUMNS if require_labels else SCORING_COLUMNS
    missing = [c for c in required if c not in columns]
    if missing:
        raise CohortFileError(
            f"{source}: missing column(s) {', '.join(missing)}; an encounter file needs "
            f"{', '.join(required)} (found: {', '.join(columns) or 'none'})"
        )
    if not records:
        raise CohortFileError(f"{source}: no encounters")
    triage_columns = sorted(c for c in columns if c.startswith(TRIAGE_PREFIX))
    ids, sites, notes = [], [], []
    labels: list[float] = []
    triage: dict[str, list[float]] = {c: [] for c in triage_columns}
    for line, record in enumerate(records, start=first):
        ids.append(_text(record, "encounter_id", line, source, required=True))
        sites.append(_text(record, "site", line, source, required=require_labels))
        notes.append(_text(record, "note_text", line, source, required=False))
        if require_labels:
            labels.append(_label(record.get("revisit_7d"), line, source))
        for column in triage_columns:
            triage[column].append(_probability(record.get(column), line, column, source))
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        raise CohortFileError(f"{source}: {duplicates} repeated encounter_id value(s)")
    return Encounters(
        ids=tuple(ids),
        sites=tuple(sites),
        notes=tuple(notes),
        labels=np.array(labels, dtype=np.float64) if require_labels else None,
        triage={c: np.array(v, dtype=np.float64) for c, v in triage.items()},
        source=source,
    )


def _text(record: Mapping[str, Any], column: str, line: int, source: str, *, required: bool) -> str:
    value = record.get(column)
    text = "" if value is None else str(value)
    if required and not text.strip():
        raise CohortFileError(f"{source} line {line}: {column} is empty")
    return text.strip() if column != "note_text" else text


def _label(value: Any, line: int, source: str) -> float:
    text = "" if value is None else str(value).strip()
    if text not in ("0", "1"):
        raise CohortFileError(f"{source} line {line}: revisit_7d must be 0 or 1, not {text!r}")
    return float(text)


def _probability(value: Any, line: int, column: str, source: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float("nan")
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
        valid = False
    else:
        valid = 0.0 <= number <= 1.0
    if not valid:
        raise CohortFileError(
            f"{source} line {line}: {column} must be a probability in [0, 1] or empty, "
            f"not {value!r}"
        )
    return number
