"""Per-sample gradient capture: which parameters (select_layers), compressed per-sample
gradients with one backward pass (GradientSketcher), and exact references
(per_sample_gradients); several checkpoints of one model as an ensemble (ensemble.py)."""
from ._batch import check_loss_shape
from .ensemble import Checkpoints, EnsembleSketcher, as_checkpoints
from .errors import CaptureError
from .exact import per_sample_gradients
from .layers import LayerInfo, left_out, select_layers
from .sketcher import GradientSketcher

__all__ = ["CaptureError", "Checkpoints", "EnsembleSketcher", "as_checkpoints",
           "check_loss_shape", "GradientSketcher", "LayerInfo", "left_out",
           "per_sample_gradients", "select_layers"]
