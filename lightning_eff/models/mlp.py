"""A multi-layer perceptron over flattened images, with the same ``features``/``classifier`` API as ConvNet."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.models.convnet import _ACTIVATIONS, make_activation
from lightning_eff.utils.checks import check_choice, check_int

__all__ = ["MLP"]


class MLP(nn.Module):
    """MLP on flattened ``C*H*W`` images: ``[Linear, activation, Dropout]`` per hidden layer, then a linear head.

    Args:
        in_channels: image channels.
        image_size: side of the square input images.
        num_classes: output classes.
        hidden_sizes: widths of the hidden layers (may be empty: then the head is a linear model on pixels).
        activation: ``"relu"``, ``"leakyrelu"``, ``"gelu"`` or ``"sigmoid"``.
        dropout: dropout probability after each hidden activation, in ``[0, 1)``.

    Example::

        >>> net = MLP(in_channels=1, image_size=8, num_classes=10, hidden_sizes=(64, 32))
        >>> x = torch.randn(5, 1, 8, 8)
        >>> net.feature_dim, net.features(x).shape, net(x).shape
        (32, torch.Size([5, 32]), torch.Size([5, 10]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_int(in_channels, "in_channels", minimum=1, owner=name)
        self.image_size = check_int(image_size, "image_size", minimum=1, owner=name)
        self.num_classes = check_int(num_classes, "num_classes", minimum=1, owner=name)
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise TypeError(f"{name}: `hidden_sizes` must be a sequence of ints, got {hidden_sizes!r}.")
        for size in hidden_sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name}: `hidden_sizes` must hold ints >= 1, got {list(hidden_sizes)!r}.")
        self.hidden_sizes = tuple(hidden_sizes)
        self.activation = check_choice(activation, "activation", _ACTIVATIONS, owner=name)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, Real)
            or not (0.0 <= dropout < 1.0)
            or math.isnan(dropout)
        ):
            raise ValueError(f"{name}: `dropout` must be a float in [0, 1), got {dropout!r}.")
        self.dropout = float(dropout)

        self.in_features = in_channels * image_size * image_size
        layers: list[nn.Module] = []
        width = self.in_features
        for size in self.hidden_sizes:
            layers += [nn.Linear(width, size), make_activation(activation)]
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            width = size
        self.encoder = nn.Sequential(*layers)
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (so the network can be rebuilt, e.g. from a checkpoint)."""
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "hidden_sizes": list(self.hidden_sizes),
            "activation": self.activation,
            "dropout": self.dropout,
        }

    def features(self, x: Tensor) -> Tensor:
        """Last hidden activations ``[B, feature_dim]`` of images ``[B, C, S, S]`` (or flat ``[B, C*S*S]``)."""
        image = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, Tensor) or not (
            (x.ndim == 4 and tuple(x.shape[1:]) == image) or (x.ndim == 2 and x.shape[1] == self.in_features)
        ):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}: expected input of shape [B, {image[0]}, {image[1]}, {image[2]}] or "
                f"[B, {self.in_features}] (in_channels={self.in_channels}, image_size={self.image_size}), got {got}."
            )
        return self.encoder(torch.flatten(x, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``: ``classifier(features(x))``."""
        return self.classifier(self.features(x))
