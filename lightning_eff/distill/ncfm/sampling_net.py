"""NCFM's frequency-sampling network psi (official ``NCFM/SampleNet.py``), the max player of the minmax."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SamplingNet"]


class SamplingNet(nn.Module):
    """The frequency-sampling network psi of NCFM (official ``SampleNet``).

    Gaussian noise ``[ceil(num_freqs / repeat), feature_dim]`` goes through ``num_layers`` blocks of
    ``Linear -> BatchNorm1d -> LeakyReLU(0.2)`` (``Tanh`` in the last block); each output row is
    repeated ``repeat`` times (a mixture of ``num_freqs / repeat`` components) and the first
    ``num_freqs`` rows are the frequencies.

    Args:
        feature_dim: dimension of the features (and of each frequency).
        num_freqs: frequencies per call.
        repeat: repetitions of each row (official 16).
        noise_std: standard deviation of the input noise (official ``t_var = 1``).
        num_layers: blocks (official 3).

    Example::

        >>> psi = SamplingNet(feature_dim=8, num_freqs=64)
        >>> psi(generator=torch.Generator().manual_seed(0)).shape
        torch.Size([64, 8])
    """

    def __init__(
        self, feature_dim: int, num_freqs: int = 4096, repeat: int = 16, noise_std: float = 1.0, num_layers: int = 3
    ) -> None:
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("num_freqs", num_freqs), ("repeat", repeat),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SamplingNet: `{name}` must be an integer >= 1, got {value!r}")
        if math.ceil(num_freqs / repeat) < 2:
            raise ValueError(
                f"SamplingNet: num_freqs / repeat = {num_freqs} / {repeat} leaves fewer than 2 noise rows, which "
                f"BatchNorm1d cannot normalise; lower `repeat` or raise `num_freqs`"
            )
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std > 0:
            raise ValueError(f"SamplingNet: `noise_std` must be a float > 0, got {noise_std!r}")
        self.feature_dim = feature_dim
        self.num_freqs = num_freqs
        self.repeat = repeat
        self.noise_std = float(noise_std)
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Linear(feature_dim, feature_dim), nn.BatchNorm1d(feature_dim)]
            layers.append(nn.LeakyReLU(0.2) if i < num_layers - 1 else nn.Tanh())
        self.layers = nn.Sequential(*layers)

    @property
    def num_rows(self) -> int:
        return math.ceil(self.num_freqs / self.repeat)

    def forward(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Frequencies ``[num_freqs, feature_dim]`` from fresh noise (drawn from ``generator``) or ``noise``."""
        device = self.layers[0].weight.device
        if noise is None:
            gdev = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(self.num_rows, self.feature_dim, generator=generator, device=gdev)
            noise = noise.to(device) * self.noise_std
        elif tuple(noise.shape) != (self.num_rows, self.feature_dim):
            raise ValueError(f"SamplingNet: noise must be [{self.num_rows}, {self.feature_dim}], got {tuple(noise.shape)}")
        out = self.layers(noise)
        return out.repeat(self.repeat, 1)[: self.num_freqs]

