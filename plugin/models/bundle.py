"""Model bundles: the ``bundle.json`` manifest, its validation, and checksum-verified loading.

A bundle is a folder that holds everything one CLIP-style model needs (docs/model-bundle.md).
Nothing is downloaded: every weight file is pinned by SHA-256 and checked when the bundle loads,
so a half-copied or tampered file fails loudly before any study is scored with it.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from plugin.disclaimers import SYNTHETIC_MODEL
from plugin.errors import PacsclipError

FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
SYNTHETIC_NOTICE = SYNTHETIC_MODEL

ModelT = TypeVar("ModelT", bound=BaseModel)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_FINDING_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _matching(pattern: re.Pattern[str], rule: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(f"{value!r} is not allowed: use {rule}")
        return value

    return AfterValidator(check)


# Names and versions become folder names in the registry, and finding names become keys in
# prompt_embeddings.npz ("<finding>/positive"), so all three are kept to safe characters.
BundleName = Annotated[
    str,
    _matching(_NAME_RE, "1-64 lowercase letters, digits, '.', '_' or '-', starting alphanumeric"),
]
BundleVersion = Annotated[
    str,
    _matching(_VERSION_RE, "1-64 letters, digits, '.', '_', '+' or '-', starting alphanumeric"),
]
FindingName = Annotated[
    str,
    _matching(_FINDING_RE, "1-64 lowercase letters, digits or '_', starting with a letter"),
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class BundleError(PacsclipError):
    """A bundle is invalid, incomplete or corrupted; the message names the file and the fix."""


class _Strict(BaseModel):
    # Unknown keys are refused so that a misspelt key ("treshold") cannot be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef(_Strict):
    """A file inside the bundle, pinned by its SHA-256."""

    path: str = Field(min_length=1)
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_bundle(cls, value: str) -> str:
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or "\\" in value:
            raise ValueError(
                f"{value!r} must be a relative path inside the bundle, with '/' separators "
                "and no '..'"
            )
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError(
                f"must be 64 lowercase hex digits (the output of `sha256sum FILE`); got {value!r}"
            )
        return value


class ImageSpec(_Strict):
    """How pixels are prepared for the image tower (the imaging code reads this)."""

    size: int = Field(ge=8, le=4096)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    # Same vocabulary as plugin.imaging.preprocess.ImageSpec, which does the pixel work.
    resize: Literal["letterbox", "stretch", "center-crop"] = "letterbox"
    # Where a center crop starts when the margin is odd: "floor" as transformers' image
    # processors place it, "round" (half to even) as torchvision's CenterCrop in open_clip does.
    # Bundles written before this key existed were cropped with "floor".
    crop_offset: Literal["floor", "round"] = "floor"
    window: Literal["voi_lut_or_minmax", "minmax"] = "voi_lut_or_minmax"
    invert_monochrome1: bool = True

    @model_validator(mode="after")
    def _per_channel(self) -> ImageSpec:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"image.{key} has {len(values)} values but image.channels is "
                    f"{self.channels}: give one value per channel, or one for all"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError("image.std values must all be > 0")
        return self


class BundleFiles(_Strict):
    """The pinned files; only the image tower is required."""

    image_tower: FileRef
    text_tower: FileRef | None = None
    tokenizer: FileRef | None = None
    prompt_embeddings: FileRef | None = None


# What is done to a text before tokenizer.json sees it (plugin.models.runtime.clean_text): the
# cleaning of the model's own tokenizer. "open_clip_*" are open_clip's clean functions (ftfy,
# HTML entities unescaped twice, whitespace; then lower-casing or canonicalisation), "siglip" is
# transformers' SiglipTokenizer.canonicalize_text, "none" leaves the text to tokenizer.json's
# own normalizer (transformers' CLIP tokenizer does all its cleaning there).
TextCleaning = Literal[
    "none", "open_clip_lower", "open_clip_whitespace", "open_clip_canonicalize", "siglip"
]


class TextEncoderSpec(_Strict):
    """Where text embeddings come from, if the bundle can embed new text at all."""

    kind: Literal["onnx", "installed-package", "none"] = "none"
    package: str | None = None
    package_sha256: str | None = None
    projection: FileRef | None = None
    max_length: int = Field(77, ge=1, le=4096)
    # "none" for bundles written before this key existed: their prompt embeddings were computed
    # from raw text, and new text must be embedded the same way to be compared with them.
    cleaning: TextCleaning = "none"

    @model_validator(mode="after")
    def _package_fields(self) -> TextEncoderSpec:
        if self.cleaning != "none" and self.kind != "onnx":
            raise ValueError(
                f"text_encoder.cleaning {self.cleaning!r} is for the ONNX text tower's "
                f"tokenizer (kind is {self.kind!r}): remove it or change the kind"
            )
        if self.kind == "installed-package":
            if not self.package or not self.package_sha256:
                raise ValueError(
                    "text_encoder.kind 'installed-package' needs text_encoder.package and "
                    "text_encoder.package_sha256"
                )
            if not _SHA256_RE.match(self.package_sha256):
                raise ValueError("text_encoder.package_sha256 must be 64 lowercase hex digits")
        elif self.package is not None or self.package_sha256 is not None:
            raise ValueError(
                f"text_encoder.package is only used with kind 'installed-package' "
                f"(kind is {self.kind!r}): remove it or change the kind"
            )
        return self


class Calibration(_Strict):
    """Maps a zero-shot probability p to sigmoid((logit(p) - bias) / temperature)."""

    temperature: float = Field(1.0, gt=0.0)
    bias: float = 0.0
    # Strictly inside (0, 1), as the triage's calibration requires: a threshold of 0 or 1
    # would make every score one decision, and a bundle must not install that way.
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    indeterminate_band: float = Field(0.1, ge=0.0, lt=0.5)
    fitted_on: str | None = None


class FindingCodeSpec(_Strict):
    """A finding's standard code (SNOMED CT "SCT", RadLex "RADLEX", ...), as results carry it."""

    value: str = Field(min_length=1, max_length=16)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class Finding(_Strict):
    """One finding the triage scores, with its prompt sets and decision thresholds."""

    name: FindingName
    display: str = Field(min_length=1)
    # The finding's code in results; without one, a default for common findings is looked up
    # by name (plugin/results/finding_codes.py), else pacsclip's local scheme codes it.
    code: FindingCodeSpec | None = Field(None, exclude_if=lambda value: value is None)
    positive_prompts: list[str] = Field(min_length=1)
    negative_prompts: list[str] = Field(min_length=1)
    templates: list[str] = Field(default_factory=lambda: ["{}"], min_length=1)
    calibration: Calibration = Field(default_factory=Calibration)
    stat_threshold: Probability | None = None
    # Words that name the finding in a radiology report, beyond the report labeler's defaults.
    report_terms: list[str] = Field(default_factory=list)
    # SHA-256 of the prompt texts prompt_embeddings.npz holds for this finding (prompts_digest),
    # written with the embeddings; absent from bundles whose embeddings did not record it.
    embedded_prompts_sha256: str | None = Field(None, exclude_if=lambda value: value is None)

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: list[str]) -> list[str]:
        for template in value:
            if template.count("{}") != 1:
                raise ValueError(
                    f"template {template!r} must contain '{{}}' exactly once "
                    "(where the prompt goes)"
                )
        return value

    @field_validator("embedded_prompts_sha256")
    @classmethod
    def _prompts_digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_RE.match(value):
            raise ValueError(f"must be 64 lowercase hex digits; got {value!r}")
        return value

    def prompt_texts(self, positive: bool) -> list[str]:
        """Every template filled with every prompt of one set, templates outermost."""
        prompts = self.positive_prompts if positive else self.negative_prompts
        return [t.replace("{}", p) for t in self.templates for p in prompts]

    def prompts_digest(self) -> str:
        """SHA-256 of the texts that are embedded for this finding (both sets, in order)."""
        texts = {"positive": self.prompt_texts(True), "negative": self.prompt_texts(False)}
        encoded = json.dumps(texts, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()

    @property
    def prompts_match_embeddings(self) -> bool:
        """False when the prompts were edited after their embeddings were written (an
        unrecorded digest, in older bundles, counts as a match)."""
        recorded = self.embedded_prompts_sha256
        return recorded is None or recorded == self.prompts_digest()


class PriorityPolicy(_Strict):
    stat_if_any: list[str] = Field(default_factory=list)
    default: Literal["routine", "stat"] = "routine"


class HeadRef(_Strict):
    """A few-shot head fitted on site data (heads/<name>-v<N>.npz)."""

    name: FindingName
    version: int = Field(ge=1)
    kind: Literal["linear_probe", "tip_adapter"]  # the KIND of plugin.triage.heads
    file: FileRef
    findings: list[str] = Field(min_length=1)
    fitted_on: str | None = None


class ModelCard(_Strict):
    intended_use: str = Field(min_length=1)
    training_data: str = Field(min_length=1)
    limitations: str = Field(min_length=1)
    not_for_clinical_use: bool


class Lineage(_Strict):
    """Where a derived bundle came from (``pacsclip model finetune``, ``calibrate``,
    ``fit-head``, ``fit-ood``, ``embed-prompts``): enough to trace it back to its parent and to
    the data it was fitted on, without any patient data."""

    parent: str = Field(min_length=3)  # "name@version"
    parent_manifest_sha256: str
    method: str = Field(min_length=1)
    hyperparameters: dict[str, float | int | str | bool]
    # Examples used, fitting and held-out together: image-report pairs (finetune), labelled
    # images (calibrate, fit-head), images (fit-ood), prompt texts (embed-prompts).
    pairs: int = Field(ge=1)
    data: str = Field(min_length=1)  # what the examples were, in words (never a patient's data)
    created: str = Field(min_length=1)  # ISO date, or date and time
    dropped: list[str] = Field(default_factory=list)  # parent parts not carried over, and why
    evaluation: dict[str, Any] = Field(default_factory=dict)  # held-out summary vs the parent

    @field_validator("parent_manifest_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError(f"must be the 64 hex digits of bundle.json's sha256; got {value!r}")
        return value


class OodFittedOn(_Strict):
    """What an out-of-distribution reference was fitted on."""

    n: int = Field(ge=2)  # images the mean and covariance came from
    heldout_n: int = Field(ge=1)  # other images the threshold was set on
    heldout_pass_rate: Probability  # share of those at or below the threshold
    description: str = Field(min_length=1)
    fitted_at: str | None = None  # ISO date


class OodSpec(_Strict):
    """The bundle's out-of-distribution reference (plugin.triage.ood): findings are not
    asserted on images whose embedding lies beyond ``threshold`` from it."""

    method: Literal["mahalanobis"] = "mahalanobis"
    # What describes an image: its embedding, and a coarse thumbnail of its model input.
    features: Literal["embedding", "embedding+thumbnail"] = "embedding+thumbnail"
    thumbnail: int = Field(16, ge=2, le=64)  # side of that thumbnail, in cells
    file: FileRef
    threshold: float = Field(gt=0.0)
    quantile: float = Field(gt=0.0, lt=1.0)  # of the held-out distances, where threshold sits
    fitted_on: OodFittedOn


class Manifest(_Strict):
    """``bundle.json``, format_version 1."""

    format_version: int
    name: BundleName
    version: BundleVersion
    embedding_dim: int = Field(ge=1, le=65536)
    synthetic: bool
    image: ImageSpec
    files: BundleFiles
    text_encoder: TextEncoderSpec = Field(default_factory=TextEncoderSpec)
    logit_scale: float = Field(100.0, gt=0.0)
    findings: list[Finding] = Field(default_factory=list)
    priority: PriorityPolicy = Field(default_factory=PriorityPolicy)
    heads: list[HeadRef] = Field(default_factory=list)
    # "name-vN" of the head that replaces zero-shot scores for its findings, if any.
    active_head: str | None = None
    # Optional: a bundle without one is scored on every image (older bundles, imports).
    ood: OodSpec | None = None
    # Optional: only bundles derived by fine-tuning have one.
    lineage: Lineage | None = None
    # (rows, columns) of the image tower's patch_embeds tokens, row-major; without it a
    # square grid is derived from the token count (ViTs on square inputs).
    patch_grid: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, exclude_if=lambda value: value is None
    )
    model_card: ModelCard

    @field_validator("format_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(
                f"format_version {value} is not supported; this pacsclip reads "
                f"format_version {FORMAT_VERSION}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [f.name for f in self.findings]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"findings: names must be unique, repeated: {duplicates}")
        self._check_references(set(names))
        self._check_text_sources()
        if self.synthetic and not self.model_card.not_for_clinical_use:
            raise ValueError("a synthetic bundle must set model_card.not_for_clinical_use: true")
        return self

    def _check_references(self, names: set[str]) -> None:
        unknown = [n for n in self.priority.stat_if_any if n not in names]
        # A stat rule without a threshold would never (or always) fire.
        no_threshold = [
            f.name
            for f in self.findings
            if f.name in self.priority.stat_if_any and f.stat_threshold is None
        ]
        if no_threshold:
            raise ValueError(
                f"findings {no_threshold} are in priority.stat_if_any but have no "
                "stat_threshold: give each a stat_threshold between 0 and 1"
            )
        for head in self.heads:
            unknown += [n for n in head.findings if n not in names]
        if self.active_head is not None and self.head(self.active_head) is None:
            raise ValueError(
                f"active_head {self.active_head!r} is not one of heads "
                f"{[f'{h.name}-v{h.version}' for h in self.heads]}"
            )
        if unknown:
            raise ValueError(
                f"priority/heads name findings that are not in findings: {sorted(set(unknown))}"
            )

    def _check_text_sources(self) -> None:
        kind = self.text_encoder.kind
        if kind == "onnx" and (self.files.text_tower is None or self.files.tokenizer is None):
            raise ValueError("text_encoder.kind 'onnx' needs files.text_tower and files.tokenizer")
        if kind != "onnx" and self.files.text_tower is not None:
            raise ValueError("files.text_tower is given: set text_encoder.kind to 'onnx'")
        # Triage scores findings against prompt embeddings; without a way to get them the
        # bundle could only ever fail at the first study.
        if self.findings and kind == "none" and self.files.prompt_embeddings is None:
            raise ValueError(
                "findings need prompt embeddings: add files.prompt_embeddings or a text encoder"
            )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def stale_prompt_findings(self) -> list[str]:
        """Findings whose prompts differ from those their stored embeddings were computed from."""
        return [f.name for f in self.findings if not f.prompts_match_embeddings]

    def head(self, label: str) -> HeadRef | None:
        """The head called ``name-vN``."""
        return next((h for h in self.heads if f"{h.name}-v{h.version}" == label), None)


class PromptsFile(_Strict):
    """The ``--prompts FILE.json`` of ``import-onnx``: the manifest's finding-related keys."""

    findings: list[Finding] = Field(min_length=1)
    priority: PriorityPolicy = Field(default_factory=PriorityPolicy)
    logit_scale: float = Field(100.0, gt=0.0)


def read_prompts_file(path: Path) -> PromptsFile:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read prompts file {path}: {exc}") from exc
    return validate_model(PromptsFile, data, f"{path} is not a valid prompts file")


@dataclass(frozen=True)
class FileCheck:
    """The checksum result of one pinned file."""

    label: str
    path: Path
    expected: str
    actual: str | None  # None when the file is missing

    @property
    def ok(self) -> bool:
        return self.actual == self.expected

    def describe(self) -> str:
        if self.actual is None:
            return f"{self.label} ({self.path}) is missing; expected sha256 {self.expected}"
        return (
            f"{self.label} ({self.path}) is corrupted: expected sha256 {self.expected}, "
            f"actual {self.actual}"
        )


@dataclass(frozen=True)
class Bundle:
    """A loaded, checksum-verified bundle: its manifest and where its files are."""

    manifest: Manifest
    directory: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def is_synthetic(self) -> bool:
        return self.manifest.synthetic

    @property
    def not_for_clinical_use(self) -> bool:
        """The model card says the bundle is not for clinical use."""
        return self.manifest.model_card.not_for_clinical_use

    @property
    def findings(self) -> list[Finding]:
        return self.manifest.findings

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    def path_of(self, ref: FileRef) -> Path:
        return self.directory / ref.path

    @property
    def image_tower_path(self) -> Path:
        return self.path_of(self.manifest.files.image_tower)

    @property
    def text_tower_path(self) -> Path | None:
        return self._optional(self.manifest.files.text_tower)

    @property
    def tokenizer_path(self) -> Path | None:
        return self._optional(self.manifest.files.tokenizer)

    @property
    def prompt_embeddings_path(self) -> Path | None:
        return self._optional(self.manifest.files.prompt_embeddings)

    @property
    def projection_path(self) -> Path | None:
        return self._optional(self.manifest.text_encoder.projection)

    @property
    def ood_reference_path(self) -> Path | None:
        ood = self.manifest.ood
        return None if ood is None else self.path_of(ood.file)

    def _optional(self, ref: FileRef | None) -> Path | None:
        return None if ref is None else self.path_of(ref)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file as 64 lowercase hex digits, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pinned_files(manifest: Manifest) -> dict[str, FileRef]:
    """Every pinned file of a manifest by label (``files.*``, projection, heads)."""
    refs: dict[str, FileRef] = {
        label: ref for label, ref in manifest.files if isinstance(ref, FileRef)
    }
    if manifest.text_encoder.projection is not None:
        refs["text_encoder.projection"] = manifest.text_encoder.projection
    for head in manifest.heads:
        refs[f"heads.{head.name}-v{head.version}"] = head.file
    if manifest.ood is not None:
        refs["ood.file"] = manifest.ood.file
    return refs


def check_files(directory: Path, manifest: Manifest) -> list[FileCheck]:
    """Checksum every pinned file; never raises for a missing or corrupted file."""
    checks = []
    for label, ref in pinned_files(manifest).items():
        path = directory / ref.path
        actual = sha256_file(path) if path.is_file() else None
        checks.append(FileCheck(label=label, path=path, expected=ref.sha256, actual=actual))
    return checks


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate ``<directory>/bundle.json`` without checking file digests."""
    path = directory / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{directory} is not a model bundle: {MANIFEST_NAME} is missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    return parse_manifest(data, source=str(path))


def parse_manifest(data: Any, source: str = MANIFEST_NAME) -> Manifest:
    """Validate manifest data; the error lists every problem with its key path."""
    return validate_model(Manifest, data, f"{source} is not a valid bundle manifest")


def validate_model(model: type[ModelT], data: Any, what: str) -> ModelT:
    """``model.model_validate(data)``, raising :class:`BundleError` with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {line}" for line in describe_validation_error(exc, model))
        raise BundleError(f"{what}:\n{problems}") from exc


def load_bundle(directory: Path) -> Bundle:
    """Read ``bundle.json`` and verify the SHA-256 of every pinned file.

    Raises :class:`BundleError` naming each missing or corrupted file with the expected and the
    actual digest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    failed = [check for check in check_files(directory, manifest) if not check.ok]
    if failed:
        details = "\n".join(f"  - {check.describe()}" for check in failed)
        raise BundleError(
            f"bundle {manifest.ref} in {directory} failed its checksums:\n{details}\n"
            "Copy the bundle again from its source, or re-pin a deliberately changed file."
        )
    return Bundle(manifest=manifest, directory=directory)


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per pydantic error: where (dotted key path) and what to fix."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, error["loc"][:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{where}: unknown key, remove it or fix its spelling{hint}")
        elif error["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{where}: {message}")
    return lines


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the nested model that ``loc`` points into, if it can be found."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue  # a list index: the element type was already unwrapped
        field = current.model_fields.get(part)
        current = _model_in(field.annotation) if field is not None else None
    return sorted(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
