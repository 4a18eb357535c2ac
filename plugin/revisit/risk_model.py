"""The 7-day ER revisit risk model: train for a target site, store versioned, load, score.

A model is one of :data:`plugin.adaptation.METHODS` fitted on concept features of the notes
(:mod:`plugin.revisit.features`), with the target site's rows as the target. The artefact is
a folder ``<data_dir>/revisit/models/v<N>/``:

- ``model.json``: format, algorithm name and version, method, target site, feature spec,
  architecture, training metadata (counts per site, seed, configuration, seconds, software
  versions) and the SHA-256 of the two files below;
- ``state.pt``: tensors only (loaded with ``weights_only=True``: opening a model never runs
  code): the network's ``state_dict`` and the input standardiser, or the logistic weights;
- ``vocabulary.json``: the concept vocabulary, in column order.

Versions only grow; "the latest" is the highest. Scores are risks in [0, 1] on the target
site's case mix, and are never a diagnosis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

import plugin
from plugin.adaptation import (
    METHODS,
    TARGET_LABEL_METHODS,
    AdaptationError,
    LinearModel,
    Method,
    NeuralModel,
    TrainConfig,
    TrainingLog,
    fit,
)
from plugin.adaptation.networks import DannNetwork, Standardiser
from plugin.concepts import ConceptVocabulary, VocabularyFileError
from plugin.disclaimers import NOT_FOR_DIAGNOSIS
from plugin.durable import fsync_dir
from plugin.models.bundle import sha256_file
from plugin.revisit.encounters import Encounters, FloatArray
from plugin.revisit.features import FeatureSpec, RevisitError

logger = logging.getLogger(__name__)

ALGORITHM_NAME: Final = "pacsclip-revisit"
MODEL_FORMAT: Final = "pacsclip.revisit-model"
MODEL_FORMAT_VERSION: Final = 1
MANIFEST_FILE: Final = "model.json"
STATE_FILE: Final = "state.pt"
VOCABULARY_FILE: Final = "vocabulary.json"


class ModelNotFound(RevisitError):
    """No model is stored yet, or not the version asked for."""


@dataclass(frozen=True, eq=False)
class RevisitModel:
    """A fitted model with everything needed to score new encounters the same way.

    ``version`` is None until :meth:`ModelStore.save` gives the model its number.
    """

    method: str
    target_site: str
    features: FeatureSpec
    fitted: NeuralModel | LinearModel
    training: dict[str, Any]
    version: str | None = None

    @property
    def name(self) -> str:
        return ALGORITHM_NAME

    def predict(self, X: FloatArray) -> FloatArray:
        return self.fitted.predict_proba(X)

    def identity(self) -> dict[str, Any]:
        """What every score carries: algorithm name, version, method, target site."""
        return {
            "name": self.name,
            "version": self.version,
            "method": self.method,
            "target_site": self.target_site,
            "pacsclip_version": self.training.get("software", {}).get("pacsclip"),
        }


@dataclass(frozen=True)
class RevisitRisk:
    encounter_id: str
    site: str
    risk: float


def fit_revisit_model(
    encounters: Encounters,
    documents: Sequence[frozenset[str]],
    target_site: str,
    method: Method,
    *,
    features: FeatureSpec,
    seed: int = 0,
    config: TrainConfig | None = None,
) -> RevisitModel:
    """Train ``method`` for ``target_site`` on the encounters' features and outcomes.

    The unsupervised methods never read the target site's outcomes (``plugin.adaptation.fit``
    blanks them); target-only and mixed need both outcomes among the target's rows.
    """
    if method not in METHODS:
        raise RevisitError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if encounters.labels is None:
        raise RevisitError(f"{encounters.source}: training needs the revisit_7d column")
    sites = np.array(encounters.sites)
    if target_site not in set(encounters.sites):
        raise RevisitError(
            f"site {target_site!r} is not in {encounters.source}; its sites are "
            f"{', '.join(encounters.site_names())}"
        )
    cfg = config or TrainConfig()
    X = features.matrix(documents, encounters)
    try:
        fitted = fit(method, X, encounters.labels, sites, target_site, seed=seed, config=cfg)
    except AdaptationError as exc:
        raise RevisitError(f"cannot train {method} for site {target_site}: {exc}") from exc
    if not isinstance(fitted, NeuralModel | LinearModel):  # fit's two model classes
        raise TypeError(f"unexpected model class {type(fitted).__name__}")
    logger.info(
        "revisit model trained: method=%s target=%s rows=%d features=%d seconds=%.1f",
        method,
        target_site,
        len(encounters),
        X.shape[1],
        fitted.log.total_seconds,
    )
    return RevisitModel(
        method=method,
        target_site=target_site,
        features=features,
        fitted=fitted,
        training=_training_metadata(encounters, target_site, method, fitted.log, seed, cfg),
    )


def _training_metadata(
    encounters: Encounters,
    target_site: str,
    method: str,
    log: TrainingLog,
    seed: int,
    cfg: TrainConfig,
) -> dict[str, Any]:
    labels = encounters.labels if encounters.labels is not None else np.zeros(len(encounters))
    sites: dict[str, dict[str, int]] = {}
    for name in encounters.site_names():
        rows = np.array(encounters.sites) == name
        entry = {"encounters": int(rows.sum())}
        # The unsupervised arms never saw the target's outcomes: record none of them.
        if name != target_site or method in TARGET_LABEL_METHODS:
            entry["revisits"] = int(labels[rows].sum())
        sites[name] = entry
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": Path(encounters.source).name,
        "encounters": len(encounters),
        "sites": sites,
        "source_sites": [s for s in encounters.site_names() if s != target_site],
        "seed": seed,
        "config": dataclasses.asdict(cfg),
        "epochs_run": log.epochs_run,
        "seconds": round(log.total_seconds, 3),
        "software": {
            "pacsclip": plugin.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }


def score_encounters(
    model: RevisitModel, encounters: Encounters, documents: Sequence[frozenset[str]]
) -> list[RevisitRisk]:
    """Risk of a 7-day revisit for each encounter, in input order."""
    risks = model.predict(model.features.matrix(documents, encounters))
    return [
        RevisitRisk(encounter_id, site, float(risk))
        for encounter_id, site, risk in zip(encounters.ids, encounters.sites, risks, strict=True)
    ]


def risks_document(model: RevisitModel, risks: Sequence[RevisitRisk]) -> dict[str, Any]:
    """Scores as plain data, with the model's identity and the notices every output carries."""
    other = sum(1 for r in risks if r.site and r.site != model.target_site)
    warnings = (
        [
            f"{other} encounter(s) are from sites other than {model.target_site}, the site this "
            "model was adapted to"
        ]
        if other
        else []
    )
    return {
        "algorithm": model.identity(),
        "notices": [NOT_FOR_DIAGNOSIS],
        "warnings": warnings,
        "risks": [dataclasses.asdict(r) for r in risks],
    }


# --------------------------------------------------------------------------- artefacts


class ModelStore:
    """Versioned model folders ``v1``, ``v2``, ... under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> ModelStore:
        return cls(Path(data_dir) / "revisit" / "models")

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            number = child.name.removeprefix("v")
            if child.name.startswith("v") and number.isdigit() and child.is_dir():
                found.append(int(number))
        return sorted(found)

    def save(self, model: RevisitModel) -> RevisitModel:
        """Write the model as the next version; returns it with its version set.

        Written into a hidden folder and renamed, so no reader sees half a model; two
        concurrent saves get different versions (the second rename fails and retries).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            while True:
                version = str(max(self.versions(), default=0) + 1)
                stored = dataclasses.replace(model, version=version)
                _write_artefact(stored, staging)
                try:
                    os.rename(staging, self.root / f"v{version}")
                except OSError:
                    if not (self.root / f"v{version}").exists():
                        raise
                    continue
                fsync_dir(self.root)
                logger.info("revisit model stored: version=%s method=%s", version, model.method)
                return stored
        finally:
            if staging.exists():
                for leftover in staging.iterdir():
                    leftover.unlink()
                staging.rmdir()

    def path(self, version: str | None = None) -> Path:
        """The folder of ``version`` (``3`` or ``v3``), or of the latest version."""
        versions = self.versions()
        if not versions:
            raise ModelNotFound(
                f"no revisit model is trained yet (none in {self.root}): "
                "run `pacsclip revisit train` first"
            )
        if version is None:
            return self.root / f"v{versions[-1]}"
        number = version.removeprefix("v")
        if not number.isdigit() or int(number) not in versions:
            raise ModelNotFound(
                f"no revisit model version {version!r}; stored: "
                f"{', '.join(str(v) for v in versions)}"
            )
        return self.root / f"v{int(number)}"

    def load(self, version: str | None = None) -> RevisitModel:
        return load_artefact(self.path(version))


def _write_artefact(model: RevisitModel, folder: Path) -> None:
    state, architecture = _state(model.fitted)
    torch.save(state, folder / STATE_FILE)
    model.features.vocabulary.save(folder / VOCABULARY_FILE)
    _fsync(folder / STATE_FILE)
    manifest = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "algorithm": {"name": model.name, "version": model.version},
        "method": model.method,
        "target_site": model.target_site,
        "notice": NOT_FOR_DIAGNOSIS,
        "features": model.features.to_json(),
        "architecture": architecture,
        "training": model.training,
        "files": {name: sha256_file(folder / name) for name in (STATE_FILE, VOCABULARY_FILE)},
    }
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync(path)


def load_artefact(folder: Path) -> RevisitModel:
    """Read and verify a model folder (format, checksums, feature names)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RevisitError(f"cannot read the revisit model in {folder}: {exc}") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MODEL_FORMAT
        or manifest.get("format_version") != MODEL_FORMAT_VERSION
    ):
        raise RevisitError(f"{folder} is not a {MODEL_FORMAT} v{MODEL_FORMAT_VERSION} model folder")
    try:
        for name, expected in manifest["files"].items():
            if sha256_file(folder / name) != expected:
                raise RevisitError(f"{folder / name} does not match its checksum: retrain")
        vocabulary = ConceptVocabulary.load(folder / VOCABULARY_FILE)
        state = torch.load(folder / STATE_FILE, weights_only=True)
        fitted = _restore(manifest["method"], manifest["architecture"], state, manifest)
        features = FeatureSpec.from_json(manifest["features"], vocabulary)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError, VocabularyFileError) as exc:
        raise RevisitError(f"the revisit model in {folder} is damaged: {exc}") from exc
    return RevisitModel(
        method=manifest["method"],
        target_site=manifest["target_site"],
        features=features,
        fitted=fitted,
        training=manifest["training"],
        version=manifest["algorithm"]["version"],
    )


def _state(fitted: NeuralModel | LinearModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    scaler = {
        "scaler.mean": torch.from_numpy(fitted.scaler.mean),
        "scaler.scale": torch.from_numpy(fitted.scaler.scale),
    }
    if isinstance(fitted, LinearModel):
        weights = {
            "weights": torch.from_numpy(fitted.weights),
            "bias": torch.tensor(fitted.bias, dtype=torch.float64),
        }
        return {**scaler, **weights}, {"kind": "linear", "n_features": len(fitted.weights)}
    network = fitted.network
    extractor_widths = [m.out_features for m in network.extractor if isinstance(m, torch.nn.Linear)]
    dropouts = [m.p for m in network.extractor if isinstance(m, torch.nn.Dropout)]
    architecture = {
        "kind": "neural",
        "n_features": int(fitted.scaler.mean.shape[0]),
        "hidden": extractor_widths,
        "dropout": dropouts[0] if dropouts else 0.0,
        "n_domain_heads": network.domain_heads.n_heads,
        "domain_hidden": int(network.domain_heads.w1.shape[2]),
    }
    tensors = {f"network.{k}": v.detach().clone() for k, v in network.state_dict().items()}
    return {**scaler, **tensors}, architecture


def _restore(
    method: str,
    architecture: dict[str, Any],
    state: dict[str, torch.Tensor],
    manifest: dict[str, Any],
) -> NeuralModel | LinearModel:
    scaler = Standardiser(
        state["scaler.mean"].double().numpy(), state["scaler.scale"].double().numpy()
    )
    training = manifest.get("training", {})
    log = TrainingLog(int(training.get("epochs_run", 0)), (), float(training.get("seconds", 0.0)))
    if architecture["kind"] == "linear":
        weights = state["weights"].double().numpy()
        return LinearModel(method, weights, float(state["bias"]), scaler, log)
    network = DannNetwork(
        int(architecture["n_features"]),
        [int(h) for h in architecture["hidden"]],
        int(architecture["n_domain_heads"]),
        dropout=float(architecture["dropout"]),
        domain_hidden=int(architecture["domain_hidden"]),
    )
    prefix = "network."
    network.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    network.eval()
    return NeuralModel(method, network, scaler, log)


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
