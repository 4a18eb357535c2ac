"""Labels CSVs: one key column, then one column per finding holding 1, 0 or nothing.

``pacsclip model calibrate`` and ``fit-head`` key the rows by image ``path``; ``pacsclip adapt``
keys them by ``sop_instance_uid`` or ``study_instance_uid``. Either way a row may leave a
finding empty (not labelled), and every error names the file, row and column to fix.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from plugin.errors import ConfigError


@dataclass(frozen=True, eq=False)
class LabelsTable:
    """The rows of a labels CSV: ``values`` is [rows, findings] of 1, 0 or NaN (not labelled)."""

    key_column: str
    keys: tuple[str, ...]
    findings: tuple[str, ...]
    values: npt.NDArray[np.float64]


def read_labels_csv(
    csv_path: Path, key_columns: Sequence[str], known_findings: Sequence[str]
) -> LabelsTable:
    """Read a labels CSV keyed by exactly one of ``key_columns``; the other columns are findings."""
    try:
        with csv_path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or ())
            raw_rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read labels {csv_path}: {exc}") from exc
    keys_present = [c for c in key_columns if c in columns]
    if len(keys_present) != 1:
        wanted = (
            f"a {key_columns[0]!r} column"
            if len(key_columns) == 1
            else f"exactly one of the columns {', '.join(key_columns)}"
        )
        raise ConfigError(f"{csv_path}: needs {wanted} (found {columns})")
    key_column = keys_present[0]
    findings = [c for c in columns if c != key_column]
    unknown = [c for c in findings if c not in known_findings]
    if unknown or not findings:
        raise ConfigError(
            f"{csv_path}: finding columns {unknown or findings} are not findings of the "
            f"bundle; use some of {list(known_findings)}"
        )
    keys, values = [], []
    for line, row in enumerate(raw_rows, start=2):
        key = (row.get(key_column) or "").strip()
        if not key:
            raise ConfigError(f"{csv_path} line {line}: {key_column} is empty")
        keys.append(key)
        values.append([_label(row.get(c), csv_path, line, c) for c in findings])
    if not keys:
        raise ConfigError(f"{csv_path}: no labelled rows")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{csv_path}: a {key_column} appears on more than one row")
    return LabelsTable(key_column, tuple(keys), tuple(findings), np.array(values, dtype=np.float64))


def _label(value: str | None, csv_path: Path, line: int, column: str) -> float:
    text = (value or "").strip()
    if text == "":
        return float("nan")
    if text in ("0", "1"):
        return float(text)
    raise ConfigError(f"{csv_path} line {line}, column {column}: expected 1, 0 or empty")
