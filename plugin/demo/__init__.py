"""The bundled demo model: synthetic data and training. Synthetic, not for clinical use.

- :mod:`plugin.demo.phantom` draws chest-radiograph-like phantoms with known findings and masks;
- :mod:`plugin.demo.sites` simulates six acquisition sites (tone, noise, blur, collimation...);
- :mod:`plugin.demo.reports` generates report sentences, split into train and held-out phrasings;
- :mod:`plugin.demo.train` trains the towers on CPU and exports the ONNX image tower (needs torch).

Importing this package imports neither torch nor onnxruntime.
"""
