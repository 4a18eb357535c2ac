"""Identity of result objects: deterministic UIDs, creation times, no names in warnings.

The same study analysed twice by the same model version must produce the same SR and SC UIDs,
so a redelivered task overwrites (C-STORE of an existing SOP Instance UID) instead of adding a
duplicate to the PACS. A re-analysis after late images passes a new `generation`, which gives
new UIDs for the new objects.

The UIDs are UUID-derived (root 2.25, PS3.5 B.2) from a name-based UUID (RFC 4122 version 5)
of the inputs. pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` is not used: with
``prefix=None`` pydicom 3 ignores ``entropy_srcs`` and returns a random uuid4 UID, and with
``prefix="2.25."`` it appends a SHA-512 integer, which is larger than a UUID and so not a
valid 2.25 UID.
"""

from __future__ import annotations

import datetime
import json
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM

from plugin.results.study_result import AlgorithmIdentity

ResultRole = Literal[
    "sr-series", "sr-instance", "sc-series", "sc-instance", "seg-series", "seg-instance",
    "tracking", "device",
]  # fmt: skip

# Fixed namespace of every pacsclip result UID; changing it would change every UID ever issued.
_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsclip:results")


def result_uid(
    study_uid: str,
    algorithm_name: str,
    algorithm_version: str,
    role: ResultRole,
    n: int = 0,
    *,
    generation: int = 0,
    key: str = "",
) -> UID:
    """The UID of the `n`-th object of `role` for one study, model version and generation.

    `key` distinguishes objects of one role that are named rather than numbered (the tracking
    UID of each finding). The inputs are serialised as JSON so that no two different input
    lists share a name (plain concatenation would make ("ab", "c") equal to ("a", "bc")).
    """
    if n < 0 or generation < 0:
        raise ValueError(f"n and generation must be >= 0, got n={n}, generation={generation}")
    name = json.dumps(
        [study_uid, algorithm_name, algorithm_version, role, n, generation, key],
        separators=(",", ":"),
    )
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


@dataclass(frozen=True)
class ResultUids:
    """The series and instance UIDs of one study's results for one model version and generation."""

    study_uid: str
    algorithm: AlgorithmIdentity
    generation: int = 0

    def _uid(self, role: ResultRole, n: int = 0) -> UID:
        name, version = self.algorithm.name, self.algorithm.version
        return result_uid(self.study_uid, name, version, role, n, generation=self.generation)

    @property
    def sr_series(self) -> UID:
        return self._uid("sr-series")

    @property
    def sr_instance(self) -> UID:
        return self._uid("sr-instance")

    @property
    def sc_series(self) -> UID:
        return self._uid("sc-series")

    def sc_instance(self, n: int) -> UID:
        """The overlay of the `n`-th analysed image (0-based, in the worker's order)."""
        return self._uid("sc-instance", n)

    @property
    def seg_series(self) -> UID:
        return self._uid("seg-series")

    def seg_instance(self, n: int) -> UID:
        """The SEG of the `n`-th image with regions (0-based, in the worker's order)."""
        return self._uid("seg-instance", n)


def tracking_uid(study_uid: str, algorithm: AlgorithmIdentity, finding_name: str) -> UID:
    """Tracking Unique Identifier of one finding of one study.

    Independent of the generation: a re-analysis reports on the same finding, and TID 1500
    tracking UIDs exist to link such reports.
    """
    return result_uid(study_uid, algorithm.name, algorithm.version, "tracking", key=finding_name)


def device_uid(algorithm: AlgorithmIdentity) -> UID:
    """Device Observer UID of the algorithm: one per name and version, whatever the study."""
    return result_uid("", algorithm.name, algorithm.version, "device")


def stamp_instance_creation(dataset: Dataset, when: datetime.datetime) -> None:
    """Set the creation times of a built object to `when` instead of highdicom's wall clock.

    highdicom stamps ``datetime.now()`` into every object it builds; replacing it with the
    caller's time keeps an object a pure function of its inputs, so a redelivered task sends
    byte-identical objects with the same UIDs.
    """
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    # highdicom lists itself as contributing equipment, with the wall clock as its time.
    for equipment in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = DT(when)


@contextmanager
def person_name_warnings_suppressed() -> Iterator[None]:
    """Silence highdicom's warning about a one-component person name while building.

    The warning quotes the name (the patient's, or the referring physician's), and a worker
    that routes warnings to its log would then log patient data.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=".*unlikely to represent the intended person name",
            category=UserWarning,
        )
        yield
