"""Site-adapted triage heads: per-site replacements of a bundle's finding scores.

A site head is a small network per finding over a bundle's image embeddings, trained for one
PACS site (``pacsclip adapt triage``, Multi-DANN by default), stored *inactive*, and made the
site's head only after a labelled validation at that site (``pacsclip adapt promote``). The
triage runtime then uses it for studies of that site only; every other site keeps the
bundle's zero-shot scores or its active head.

Storage, per bundle (embeddings of another bundle version are another space):
``<data_dir>/site-heads/<name>@<version>/index.json`` lists every head with its site, method,
findings, SHA-256 and validation record, and maps each site to its active head version;
``site-head-v<N>.npz`` holds the weights (numpy arrays only, loaded without pickle). Scoring
is numpy: the worker needs no torch to apply a head.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from plugin.durable import FileStamp, file_stamp, write_durably
from plugin.errors import ConfigError
from plugin.triage.zeroshot import FloatArray, sigmoid

SITE_HEAD_KIND: Final = "site_mlp"
SITE_HEAD_FORMAT_VERSION: Final = 1
INDEX_FORMAT: Final = "pacsclip.site-heads"
INDEX_FILE: Final = "index.json"
_MODEL_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


class SiteHeadError(ConfigError):
    """A site head or its index is missing, damaged, or asked for the wrong site."""


@dataclass(frozen=True, eq=False)
class FindingNetwork:
    """P(finding) = sigmoid(out . relu(... relu(z W1 + b1) ...) + out_bias), z standardised."""

    mean: FloatArray  # [D]
    scale: FloatArray  # [D]
    layers: tuple[tuple[FloatArray, FloatArray], ...]  # hidden (W [in, out], b [out]), ReLU
    out_weight: FloatArray  # [H] (or [D] without hidden layers)
    out_bias: float

    def logits(self, embeds: FloatArray) -> FloatArray:
        hidden = (embeds - self.mean) / self.scale
        for weight, bias in self.layers:
            hidden = np.maximum(hidden @ weight + bias, 0.0)
        result: FloatArray = hidden @ self.out_weight + self.out_bias
        return result


@dataclass(frozen=True, eq=False)
class SiteHead:
    """One network per finding, columns in the order of ``findings``."""

    findings: tuple[str, ...]
    networks: tuple[FindingNetwork, ...]

    def __post_init__(self) -> None:
        if len(self.findings) != len(self.networks) or not self.findings:
            raise ValueError("a site head needs one network per finding, and a finding")

    @property
    def embedding_dim(self) -> int:
        return int(self.networks[0].mean.shape[0])

    def predict_proba(self, embeds: npt.ArrayLike) -> FloatArray:
        """P(present) [N, F]."""
        array = np.asarray(embeds, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must be [N, {self.embedding_dim}], got shape {array.shape}"
            )
        return sigmoid(np.column_stack([n.logits(array) for n in self.networks]))

    def to_bytes(self) -> bytes:
        arrays: dict[str, Any] = {
            "kind": np.array(SITE_HEAD_KIND),
            "format_version": np.array(SITE_HEAD_FORMAT_VERSION),
            "findings": np.array(list(self.findings), dtype=np.str_),
        }
        for i, network in enumerate(self.networks):
            arrays[f"{i}.mean"] = network.mean
            arrays[f"{i}.scale"] = network.scale
            arrays[f"{i}.layers"] = np.array(len(network.layers))
            for j, (weight, bias) in enumerate(network.layers):
                arrays[f"{i}.{j}.weight"] = weight
                arrays[f"{i}.{j}.bias"] = bias
            arrays[f"{i}.out.weight"] = network.out_weight
            arrays[f"{i}.out.bias"] = np.array(network.out_bias)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SiteHead:
        try:
            # allow_pickle=False: opening a head file must never run code.
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            if str(arrays["kind"]) != SITE_HEAD_KIND:
                raise SiteHeadError(f"{where} is a {arrays['kind']}, not a site head")
            if int(arrays["format_version"]) != SITE_HEAD_FORMAT_VERSION:
                raise SiteHeadError(f"{where} has format version {arrays['format_version']}")
            findings = tuple(str(f) for f in arrays["findings"])
            networks = tuple(_network(arrays, i) for i in range(len(findings)))
        except (KeyError, OSError, ValueError, zipfile.BadZipFile) as exc:
            raise SiteHeadError(f"cannot read site head {where}: {exc}") from exc
        return cls(findings, networks)


def _network(arrays: Mapping[str, npt.NDArray[Any]], i: int) -> FindingNetwork:
    def floats(name: str) -> FloatArray:
        return np.asarray(arrays[name], dtype=np.float64)

    layers = tuple(
        (floats(f"{i}.{j}.weight"), floats(f"{i}.{j}.bias"))
        for j in range(int(arrays[f"{i}.layers"]))
    )
    return FindingNetwork(
        floats(f"{i}.mean"),
        floats(f"{i}.scale"),
        layers,
        floats(f"{i}.out.weight"),
        float(arrays[f"{i}.out.bias"]),
    )


def apply_site_head(
    probs: FloatArray, finding_names: Sequence[str], head: SiteHead, embeds: npt.ArrayLike
) -> FloatArray:
    """``probs`` [N, F] with the head's findings' columns replaced by the head's scores."""
    columns = [list(finding_names).index(name) for name in head.findings]
    result = probs.copy()
    result[:, columns] = head.predict_proba(embeds)
    return result


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class SiteHeadEntry:
    """One stored head: what it is for, how it was made, and how it was validated."""

    version: int
    site: str
    file: str
    sha256: str
    method: str
    findings: list[str]
    source_sites: list[str]
    fitted_on: str
    created_at: str
    validation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"site-head-v{self.version}"


class SiteHeadRegistry:
    """The site heads of one bundle version (``model_ref``, ``name@version``)."""

    def __init__(self, root: Path, model_ref: str) -> None:
        self.root = Path(root)
        self.model_ref = model_ref

    @classmethod
    def for_data_dir(cls, data_dir: Path, model_ref: str) -> SiteHeadRegistry:
        if not _MODEL_REF.match(model_ref):
            raise SiteHeadError(f"model reference {model_ref!r} cannot name a folder")
        return cls(Path(data_dir) / "site-heads" / model_ref, model_ref)

    def entries(self) -> list[SiteHeadEntry]:
        return [SiteHeadEntry(**entry) for entry in self._index()["heads"]]

    def entry(self, version: int) -> SiteHeadEntry:
        for entry in self.entries():
            if entry.version == version:
                return entry
        known = ", ".join(str(e.version) for e in self.entries()) or "none"
        raise SiteHeadError(
            f"no site head version {version} for {self.model_ref} (stored: {known})"
        )

    def active(self) -> dict[str, int]:
        """Site key -> version of its active head."""
        return {str(k): int(v) for k, v in self._index()["active"].items()}

    def add(
        self,
        head: SiteHead,
        *,
        site: str,
        method: str,
        source_sites: Sequence[str],
        fitted_on: str,
        extra: Mapping[str, Any] | None = None,
    ) -> SiteHeadEntry:
        """Store ``head`` for ``site`` as the next version, inactive."""
        index = self._index()
        version = 1 + max((int(e["version"]) for e in index["heads"]), default=0)
        data = head.to_bytes()
        entry = SiteHeadEntry(
            version=version,
            site=site,
            file=f"site-head-v{version}.npz",
            sha256=hashlib.sha256(data).hexdigest(),
            method=method,
            findings=list(head.findings),
            source_sites=list(source_sites),
            fitted_on=fitted_on,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            extra=dict(extra or {}),
        )
        self.root.mkdir(parents=True, exist_ok=True)
        write_durably(self.root / entry.file, data, self.root)
        index["heads"].append(asdict(entry))
        self._write(index)
        return entry

    def load(self, version: int) -> SiteHead:
        entry = self.entry(version)
        path = self.root / entry.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SiteHeadError(f"cannot read site head {path}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise SiteHeadError(f"{path} does not match its checksum in {INDEX_FILE}")
        return SiteHead.from_bytes(data, str(path))

    def activate(self, site: str, version: int, validation: Mapping[str, Any]) -> None:
        """Make head ``version`` the head of ``site``, recording the validation it passed."""
        entry = self.entry(version)
        if entry.site != site:
            raise SiteHeadError(
                f"site head {version} was trained for site {entry.site!r}, not {site!r}"
            )
        index = self._index()
        heads = [SiteHeadEntry(**raw) for raw in index["heads"]]
        index["heads"] = [
            asdict(replace(e, validation=dict(validation)) if e.version == version else e)
            for e in heads
        ]
        index["active"][site] = version
        self._write(index)

    def active_heads(self) -> dict[str, tuple[int, SiteHead]]:
        """(version, head) of every site's active head, loaded and verified."""
        return {site: (version, self.load(version)) for site, version in self.active().items()}

    def _index(self) -> dict[str, Any]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return {
                "format": INDEX_FORMAT,
                "format_version": 1,
                "model_ref": self.model_ref,
                "heads": [],
                "active": {},
            }
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SiteHeadError(f"cannot read {path}: {exc}") from exc
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise SiteHeadError(f"{path} is not a {INDEX_FORMAT} index")
        return index

    def _write(self, index: dict[str, Any]) -> None:
        data = json.dumps(index, indent=1).encode("utf-8")
        write_durably(self.root / INDEX_FILE, data, self.root)


def load_active_site_heads(data_dir: Path, model_ref: str) -> dict[str, tuple[int, SiteHead]]:
    """Promoted heads by site key for a bundle, for ``TriageModel(site_heads=...)``."""
    return SiteHeadRegistry.for_data_dir(data_dir, model_ref).active_heads()


def site_heads_stamp(data_dir: Path) -> tuple[tuple[str, FileStamp | None], ...]:
    """The stamp of every bundle's site-head index: changes when a head is added or promoted
    (``pacsclip adapt triage``, ``adapt promote``), so running workers notice."""
    root = Path(data_dir) / "site-heads"
    indexes = sorted(root.glob(f"*/{INDEX_FILE}")) if root.is_dir() else []
    return tuple((path.parent.name, file_stamp(path)) for path in indexes)
