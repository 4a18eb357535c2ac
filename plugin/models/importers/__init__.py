"""Building bundles from operator-supplied models, one module per source format.

``onnx``: image (and optionally text) towers already exported to ONNX. ``hf``: a local Hugging
Face CLIP or SigLIP folder. ``open_clip``: an open_clip checkpoint, loaded into pacsclip's own
towers (``open_clip_towers``) without open_clip, timm or torchvision. The PyTorch sources are
exported to ONNX by ``torch_export`` and then built by ``onnx``; every importer writes its
bundle through :mod:`plugin.models.bundle_writer`.
"""
