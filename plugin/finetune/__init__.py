"""Contrastive fine-tuning of a bundle on a site's own image-report pairs.

Both towers stay frozen: their embeddings are computed once, and two small low-rank adapters
(one per side, ``x -> x (I + BA)^T``) are trained on them with a symmetric InfoNCE loss. The
trained adapters are then folded into the bundle's own files (the image tower's ONNX graph, the
text projection or text tower, the prompt embeddings), so the fine-tuned bundle has the same
format as its parent and the runtime needs nothing new (docs/finetune.md).
"""

from plugin.finetune.adapters import AdapterConfig, TrainedAdapters, train_adapters
from plugin.finetune.errors import FinetuneError
from plugin.finetune.folding import Affine

__all__ = ["AdapterConfig", "Affine", "FinetuneError", "TrainedAdapters", "train_adapters"]
