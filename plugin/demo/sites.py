"""Simulated acquisition at six demo sites, so that site shift in the demo data is real.

Each site has its own detector and processing (tone curve, noise, blur and resolution, heel
effect, collimation, positioning) and its own case mix (finding prevalence). The output pixels
are always display-normalised (dense = bright, min-max to [0, 1]), which is what the model
sees after the runtime's windowing; the site's ``photometric_interpretation`` is kept so a
DICOM writer can store MONOCHROME1 pixels inverted, as such a site's modality would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from plugin.demo.phantom import (
    CARDIOMEGALY,
    CONSOLIDATION,
    DEFAULT_SIZE,
    NODULE,
    PLEURAL_EFFUSION,
    PNEUMOTHORAX,
    SUPPORT_DEVICES,
    Phantom,
    gaussian_blur,
    generate_phantom,
)

FloatImage = npt.NDArray[np.float32]
BoolImage = npt.NDArray[np.bool_]
Array = npt.NDArray[np.float64]

MONOCHROME1 = "MONOCHROME1"
MONOCHROME2 = "MONOCHROME2"


@dataclass(frozen=True)
class SiteProfile:
    """How one simulated site acquires and processes a chest radiograph, and whom it sees."""

    name: str
    description: str
    photometric_interpretation: str
    bits_stored: int
    gamma: float  # tone-curve exponent applied to [0, 1] intensities
    contrast: float  # slope of the tone curve around mid-grey
    brightness: float  # offset after the tone curve
    noise: float  # standard deviation of the quantum-like noise at mid-grey
    blur_sigma: float  # detector blur, in output pixels
    resolution: float  # fraction of the output matrix the detector really resolves
    heel_effect: float  # top-to-bottom exposure gradient (anode heel)
    collimation: tuple[float, float]  # min and max border width, fraction of the image
    max_rotation_deg: float
    scale_range: tuple[float, float]
    prevalence: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Acquisition:
    """A phantom as one site's modality would deliver it, with masks moved alongside."""

    pixels: FloatImage  # display-normalised, [0, 1], dense = bright
    masks: dict[str, BoolImage]
    site: str
    photometric_interpretation: str
    bits_stored: int

    def stored_pixels(self) -> npt.NDArray[np.uint16]:
        """Pixel data as the site's modality would store it (MONOCHROME1: inverted)."""
        return to_stored(self.pixels, self.photometric_interpretation, self.bits_stored)


def _prevalence(**values: float) -> dict[str, float]:
    return dict(values)


SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="demo-a",
        description="general hospital, modern DR room",
        photometric_interpretation=MONOCHROME2,
        bits_stored=12,
        gamma=1.0,
        contrast=1.0,
        brightness=0.0,
        noise=0.012,
        blur_sigma=0.3,
        resolution=1.0,
        heel_effect=0.02,
        collimation=(0.0, 0.03),
        max_rotation_deg=2.0,
        scale_range=(0.97, 1.03),
        prevalence=_prevalence(
            **{
                CONSOLIDATION: 0.22,
                PLEURAL_EFFUSION: 0.22,
                CARDIOMEGALY: 0.22,
                PNEUMOTHORAX: 0.25,
                NODULE: 0.28,
                SUPPORT_DEVICES: 0.22,
            }
        ),
    ),
    SiteProfile(
        name="demo-b",
        description="intensive care, portable CR with grid",
        photometric_interpretation=MONOCHROME1,
        bits_stored=12,
        gamma=1.35,
        contrast=0.85,
        brightness=0.03,
        noise=0.03,
        blur_sigma=0.9,
        resolution=0.8,
        heel_effect=0.06,
        collimation=(0.02, 0.09),
        max_rotation_deg=6.0,
        scale_range=(0.9, 1.08),
        prevalence=_prevalence(
            **{
                CONSOLIDATION: 0.35,
                PLEURAL_EFFUSION: 0.42,
                CARDIOMEGALY: 0.25,
                PNEUMOTHORAX: 0.28,
                NODULE: 0.18,
                SUPPORT_DEVICES: 0.65,
            }
        ),
    ),
    SiteProfile(
        name="demo-c",
        description="outpatient clinic, DR with strong edge enhancement look",
        photometric_interpretation=MONOCHROME2,
        bits_stored=14,
        gamma=0.8,
        contrast=1.2,
        brightness=-0.03,
        noise=0.008,
        blur_sigma=0.0,
        resolution=1.0,
        heel_effect=0.0,
        collimation=(0.0, 0.02),
        max_rotation_deg=1.5,
        scale_range=(0.98, 1.05),
        prevalence=_prevalence(
            **{
                CONSOLIDATION: 0.12,
                PLEURAL_EFFUSION: 0.1,
                CARDIOMEGALY: 0.15,
                PNEUMOTHORAX: 0.16,
                NODULE: 0.4,
                SUPPORT_DEVICES: 0.05,
            }
        ),
    ),
    SiteProfile(
        name="demo-d",
        description="emergency department, DR, hurried positioning",
        photometric_interpretation=MONOCHROME2,
        bits_stored=12,
        gamma=1.1,
        contrast=1.05,
        brightness=0.02,
        noise=0.018,
        blur_sigma=0.5,
        resolution=0.9,
        heel_effect=0.04,
        collimation=(0.0, 0.06),
        max_rotation_deg=5.0,
        scale_range=(0.92, 1.06),
        prevalence=_prevalence(
            **{
                CONSOLIDATION: 0.3,
                PLEURAL_EFFUSION: 0.18,
                CARDIOMEGALY: 0.15,
                PNEUMOTHORAX: 0.35,
                NODULE: 0.2,
                SUPPORT_DEVICES: 0.2,
            }
        ),
    ),
    SiteProfile(
        name="demo-e",
        description="cardiology centre, CR, soft tone curve",
        photometric_interpretation=MONOCHROME1,
        bits_stored=10,
        gamma=0.7,
        contrast=0.8,
        brightness=0.05,
        noise=0.015,
        blur_sigma=0.6,
        resolution=0.85,
        heel_effect=0.03,
        collimation=(0.01, 0.05),
        max_rotation_deg=3.0,
        scale_range=(0.95, 1.04),
        prevalence=_prevalence(
            **{
                CONSOLIDATION: 0.12,
                PLEURAL_EFFUSION: 0.35,
                CARDIOMEGALY: 0.45,
                PNEUMOTHORAX: 0.15,
                NODULE: 0.2,
                SUPPORT_DEVICES: 0.3,
            }
        ),
    ),
    SiteProfile(
        name="demo-f",
        description="rural hospital, older CR reader, noisy and soft",
        photometric_interpretation=MONOCHROME1,
        bits_stored=10,
        gamma=1.5,
        contrast=0.75,
        brightness=-0.02,
        noise=0.04,
        blur_sigma=1.2,
        resolution=0.65,
        heel_effect=0.08,
        collimation=(0.03, 0.1),
        max_rotation_deg=7.0,
        scale_range=(0.88, 1.1),
        prevalence=_prevalence(
            **{
                CONSOLIDATION: 0.28,
                PLEURAL_EFFUSION: 0.2,
                CARDIOMEGALY: 0.22,
                PNEUMOTHORAX: 0.22,
                NODULE: 0.24,
                SUPPORT_DEVICES: 0.12,
            }
        ),
    ),
)


# A site unlike all six above, kept out of SITES (the demo model never trains on it): a harsh
# tone curve, heavy noise and a coarse, blurred detector. The fine-tuning benchmark
# (tests/benchmarks/finetune.py) adapts the demo model to it.
SHIFTED_SITE = SiteProfile(
    name="demo-shifted",
    description="older CR reader with a harsh tone curve, noisy and coarse",
    photometric_interpretation=MONOCHROME1,
    bits_stored=10,
    gamma=2.2,
    contrast=0.6,
    brightness=0.0,
    noise=0.06,
    blur_sigma=1.4,
    resolution=0.6,
    heel_effect=0.05,
    collimation=(0.0, 0.05),
    max_rotation_deg=4.0,
    scale_range=(0.93, 1.06),
    prevalence=SITES[0].prevalence,
)


def site_by_name(name: str) -> SiteProfile:
    for site in SITES:
        if site.name == name:
            return site
    raise KeyError(f"unknown demo site {name!r}; expected one of {[s.name for s in SITES]}")


@dataclass(frozen=True)
class Case:
    """One simulated study: the site's image of a phantom, with the phantom's ground truth."""

    acquisition: Acquisition
    phantom: Phantom

    @property
    def pixels(self) -> FloatImage:
        return self.acquisition.pixels

    @property
    def site(self) -> str:
        return self.acquisition.site


def simulate_case(
    seed: int | np.random.SeedSequence,
    sites: tuple[SiteProfile, ...] = SITES,
    size: int = DEFAULT_SIZE,
) -> Case:
    """Pick a site, draw a patient from its case mix, and acquire the image there."""
    rng = np.random.default_rng(seed)
    site = sites[int(rng.integers(len(sites)))]
    phantom_seed, acquisition_seed = rng.integers(0, 2**63 - 1, size=2)
    phantom = generate_phantom(int(phantom_seed), site.prevalence, size)
    acquisition = acquire(
        phantom.image, phantom.masks, site, np.random.default_rng(int(acquisition_seed))
    )
    return Case(acquisition, phantom)


def acquire(
    image: FloatImage,
    masks: Mapping[str, BoolImage],
    site: SiteProfile,
    rng: np.random.Generator,
) -> Acquisition:
    """Pass a phantom through one site's positioning, detector and processing."""
    angle = np.deg2rad(rng.uniform(-site.max_rotation_deg, site.max_rotation_deg))
    scale = rng.uniform(*site.scale_range)
    shift = rng.uniform(-0.03, 0.03, size=2) * image.shape[0]
    src_r, src_c = _affine_sources(image.shape[0], angle, scale, shift)
    pixels = _bilinear(image.astype(np.float64), src_r, src_c)
    # Masks move with the anatomy; nearest-neighbour keeps them binary.
    near_r = np.clip(np.rint(src_r), 0, image.shape[0] - 1).astype(np.intp)
    near_c = np.clip(np.rint(src_c), 0, image.shape[1] - 1).astype(np.intp)
    moved = {name: mask[near_r, near_c] for name, mask in masks.items()}
    pixels = _detector(pixels, site, rng)
    pixels = _collimate(pixels, site, rng)
    return Acquisition(
        pixels=_minmax(pixels).astype(np.float32),
        masks=moved,
        site=site.name,
        photometric_interpretation=site.photometric_interpretation,
        bits_stored=site.bits_stored,
    )


def to_stored(
    pixels: npt.ArrayLike, photometric_interpretation: str, bits_stored: int
) -> npt.NDArray[np.uint16]:
    """Quantise display pixels to ``bits_stored`` bits; MONOCHROME1 stores dense as dark."""
    values = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 1.0)
    if photometric_interpretation == MONOCHROME1:
        values = 1.0 - values
    elif photometric_interpretation != MONOCHROME2:
        raise ValueError(f"unsupported photometric interpretation {photometric_interpretation!r}")
    top = (1 << bits_stored) - 1
    result: npt.NDArray[np.uint16] = np.round(values * top).astype(np.uint16)
    return result


def _detector(pixels: Array, site: SiteProfile, rng: np.random.Generator) -> Array:
    size = pixels.shape[0]
    if site.resolution < 1.0:
        pixels = _resample_resolution(pixels, site.resolution)
    if site.blur_sigma > 0:
        pixels = gaussian_blur(pixels, site.blur_sigma)
    rows = np.linspace(-1.0, 1.0, size)[:, None]
    pixels = pixels * (1.0 + site.heel_effect * rows)
    curved = np.clip(pixels, 0.0, 1.0) ** site.gamma
    toned = 0.5 + site.contrast * (curved - 0.5) + site.brightness
    # Quantum noise grows with exposure (darker display = more photons reached the detector),
    # so its amplitude is larger in the lungs than over the mediastinum.
    sigma = site.noise * (1.3 - 0.6 * np.clip(toned, 0.0, 1.0))
    result: Array = toned + sigma * rng.standard_normal(pixels.shape)
    return result


def _collimate(pixels: Array, site: SiteProfile, rng: np.random.Generator) -> Array:
    """Unexposed borders outside the collimator read as bright (dense) in display."""
    size = pixels.shape[0]
    low, high = site.collimation
    top, bottom, left, right = (int(rng.uniform(low, high) * size) for _ in range(4))
    level = float(np.percentile(pixels, 99.5))
    out = pixels.copy()
    border = 0.01 * rng.standard_normal(pixels.shape)
    out[:top] = level + border[:top]
    out[size - bottom :] = level + border[size - bottom :]
    out[:, :left] = level + border[:, :left]
    out[:, size - right :] = level + border[:, size - right :]
    return out


def _minmax(pixels: Array) -> Array:
    """The runtime's display window: robust min-max to [0, 1]."""
    low, high = np.percentile(pixels, [0.5, 99.5])
    result: Array = np.clip((pixels - low) / max(high - low, 1e-6), 0.0, 1.0)
    return result


def _affine_sources(size: int, angle: float, scale: float, shift: Array) -> tuple[Array, Array]:
    """Source coordinates of each output pixel: rotate and scale about the centre, shift."""
    centre = (size - 1) / 2.0
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    r = rows - centre - shift[0]
    c = cols - centre - shift[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return (cos * r - sin * c) / scale + centre, (sin * r + cos * c) / scale + centre


def _bilinear(image: Array, rows: Array, cols: Array) -> Array:
    size_r, size_c = image.shape
    rows = np.clip(rows, 0.0, size_r - 1.0)
    cols = np.clip(cols, 0.0, size_c - 1.0)
    r0 = np.minimum(np.floor(rows).astype(int), size_r - 2)
    c0 = np.minimum(np.floor(cols).astype(int), size_c - 2)
    fr, fc = rows - r0, cols - c0
    top = image[r0, c0] * (1 - fc) + image[r0, c0 + 1] * fc
    bottom = image[r0 + 1, c0] * (1 - fc) + image[r0 + 1, c0 + 1] * fc
    result: Array = top * (1 - fr) + bottom * fr
    return result


def _resample_resolution(image: Array, factor: float) -> Array:
    """Lose detail as a coarser detector would: sample at ``factor`` of the matrix, upsample."""
    size = image.shape[0]
    low = max(8, round(size * factor))
    coarse_axis = np.linspace(0.0, size - 1.0, low)
    rr, cc = np.meshgrid(coarse_axis, coarse_axis, indexing="ij")
    coarse = _bilinear(gaussian_blur(image, 0.5 / factor), rr, cc)
    fine_axis = np.linspace(0.0, low - 1.0, size)
    fr, fc = np.meshgrid(fine_axis, fine_axis, indexing="ij")
    return _bilinear(coarse, fr, fc)
