"""DICOM -> model input: rendering, resizing and normalisation, slice sampling, score pooling."""

from plugin.imaging.preprocess import (
    ImageSpec,
    UnsupportedImage,
    batch_inputs,
    dataset_input,
    display_array,
    model_input,
)
from plugin.imaging.slices import (
    VOLUME_MODALITIES,
    pool_scores,
    sample_indices,
    sample_slices,
    select_images,
    sort_slices,
)

__all__ = [
    "VOLUME_MODALITIES",
    "ImageSpec",
    "UnsupportedImage",
    "batch_inputs",
    "dataset_input",
    "display_array",
    "model_input",
    "pool_scores",
    "sample_indices",
    "sample_slices",
    "select_images",
    "sort_slices",
]
