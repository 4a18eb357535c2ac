"""A workitem's inputs, retrieved by WADO-RS, taken in as the node takes in what it receives:
fsynced into the spool, cataloged, and the study completed under the routing rules, so that
the worker analyses it exactly as it analyses a pushed study (same site key, OOD guard,
shadow models, result UIDs).

Two things differ, both by the workitem's word: the study runs the triage pipeline whatever
the rules' pipelines say (the Task Manager asked for it), and no destination gets the
results by the push path's dispatch: the performer stores them at the workitem's Output
Destination itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Final

from pydicom import dcmread

from dicom_node.object_checks import InvalidObject, inspect_dataset
from dicom_node.routing import RoutingInput, RuleSet
from dicom_node.spool import Spool
from plugin.catalog import repository
from plugin.catalog.db import Catalog
from plugin.catalog.records import Peer, ReceivedObject, SpooledInstance
from plugin.catalog.writer import CatalogWriter
from plugin.pipelines import TRIAGE
from plugin.settings import Settings
from plugin.site import site_key

logger = logging.getLogger(__name__)

COMPLETION_REASON: Final = "workitem"


class InputRefused(ValueError):
    """A retrieved input pacsclip cannot take: the sentence is the workitem's cancel reason."""


@dataclass(frozen=True)
class TakenIn:
    study_uid: str
    stored: int  # new or changed instances
    duplicates: int


class WorkitemIntake:
    def __init__(self, settings: Settings, catalog: Catalog, rules: RuleSet) -> None:
        self.settings = settings
        self.sessions = catalog.sessions
        self.rules = rules
        self.spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_disk_mb * 2**20)
        self.writer = CatalogWriter(catalog.engine)

    def take_in(
        self,
        parts: Sequence[bytes],
        study_uid: str,
        source_host: str | None,
        *,
        wanted: Sequence[str] = (),
    ) -> TakenIn:
        """Spool and catalog the retrieved Part 10 files of ``study_uid`` (only the instances
        ``wanted``, when it names some: a study's Retrieve URL brings all of it); InputRefused
        when one cannot be read, belongs to another study or a wanted one is missing (nothing
        is cataloged then)."""
        # ups_calling_ae_title stands for the sender's AE title: in the site key, routing
        # rules and the audit log, as a pushing PACS's AE title is.
        calling = self.settings.ups_calling_ae_title
        peer = Peer(calling_ae_title=calling, host=source_host)
        checked = [(_inspect(data, n), data) for n, data in enumerate(parts, 1)]
        if wanted:
            by_uid = {obj.sop_instance_uid: (obj, data) for obj, data in checked}
            missing = [uid for uid in wanted if uid not in by_uid]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise InputRefused(
                    f"input instance {missing[0]}{more} is not at the workitem's Retrieve URL"
                )
            checked = [by_uid[uid] for uid in dict.fromkeys(wanted)]
        for obj, _ in checked:
            if obj.study_instance_uid != study_uid:
                raise InputRefused(
                    f"the inputs hold an instance of study {obj.study_instance_uid}, not of the "
                    f"workitem's study {study_uid}"
                )
        items = []
        for obj, data in checked:
            rel = self.spool.relative_path(
                obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid
            )
            self.spool.write(rel, data)  # OutOfResources: the performer tries again later
            items.append(
                SpooledInstance(
                    obj=obj,
                    site_key=site_key(self.settings.site_tags, obj.tag_values(calling)),
                    peer=peer,
                    path=rel,
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        recorded = self.writer.record_instances(items)
        stored = sum(1 for r in recorded if r.outcome != "duplicate")
        logger.info(
            "study %s: %d inputs retrieved for a workitem (%d new or changed)",
            study_uid,
            len(items),
            stored,
        )
        return TakenIn(study_uid, stored, len(items) - stored)

    def complete(self, study_uid: str, priority: str | None) -> tuple[int, str] | None:
        """Complete the study for triage; its generation and priority, or None when it is not
        receiving (nothing new came: an earlier completion of the same images stands)."""
        with self.sessions() as session:
            facts = repository.study_facts(session, study_uid)
            if facts is None:
                raise LookupError(f"no study {study_uid} in the catalog")
            decision = self.rules.decide(RoutingInput.of_study(facts))
            chosen = priority or decision.priority
            routing = {
                **decision.as_dict(),
                "pipelines": [TRIAGE],
                "destinations": [],
                "priority": chosen,
            }
            generation = repository.mark_complete(
                session, study_uid, reason=COMPLETION_REASON, routing=routing, priority=chosen
            )
            session.commit()
        return None if generation is None else (generation, chosen)


def _inspect(data: bytes, n: int) -> ReceivedObject:
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        return inspect_dataset(
            lambda: ds,
            requested_sop_class_uid=str(ds.SOPClassUID),
            requested_sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        )
    except InvalidObject as exc:
        raise InputRefused(f"retrieved instance {n} cannot be used: {exc.detail}") from exc
    except Exception as exc:  # no file meta, no SOP Class UID: not a usable Part 10 file
        raise InputRefused(
            f"retrieved instance {n} is not a readable DICOM file: {type(exc).__name__}"
        ) from exc
