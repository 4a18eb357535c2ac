"""The bundle registry in ``<data_dir>/models/``: installed bundles and which one is active.

Layout::

    <root>/registry.json          {"format_version": 1, "active": "name@version" | null,
                                   "installed": [{"name", "version", "path", "synthetic",
                                                  "installed_at"}],
                                   "shadow": [{"ref": "name@version", "site": key | null}]}
    <root>/<name>/<version>/      a verified copy of an installed bundle
    <root>/.lock                  serialises writers (install, activate) across processes

Built-in bundles (the demo model shipped inside the package) are read where they lie and are
never copied; ``registry.json`` only remembers their ``name@version`` when one is active.

While no bundle is active, the built-in demo is live or runs in shadow at every site, as the
registry's ``demo`` says (the ``demo_model`` setting): live for the quick start, shadow where
nothing synthetic may reach a clinical PACS.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plugin.durable import FileStamp, file_stamp, fsync_dir
from plugin.errors import PacsclipError
from plugin.models.bundle import (
    Bundle,
    BundleError,
    FileCheck,
    Manifest,
    check_files,
    load_bundle,
    read_manifest,
)

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
DemoRole = Literal["live", "shadow"]
DEMO_BUNDLE_DIR = Path(__file__).parent / "demo"


class RegistryError(PacsclipError):
    """A registry operation cannot be done; the message says why and what to do."""


class _InstalledRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    path: str  # relative to the registry root, so the data directory can move
    synthetic: bool
    installed_at: str


class ShadowModel(BaseModel):
    """A candidate that scores every study of ``site`` (every site when None) in shadow: its
    results are kept for validation, and nothing of it leaves pacsclip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str
    site: str | None = None

    def covers(self, site: str) -> bool:
        return self.site is None or self.site == site


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    active: str | None = None
    installed: list[_InstalledRecord] = Field(default_factory=list)
    shadow: list[ShadowModel] = Field(default_factory=list)


@dataclass(frozen=True)
class RegistryEntry:
    """One bundle the registry knows: installed (copied in) or built-in (in the package)."""

    name: str
    version: str
    synthetic: bool
    active: bool
    builtin: bool
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "synthetic": self.synthetic,
            "active": self.active,
            "builtin": self.builtin,
            "path": str(self.path),
        }


@dataclass(frozen=True)
class BundleReport:
    """What ``model info`` shows: the entry, its manifest and every file's checksum."""

    entry: RegistryEntry
    manifest: Manifest
    checks: list[FileCheck]

    @property
    def checksums_ok(self) -> bool:
        return all(check.ok for check in self.checks)


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``name@version``."""
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise RegistryError(f"{ref!r} is not of the form name@version")
    return name, version


def builtin_bundle_dirs() -> list[Path]:
    """The bundles shipped inside the package (the demo model, once it exists)."""
    return [DEMO_BUNDLE_DIR] if (DEMO_BUNDLE_DIR / "bundle.json").is_file() else []


class Registry:
    """Bundles installed under ``root`` plus the built-in ones in ``builtin_dirs``."""

    def __init__(
        self, root: Path, builtin_dirs: Sequence[Path] = (), demo: DemoRole = "live"
    ) -> None:
        self.root = Path(root)
        self.builtin_dirs = [Path(d) for d in builtin_dirs]
        self.demo = demo

    @classmethod
    def for_data_dir(cls, data_dir: Path, demo: DemoRole = "live") -> Registry:
        """The registry of a pacsclip data directory, with the package's built-in bundles."""
        return cls(Path(data_dir) / "models", builtin_dirs=builtin_bundle_dirs(), demo=demo)

    # -- reading ---------------------------------------------------------------------------

    def list(self) -> builtins.list[RegistryEntry]:
        """Every known bundle, installed first, each sorted by name then version."""
        state = self._read()
        entries = [self._installed_entry(r, state.active) for r in state.installed]
        seen = {e.ref for e in entries}
        live = state.active or (self._demo_ref() if self.demo == "live" else None)
        for entry in self._builtin_entries(live):
            if entry.ref not in seen:
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.builtin, e.name, _version_key(e.version)))

    def info(self, name: str, version: str | None = None) -> BundleReport:
        """Manifest and checksum results of one bundle (never raises for bad checksums).

        Without ``version``: the active version of ``name`` if it is active, else the newest.
        """
        entry = self._find(name, version)
        manifest = read_manifest(entry.path)
        return BundleReport(
            entry=entry, manifest=manifest, checks=check_files(entry.path, manifest)
        )

    def active(self) -> Bundle | None:
        """The active bundle, checksum-verified, or None when none was activated."""
        state = self._read()
        if state.active is None:
            return None
        name, version = parse_ref(state.active)
        return load_bundle(self._find(name, version).path)

    def live(self) -> Bundle | None:
        """The bundle whose results go out: the active one, else the built-in demo when it is
        live; None when no model is live (the demo, if any, runs in shadow)."""
        active = self.active()
        if active is not None or self.demo != "live":
            return active
        demo = self._demo_dir()
        return None if demo is None else load_bundle(demo)

    def stamp(self) -> FileStamp | None:
        """Changes whenever the registry is written (install, activate, shadow); see
        :func:`plugin.durable.file_stamp`. Running workers compare it to notice a change."""
        return file_stamp(self.root / REGISTRY_FILE)

    def live_ref(self) -> str | None:
        """``name@version`` of :meth:`live`, without loading it."""
        active = self._read().active
        if active is not None or self.demo != "live":
            return active
        return self._demo_ref()

    # -- changing --------------------------------------------------------------------------

    def install(self, src_dir: Path, activate: bool = False) -> str:
        """Verify the bundle in ``src_dir``, copy it in, and return its ``name@version``.

        Installing the same bundle again is a no-op; a different bundle under an existing
        ``name@version`` is refused (a version names one set of weights, forever).
        """
        bundle = load_bundle(Path(src_dir))
        with self._locked():
            state = self._read()
            if not self._already_there(bundle):
                record = self._copy_in(bundle)
                state.installed.append(record)
            if activate:
                state.active = bundle.ref
            self._write(state)
        logger.info("model bundle installed: %s (active=%s)", bundle.ref, activate)
        return bundle.ref

    def activate(self, name: str, version: str) -> Bundle:
        """Make ``name@version`` the active bundle after verifying its checksums."""
        with self._locked():
            bundle = load_bundle(self._find(name, version).path)
            state = self._read()
            state.active = bundle.ref
            # Live now: it no longer runs in shadow beside itself.
            state.shadow = [s for s in state.shadow if s.ref != bundle.ref]
            self._write(state)
        logger.info("model bundle activated: %s", bundle.ref)
        return bundle

    def shadows(self) -> builtins.list[ShadowModel]:
        """The candidates in shadow, with the built-in demo at every site while it is the
        fallback but not live."""
        state = self._read()
        shadows = list(state.shadow)
        demo = self._demo_ref() if self.demo == "shadow" and state.active is None else None
        if demo is not None and all(s.ref != demo for s in shadows):
            shadows.append(ShadowModel(ref=demo, site=None))
        return shadows

    def set_shadow(self, name: str, version: str, site: str | None, on: bool = True) -> None:
        """Run ``name@version`` in shadow at ``site`` (every site when None), or stop it."""
        with self._locked():
            entry = self._find(name, version)
            state = self._read()
            record = ShadowModel(ref=entry.ref, site=site)
            if on and entry.ref == state.active:
                raise RegistryError(f"{entry.ref} is the live model; it cannot also be a shadow")
            kept = [s for s in state.shadow if s != record]
            if not on and len(kept) == len(state.shadow):
                where = "every site" if site is None else f"site {site}"
                raise RegistryError(f"{entry.ref} is not in shadow at {where}")
            if on:
                load_bundle(entry.path)  # checksums: a shadow that cannot load is refused now
                kept.append(record)
            state.shadow = kept
            self._write(state)
        logger.info("shadow %s %s at %s", "on" if on else "off", entry.ref, site or "every site")

    def shadow_bundle(self, ref: str) -> Bundle:
        name, version = parse_ref(ref)
        return load_bundle(self._find(name, version).path)

    # -- internals -------------------------------------------------------------------------

    def _demo_dir(self) -> Path | None:
        return next((d for d in self.builtin_dirs if (d / "bundle.json").is_file()), None)

    def _demo_ref(self) -> str | None:
        directory = self._demo_dir()
        return None if directory is None else read_manifest(directory).ref

    def _find(self, name: str, version: str | None) -> RegistryEntry:
        candidates = [e for e in self.list() if e.name == name]
        if not candidates:
            known = ", ".join(sorted({e.name for e in self.list()})) or "none"
            raise RegistryError(
                f"no bundle named {name!r} (known: {known}); install it with "
                "`pacsclip model install DIR`"
            )
        if version is None:
            active = [e for e in candidates if e.active]
            return active[0] if active else max(candidates, key=lambda e: _version_key(e.version))
        for entry in candidates:
            if entry.version == version:
                return entry
        versions = ", ".join(e.version for e in candidates)
        raise RegistryError(f"{name} has no version {version!r} (versions: {versions})")

    def _already_there(self, bundle: Bundle) -> bool:
        """True when this exact bundle is already known; raises for a conflicting one."""
        existing = [e for e in self.list() if e.ref == bundle.ref]
        if not existing:
            if (self.root / bundle.name / bundle.version).exists():
                raise RegistryError(
                    f"{self.root / bundle.name / bundle.version} exists but is not in "
                    f"{REGISTRY_FILE}; move it away, then install again"
                )
            return False
        # Equal manifests pin equal digests, and load_bundle verified the files against them.
        if read_manifest(existing[0].path) == bundle.manifest:
            return True
        raise RegistryError(
            f"{bundle.ref} is already installed at {existing[0].path} with different "
            "contents; give the new bundle a new version in its bundle.json"
        )

    def _copy_in(self, bundle: Bundle) -> _InstalledRecord:
        parent = self.root / bundle.name
        parent.mkdir(parents=True, exist_ok=True)
        dest = parent / bundle.version
        # Copy beside the destination and rename, so a crash never leaves a half bundle
        # under its final name; the copy is re-verified in case the disk corrupted it.
        staging = Path(tempfile.mkdtemp(prefix=f".{bundle.version}.", dir=parent))
        try:
            shutil.copytree(bundle.directory, staging, dirs_exist_ok=True)
            load_bundle(staging)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(parent)
        return _InstalledRecord(
            name=bundle.name,
            version=bundle.version,
            path=dest.relative_to(self.root).as_posix(),
            synthetic=bundle.is_synthetic,
            installed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def _installed_entry(self, record: _InstalledRecord, active: str | None) -> RegistryEntry:
        return RegistryEntry(
            name=record.name,
            version=record.version,
            synthetic=record.synthetic,
            active=active == f"{record.name}@{record.version}",
            builtin=False,
            path=self.root / record.path,
        )

    def _builtin_entries(self, active: str | None) -> Iterator[RegistryEntry]:
        for directory in self.builtin_dirs:
            if not (directory / "bundle.json").is_file():
                continue
            try:
                manifest = read_manifest(directory)
            except BundleError as exc:
                # A broken built-in is a packaging bug; listing the others is still useful.
                logger.warning("built-in bundle in %s skipped: %s", directory, exc)
                continue
            yield RegistryEntry(
                name=manifest.name,
                version=manifest.version,
                synthetic=manifest.synthetic,
                active=active == manifest.ref,
                builtin=True,
                path=directory,
            )

    def _read(self) -> _RegistryFile:
        path = self.root / REGISTRY_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _RegistryFile()
        try:
            return _RegistryFile.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise RegistryError(
                f"{path} is damaged ({exc}); restore it from a backup or remove it and "
                "install the bundles again"
            ) from exc

    def _write(self, state: _RegistryFile) -> None:
        """Write registry.json atomically: temp file, fsync, rename, fsync the directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / REGISTRY_FILE
        fd, tmp = tempfile.mkstemp(prefix=f".{REGISTRY_FILE}.", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(state.model_dump_json(indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.root)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock so two processes cannot interleave read-modify-write."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order, so 2026.10.0 sorts after 2026.9.0."""
    parts = re.findall(r"\d+|[^\d]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def resolve_bundle(data_dir: Path, bundle_dir: Path | None = None) -> Bundle:
    """The bundle to run: an explicit folder, else the active one, else the built-in demo."""
    if bundle_dir is not None:
        return load_bundle(bundle_dir)
    registry = Registry.for_data_dir(data_dir)
    active = registry.active()
    if active is not None:
        return active
    builtin = builtin_bundle_dirs()
    if builtin:
        return load_bundle(builtin[0])
    raise RegistryError(
        "no model bundle: install one with 'pacsclip model install DIR --activate' "
        "or pass --bundle DIR"
    )


def live_bundle(
    data_dir: Path, bundle_dir: Path | None = None, demo: DemoRole = "live"
) -> Bundle | None:
    """The bundle whose results go out: an explicit folder, else the registry's live one;
    None when no model is live."""
    if bundle_dir is not None:
        return load_bundle(bundle_dir)
    return Registry.for_data_dir(data_dir, demo).live()


def live_model_ref(
    data_dir: Path, bundle_dir: Path | None = None, demo: DemoRole = "live"
) -> str | None:
    """``name@version`` of :func:`live_bundle`."""
    if bundle_dir is not None:
        return read_manifest(bundle_dir).ref
    return Registry.for_data_dir(data_dir, demo).live_ref()
