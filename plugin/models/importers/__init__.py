"""Building bundles from operator-supplied models, one module per source format.

``onnx``: image (and optionally text) towers already exported to ONNX. Every importer writes
its bundle through :mod:`plugin.models.bundle_writer`.
"""
