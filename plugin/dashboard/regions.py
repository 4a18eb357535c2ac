"""Where the newest analysis sees each present finding, as shapes the study page draws.

Pure: the analysis's stored finding rows and the source images' sizes in, dataclasses out.
A region is a closed polyline in the source image's pixel coordinates (DICOM image
coordinates: (0, 0) is the top-left corner of the top-left pixel, x the column, y the row).
The page draws it in an SVG whose viewBox is the source's Columns x Rows, laid over the
rendered image, so that whatever size the browser shows the image at, the shape stays on it.

Rows stored before regions were computed have no ``regions`` key: no region, as for a
finding the map was not computed for. A malformed contour (fewer than three points, a point
that is not two finite numbers) is left out, never drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

PRESENT: Final = "present"
PALETTE_SIZE: Final = 6  # region-0 .. region-5 in dashboard.css
MIN_POINTS: Final = 3
MAX_POINTS: Final = 10_000  # a contour is a few hundred points at most


@dataclass(frozen=True)
class Region:
    """One contour of a finding on one image."""

    sop_instance_uid: str
    points: tuple[tuple[float, float], ...]

    @property
    def svg_points(self) -> str:
        """The contour as an SVG ``points`` attribute: ``x,y x,y ...``."""
        return " ".join(f"{_num(x)},{_num(y)}" for x, y in self.points)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels."""
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class FindingRegions:
    """A present finding, what scored and located it, and its regions (maybe none)."""

    name: str
    display: str
    probability: float
    palette: int  # which colour the page draws it in
    localisation: str | None
    scored_by: str | None
    regions: list[Region] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.display} {self.probability:.2f}"


@dataclass(frozen=True)
class Shape:
    """A region as drawn on one image: its finding and where its label goes."""

    finding: FindingRegions
    region: Region
    label_x: float
    label_y: float


@dataclass(frozen=True)
class ImageView:
    """One image of the study with the shapes drawn on it; no size: it cannot be drawn on."""

    sop_instance_uid: str
    size: tuple[int, int] | None  # (Columns, Rows) of the source image
    shapes: list[Shape] = field(default_factory=list)

    @property
    def font_size(self) -> float:
        """Label height in image pixels: the same on screen for a 128 or a 4096 matrix."""
        return 1.0 if self.size is None else round(max(self.size) / 28, 2)


def present_findings(findings: Sequence[Mapping[str, object]]) -> list[FindingRegions]:
    """The rows whose decision is "present", most probable first, with their regions."""
    rows = [f for f in findings if f.get("decision") == PRESENT]
    rows.sort(key=lambda f: -_probability(f))
    return [
        FindingRegions(
            name=str(f.get("name", "")),
            display=str(f.get("display") or f.get("name", "")),
            probability=_probability(f),
            palette=index % PALETTE_SIZE,
            localisation=_text(f.get("localisation")),
            scored_by=_text(f.get("scored_by")),
            regions=_regions(f.get("regions")),
        )
        for index, f in enumerate(rows)
    ]


def image_views(
    findings: Sequence[FindingRegions],
    first: str | None,
    sizes: Mapping[str, tuple[int, int]],
) -> list[ImageView]:
    """The images to show: ``first`` (the page's source image), then every other image a
    region is on, each with the shapes drawn on it."""
    order = [first] if first else []
    for finding in findings:
        for region in finding.regions:
            if region.sop_instance_uid not in order:
                order.append(region.sop_instance_uid)
    views = []
    for uid in order:
        size = sizes.get(uid)
        shapes = []
        if size is not None:
            font = max(size) / 28
            for finding in findings:
                for region in finding.regions:
                    if region.sop_instance_uid == uid:
                        left, top, _, _ = region.bounds
                        # Above the region, or inside it when it touches the top edge.
                        label_y = top - font * 0.3 if top >= font else top + font
                        shapes.append(Shape(finding, region, round(left, 2), round(label_y, 2)))
        views.append(ImageView(uid, size, shapes))
    return views


def _regions(value: object) -> list[Region]:
    if not isinstance(value, list):
        return []
    regions = []
    for item in value:
        if not isinstance(item, Mapping):
            continue
        uid, contour = item.get("sop_instance_uid"), item.get("contour")
        points = _points(contour)
        if isinstance(uid, str) and uid and points:
            regions.append(Region(uid, points))
    return regions


def _points(contour: object) -> tuple[tuple[float, float], ...] | None:
    if not isinstance(contour, list) or not MIN_POINTS <= len(contour) <= MAX_POINTS:
        return None
    points = []
    for point in contour:
        if not isinstance(point, list | tuple) or len(point) != 2:
            return None
        x, y = point
        if not _finite(x) or not _finite(y):
            return None
        points.append((float(x), float(y)))
    return tuple(points)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _probability(row: Mapping[str, object]) -> float:
    value = row.get("probability")
    return float(value) if _finite(value) else 0.0  # type: ignore[arg-type]


def _text(value: object) -> str | None:
    return str(value) if isinstance(value, str) and value else None


def _num(value: float) -> str:
    """A coordinate as short as it is exact: 10 for 10.0, 10.5 for 10.5."""
    return f"{value:.2f}".rstrip("0").rstrip(".")
