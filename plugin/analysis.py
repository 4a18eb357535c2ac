"""Analysing a complete study: triage, result objects, catalog rows, dispatch jobs.

A study out of the model's distribution is still recorded, with its embeddings (so retrieval
finds it), and gets an SR saying it was not scored; it gets no overlay, since there is no
finding to show.

Idempotent per (study, generation, model name, model version): the result UIDs are derived
from those, and a second run finds the first one's rows, so a redelivered task never makes a
second SR in the PACS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from plugin.catalog.analyses import (
    LIVE,
    NewAnalysis,
    RecordedAnalysis,
    ResultFile,
    ScoredImages,
    find_analysis,
    predecessor_report_path,
    record_analysis,
    record_embeddings_only,
    study_to_analyse,
)
from plugin.catalog.db import Catalog
from plugin.demo.radiographs import demo_radiographs
from plugin.durable import write_durably
from plugin.inference import (
    MAX_MAP_PIXELS,
    UNMAPPED_TOO_LARGE,
    FindingOutcome,
    SaliencyOutcome,
    TriageModel,
    TriageReport,
)
from plugin.results import (
    AlgorithmIdentity,
    DistributionCheck,
    FindingResult,
    ResultUids,
    StudyResult,
    build_measurement_report,
    build_overlay,
)
from plugin.results.overlay import OverlayBase, overlay_base
from plugin.results.seg import build_segmentation, segmented_findings
from plugin.results.study_result import MANUFACTURER
from plugin.settings import DestinationConfig, Settings
from plugin.triage.saliency import outlines

logger = logging.getLogger(__name__)

# Series numbers of pacsclip's result series: high, so they sort after the acquisitions.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SEG_SERIES_NUMBER = 9903
ALL_DESTINATIONS = "*"
# The synthetic image a worker scores once at start (a stream no demo data set draws from).
WARM_UP_STREAM = 99
WARM_UP_SIZE = 256


@dataclass(frozen=True)
class AnalysisOutcome:
    analysis_id: int
    job_ids: list[int]
    priority: str
    created: bool  # False when an earlier run of the same generation had done it
    duration_s: float = 0.0
    since_complete_s: float | None = None
    # Seconds per step: read, decode, inference, saliency, build, write, record.
    steps: dict[str, float] = field(default_factory=dict)
    site: str | None = None  # the study's site key, for per-site metrics
    images_outside: int = 0  # images out of the model's distribution (not scored)


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # SR | SC | SEG
    dataset: Dataset


class StudyAnalyser:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        model: TriageModel,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.model = model
        self.now = now
        self.algorithm = AlgorithmIdentity(
            name=model.bundle.name,
            version=model.bundle.version,
            synthetic=model.bundle.is_synthetic,
            not_for_clinical_use=model.bundle.not_for_clinical_use,
        )

    def warm_up(self) -> list[str]:
        """Score one synthetic image and build and encode its SR and an overlay, in memory
        only (nothing is written or recorded): the first study then finds pydicom's pixel
        handlers, highdicom's SR and secondary-capture code and onnxruntime already set up.
        Returns the kinds of the objects built."""
        source = next(demo_radiographs(1, seed=0, stream=WARM_UP_STREAM, size=WARM_UP_SIZE))
        report = self.model.triage([source])
        heatmap = np.zeros((source.Rows, source.Columns), dtype=np.float32)
        heatmap[: source.Rows // 2, : source.Columns // 2] = 1.0
        name = self.model.finding_names[0]
        saliency = SaliencyOutcome(
            finding=name,
            sop_instance_uid=str(source.SOPInstanceUID),
            heatmap=heatmap,
            peak=(0, 0, 1.0),
            region=(0, 0, source.Rows // 2 - 1, source.Columns // 2 - 1),
            outlines=tuple(outlines(heatmap)),
        )
        # The finding present on its image, so that the SR's region and the SEG are built too.
        present = [
            replace(f, decision="present", source_sop_instance_uid=str(source.SOPInstanceUID))
            if f.name == name
            else f
            for f in report.findings
        ]
        report = replace(report, findings=present, saliency=[saliency])
        result = self._study_result(report, [source])
        built = self._build([source], report, result, generation=1, predecessor=None)
        for obj in built:
            obj.dataset.save_as(BytesIO(), enforce_file_format=True)
        return [obj.kind for obj in built]

    def analyse(self, study_uid: str, generation: int) -> AnalysisOutcome:
        started = time.monotonic()
        with self.catalog.sessions() as session:
            study = study_to_analyse(session, study_uid)
            done = find_analysis(
                session, study.id, generation, self.algorithm.name, self.algorithm.version, LIVE
            )
            if done is not None:
                return _outcome(done)
            destinations = self._destinations(study.routing)
            previous = predecessor_report_path(session, study.id, generation, self.algorithm.name)
        # The SR of the latest earlier generation by the same model, for re-analysis.
        predecessor = None if previous is None else dcmread(self.settings.results_dir / previous)
        site = study.site_key  # picks the site's promoted head, if it has one
        steps: dict[str, float] = {}
        with _timed(steps, "read"):
            datasets = read_study(self.settings.spool_dir, study.instance_paths)
        report = self.model.triage(datasets, site=site)
        steps.update(report.timings)
        with _timed(steps, "build"):
            result = self._study_result(report, datasets)
            built = self._build(datasets, report, result, generation, predecessor)
        with _timed(steps, "write"):
            stored = [self._write(study_uid, obj) for obj in built]
        with _timed(steps, "record"):
            rows = finding_rows(report, result.findings)
            outcome = self._record(
                study_uid,
                generation,
                report,
                rows,
                stored,
                destinations,
                time.monotonic() - started,
            )
        outcome.steps.update(steps)
        if report.distribution is not None:
            outcome = replace(outcome, site=site, images_outside=report.distribution.images_outside)
        logger.info(
            "study %s generation %d analysed by %s %s: priority %s, %d objects, %d jobs",
            study_uid,
            generation,
            self.algorithm.name,
            self.algorithm.version,
            report.priority,
            len(stored),
            len(outcome.job_ids),
        )
        return outcome

    def embed_only(self, study_uid: str, generation: int) -> bool:
        """Routing asks for retrieval only: keep the images' embeddings for the similar-case
        index and build or send nothing; True when the study moved to analysed."""
        with self.catalog.sessions() as session:
            study = study_to_analyse(session, study_uid)
        datasets = read_study(self.settings.spool_dir, study.instance_paths)
        uids, vectors = self.model.embed(datasets)
        scored = ScoredImages(self.model.bundle.ref, uids, vectors)
        with self.catalog.sessions() as session:
            moved = record_embeddings_only(session, study_uid, generation, scored)
        logger.info(
            "study %s generation %d: retrieval only, %d images embedded by %s",
            study_uid,
            generation,
            len(uids),
            self.model.bundle.ref,
        )
        return moved

    def _destinations(self, routing: dict[str, object] | None) -> list[DestinationConfig]:
        named = list((routing or {}).get("destinations", [ALL_DESTINATIONS]))  # type: ignore[call-overload]
        configured = {d.name: d for d in self.settings.destinations}
        if ALL_DESTINATIONS in named:
            return list(configured.values())
        missing = [n for n in named if n not in configured]
        if missing:
            logger.warning("routing names destinations that are not configured: %s", missing)
        return [configured[n] for n in named if n in configured]

    def _build(
        self,
        datasets: Sequence[Dataset],
        report: TriageReport,
        result: StudyResult,
        generation: int,
        predecessor: Dataset | None,
    ) -> list[BuiltObject]:
        """The SR, one overlay per heat map and the SEGs of `result` (see `_study_result`)."""
        study_uid = str(datasets[0].StudyInstanceUID)
        uids = ResultUids(study_uid, self.algorithm, generation)
        scored = _scored(datasets, report)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in scored}
        when = self.now()
        sr = build_measurement_report(
            scored,
            result,
            series_uid=uids.sr_series,
            sop_uid=uids.sr_instance,
            series_number=SR_SERIES_NUMBER,
            instance_number=1,
            content_datetime=when,
            predecessor=predecessor,
        )
        objects = [BuiltObject("SR", sr)]
        findings = {f.name: f for f in result.findings}
        # The grey of an image is prepared once for all the overlays of that image.
        bases: dict[str, OverlayBase] = {}
        for n, saliency in enumerate(report.saliency):
            uid = saliency.sop_instance_uid
            source = by_uid[uid]
            if uid not in bases:
                display = report.displays.get(uid)
                bases[uid] = overlay_base(
                    self.model.display(source) if display is None else display
                )
            objects.append(
                BuiltObject(
                    "SC",
                    build_overlay(
                        source,
                        saliency.heatmap,
                        result,
                        bases[uid],
                        finding=findings[saliency.finding],
                        series_uid=uids.sc_series,
                        sop_uid=uids.sc_instance(n),
                        series_number=SC_SERIES_NUMBER,
                        instance_number=n + 1,
                        content_datetime=when,
                    ),
                )
            )
        if self.settings.result_seg:
            objects.extend(self._segmentations(scored, result, uids, when))
        return objects

    def _study_result(self, report: TriageReport, datasets: Sequence[Dataset]) -> StudyResult:
        """What the builders and the catalog's finding rows take, from the scored images."""
        sources = {str(ds.SOPInstanceUID): ds for ds in _scored(datasets, report)}
        return StudyResult(
            findings=[
                _finding_result(f, report, sources, regions_on=self.settings.result_regions)
                for f in report.findings
            ],
            priority=report.priority,  # type: ignore[arg-type]
            triggered_by=report.triggered_by,
            algorithm=self.algorithm,
            distribution=_distribution_check(report),
        )

    def _segmentations(
        self,
        sources: Sequence[Dataset],
        result: StudyResult,
        uids: ResultUids,
        when: datetime,
    ) -> list[BuiltObject]:
        """One SEG per image that a present finding has a region on, in one series."""
        with_regions = [ds for ds in sources if segmented_findings(result, ds)]
        return [
            BuiltObject(
                "SEG",
                build_segmentation(
                    source,
                    result,
                    series_uid=uids.seg_series,
                    sop_uid=uids.seg_instance(n),
                    series_number=SEG_SERIES_NUMBER,
                    instance_number=n + 1,
                    content_datetime=when,
                ),
            )
            for n, source in enumerate(with_regions)
        ]

    def _write(self, study_uid: str, obj: BuiltObject) -> ResultFile:
        ds = obj.dataset
        relative = f"{study_uid}/{ds.SOPInstanceUID}.dcm"
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = self.settings.results_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.settings.results_dir / ".incoming").mkdir(exist_ok=True)
        write_durably(path, buffer.getvalue(), self.settings.results_dir / ".incoming")
        return ResultFile(
            kind=obj.kind,
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            path=relative,
        )

    def _record(
        self,
        study_uid: str,
        generation: int,
        report: TriageReport,
        findings: list[dict[str, object]],
        objects: list[ResultFile],
        destinations: list[DestinationConfig],
        duration_s: float,
    ) -> AnalysisOutcome:
        new = NewAnalysis(
            generation=generation,
            algorithm_name=self.algorithm.name,
            algorithm_version=self.algorithm.version,
            synthetic=self.algorithm.synthetic,
            priority=report.priority,
            triggered_by=list(report.triggered_by),
            findings=findings,
            ood=report.ood_dict(),
            duration_s=duration_s,
            objects=objects,
            destinations=[d.name for d in destinations],
        )
        # Each scored image's embedding is kept once per model: the retrieval index's source.
        scored = ScoredImages(self.model.bundle.ref, report.images, report.embeddings)
        with self.catalog.sessions() as session:
            recorded = record_analysis(session, study_uid, new, scored)
        if not recorded.created:
            return _outcome(recorded)
        completed = recorded.completed_at
        return AnalysisOutcome(
            recorded.analysis_id,
            recorded.job_ids,
            report.priority,
            created=True,
            duration_s=duration_s,
            since_complete_s=None
            if completed is None
            else (datetime.now(UTC) - completed).total_seconds(),
        )


def read_study(spool_dir: Path, paths: Sequence[str]) -> list[Dataset]:
    """The study's objects, less pacsclip's own results: a PACS that sends the whole study
    again (with a report, say) sends back our SR and overlays too, and an overlay is no
    acquisition to score.

    In acquisition order (series, then instance number, then UIDs), not in the order they
    arrived: the same images give the same results whether a PACS pushed them in any order
    or a task performer retrieved them, down to which of two equal images an overlay is on."""
    datasets = [dcmread(spool_dir / p) for p in paths]
    return sorted(
        (ds for ds in datasets if str(ds.get("Manufacturer", "")) != MANUFACTURER),
        key=_acquisition_order,
    )


def _acquisition_order(ds: Dataset) -> tuple[int, str, int, str]:
    def number(keyword: str) -> int:
        try:
            return int(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            return 0

    return (
        number("SeriesNumber"),
        str(ds.get("SeriesInstanceUID", "")),
        number("InstanceNumber"),
        str(ds.get("SOPInstanceUID", "")),
    )


def finding_rows(
    report: TriageReport, results: Sequence[FindingResult] = ()
) -> list[dict[str, object]]:
    """A triage's findings as the catalog keeps them; with the `results` the SR was built
    from, each present finding's regions as the SR and SEG outline them."""
    maps = {s.finding: s for s in report.saliency}
    built = {r.name: r for r in results}
    rows: list[dict[str, object]] = []
    for f in report.findings:
        saliency = maps.get(f.name)
        result = built.get(f.name)
        shown = () if result is None or saliency is None else result.shown_regions
        rows.append(
            {
                "name": f.name,
                "display": f.display,
                "probability": f.probability,
                "raw_probability": f.raw_probability,
                "decision": f.decision,
                "threshold": f.threshold,
                "source_sop_instance_uid": f.source_sop_instance_uid,
                "code": None if f.code is None else asdict(f.code),
                "scored_by": f.scored_by,
                "localisation": None if saliency is None else saliency.method,
                "regions": [
                    {"sop_instance_uid": f.source_sop_instance_uid, "contour": [list(p) for p in o]}
                    for o in shown
                ],
                **({"region_note": result.region_note} if result and result.region_note else {}),
            }
        )
    return rows


def _scored(datasets: Sequence[Dataset], report: TriageReport) -> list[Dataset]:
    """The study's objects that the triage scored, in the study's order."""
    images = set(report.images)
    return [ds for ds in datasets if str(ds.SOPInstanceUID) in images]


def _pixels(source: Dataset) -> int:
    return int(source.get("Rows", 0) or 0) * int(source.get("Columns", 0) or 0)


def _finding_result(
    finding: FindingOutcome,
    report: TriageReport,
    sources: dict[str, Dataset],
    *,
    regions_on: bool,
) -> FindingResult:
    """A finding as the result builders take it: its regions only where it is present, and
    the reason when a present finding has none."""
    saliency = next((s for s in report.saliency if s.finding == finding.name), None)
    source = sources.get(finding.source_sop_instance_uid)
    regions: tuple[tuple[tuple[float, float], ...], ...] = ()
    note = None
    if finding.decision == "present":
        if not regions_on:
            note = "region output is turned off (result_regions)"
        elif saliency is None and source is not None and _pixels(source) > MAX_MAP_PIXELS:
            note = UNMAPPED_TOO_LARGE
        elif saliency is None:
            note = "no heat map was computed for this study"
        elif source is not None and int(source.get("NumberOfFrames", 1) or 1) > 1:
            note = "regions are placed on single-frame images only"
        elif not saliency.outlines:
            note = "the heat map points at no region"
        else:
            regions = tuple(tuple((c, r) for c, r in o.as_list()) for o in saliency.outlines)
    return FindingResult(
        name=finding.name,
        display=finding.display,
        code=finding.code,
        probability=finding.probability,
        decision=finding.decision,  # type: ignore[arg-type]
        threshold=finding.threshold,
        source_sop_instance_uid=finding.source_sop_instance_uid,
        outlines=regions,
        scored_by=finding.scored_by,
        region_note=note,
    )


@contextmanager
def _timed(steps: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        steps[name] = time.perf_counter() - started


def _distribution_check(report: TriageReport) -> DistributionCheck | None:
    d = report.distribution
    if d is None:
        return None
    return DistributionCheck(
        method=d.method,
        distance=d.distance,
        threshold=d.threshold,
        images=len(d.distances),
        images_outside=d.images_outside,
        scored=d.scored,
    )


def _outcome(done: RecordedAnalysis) -> AnalysisOutcome:
    """The outcome of a run that finds its analysis recorded by an earlier one."""
    return AnalysisOutcome(done.analysis_id, done.job_ids, done.priority, created=False)
