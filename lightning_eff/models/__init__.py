"""Networks and the supervised classification module.

:class:`ConvNet` (the dataset-distillation ConvNet-3) and :class:`MLP` share one API: ``features(x)`` returns
the flattened penultimate embedding of size ``feature_dim`` and ``classifier`` is the linear head.
:class:`ImageClassifier` trains any such network with cross-entropy.
"""

from lightning_eff.models.classifier import ImageClassifier
from lightning_eff.models.convnet import ConvNet
from lightning_eff.models.mlp import MLP

__all__ = ["MLP", "ConvNet", "ImageClassifier"]
