"""NCFM's discrepancy as plain functions of tensors (the paper's NCFD, official ``CFLossFunc``).

S. Wang et al., "Dataset Distillation with Neural Characteristic Function: A Minmax Perspective", CVPR 2025
(see :mod:`lightning_eff.distill.ncfm` for the formula and the departures from the official code), and the
gradient reversal that makes one backward pass serve the minmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["characteristic_function", "ncfd", "ascent_gradient"]

_SQRT_EPS = 1e-12


def characteristic_function(features: Tensor, frequencies: Tensor) -> tuple[Tensor, Tensor]:
    """Empirical characteristic function ``mean_x exp(i <t, f(x)>)`` at every frequency.

    Args:
        features: ``[N, D]``.
        frequencies: ``[T, D]``.

    Returns:
        ``(real [T], imag [T])``.

    Example::

        >>> re, im = characteristic_function(torch.zeros(3, 2), torch.randn(5, 2))
        >>> bool((re == 1).all()), bool((im == 0).all())
        (True, True)
    """
    arg = frequencies @ features.T
    return torch.cos(arg).mean(1), torch.sin(arg).mean(1)


def _safe_sqrt(x: Tensor) -> Tensor:
    positive = x > _SQRT_EPS
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def ncfd(real_features: Tensor, syn_features: Tensor, frequencies: Tensor, alpha: float = 0.5) -> Tensor:
    """The neural characteristic function discrepancy of NCFM (official ``CFLossFunc``), averaged over the frequencies.

    ``mean_t sqrt(alpha (|Phi_r| - |Phi_s|)^2 + (1 - alpha) 2 (|Phi_r||Phi_s| - Re_r Re_s - Im_r Im_s))``
    where ``Phi`` are the empirical characteristic functions of the two feature sets. ``alpha``
    weighs amplitude against phase; at ``alpha = 0.5`` the integrand is ``|Phi_r - Phi_s| / sqrt(2)``.
    Without the official ``300`` scale (the module owns it). Zero for identical sets.

    Args:
        real_features: ``[N_r, D]`` (the module passes L2-normalised features).
        syn_features: ``[N_s, D]``.
        frequencies: ``[T, D]``.
        alpha: amplitude weight in ``[0, 1]``.

    Example::

        >>> f = torch.randn(6, 4)
        >>> t = torch.randn(32, 4)
        >>> float(ncfd(f, f, t))
        0.0
        >>> g = torch.randn(3, 4)
        >>> re_r, im_r = characteristic_function(f, t)
        >>> re_s, im_s = characteristic_function(g, t)
        >>> direct = torch.complex(re_r - re_s, im_r - im_s).abs().mean() / 2 ** 0.5
        >>> bool(torch.isclose(ncfd(f, g, t), direct, atol=1e-6))
        True
    """
    for name, x in (("real_features", real_features), ("syn_features", syn_features), ("frequencies", frequencies)):
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"ncfd: `{name}` must be a 2-D tensor, got {tuple(getattr(x, 'shape', ()))}")
    if not real_features.shape[1] == syn_features.shape[1] == frequencies.shape[1]:
        raise ValueError(
            f"ncfd: feature dimensions differ: real {tuple(real_features.shape)}, syn {tuple(syn_features.shape)}, "
            f"frequencies {tuple(frequencies.shape)} (expected [N_r, D], [N_s, D], [T, D])"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"ncfd: `alpha` must be a float in [0, 1], got {alpha!r}")
    re_r, im_r = characteristic_function(real_features, frequencies)
    re_s, im_s = characteristic_function(syn_features, frequencies)
    amp_r = torch.sqrt(re_r * re_r + im_r * im_r)
    amp_s = torch.sqrt(re_s * re_s + im_s * im_s)
    amplitude = (amp_r - amp_s).square()
    # the phase term 2 (|Phi_r||Phi_s| - Re_r Re_s - Im_r Im_s) = |Phi_r - Phi_s|^2 - (|Phi_r| - |Phi_s|)^2,
    # computed in this form (no cancellation of two nearly equal products; exactly 0 for equal sets)
    distance = (re_r - re_s).square() + (im_r - im_s).square()
    phase = (distance - amplitude).clamp_min(0)
    return _safe_sqrt(alpha * amplitude + (1 - alpha) * phase).mean()


class _AscentGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return -grad


def ascent_gradient(x: Tensor) -> Tensor:
    """Identity in the forward pass, negated gradient in the backward (gradient reversal).

    Whatever produced ``x`` (psi) receives ``-dL/dx``: a descent step of its optimizer ascends ``L``,
    while everything else in the same backward pass (the images) descends.

    Example::

        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (ascent_gradient(x) * 3).sum().backward()
        >>> x.grad
        tensor([-3., -3.])
    """
    return _AscentGradient.apply(x)

