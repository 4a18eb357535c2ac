"""New bundle versions derived from an existing bundle: what ``pacsclip model calibrate``,
``fit-head``, ``fit-ood`` and ``embed-prompts`` write.

An installed version's files never change, so a version named in an SR names one behaviour.
These commands copy the source bundle into a staging folder, change the copy, give it a new
version and a ``lineage`` entry (parent, what was fitted, on what, when), and install it in the
registry without activating it (``pacsclip model promote`` makes it live); with ``--out DIR``
the copy is written to DIR instead and not installed. The source is only read.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pydantic import TypeAdapter, ValidationError

from plugin.errors import ConfigError
from plugin.models.bundle import (
    MANIFEST_NAME,
    Bundle,
    BundleVersion,
    Lineage,
    Manifest,
    read_manifest,
    sha256_file,
)
from plugin.models.bundle_writer import copy_bundle, write_bundle
from plugin.models.registry import Registry

logger = logging.getLogger(__name__)

# The version suffix each command adds by default: 2026.1.0 -> 2026.1.0+cal1.
CALIBRATE_TAG: Final = "cal"
HEAD_TAG: Final = "head"
OOD_TAG: Final = "ood"
PROMPTS_TAG: Final = "prompts"


@dataclass(frozen=True)
class Change:
    """What a command did to the copy, in the words and figures its lineage keeps."""

    method: str  # what was fitted
    data: str  # on what: file name and counts, never a patient's data
    examples: int  # images (or texts) used, fitting and held-out together
    hyperparameters: Mapping[str, float | int | str | bool]
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    dropped: Sequence[str] = ()  # parts of the parent not carried over, and why


@dataclass(frozen=True)
class NewVersion:
    manifest: Manifest
    change: Change
    path: Path  # where it now lies: in the registry, or the --out folder
    installed: bool

    @property
    def ref(self) -> str:
        return self.manifest.ref


def next_version(source_version: str, tag: str, taken: Collection[str]) -> str:
    """``<source>+<tag><n>`` with the smallest free n; a source that already ends in
    ``+<tag><m>`` is counted from its base, so calibrating 1.0+cal1 again gives 1.0+cal2."""
    base = re.sub(rf"\+{re.escape(tag)}\d+$", "", source_version)
    n = 1
    while f"{base}+{tag}{n}" in taken:
        n += 1
    return f"{base}+{tag}{n}"


def check_version(name: str, version: str, taken: Collection[str]) -> None:
    """The new version must fit the manifest's pattern and not be installed yet."""
    try:
        TypeAdapter(BundleVersion).validate_python(version)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"new version: {message}; give one with --version") from exc
    if version in taken:
        raise ConfigError(f"{name}@{version} is already installed: choose a new --version")


def derive_version(
    registry: Registry,
    source: Bundle,
    change: Callable[[Path], Change],
    *,
    tag: str,
    version: str | None = None,
    out: Path | None = None,
) -> NewVersion:
    """Copy ``source``, apply ``change`` to the copy's folder, give it a new version and its
    lineage, then install it inactive (or, with ``out``, write it there, not installed)."""
    taken = {e.version for e in registry.list() if e.name == source.name}
    version = version or next_version(source.version, tag, taken)
    check_version(source.name, version, taken)
    if out is not None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out} is not an empty folder: choose a new one")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging_root = out.parent
    else:
        registry.root.mkdir(parents=True, exist_ok=True)
        staging_root = registry.root
    # Staged beside its final place (a dot-folder no listing reads): a failed fit leaves
    # nothing under a bundle's name, and the source is never written.
    with tempfile.TemporaryDirectory(prefix=".derive-", dir=staging_root) as staging:
        bundle, applied = write_new_version(source, Path(staging) / "bundle", version, change)
        if out is None:
            registry.install(bundle.directory, activate=False)
            path = registry.info(bundle.name, bundle.version).entry.path
        else:
            if out.exists():
                out.rmdir()
            shutil.move(bundle.directory, out)
            path = out
    logger.info("new bundle version %s from %s: %s", bundle.ref, source.ref, applied.method)
    return NewVersion(bundle.manifest, applied, path, installed=out is None)


def write_new_version(
    parent: Bundle, dest: Path, version: str, change: Callable[[Path], Change]
) -> tuple[Bundle, Change]:
    """Write the changed copy of ``parent`` into the new folder ``dest`` and load it back."""
    parent_digest = sha256_file(parent.directory / MANIFEST_NAME)
    copy_bundle(parent, dest)
    applied = change(dest)
    lineage = Lineage(
        parent=parent.ref,
        parent_manifest_sha256=parent_digest,
        method=applied.method,
        hyperparameters=dict(applied.hyperparameters),
        pairs=applied.examples,
        data=applied.data,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        dropped=list(applied.dropped),
        evaluation=dict(applied.evaluation),
    )
    changed = read_manifest(dest).model_dump(mode="json")
    # Validated as a whole: the lineage replaces the parent's, which stays in the parent.
    data = {**changed, "version": version, "lineage": lineage.model_dump(mode="json")}
    return write_bundle(dest, Manifest.model_validate(data)), applied
