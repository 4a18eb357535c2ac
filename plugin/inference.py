"""Run a model bundle on the images of a study: the triage the worker and ``pacsclip triage`` share.

DICOM datasets -> model input -> image embeddings -> out-of-distribution check (when the
bundle has a reference) -> per-finding probabilities of the images in distribution (zero-shot
prompt ensembles, or a fitted head) -> pooled over images -> calibrated decisions -> priority
-> saliency maps for the findings worth showing. A study whose images are out of distribution
is "not scored": no finding, no heat map. Loaded once per process.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from plugin.disclaimers import NOT_FOR_CLINICAL_USE, NOT_FOR_DIAGNOSIS
from plugin.imaging import ImageSpec, display_array, model_input, pool_scores, select_images
from plugin.models.bundle import SYNTHETIC_NOTICE, Bundle
from plugin.models.runtime import ImageEncoder, PromptEmbeddings
from plugin.results.finding_codes import finding_code
from plugin.results.study_result import FindingCode
from plugin.triage import (
    NOT_SCORED,
    Calibration,
    FindingPrompts,
    LinearProbe,
    PriorityPolicy,
    TipAdapter,
    decide,
    occlusion_maps,
    peak,
    zero_shot_probabilities,
)
from plugin.triage.ood import OodReference, OodReferenceError, StudyDistribution
from plugin.triage.patch_maps import finding_map, input_map_to_image
from plugin.triage.saliency import Outline, outlines
from plugin.triage.site_heads import SiteHead, apply_site_head

logger = logging.getLogger(__name__)

AI_NOTICE = NOT_FOR_DIAGNOSIS
# Occlusion squares are this share of the tower's input side (32 pixels of a 224 input),
# moved by half a square: finer maps cost more passes than they show.
OCCLUSION_PATCH = 1 / 7
# Images larger than this (pixels) get no heat map: 64 megapixels, beyond any radiograph.
MAX_MAP_PIXELS = 64_000_000
UNMAPPED_TOO_LARGE = "the image is too large for a heat map (over 64 megapixels)"
REGION_KEYS = ("row_min", "col_min", "row_max", "col_max")


@dataclass(frozen=True)
class FindingOutcome:
    name: str
    display: str
    raw_probability: float  # before calibration, pooled over the study's images
    probability: float  # calibrated
    decision: str  # present | absent | indeterminate
    threshold: float
    source_sop_instance_uid: str  # the image that scored highest
    # What produced the score: zero-shot prompts, the bundle's head or a site head, and the
    # calibration applied (results say it beside the score).
    scored_by: str = "zero-shot prompts"
    # The finding's standard code (the bundle's, else a default for its name); None: none.
    code: FindingCode | None = None


@dataclass(frozen=True)
class SaliencyOutcome:
    finding: str
    sop_instance_uid: str
    heatmap: NDArray[np.float32]  # at the source image size, in [0, 1]
    peak: tuple[int, int, float]
    region: tuple[int, int, int, int] | None  # row_min, col_min, row_max, col_max
    # The regions the map points at, hottest first (plugin/triage/saliency.py outlines).
    outlines: tuple[Outline, ...] = ()
    # "patch-similarity" (the tower's patch tokens, plugin/triage/patch_maps.py) or "occlusion".
    method: str = "occlusion"


@dataclass(frozen=True)
class TriageReport:
    algorithm_name: str
    algorithm_version: str
    synthetic: bool
    findings: list[FindingOutcome]
    priority: str
    triggered_by: list[str]
    # SOP Instance UIDs embedded: those out of distribution too, for they are still indexed.
    images: list[str]
    embeddings: NDArray[np.float32]  # [images, D], for similar-case retrieval
    saliency: list[SaliencyOutcome] = field(default_factory=list)
    site_head: str | None = None  # "site-head-vN" when a promoted site head scored the study
    # Where the images lie against the bundle's reference; None when none was checked.
    distribution: StudyDistribution | None = None
    # Not part of the result: the decoded images (by SOP Instance UID), so overlays need not
    # decode them again, and seconds per step (decode, inference, saliency).
    displays: dict[str, NDArray[np.float32]] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    # The bundle's model card says not for clinical use (the synthetic demo's says so too).
    not_for_clinical_use: bool = False

    @property
    def notices(self) -> list[str]:
        if self.synthetic:
            return [AI_NOTICE, SYNTHETIC_NOTICE]
        if self.not_for_clinical_use:
            return [AI_NOTICE, NOT_FOR_CLINICAL_USE]
        return [AI_NOTICE]

    @property
    def scored(self) -> bool:
        return self.distribution is None or self.distribution.scored

    def ood_dict(self) -> dict[str, Any] | None:
        """The out-of-distribution status as results show it; None when none was checked."""
        d = self.distribution
        if d is None:
            return None
        return {
            "status": "in_distribution" if d.scored else "out_of_distribution",
            "scored": d.scored,
            "method": d.method,
            "distance": d.distance,
            "threshold": d.threshold,
            "images": len(d.distances),
            "images_outside": d.images_outside,
            "distances": list(d.distances),
            "model": {"name": self.algorithm_name, "version": self.algorithm_version},
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "algorithm": {
                "name": self.algorithm_name,
                "version": self.algorithm_version,
                "synthetic": self.synthetic,
                # Only when one scored the study: the usual output keeps its shape.
                **({"site_head": self.site_head} if self.site_head else {}),
            },
            "notices": self.notices,
            "ood": self.ood_dict(),
            "priority": self.priority,
            "triggered_by": self.triggered_by,
            "findings": [asdict(f) for f in self.findings],
            "images": self.images,
            "saliency": [
                {
                    "finding": s.finding,
                    "sop_instance_uid": s.sop_instance_uid,
                    "method": s.method,
                    "peak": {"row": s.peak[0], "col": s.peak[1], "value": s.peak[2]},
                    "region": None
                    if s.region is None
                    else dict(zip(REGION_KEYS, s.region, strict=True)),
                    "outlines": [o.as_list() for o in s.outlines],
                }
                for s in self.saliency
            ],
        }


class TriageModel:
    """A bundle ready to score studies: encoder session, prompts, calibration, priority."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        threads: int | None = None,
        site_heads: Mapping[str, tuple[int, SiteHead]] | None = None,
        ood_guard: bool = True,
    ) -> None:
        manifest = bundle.manifest
        self.bundle = bundle
        self.spec = ImageSpec.from_manifest(manifest.image.model_dump())
        self.encoder = ImageEncoder(bundle, threads=threads)
        prompts = PromptEmbeddings.load(bundle)
        self.prompts = [
            FindingPrompts.from_prompt_sets(f.name, *prompts.for_finding(f.name))
            for f in manifest.findings
        ]
        self.calibrations = {
            f.name: Calibration.from_manifest(f.calibration.model_dump()) for f in manifest.findings
        }
        self.policy = PriorityPolicy.from_manifest(
            manifest.priority.model_dump(), [f.model_dump() for f in manifest.findings]
        )
        self.logit_scale = manifest.logit_scale
        self.codes = {
            f.name: finding_code(
                f.name, None if f.code is None else FindingCode(**f.code.model_dump())
            )
            for f in manifest.findings
        }
        self.head = _load_head(bundle)
        # Promoted site-adapted heads (site key -> (version, head)): they replace the scores of
        # their findings for studies of that site only (plugin/triage/site_heads.py).
        self.site_heads = dict(site_heads or {})
        self.ood = _load_ood(bundle) if ood_guard else None
        if ood_guard and self.ood is None:
            logger.warning(
                "bundle %s has no out-of-distribution reference: its findings are asserted on "
                "every image; fit one with `pacsclip model fit-ood`",
                bundle.ref,
            )

    def warm_up(self) -> None:
        """Run the image tower once on a blank image, so that the first study does not pay
        for onnxruntime's first-run set-up."""
        blank = np.zeros((self.spec.size, self.spec.size), dtype=np.float32)
        self.encoder.encode(model_input(blank, self.spec)[np.newaxis])

    def display(self, ds: Dataset) -> NDArray[np.float32]:
        """The image as the model's preprocessing shows it (grey in [0, 1])."""
        return display_array(
            ds, window=self.spec.window, invert_monochrome1=self.spec.invert_monochrome1
        )

    @property
    def finding_names(self) -> list[str]:
        return [p.name for p in self.prompts]

    def probabilities(
        self, inputs: NDArray[np.float32], site: str | None = None
    ) -> NDArray[np.float64]:
        """Uncalibrated per-finding probabilities [N, F] of model inputs [N, C, H, W]."""
        return self.scores(self.encoder.encode(inputs), site)

    def scores(self, embeds: NDArray[np.float32], site: str | None = None) -> NDArray[np.float64]:
        """Zero-shot probabilities, replaced by the active head's for the findings it has,
        then by the site's promoted head's for the findings that one has."""
        probs = zero_shot_probabilities(embeds, self.prompts, self.logit_scale)
        if self.head is not None:
            columns = [self.finding_names.index(name) for name in self.head.findings]
            if isinstance(self.head, TipAdapter):
                probs[:, columns] = self.head.predict_proba(embeds, probs[:, columns])
            else:
                probs[:, columns] = self.head.predict_proba(embeds)
        site_head = self._site_head(site)
        if site_head is not None:
            probs = apply_site_head(probs, self.finding_names, site_head[1], embeds)
        return probs

    def _site_head(self, site: str | None) -> tuple[int, SiteHead] | None:
        return None if site is None else self.site_heads.get(site)

    def _calibration(self, finding: str, site: str | None) -> Calibration:
        """A site head's outputs are probabilities of their own: the bundle's temperature and
        bias (fitted on zero-shot scores) do not apply to them; its threshold still does."""
        calibration = self.calibrations[finding]
        site_head = self._site_head(site)
        if site_head is not None and finding in site_head[1].findings:
            return Calibration(
                threshold=calibration.threshold,
                indeterminate_band=calibration.indeterminate_band,
                fitted_on=calibration.fitted_on,
            )
        return calibration

    def _scored_by(self, finding: str, calibration: Calibration, site: str | None) -> str:
        site_head = self._site_head(site)
        if site_head is not None and finding in site_head[1].findings:
            source = f"site head v{site_head[0]} of site {site}"
        elif self.head is not None and finding in self.head.findings:
            source = f"few-shot head {self.bundle.manifest.active_head}"
        else:
            source = "zero-shot prompts"
        fitted = calibration.fitted_on
        return f"{source}; calibrated on {fitted}" if fitted else f"{source}; not calibrated"

    def embed(self, datasets: Sequence[Dataset]) -> tuple[list[str], NDArray[np.float32]]:
        """The SOP Instance UIDs and image embeddings of the study's images, unscored (for the
        similar-case index when routing runs retrieval only)."""
        images = _images_to_score(datasets)
        if not images:
            raise ValueError("no image in the study can be embedded")
        inputs = np.stack([model_input(self.display(ds), self.spec) for ds in images])
        embeds = self.encoder.encode(inputs).astype(np.float32)
        return [str(ds.SOPInstanceUID) for ds in images], embeds

    def triage(
        self, datasets: Sequence[Dataset], *, saliency: bool = True, site: str | None = None
    ) -> TriageReport:
        """Score a study; ``site`` (the study's site key) selects that site's promoted head."""
        images = all_images = _images_to_score(datasets)
        if not images:
            raise ValueError("no image in the study can be scored")
        started = time.perf_counter()
        displays = [self.display(ds) for ds in images]
        decoded = time.perf_counter()
        inputs = np.stack([model_input(d, self.spec) for d in displays])
        patches: NDArray[np.float32] | None = None
        if self.encoder.has_patch_embeddings and saliency:
            # The patch tokens come from the same forward pass: the maps need no other.
            embeds, patches = self.encoder.encode_with_patches(inputs)
        else:
            embeds = self.encoder.encode(inputs)
        distribution = None if self.ood is None else self.ood.assess(embeds, inputs)
        if distribution is not None and not distribution.scored:
            return self._not_scored(images, displays, embeds, distribution, started, decoded)
        # Images outside the reference are embedded (and indexed) but never scored.
        kept = [
            i for i in range(len(images)) if distribution is None or not distribution.outside[i]
        ]
        if len(kept) < len(images):
            images, displays = [images[i] for i in kept], [displays[i] for i in kept]
        probs = self.scores(embeds[kept], site)
        site_head = self._site_head(site)
        pooled = pool_scores(probs, "max")
        best = probs.argmax(axis=0)
        findings = []
        for j, finding in enumerate(self.bundle.manifest.findings):
            calibration = self._calibration(finding.name, site)
            calibrated = float(calibration.apply(np.array([pooled[j]]))[0])
            findings.append(
                FindingOutcome(
                    name=finding.name,
                    display=finding.display,
                    raw_probability=float(pooled[j]),
                    probability=calibrated,
                    decision=decide(calibrated, calibration),
                    threshold=calibration.threshold,
                    source_sop_instance_uid=str(images[best[j]].SOPInstanceUID),
                    scored_by=self._scored_by(finding.name, calibration, site),
                    code=self.codes[finding.name],
                )
            )
        priority, triggered = self.policy.priority_for({f.name: f.probability for f in findings})
        report = TriageReport(
            algorithm_name=self.bundle.name,
            algorithm_version=self.bundle.version,
            synthetic=self.bundle.is_synthetic,
            not_for_clinical_use=self.bundle.not_for_clinical_use,
            findings=findings,
            priority=priority,
            triggered_by=triggered,
            images=[str(ds.SOPInstanceUID) for ds in all_images],
            embeddings=embeds.astype(np.float32),
            site_head=None if site_head is None else f"site-head-v{site_head[0]}",
            distribution=distribution,
            displays={str(ds.SOPInstanceUID): d for ds, d in zip(images, displays, strict=True)},
        )
        scored = time.perf_counter()
        if saliency:
            kept_patches = None if patches is None else patches[kept]
            report.saliency.extend(
                self._saliency(findings, images, displays, site, patches=kept_patches)
            )
        report.timings.update(
            decode=decoded - started,
            inference=scored - decoded,
            saliency=time.perf_counter() - scored,
        )
        return report

    def _not_scored(
        self,
        images: list[Dataset],
        displays: list[NDArray[np.float32]],
        embeds: NDArray[np.float32],
        distribution: StudyDistribution,
        started: float,
        decoded: float,
    ) -> TriageReport:
        """The report of a study out of distribution: no finding, no heat map, no priority
        from findings; its embeddings are kept for retrieval."""
        logger.info(
            "study not scored by %s: %d of %d images out of distribution (distance %.2f, "
            "threshold %.2f)",
            self.bundle.ref,
            distribution.images_outside,
            len(distribution.distances),
            distribution.distance,
            distribution.threshold,
        )
        report = TriageReport(
            algorithm_name=self.bundle.name,
            algorithm_version=self.bundle.version,
            synthetic=self.bundle.is_synthetic,
            not_for_clinical_use=self.bundle.not_for_clinical_use,
            findings=[],
            priority=NOT_SCORED,
            triggered_by=[],
            images=[str(ds.SOPInstanceUID) for ds in images],
            embeddings=embeds.astype(np.float32),
            distribution=distribution,
            displays={str(ds.SOPInstanceUID): d for ds, d in zip(images, displays, strict=True)},
        )
        report.timings.update(
            decode=decoded - started, inference=time.perf_counter() - decoded, saliency=0.0
        )
        return report

    def _saliency(
        self,
        findings: list[FindingOutcome],
        images: list[Dataset],
        displays: list[NDArray[np.float32]],
        site: str | None = None,
        *,
        patches: NDArray[np.float32] | None = None,
    ) -> list[SaliencyOutcome]:
        """Heat maps for present or undetermined findings; an absent one gets none, so no map
        ever points at a finding the result says is not there."""
        shown = [f for f in findings if f.decision != "absent"]
        if not shown:
            return []
        index_of = {str(ds.SOPInstanceUID): i for i, ds in enumerate(images)}
        column = {name: j for j, name in enumerate(self.finding_names)}
        by_image: dict[int, list[FindingOutcome]] = defaultdict(list)
        for finding in shown:
            by_image[index_of[finding.source_sop_instance_uid]].append(finding)
        maps: dict[str, NDArray[np.float32]] = {}
        method = "occlusion" if patches is None else "patch-similarity"
        for i, on_image in by_image.items():
            if displays[i].size > MAX_MAP_PIXELS:
                # A full-size float map per finding would take gigabytes; the findings keep
                # their scores, and the results say why they have no region.
                continue
            if patches is not None:
                maps.update(self._patch_maps(on_image, patches[i], displays[i].shape))
                continue
            columns = [column[f.name] for f in on_image]
            heatmaps = self._occlusion_maps(displays[i], columns, site)
            maps.update({f.name: h for f, h in zip(on_image, heatmaps, strict=True)})
        outcomes = []
        for finding in shown:
            if finding.name not in maps:
                continue
            heatmap = maps[finding.name]
            found = tuple(outlines(heatmap))
            box = found[0].box() if found else None
            outcomes.append(
                SaliencyOutcome(
                    finding=finding.name,
                    sop_instance_uid=finding.source_sop_instance_uid,
                    heatmap=heatmap,
                    peak=peak(heatmap),
                    region=box,
                    outlines=found,
                    method=method,
                )
            )
        return outcomes

    def _occlusion_maps(
        self, display: NDArray[np.float32], columns: list[int], site: str | None
    ) -> list[NDArray[np.float32]]:
        """Occlusion maps of the `columns` findings on one image, on its own pixel grid.

        The squares are blanked in the model's input (size x size) rather than in the image:
        the input is made once, not once per occluded copy, and a square covers the same
        share of what the tower sees whatever the image's size. One pass of occluded inputs
        serves every finding shown on the image.
        """
        size = self.spec.size
        image = model_input(display, self.spec)
        # What the tower is given for a black image: the value a blanked square takes.
        blank = model_input(np.zeros_like(display), self.spec)

        def scores(masks: NDArray[np.float32]) -> NDArray[np.float64]:
            inputs = np.where(masks[:, np.newaxis] > 0.5, blank, image)
            return self.probabilities(inputs, site)[:, columns]

        # occlusion_maps blanks squares of its image with the baseline: on an all-zero image
        # with baseline 1 its occluded copies are exactly the masks of the squares.
        patch = max(2, round(size * OCCLUSION_PATCH))
        on_input = occlusion_maps(
            np.zeros((size, size), dtype=np.float32),
            scores,
            len(columns),
            patch=patch,
            stride=max(1, patch // 2),
            baseline=1.0,
        )
        return [input_map_to_image(m, display.shape, self.spec, stretch=False) for m in on_input]

    def _patch_maps(
        self,
        on_image: list[FindingOutcome],
        patches: NDArray[np.float32],
        shape: tuple[int, ...],
    ) -> dict[str, NDArray[np.float32]]:
        """Patch-similarity maps of one image's tokens [P, D], on its own pixel grid."""
        grid = self.encoder.patch_grid(patches.shape[0])
        prompts = {p.name: p for p in self.prompts}
        height, width = shape
        return {
            f.name: finding_map(patches, grid, prompts[f.name], (height, width), self.spec)
            for f in on_image
        }


def _load_head(bundle: Bundle) -> LinearProbe | TipAdapter | None:
    label = bundle.manifest.active_head
    if label is None:
        return None
    ref = bundle.manifest.head(label)
    if ref is None:  # the manifest validator makes this unreachable
        raise ValueError(f"active head {label} is not in the bundle")
    kind = TipAdapter if ref.kind == "tip_adapter" else LinearProbe
    return kind.load(bundle.path_of(ref.file), ref.findings)


def _load_ood(bundle: Bundle) -> OodReference | None:
    """The bundle's reference, checked against its manifest entry; None when it has none."""
    spec, path = bundle.manifest.ood, bundle.ood_reference_path
    if spec is None or path is None:
        return None
    reference = OodReference.load(path, bundle.embedding_dim)
    stored = (reference.method, reference.features, reference.thumbnail)
    declared = (spec.method, spec.features, spec.thumbnail)
    if stored != declared or not np.isclose(reference.threshold, spec.threshold, rtol=1e-9):
        raise OodReferenceError(
            f"bundle {bundle.ref}: {spec.file.path} holds {stored} with threshold "
            f"{reference.threshold:.6g} but bundle.json declares {declared} with threshold "
            f"{spec.threshold:.6g}: fit the reference again with `pacsclip model fit-ood`"
        )
    return reference


def _images_to_score(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Every projection image; sampled slices of each CT/MR series."""
    series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        if "PixelData" in ds:
            series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    return [image for members in series.values() for image in select_images(members)]
