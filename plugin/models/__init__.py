"""Model bundles (manifest, checksums), the bundle registry, and the ONNX Runtime encoders.

Bundles, their writer and the registry are re-exported here; the encoders live in
``plugin.models.runtime`` and the importers in ``plugin.models.importers``, and are imported
from there, so that reading a manifest never loads onnxruntime.
"""

from plugin.models.bundle import (
    FORMAT_VERSION,
    SYNTHETIC_NOTICE,
    Bundle,
    BundleError,
    FileCheck,
    FileRef,
    Finding,
    ImageSpec,
    Manifest,
    check_files,
    load_bundle,
    read_manifest,
    sha256_file,
)
from plugin.models.bundle_writer import pin_file, write_manifest
from plugin.models.registry import Registry, RegistryEntry, RegistryError

__all__ = [
    "FORMAT_VERSION",
    "SYNTHETIC_NOTICE",
    "Bundle",
    "BundleError",
    "FileCheck",
    "FileRef",
    "Finding",
    "ImageSpec",
    "Manifest",
    "Registry",
    "RegistryEntry",
    "RegistryError",
    "check_files",
    "load_bundle",
    "pin_file",
    "read_manifest",
    "sha256_file",
    "write_manifest",
]
