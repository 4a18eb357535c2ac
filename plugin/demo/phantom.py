"""Procedural chest-radiograph-like phantoms with known findings (synthetic, not clinical).

Every image is a PA-view-like 2D picture in display convention (dense = bright, values in
[0, 1]). Image left is the patient's right, as on a real PA film, so ``side="right"`` findings
appear on the left half of the array. The renderer is numpy only and fully determined by its
inputs: an :class:`Anatomy` (body habitus and texture seed) and a tuple of :class:`FindingSpec`
(each with its own seed), so the same anatomy can be rendered with and without one finding and
the two images differ only where that finding is.

Coordinates: ``x`` and ``y`` run over [-1, 1] across the image, ``y`` downwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatImage = npt.NDArray[np.float32]
BoolImage = npt.NDArray[np.bool_]
Array = npt.NDArray[np.float64]

CONSOLIDATION = "consolidation"
PLEURAL_EFFUSION = "pleural_effusion"
CARDIOMEGALY = "cardiomegaly"
PNEUMOTHORAX = "pneumothorax"
NODULE = "nodule"
SUPPORT_DEVICES = "support_devices"
FINDINGS: tuple[str, ...] = (
    CONSOLIDATION,
    PLEURAL_EFFUSION,
    CARDIOMEGALY,
    PNEUMOTHORAX,
    NODULE,
    SUPPORT_DEVICES,
)

LEFT, RIGHT, BILATERAL = "left", "right", "bilateral"
LOBES = ("upper", "middle", "lower")
PNEUMOTHORAX_SITES = ("apical", "lateral")
DEVICES = ("endotracheal_tube", "central_line", "pigtail_drain")
DEFAULT_SIZE = 128

# Display intensities of the tissues (dense = bright), chosen so lungs are clearly darker than
# soft tissue and the mediastinum brighter, as on a windowed chest film.
_BACKGROUND = 0.04
_SOFT_TISSUE = 0.42
_LUNG = 0.17
_MEDIASTINUM = 0.74
_SPINE = 0.82
_HEART = 0.70
_ABDOMEN = 0.62
_TRACHEA = 0.50
_PLEURAL_AIR = 0.05
_FLUID = 0.60
_NORMAL_CTR = (0.40, 0.50)
_ENLARGED_CTR = (0.57, 0.72)


@dataclass(frozen=True)
class FindingSpec:
    """One finding to draw. ``size`` in [0, 1] is severity; ``seed`` drives its own texture.

    ``side`` is the patient's side ("left", "right", "bilateral" where that makes sense, None
    for cardiomegaly); ``variant`` is the lobe (consolidation), "apical"/"lateral"
    (pneumothorax) or the devices joined by "+" (support_devices).
    """

    name: str
    side: str | None = None
    size: float = 0.5
    variant: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in FINDINGS:
            raise ValueError(f"unknown finding {self.name!r}; expected one of {FINDINGS}")
        if not 0.0 <= self.size <= 1.0:
            raise ValueError(f"finding size must be in [0, 1], got {self.size}")


@dataclass(frozen=True)
class Anatomy:
    """Normal-variant body habitus; all lengths in normalised image units."""

    lung_half_width: float = 0.58
    lung_top: float = -0.72
    lung_base: float = 0.58
    shift_x: float = 0.0
    right_diaphragm_rise: float = 0.05
    heart_ctr: float = 0.45
    heart_shift: float = 0.08
    rib_spacing: float = 0.17
    texture_seed: int = 0


@dataclass(frozen=True)
class Phantom:
    """A rendered image with its ground truth (absent findings included, present=False)."""

    image: FloatImage
    truth: dict[str, dict[str, Any]]
    masks: dict[str, BoolImage]
    lungs: BoolImage
    heart: BoolImage
    cardiothoracic_ratio: float
    findings: tuple[FindingSpec, ...] = field(default=())

    def present(self) -> list[str]:
        return [name for name in FINDINGS if self.truth[name]["present"]]


def size_label(size: float) -> str:
    """Radiology's three-step severity words for a size in [0, 1]."""
    if size < 1 / 3:
        return "small"
    return "moderate" if size < 2 / 3 else "large"


# --------------------------------------------------------------------------- sampling


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        lung_half_width=float(rng.uniform(0.53, 0.62)),
        lung_top=float(rng.uniform(-0.78, -0.66)),
        lung_base=float(rng.uniform(0.52, 0.64)),
        shift_x=float(rng.uniform(-0.04, 0.04)),
        right_diaphragm_rise=float(rng.uniform(0.02, 0.08)),
        heart_ctr=float(rng.uniform(*_NORMAL_CTR)),
        heart_shift=float(rng.uniform(0.05, 0.11)),
        rib_spacing=float(rng.uniform(0.15, 0.19)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_finding(name: str, rng: np.random.Generator) -> FindingSpec:
    """A random instance of one finding (side, severity, variant, texture seed)."""
    seed = int(rng.integers(0, 2**31 - 1))
    size = float(rng.uniform(0.0, 1.0))
    if name == CARDIOMEGALY:
        return FindingSpec(name, None, size, None, seed)
    if name == SUPPORT_DEVICES:
        count = 1 + int(rng.random() < 0.3)
        chosen = sorted(rng.choice(len(DEVICES), size=count, replace=False).tolist())
        side = str(rng.choice([LEFT, RIGHT]))
        return FindingSpec(name, side, size, "+".join(DEVICES[i] for i in chosen), seed)
    bilateral_rate = {PLEURAL_EFFUSION: 0.3, CONSOLIDATION: 0.15}.get(name, 0.0)
    side = BILATERAL if rng.random() < bilateral_rate else str(rng.choice([LEFT, RIGHT]))
    variant = None
    if name == CONSOLIDATION:
        variant = str(rng.choice(LOBES))
    elif name == PNEUMOTHORAX:
        variant = str(rng.choice(PNEUMOTHORAX_SITES))
    return FindingSpec(name, side, size, variant, seed)


def sample_findings(
    rng: np.random.Generator, prevalence: Mapping[str, float]
) -> tuple[FindingSpec, ...]:
    """Independent draws per finding, so findings co-occur at the product of prevalences."""
    specs = []
    for name in FINDINGS:
        present = rng.random() < prevalence.get(name, 0.0)
        spec = sample_finding(name, rng)  # drawn either way so one finding's draw never
        if present:  # shifts the random stream of the next
            specs.append(spec)
    return tuple(specs)


# --------------------------------------------------------------------------- rendering


@dataclass
class _Layers:
    """Separate tissue layers, so a finding can replace lung without erasing the ribs."""

    x: Array
    y: Array
    px: float  # one pixel in normalised units
    base: Array
    markings: Array
    bones: Array
    overlay: Array
    lungs: BoolImage
    lung_side: dict[int, BoolImage]
    heart: BoolImage
    geometry: dict[str, float]

    def compose(self) -> Array:
        lung_weight = self.lungs.astype(np.float64)
        return self.base + self.markings * lung_weight + self.bones + self.overlay


def render_phantom(
    anatomy: Anatomy, findings: tuple[FindingSpec, ...] = (), size: int = DEFAULT_SIZE
) -> Phantom:
    """Draw one phantom; each finding mask marks the pixels that finding changed."""
    by_name = _index_findings(findings)
    ctr = _cardiothoracic_target(anatomy, by_name.get(CARDIOMEGALY))
    layers = _anatomy_layers(anatomy, ctr, size)
    masks: dict[str, BoolImage] = {}
    for name in (PLEURAL_EFFUSION, CONSOLIDATION, NODULE, PNEUMOTHORAX, SUPPORT_DEVICES):
        spec = by_name.get(name)
        if spec is not None:
            masks[name] = _DRAW[name](layers, spec)
    if CARDIOMEGALY in by_name:
        masks[CARDIOMEGALY] = layers.heart.copy()
    image = gaussian_blur(layers.compose(), sigma_px=0.7)
    truth = _truth(by_name)
    return Phantom(
        image=np.clip(image, 0.0, 1.0).astype(np.float32),
        truth=truth,
        masks=masks,
        lungs=layers.lungs,
        heart=layers.heart,
        cardiothoracic_ratio=cardiothoracic_ratio(layers.heart, layers.lungs),
        findings=tuple(by_name[n] for n in FINDINGS if n in by_name),
    )


def generate_phantom(
    seed: int | np.random.SeedSequence,
    prevalence: Mapping[str, float],
    size: int = DEFAULT_SIZE,
) -> Phantom:
    """Sample anatomy and findings from one seed and render them."""
    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng)
    return render_phantom(anatomy, sample_findings(rng, prevalence), size)


def cardiothoracic_ratio(heart: BoolImage, lungs: BoolImage) -> float:
    """Widest heart extent over widest inner thoracic (lung-to-lung) extent, in pixels."""
    heart_cols = np.flatnonzero(heart.any(axis=0))
    lung_cols = np.flatnonzero(lungs.any(axis=0))
    if heart_cols.size == 0 or lung_cols.size == 0:
        raise ValueError("cardiothoracic ratio needs a non-empty heart and lung mask")
    heart_width = heart_cols[-1] - heart_cols[0] + 1
    thorax_width = lung_cols[-1] - lung_cols[0] + 1
    return float(heart_width / thorax_width)


def _index_findings(findings: tuple[FindingSpec, ...]) -> dict[str, FindingSpec]:
    by_name: dict[str, FindingSpec] = {}
    for spec in findings:
        if spec.name in by_name:
            raise ValueError(f"finding {spec.name!r} given twice; combine it into one spec")
        by_name[spec.name] = spec
    return by_name


def _truth(by_name: Mapping[str, FindingSpec]) -> dict[str, dict[str, Any]]:
    truth: dict[str, dict[str, Any]] = {}
    for name in FINDINGS:
        spec = by_name.get(name)
        if spec is None:
            truth[name] = {"present": False, "side": None, "size": 0.0, "variant": None}
        else:
            truth[name] = {
                "present": True,
                "side": spec.side,
                "size": spec.size,
                "size_label": size_label(spec.size),
                "variant": spec.variant,
            }
    return truth


def _cardiothoracic_target(anatomy: Anatomy, spec: FindingSpec | None) -> float:
    if spec is None:
        return anatomy.heart_ctr
    low, high = _ENLARGED_CTR
    return low + (high - low) * spec.size


def _grid(size: int) -> tuple[Array, Array]:
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return x, y


def _sides(spec: FindingSpec) -> list[int]:
    """Image-side signs for a patient side: the patient's right is image left (-1)."""
    if spec.side == BILATERAL:
        return [-1, 1]
    return [-1] if spec.side == RIGHT else [1]


def _anatomy_layers(anatomy: Anatomy, ctr: float, size: int) -> _Layers:
    x, y = _grid(size)
    rng = np.random.default_rng(anatomy.texture_seed)
    xs = x - anatomy.shift_x
    geometry = _lung_geometry(anatomy)
    lung_side = {s: _lung_mask(xs, y, anatomy, s) for s in (-1, 1)}
    heart = _heart_mask(xs, y, anatomy, ctr, geometry)
    for s in (-1, 1):
        lung_side[s] &= ~heart
    lungs = lung_side[-1] | lung_side[1]
    base = _base_tissue(xs, y, anatomy, lungs, heart, rng)
    markings = _lung_markings(xs, y, rng, size)
    bones = _bones(xs, y, anatomy, lungs)
    return _Layers(
        x=xs,
        y=y,
        px=2.0 / size,
        base=base,
        markings=markings,
        bones=bones,
        overlay=np.zeros_like(base),
        lungs=lungs,
        lung_side=lung_side,
        heart=heart,
        geometry=geometry,
    )


def _lung_geometry(anatomy: Anatomy) -> dict[str, float]:
    medial = 0.13
    return {
        "medial": medial,
        "lateral": medial + 0.09 + anatomy.lung_half_width,
        "top": anatomy.lung_top,
        "base": anatomy.lung_base,
    }


def _diaphragm(xs: Array, anatomy: Anatomy, s: int) -> Array:
    """Dome of one hemidiaphragm: highest mid-hemithorax, lowest at the costophrenic angle."""
    geometry = _lung_geometry(anatomy)
    centre = (geometry["medial"] + geometry["lateral"]) / 2 - 0.05
    half = (geometry["lateral"] - geometry["medial"]) / 2 + 0.05
    t = np.clip((s * xs - centre) / half, -1.0, 1.0)
    base = anatomy.lung_base - (anatomy.right_diaphragm_rise if s < 0 else 0.0)
    result: Array = base - 0.13 * (1.0 - t**2)
    return result


def _lung_mask(xs: Array, y: Array, anatomy: Anatomy, s: int) -> BoolImage:
    g = _lung_geometry(anatomy)
    height = g["base"] - g["top"]
    u = s * xs
    # Apex: a dome peaking a little lateral of the mediastinum, under the clavicle.
    peak = g["medial"] + 0.22
    apex = g["top"] + 0.9 * ((u - peak) / (g["lateral"] - g["medial"])) ** 2
    # The lateral wall widens from the apex to the costophrenic angle.
    t = np.clip((y - g["top"]) / (0.6 * height), 0.0, 1.0)
    lateral = peak + (g["lateral"] - peak) * np.sqrt(1.0 - (1.0 - t) ** 2)
    mask: BoolImage = (
        (u > g["medial"]) & (u < lateral) & (y > apex) & (y < _diaphragm(xs, anatomy, s))
    )
    return mask


def _heart_mask(
    xs: Array, y: Array, anatomy: Anatomy, ctr: float, geometry: Mapping[str, float]
) -> BoolImage:
    thorax = 2.0 * geometry["lateral"]
    half_width = ctr * thorax / 2.0
    # The heart sits mostly to the patient's left (image right) of the midline and rests on
    # the diaphragm, so only its upper border is drawn as an ellipse.
    centre_x = anatomy.heart_shift + 0.3 * (half_width - 0.33)
    centre_y = anatomy.lung_base - 0.12
    radius_y = 0.36
    inside = ((xs - centre_x) / half_width) ** 2 + ((y - centre_y) / radius_y) ** 2 <= 1.0
    diaphragm = np.minimum(_diaphragm(xs, anatomy, -1), _diaphragm(xs, anatomy, 1))
    mask: BoolImage = inside & (y < diaphragm)
    return mask


def _base_tissue(
    xs: Array,
    y: Array,
    anatomy: Anatomy,
    lungs: BoolImage,
    heart: BoolImage,
    rng: np.random.Generator,
) -> Array:
    body = (xs / 0.95) ** 2 + ((y - 0.2) / 1.35) ** 2 <= 1.0
    neck = (np.abs(xs) < 0.24) & (y < -0.6)
    base = np.full(xs.shape, _BACKGROUND)
    base[body | neck] = _SOFT_TISSUE + 0.05 * (1 - np.abs(xs[body | neck]))
    below = y > np.minimum(_diaphragm(xs, anatomy, -1), _diaphragm(xs, anatomy, 1)) - 0.02
    base[below & body] = _ABDOMEN
    mediastinum = (np.abs(xs - 0.02) < 0.14 + 0.04 * np.exp(-(((y + 0.35) / 0.08) ** 2))) & (
        y > -1.0
    )
    base[mediastinum & (body | neck)] = _MEDIASTINUM
    spine = np.abs(xs) < 0.07
    vertebrae = 0.04 * (np.cos(2 * np.pi * y / 0.14) > 0.6)
    base[spine & (body | neck)] = _SPINE + vertebrae[spine & (body | neck)]
    # The air column of the trachea down to the carina, where an endotracheal tube sits.
    trachea = (np.abs(xs - 0.01) < 0.045) & (y < anatomy.lung_top + 0.42)
    base[trachea] = _TRACHEA
    base[heart] = _HEART
    base[lungs] = _LUNG + 0.02 * _smooth_noise(rng, xs.shape[0], 0.05)[lungs]
    return base


def _lung_markings(xs: Array, y: Array, rng: np.random.Generator, size: int) -> Array:
    """Branching-looking vessels: ridges of band-passed noise, fading from the hila outwards."""
    noise = _band_noise(rng, size, low=0.04, high=0.12)
    ridges = np.clip(1.0 - np.abs(noise) / (0.35 * noise.std() + 1e-9), 0.0, 1.0) ** 2
    hilum = np.minimum(np.hypot(xs + 0.22, y + 0.05), np.hypot(xs - 0.24, y + 0.05))
    fade = np.clip(1.0 - hilum / 0.75, 0.15, 1.0)
    result: Array = 0.14 * ridges * fade
    return result


def _bones(xs: Array, y: Array, anatomy: Anatomy, lungs: BoolImage) -> Array:
    """Posterior-rib arcs over the hemithoraces and the two clavicles."""
    g = _lung_geometry(anatomy)
    u = np.abs(xs)
    phase = (y - anatomy.lung_top + 0.45 * (u - 0.15) ** 2) / anatomy.rib_spacing
    rib = np.clip((np.cos(2 * np.pi * phase) - 0.55) / 0.45, 0.0, 1.0)
    chest = (u > 0.1) & (u < g["lateral"] + 0.06) & (y < g["base"]) & (y > g["top"] - 0.1)
    ribs = 0.07 * rib * chest
    clavicle_y = -0.80 + 0.12 * ((u - 0.1) / 0.55) ** 2 - 0.05 * (u - 0.1)
    clavicle = np.exp(-(((y - clavicle_y) / 0.03) ** 2)) * ((u > 0.08) & (u < 0.68))
    result: Array = ribs + 0.16 * clavicle
    return result


# --------------------------------------------------------------------------- findings


def _draw_effusion(layers: _Layers, spec: FindingSpec) -> BoolImage:
    """Meniscus: fluid that climbs the lateral chest wall and hides the costophrenic angle."""
    g = layers.geometry
    mask = np.zeros(layers.x.shape, dtype=bool)
    height = 0.15 + 0.45 * spec.size
    for s in _sides(spec):
        lung = layers.lung_side[s]
        t = np.clip((s * layers.x - g["medial"]) / (g["lateral"] - g["medial"]), 0.0, 1.0)
        level = g["base"] - height * (0.7 + 0.5 * t**2)
        weight = 1.0 / (1.0 + np.exp(-(layers.y - level) / 0.025))
        fluid = lung & (weight > 0.02)
        layers.base[fluid] = (1 - weight[fluid]) * layers.base[fluid] + weight[fluid] * _FLUID
        layers.markings[fluid] *= 1 - weight[fluid]
        mask |= lung & (weight > 0.5)
    return mask


def _draw_consolidation(layers: _Layers, spec: FindingSpec) -> BoolImage:
    """Patchy airspace opacity inside one lobe's region, confined to the lung."""
    rng = np.random.default_rng(spec.seed)
    g = layers.geometry
    lobe_height = {"upper": 0.22, "middle": 0.5, "lower": 0.78}[spec.variant or "lower"]
    radius = 0.17 + 0.17 * spec.size
    # Coarse and fine noise make the patch ill-defined and blotchy, unlike a round nodule.
    texture = _smooth_noise(rng, layers.x.shape[0], 0.05) + 0.6 * _smooth_noise(
        rng, layers.x.shape[0], 0.15
    )
    texture = (texture - texture.mean()) / (texture.std() + 1e-9)
    mask = np.zeros(layers.x.shape, dtype=bool)
    for s in _sides(spec):
        cy = g["top"] + lobe_height * (g["base"] - g["top"]) + rng.uniform(-0.05, 0.05)
        cx = s * (g["medial"] + rng.uniform(0.35, 0.6) * (g["lateral"] - g["medial"]))
        r2 = ((layers.x - cx) / (radius * 1.2)) ** 2 + ((layers.y - cy) / radius) ** 2
        envelope = np.exp(-r2 * 1.6)
        opacity = np.clip(envelope * (1.0 + 0.6 * texture) - 0.15, 0.0, 1.0)
        opacity *= layers.lung_side[s]
        layers.overlay += 0.34 * opacity
        mask |= opacity > 0.2
    return mask


def _draw_nodule(layers: _Layers, spec: FindingSpec) -> BoolImage:
    """Small round opacity at a random point well inside one lung."""
    rng = np.random.default_rng(spec.seed)
    s = _sides(spec)[0]
    size = layers.x.shape[0]
    radius_px = (2.5 + 3.5 * spec.size) * size / DEFAULT_SIZE
    inner = _erode(layers.lung_side[s], int(radius_px) + 3)
    if not inner.any():
        inner = layers.lung_side[s]
    rows, cols = np.nonzero(inner)
    pick = int(rng.integers(0, rows.size))
    row, col = rows[pick], cols[pick]
    grid_r, grid_c = np.mgrid[0:size, 0:size]
    dist = np.hypot(grid_r - row, grid_c - col)
    profile = 1.0 / (1.0 + np.exp((dist - radius_px) / 0.6))
    layers.overlay += 0.42 * profile
    mask: BoolImage = dist <= radius_px + 1.0
    return mask


def _draw_pneumothorax(layers: _Layers, spec: FindingSpec) -> BoolImage:
    """Lucent rim without lung markings, bounded by a thin bright visceral pleural line."""
    g = layers.geometry
    size = layers.x.shape[0]
    thickness = (4.0 + 10.0 * spec.size) * size / DEFAULT_SIZE
    mask = np.zeros(layers.x.shape, dtype=bool)
    for s in _sides(spec):
        lung = layers.lung_side[s]
        depth = _depth_from_edge(lung, int(np.ceil(thickness)) + 3)
        # The rim tapers to nothing at its ends, giving the crescent a real pneumothorax has.
        if spec.variant == "lateral":
            start = g["medial"] + 0.3 * (g["lateral"] - g["medial"])
            taper = np.clip((s * layers.x - start) / 0.2, 0.0, 1.0)
            taper *= np.clip((g["base"] - 0.1 - layers.y) / 0.25, 0.0, 1.0)
        else:
            taper = np.clip((g["top"] + 0.45 * (g["base"] - g["top"]) - layers.y) / 0.25, 0.0, 1.0)
        local = thickness * np.sqrt(taper)
        rim = lung & (depth <= local) & (taper > 0.05)
        line = lung & (taper > 0.2) & (np.abs(depth - local - 1.0) <= 0.6)
        # Pleural air is as lucent as it gets inside the chest; the lung behind the line is
        # partly collapsed and so a little denser than normal lung.
        collapsed = lung & ~rim
        layers.base[collapsed] += 0.03
        layers.markings[rim] = 0.0
        layers.base[rim] = _PLEURAL_AIR
        layers.overlay[line] += 0.22
        mask |= rim
    return mask


def _draw_devices(layers: _Layers, spec: FindingSpec) -> BoolImage:
    """Radio-opaque tubes and catheters as thin bright curves."""
    rng = np.random.default_rng(spec.seed)
    s = _sides(spec)[0]
    g = layers.geometry
    mask = np.zeros(layers.x.shape, dtype=bool)
    for device in (spec.variant or DEVICES[0]).split("+"):
        points, width, brightness = _device_path(device, s, g, rng)
        dist = _polyline_distance(layers.x, layers.y, points, 6.0 * layers.px) / layers.px
        layers.overlay += brightness * np.exp(-((dist / width) ** 2))
        mask |= dist <= width + 1.5
    return mask


def _device_path(
    device: str, s: int, g: Mapping[str, float], rng: np.random.Generator
) -> tuple[Array, float, float]:
    jitter = rng.uniform(-0.03, 0.03, size=2)
    if device == "endotracheal_tube":
        # Tip a few centimetres above the carina, inside the tracheal air column.
        ys = np.linspace(-1.0, g["top"] + 0.3 + jitter[1], 12)
        xs = 0.02 + jitter[0] + 0.02 * np.sin((ys + 1.0) * 2.0)
        return np.stack([xs, ys], axis=1), 1.8, 0.45
    if device == "central_line":
        # Subclavian entry on the patient's side, down the SVC to the cavoatrial junction.
        t = np.linspace(0.0, 1.0, 24)
        start = np.array([s * (0.62 + jitter[0]), -0.82])
        bend = np.array([s * 0.18, -0.62])
        end = np.array([0.05 * s - 0.06, -0.08 + jitter[1]])
        curve = ((1 - t) ** 2)[:, None] * start + (2 * (1 - t) * t)[:, None] * bend
        curve += (t**2)[:, None] * end
        return curve, 1.3, 0.40
    # Pigtail drain: in through the lateral lower chest wall, ending in a curl.
    entry = np.array([s * (g["lateral"] + 0.12), 0.35 + jitter[1]])
    tip = np.array([s * (g["lateral"] - 0.22), 0.28 + jitter[1]])
    straight = np.linspace(entry, tip, 10)
    angle = np.linspace(0.0, 1.8 * np.pi, 20)
    curl = tip + 0.055 * np.stack([np.cos(angle) - 1.0, np.sin(angle)], axis=1) * [s, 1.0]
    return np.concatenate([straight, curl]), 1.5, 0.40


_DRAW = {
    PLEURAL_EFFUSION: _draw_effusion,
    CONSOLIDATION: _draw_consolidation,
    NODULE: _draw_nodule,
    PNEUMOTHORAX: _draw_pneumothorax,
    SUPPORT_DEVICES: _draw_devices,
}


# --------------------------------------------------------------------------- numpy helpers


def _polyline_distance(x: Array, y: Array, points: Array, reach: float) -> Array:
    """Distance of every pixel to a polyline [K, 2], exact within ``reach``, else ``reach``.

    Each segment only touches the pixels in its own bounding box (grown by ``reach``): the
    curves are thin, so this is far cheaper than a full distance field per segment.
    """
    size = x.shape[0]
    dist = np.full(x.shape, reach)
    to_index = size / 2.0
    for a, b in itertools.pairwise(points):
        low = np.minimum(a, b) - reach
        high = np.maximum(a, b) + reach
        c0, r0 = (np.floor((low + 1.0) * to_index)).astype(int).clip(0, size)
        c1, r1 = (np.ceil((high + 1.0) * to_index)).astype(int).clip(0, size)
        if c1 <= c0 or r1 <= r0:
            continue
        wx, wy = x[r0:r1, c0:c1], y[r0:r1, c0:c1]
        ab = b - a
        t = ((wx - a[0]) * ab[0] + (wy - a[1]) * ab[1]) / (ab @ ab + 1e-12)
        t = np.clip(t, 0.0, 1.0)
        d = np.hypot(wx - (a[0] + t * ab[0]), wy - (a[1] + t * ab[1]))
        np.minimum(dist[r0:r1, c0:c1], d, out=dist[r0:r1, c0:c1])
    return dist


def _erode(mask: BoolImage, steps: int) -> BoolImage:
    """Binary erosion by a 4-neighbour cross, ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        shrunk = out.copy()
        shrunk[1:, :] &= out[:-1, :]
        shrunk[:-1, :] &= out[1:, :]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        out = shrunk
    return out


def _depth_from_edge(mask: BoolImage, max_steps: int) -> Array:
    """Approximate pixel distance from the mask edge (erosion count), capped at max_steps."""
    depth = np.zeros(mask.shape)
    current = mask.copy()
    for _ in range(max_steps):
        depth += current
        current = _erode(current, 1)
    result: Array = depth - 0.5
    return result


def gaussian_blur(image: Array, sigma_px: float) -> Array:
    """Separable Gaussian blur as a few shifted, weighted sums, edges replicated.

    Written without BLAS on purpose: a 128x128 matrix product through a multi-threaded
    BLAS is ten times slower than this on a busy two-core machine.
    """
    if sigma_px <= 0:
        return image
    radius = max(1, int(np.ceil(3.0 * sigma_px)))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    weights /= weights.sum()
    out = image
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], "edge")
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for offset, weight in zip(offsets, weights, strict=True):
            start = radius + offset
            acc += weight * (
                padded[start : start + length] if axis == 0 else padded[:, start : start + length]
            )
        out = acc
    return out


def _radial_frequency(size: int) -> Array:
    """|f| on the half-plane grid that rfft2 uses (real input needs only half the spectrum)."""
    result: Array = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    return result


def _band_noise(rng: np.random.Generator, size: int, low: float, high: float) -> Array:
    """White noise band-passed in frequency (cycles per pixel between low and high)."""
    radius = _radial_frequency(size)
    band = np.exp(-(((radius - (low + high) / 2) / ((high - low) / 2)) ** 2))
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) * band
    result: Array = np.fft.irfft2(spectrum, s=(size, size))
    return result


def _smooth_noise(rng: np.random.Generator, size: int, cutoff: float) -> Array:
    """Low-passed noise scaled to unit standard deviation."""
    radius = _radial_frequency(size)
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) * np.exp(-((radius / cutoff) ** 2))
    noise = np.fft.irfft2(spectrum, s=(size, size))
    result: Array = noise / (noise.std() + 1e-12)
    return result
