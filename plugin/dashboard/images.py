"""Stored DICOM images as windowed PNGs for the browser, cached on disk.

Received images are windowed as the model saw them (``display_array``: modality LUT, VOI or a
robust min-max window, MONOCHROME1 inverted); pacsclip's colour overlays keep their colours.
A rendering is cached under ``<data dir>/dashboard-cache`` by SOP Instance UID and size: an
object of a UID never changes its pixels (a replaced instance gets its cache entry dropped
when its file is newer than the PNG).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.imaging.preprocess import UnsupportedImage, display_array

logger = logging.getLogger(__name__)

SIZES: Final = (160, 512, 1024)  # thumbnail, study page, full view: a bounded cache
_UID: Final = re.compile(r"^[0-9.]{1,64}$")


class ImageUnavailable(ValueError):
    """The object has no image the dashboard can show; the message says why."""


def render_png(path: Path, size: int) -> bytes:
    """The object's image fitted into ``size`` x ``size`` pixels, as PNG bytes."""
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise ImageUnavailable(f"the stored object cannot be read ({type(exc).__name__})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        if photometric == "RGB" and int(ds.get("NumberOfFrames", 1) or 1) == 1:
            image = Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8), mode="RGB")
        else:
            grey = display_array(ds)
            image = Image.fromarray(np.round(grey * 255.0).astype(np.uint8), mode="L")
    except (UnsupportedImage, ValueError, AttributeError) as exc:
        raise ImageUnavailable(f"the object has no displayable image: {exc}") from exc
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


class PngCache:
    """Rendered PNGs on disk, one file per (SOP Instance UID, size)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def png(self, source: Path, sop_instance_uid: str, size: int) -> bytes:
        if size not in SIZES:
            raise ImageUnavailable(f"size must be one of {SIZES}, got {size}")
        if not _UID.match(sop_instance_uid):  # it names a file
            raise ImageUnavailable("not a valid SOP Instance UID")
        cached = self.directory / f"{sop_instance_uid}-{size}.png"
        try:
            if cached.stat().st_mtime >= source.stat().st_mtime:
                return cached.read_bytes()
        except FileNotFoundError:
            pass
        data = render_png(source, size)
        self._store(cached, data)
        return data

    def _store(self, cached: Path, data: bytes) -> None:
        # Written to a temp file and renamed: a reader never sees half a PNG.
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.directory, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(temp, cached)
        except OSError as exc:
            Path(temp).unlink(missing_ok=True)
            logger.warning("dashboard image cache not written (%s)", type(exc).__name__)
