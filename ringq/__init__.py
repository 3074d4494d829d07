"""Engine for Ring Quantization: config, data, training/evaluation loops,
checkpoint I/O, packing and distributed set-up, shared by the CLI scripts; and the
API for a model of your own (:mod:`ringq.api`, docs/OWN_MODELS.md)."""
from .api import Recipe, distinct_levels, load_packed, quantize_model, save_packed

__all__ = ["Recipe", "distinct_levels", "load_packed", "quantize_model", "save_packed"]
