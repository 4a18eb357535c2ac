"""``pacsclip purge``: remove everything pacsclip holds about one patient or one study.

Files go first (spool, results, quarantined objects and their reasons, rendered images, HL7
messages that name the patient or the studies), then the catalog rows in one transaction with
one ``purge`` audit entry, then the similar-case indexes are rebuilt without the vectors. A
purge stopped half-way is run again: whatever is left is found the same way.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.catalog.db import Catalog
from plugin.catalog.purge import (
    PurgeTarget,
    checkpoint_sqlite,
    delete_purge_target,
    enable_secure_delete,
    find_purge_target,
)
from plugin.errors import PacsclipError
from plugin.hl7_inbound.inbox import inbox_dir
from plugin.settings import Settings

logger = logging.getLogger(__name__)

DASHBOARD_CACHE: Final = "dashboard-cache"
RETRIEVAL: Final = "retrieval"
# Field, component, repetition and subcomponent separators and segment ends of HL7 v2.
_HL7_TOKENS: Final = re.compile(rb"[|^~&\\\r\n]")


class NothingToPurge(PacsclipError):
    """No study in the catalog matches the patient id or study uid given."""


@dataclass
class PurgeOutcome:
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    indexes_rebuilt: int = 0
    scrubbed: bool = True  # SQLite's log emptied (False: a reader held it; run again)

    def as_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "files": self.files,
            "indexes_rebuilt": self.indexes_rebuilt,
            "scrubbed": self.scrubbed,
        }


def find_target(
    catalog: Catalog, *, patient_id: str | None = None, study_uid: str | None = None
) -> PurgeTarget:
    """What a purge would remove; NothingToPurge when no study matches."""
    with catalog.sessions() as session:
        target = find_purge_target(session, patient_id=patient_id, study_uid=study_uid)
    if target is None:
        what = "patient id" if patient_id is not None else f"study {study_uid}"
        raise NothingToPurge(f"no study of that {what} in the catalog: nothing was removed")
    return target


def purge(
    settings: Settings, catalog: Catalog, target: PurgeTarget, *, patient_id: str | None = None
) -> PurgeOutcome:
    """Remove the target's files, rows and index vectors. ``patient_id`` (a purge by
    patient) also finds quarantined objects and HL7 messages of that patient that were never
    cataloged as a study."""
    outcome = PurgeOutcome()
    keys = {*target.uids, *target.accession_numbers}
    if patient_id is not None:
        keys.add(patient_id)
    outcome.files["spool"] = _remove_trees(settings.spool_dir, target.study_uids)
    outcome.files["results"] = _remove_trees(settings.results_dir, target.study_uids)
    quarantined = set(target.quarantine_paths) | set(
        _quarantined_of(settings.quarantine_dir, target.study_uids, patient_id)
    )
    outcome.files["quarantine"] = _remove_quarantined(settings.quarantine_dir, quarantined)
    outcome.files["dashboard_cache"] = _remove_rendered(
        settings.data_dir / DASHBOARD_CACHE,
        [*target.sop_instance_uids, *target.result_sop_instance_uids],
    )
    outcome.files["hl7_inbox"] = _remove_hl7_messages(inbox_dir(settings.data_dir), keys)
    with catalog.sessions.begin() as session:
        enable_secure_delete(session)
        outcome.rows = delete_purge_target(session, target, quarantine_paths=quarantined)
    outcome.scrubbed = checkpoint_sqlite(catalog.engine)
    outcome.indexes_rebuilt = rebuild_indexes(
        settings.data_dir / RETRIEVAL,
        catalog,
        images=target.image_model_refs,
        reports=target.report_model_refs,
    )
    logger.info(
        "purge by %s done: %d studies, %d files, %d indexes rebuilt",
        target.by,
        len(target.study_ids),
        sum(outcome.files.values()),
        outcome.indexes_rebuilt,
    )
    return outcome


def rebuild_indexes(
    root: Path, catalog: Catalog, *, images: Collection[str], reports: Collection[str]
) -> int:
    """Rebuild the saved indexes of these model versions from the rows left, so that no
    deleted embedding stays in a file; returns how many were rebuilt."""
    # Imported here: the DICOM node runs retention and never needs the vector index code
    # unless embeddings expire.
    from plugin.retrieval.index import IndexCorrupt, read_info
    from plugin.retrieval.store import IndexStore, Kind

    store = IndexStore(root, catalog.sessions)
    rebuilt = 0
    for kind, refs in ((Kind.IMAGES, images), (Kind.REPORTS, reports)):
        for ref in refs:
            path = store.path(kind, ref)
            try:
                info = read_info(path)
            except IndexCorrupt:
                if path.exists():
                    path.unlink()  # unreadable: the next use builds it from the rows
                continue
            index = store.rebuild(kind, ref, info.dim)
            # Never below the old snapshot's mark: a process with an older copy must not
            # save it over this one.
            if index.high_water < info.high_water:
                index.high_water = info.high_water
                index.save()
            rebuilt += 1
    return rebuilt


def _remove_trees(root: Path, study_uids: Collection[str]) -> int:
    removed = 0
    for uid in study_uids:
        folder = root / uid
        if _safe_name(uid) and folder.is_dir():
            removed += sum(1 for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder)
    return removed


def _quarantined_of(
    root: Path, study_uids: Collection[str], patient_id: str | None
) -> Iterator[str]:
    """Quarantined objects whose header names one of the studies or the patient."""
    wanted = set(study_uids)
    for path in sorted(root.glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # refused for being unreadable: nothing in it can be matched
        study = str(ds.get("StudyInstanceUID", ""))
        patient = str(ds.get("PatientID", ""))
        if study in wanted or (patient_id is not None and patient == patient_id):
            yield path.name


def _remove_quarantined(root: Path, names: Collection[str]) -> int:
    removed = 0
    for name in names:
        if not _safe_name(name):
            continue
        for path in (root / name, (root / name).with_suffix(".json")):
            if path.is_file():
                path.unlink()
                removed += 1
    return removed


def _remove_rendered(root: Path, sop_instance_uids: Collection[str]) -> int:
    removed = 0
    for uid in sop_instance_uids:
        if not _safe_name(uid):
            continue
        for path in root.glob(f"{uid}-*.png"):
            path.unlink()
            removed += 1
    return removed


def _remove_hl7_messages(root: Path, keys: Collection[str]) -> int:
    """HL7 messages kept as received that carry one of ``keys`` as a whole field or
    component (the Patient ID in PID-3, an accession number, a Study Instance UID)."""
    wanted = {key.encode() for key in keys if key}
    removed = 0
    for path in sorted(root.glob("*.hl7")) if root.is_dir() else []:
        if wanted & set(_HL7_TOKENS.split(path.read_bytes())):
            path.unlink()
            removed += 1
    return removed


def _safe_name(name: str) -> bool:
    """A UID or file name that names one entry of its folder, never a path out of it."""
    return bool(name) and "/" not in name and name not in (".", "..")
