"""NCFM: neural characteristic function matching, with a minmax that really trains.

Paper: S. Wang, Y. Yang, Z. Liu, C. Sun, X. Hu, C. He, L. Zhang, "Dataset Distillation with Neural
Characteristic Function: A Minmax Perspective", CVPR 2025 (arXiv:2502.20653). Official code:
gszfwsb/NCFM (``NCFM/NCFM.py``, ``NCFM/SampleNet.py``, ``condenser/compute_loss.py``,
``condenser/Condenser.py``, ``condenser/decode.py``, ``config/ipc*/``).

The loss (the paper's neural characteristic function discrepancy, NCFD; the official ``CFLossFunc``). For L2-normalised penultimate features ``f(x)`` of a feature
network and frequencies ``t``, the empirical characteristic function of a set ``X`` is
``Phi_X(t) = mean_{x in X} exp(i <t, f(x)>)``; with amplitudes ``|Phi|`` and the phase difference
written through real and imaginary parts, the neural characteristic function discrepancy is::

    NCFD = mean_t sqrt( alpha (|Phi_r| - |Phi_s|)^2
                        + (1 - alpha) 2 (|Phi_r||Phi_s| - Re_r Re_s - Im_r Im_s) )

(:func:`ncfd`; at ``alpha = 0.5`` the integrand is ``|Phi_r - Phi_s| / sqrt(2)``). The module
minimises ``scale * NCFD`` (``scale = 300`` as in the code) summed over classes.

The minmax (min over the synthetic set, max over psi): the frequencies come either from ``N(0, I)`` or from a sampling network psi
(:class:`SamplingNet`: noise -> 3 x [Linear, BatchNorm1d, LeakyReLU(0.2) / Tanh last], each row
repeated 16 times, SGD lr 1e-3); the synthetic images *minimise* the discrepancy and psi
*maximises* it. Here psi's frequencies pass through a gradient-reversal node
(:func:`ascent_gradient`), so one backward pass gives the images ``+dL/dS`` and psi ``-dL/dpsi``,
and a descent step of psi's optimizer is an ascent step on ``L``. Under DDP both gradients are
all-reduced by the same backward.

Procedure (``config/ipc10/cifar10.yaml``; :class:`NCFM`):

1. :func:`pretrain_feature_networks` trains K ConvNets (SGD lr 0.01, momentum 0.9, MultiStepLR x0.2
   at 2/3 and 5/6 of the epochs, DSA + CutMix p 0.5) and keeps each net's initial and trained
   weights (:class:`FeatureNetworks`, saved atomically with a format version).
2. The synthetic set starts from real images; with ``factor = 2`` each stored image packs four
   downsampled real images ("multi-formation", from IDC, Kim et al. ICML 2022, which the official
   code reuses) and is decoded to four full-size images (:func:`decode_multi_formation`).
3. Each iteration draws a net k and ``lambda ~ U(0, 1)`` and matches, per class, the CF of a real
   batch and of the decoded synthetic images of the class under the net with weights
   ``lambda init_k + (1 - lambda) trained_k``, both augmented with the same siamese DSA draw; a
   calibration term ``calib_weight * sum_c CE(trained_k(A(S_c)), c)`` is added; images stay in the valid
   pixel range; ReduceLROnPlateau(0.5, patience 500) on the images (and psi).

Departures from the official code, and why:

* psi is trained: the official ``compute_match_loss`` calls ``loss.backward(retain_graph=True)``,
  steps the images, then ``(-loss).backward()`` and steps psi without zeroing psi's gradient in
  between, so psi's two gradients cancel and psi never moves (its issues #3 and #14). The tests
  show one psi step here raises the loss and one image step lowers it.
* One iteration is one optimizer step on the loss summed over the classes (and the per-class
  calibration terms summed as well); the official code steps the image optimizer once per class,
  then once per class for calibration. The gradient of each class's images is the same; the number
  of optimizer steps per iteration differs (1 here, ``2 C`` there).
* The discrepancy is exactly 0 for identical sets: the phase term is computed as
  ``|Phi_r - Phi_s|^2 - (|Phi_r| - |Phi_s|)^2`` (the same quantity without the cancellation of
  two nearly equal products, which leaves ~5e-5 per frequency in float32), and the square root
  is taken only where its argument exceeds 1e-12 (zero value and gradient below), instead of
  clamping the phase term to 1e-12.
* Images live in the DataModule's normalised space (as in every method of this package), so the
  official pixel-space learning rates are divided by the std (Adam) or its square (SGD) in the
  configs; the initial packing downsamples with ``area`` (the official code: ``nearest``).
* Frequencies, nets, lambdas and augmentations come from the per-iteration generators of the
  base, so runs are reproducible, resume exactly, and are the same on every rank.
* ``memory_efficient=True`` recomputes each class's synthetic forward in the backward
  (activation checkpointing) so memory no longer grows with the number of classes; the gradients
  are the same.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_eff.distill.base import (
    DistillationModule,
    DistillPlugin,
    DistillStep,
    _seed_from,
    reinitialized,
)
from lightning_eff.distill.synthetic import SyntheticSet
from lightning_eff.utils.io import load_versioned, save_versioned

__all__ = [
    "NCFM",
    "SamplingNet",
    "FeatureNetworks",
    "pretrain_feature_networks",
    "ncfd",
    "characteristic_function",
    "ascent_gradient",
    "pack_multi_formation",
    "decode_multi_formation",
    "multi_formation_init",
    "decode_synthetic_set",
]

FEATURE_NETS_FORMAT = "lightning-eff/ncfm-feature-networks"
FEATURE_NETS_VERSION = 1
_SQRT_EPS = 1e-12
_REAL_CHUNK = 4096  # real images per no-grad forward on an accelerator


# ---------------------------------------------------------------------------------------------
# the discrepancy (pure functions)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# multi-formation
# ---------------------------------------------------------------------------------------------
def _check_factor(factor: Any, where: str) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{where}: `factor` must be an integer >= 1, got {factor!r}")
    return factor


def _check_divisible(images: Tensor, factor: int, where: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{where}: expected images [N, C, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{where}: image size {h}x{w} is not divisible by factor={factor}")


def pack_multi_formation(images: Tensor, factor: int = 2) -> Tensor:
    """Pack ``factor**2`` images into one (the multi-formation initialisation).

    ``images`` ``[factor**2 * n, C, H, W]`` are read as ``factor**2`` consecutive chunks of ``n``;
    chunk ``k = i * factor + j`` is downsampled (area) to ``H/factor x W/factor`` and placed in tile
    ``(i, j)`` of the ``n`` output images. :func:`decode_multi_formation` reads the tiles in the same
    order.

    Example::

        >>> x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
        >>> pack_multi_formation(x, 2)[0, 0]
        tensor([[0., 1.],
                [2., 3.]])
    """
    factor = _check_factor(factor, "pack_multi_formation")
    _check_divisible(images, factor, "pack_multi_formation")
    if factor == 1:
        return images
    k = factor * factor
    if images.shape[0] % k:
        raise ValueError(f"pack_multi_formation: {images.shape[0]} images is not a multiple of factor**2 = {k}")
    n = images.shape[0] // k
    h, w = images.shape[-2] // factor, images.shape[-1] // factor
    small = F.interpolate(images, size=(h, w), mode="area")
    out = images.new_empty(n, *images.shape[1:])
    for i in range(factor):
        for j in range(factor):
            chunk = small[(i * factor + j) * n : (i * factor + j + 1) * n]
            out[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w] = chunk
    return out


def decode_multi_formation(images: Tensor, factor: int = 2) -> Tensor:
    """Decode stored images into ``factor**2`` full-size images each (differentiable).

    Tile ``(i, j)`` of every image is cropped and upsampled (bilinear) back to ``H x W``; the
    output holds all tiles ``(0, 0)`` first, then ``(0, 1)``, ... (row-major), as the official
    ``decode_zoom``. ``factor = 1`` returns the images unchanged.

    Example::

        >>> decode_multi_formation(torch.randn(3, 1, 8, 8), 2).shape
        torch.Size([12, 1, 8, 8])
    """
    factor = _check_factor(factor, "decode_multi_formation")
    _check_divisible(images, factor, "decode_multi_formation")
    if factor == 1:
        return images
    h, w = images.shape[-2] // factor, images.shape[-1] // factor
    tiles = [images[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w] for i in range(factor) for j in range(factor)]
    return F.interpolate(torch.cat(tiles), size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)


def multi_formation_init(
    datamodule, ipc: int, factor: int = 2, seed: int = 0, method: str = "ncfm", **metadata: Any
) -> SyntheticSet:
    """The stored initial set: per class, ``ipc`` images each packing ``factor**2`` random real images.

    Real images are drawn without replacement with a generator seeded by ``seed`` (``factor = 1`` gives
    :meth:`SyntheticSet.from_real`'s draw). :func:`decode_synthetic_set` turns it into the evaluable
    set (the "packed real" baseline of the same storage budget).

    Example::

        >>> from lightning_eff.data import DigitsDataModule
        >>> s = multi_formation_init(DigitsDataModule(image_size=16), ipc=2)
        >>> len(s), s.metadata["formation"], len(decode_synthetic_set(s))
        (20, 'stored', 80)
    """
    from lightning_eff.distill.synthetic import _check_ipc, _metadata, _ready

    _check_ipc(ipc)
    factor = _check_factor(factor, "multi_formation_init")
    dm = _ready(datamodule)
    need = factor**2 * ipc
    gen = torch.Generator().manual_seed(seed)
    images = []
    for c in range(dm.num_classes):
        available = len(dm.class_indices(c))
        if available < need:
            raise ValueError(
                f"multi-formation with factor={factor} at ipc={ipc} packs {need} real images per class, but "
                f"class {c} has {available}; lower ipc or factor"
            )
        images.append(pack_multi_formation(dm.class_images(c, need, generator=gen), factor))
    labels = torch.arange(dm.num_classes).repeat_interleave(ipc)
    meta = _metadata(dm, method, ipc, seed, metadata)
    meta.update(factor=factor, stored_ipc=ipc, decoded_ipc=ipc * factor**2,
                formation="stored" if factor > 1 else "decoded")
    return SyntheticSet(torch.cat(images), labels, metadata=meta)


def decode_synthetic_set(stored: SyntheticSet, factor: int | None = None) -> SyntheticSet:
    """Decode a stored multi-formation set into the evaluable one (``factor**2`` images per stored image).

    ``factor`` defaults to ``stored.metadata["factor"]``. Classes come out in order; within a class,
    tile ``(0, 0)`` of every stored image first (see :func:`decode_multi_formation`). The metadata keeps
    the stored budget (``ipc``, ``stored_ipc``) and adds ``decoded_ipc`` and ``formation="decoded"``.
    """
    if factor is None:
        factor = int(stored.metadata.get("factor", 1))
    factor = _check_factor(factor, "decode_synthetic_set")
    if stored.metadata.get("formation") == "decoded" and factor > 1:
        raise ValueError("decode_synthetic_set: the set is already decoded (metadata formation='decoded')")
    if stored.soft_labels is not None or stored.privileged is not None:
        raise ValueError("decode_synthetic_set: decode before adding soft labels or privileged information")
    images, labels = [], []
    for c in range(stored.num_classes):
        block = stored.images[stored.labels == c]
        if len(block):
            decoded = decode_multi_formation(block, factor)
            images.append(decoded)
            labels.append(torch.full((decoded.shape[0],), c, dtype=torch.long))
    meta = dict(stored.metadata)
    stored_ipc = int(meta.get("stored_ipc", stored.ipc))
    meta.update(factor=factor, stored_ipc=stored_ipc, decoded_ipc=stored_ipc * factor**2, formation="decoded")
    meta.pop("image_shape", None)
    return SyntheticSet(torch.cat(images), torch.cat(labels), lr=stored.lr, metadata=meta)


# ---------------------------------------------------------------------------------------------
# the sampling network psi
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# feature networks: initial and trained weights of K pretrained nets
# ---------------------------------------------------------------------------------------------
class FeatureNetworks:
    """The initial and trained weights of K feature networks (stacked per state-dict entry).

    ``init[name]`` and ``trained[name]`` are ``[K, *shape]`` tensors over the floating-point entries
    of the networks' state dicts (parameters and float buffers). :meth:`interpolated` gives
    ``lambda init_k + (1 - lambda) trained_k`` (the official ``update_feature_extractor``).

    File format (``*.pt``, written atomically)::

        {"format": "lightning-eff/ncfm-feature-networks", "format_version": 1,
         "names": [str, ...], "init": {name: Tensor[K, ...]}, "trained": {name: Tensor[K, ...]},
         "metadata": {"net": {"class_path", "init_args"} or None, "epochs", "test_acc": [...], ...}}

    Example::

        >>> net = nn.Linear(2, 1)
        >>> fn = FeatureNetworks.from_states([net.state_dict()], [{k: v + 1 for k, v in net.state_dict().items()}])
        >>> len(fn), bool(torch.allclose(fn.interpolated(0, 0.5)["bias"], net.bias + 0.5))
        (1, True)
    """

    def __init__(
        self, names: list[str], init: dict[str, Tensor], trained: dict[str, Tensor], metadata: dict[str, Any] | None = None
    ) -> None:
        if not names:
            raise ValueError("FeatureNetworks: no state entries")
        if set(init) != set(names) or set(trained) != set(names):
            raise ValueError("FeatureNetworks: init and trained must hold exactly the entries in `names`")
        k = init[names[0]].shape[0]
        for name in names:
            if init[name].shape != trained[name].shape or init[name].shape[0] != k:
                raise ValueError(
                    f"FeatureNetworks: entry {name!r} has init {tuple(init[name].shape)} and trained "
                    f"{tuple(trained[name].shape)}; both must be [K={k}, ...]"
                )
        self.names = list(names)
        self.init = init
        self.trained = trained
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return int(self.init[self.names[0]].shape[0])

    @classmethod
    def from_states(
        cls, init_states: list[dict[str, Tensor]], trained_states: list[dict[str, Tensor]], **metadata: Any
    ) -> FeatureNetworks:
        if len(init_states) != len(trained_states) or not init_states:
            raise ValueError("FeatureNetworks.from_states: need as many (>= 1) initial as trained states")
        names = [n for n, v in init_states[0].items() if v.is_floating_point()]
        init = {n: torch.stack([s[n].detach().cpu() for s in init_states]) for n in names}
        trained = {n: torch.stack([s[n].detach().cpu() for s in trained_states]) for n in names}
        return cls(names, init, trained, metadata)

    def to(self, device: torch.device | str) -> FeatureNetworks:
        return FeatureNetworks(
            self.names, {n: v.to(device) for n, v in self.init.items()},
            {n: v.to(device) for n, v in self.trained.items()}, self.metadata,
        )

    @property
    def device(self) -> torch.device:
        return self.init[self.names[0]].device

    def subset(self, count: int) -> FeatureNetworks:
        """The first ``count`` networks."""
        return FeatureNetworks(
            self.names, {n: v[:count] for n, v in self.init.items()},
            {n: v[:count] for n, v in self.trained.items()}, self.metadata,
        )

    def interpolated(self, k: int, lam: float | Tensor) -> dict[str, Tensor]:
        """``lam * init_k + (1 - lam) * trained_k`` for every entry."""
        return {n: torch.lerp(self.trained[n][k], self.init[n][k], lam) for n in self.names}

    def trained_state(self, k: int) -> dict[str, Tensor]:
        return {n: self.trained[n][k] for n in self.names}

    def check_compatible(self, net: nn.Module, where: str = "") -> None:
        state = {n: v for n, v in net.state_dict().items() if v.is_floating_point()}
        mine = [(n, tuple(self.init[n].shape[1:])) for n in self.names]
        theirs = [(n, tuple(v.shape)) for n, v in state.items()]
        if mine != theirs:
            raise ValueError(
                f"{where}the feature networks were trained on an architecture with entries {mine[:3]}..., which "
                f"does not match the net {type(net).__name__} ({theirs[:3]}...): use the same architecture or "
                f"pretrain new feature networks"
            )

    def load_into(self, net: nn.Module, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (from :meth:`interpolated` / :meth:`trained_state`) into ``net`` in place."""
        own = net.state_dict()
        with torch.no_grad():
            for n in self.names:
                own[n].copy_(state[n])

    def save(self, path: str | Path) -> Path:
        """Write the networks atomically (a versioned ``torch.save`` file, see :mod:`lightning_eff.utils.io`)."""
        return save_versioned(path, FEATURE_NETS_FORMAT, FEATURE_NETS_VERSION, {
            "names": self.names,
            "init": {n: v.cpu() for n, v in self.init.items()},
            "trained": {n: v.cpu() for n, v in self.trained.items()},
            "metadata": self.metadata,
        })

    @classmethod
    def load(cls, path: str | Path) -> FeatureNetworks:
        """Read a file of :meth:`save`; a missing, corrupt, foreign or other-version file raises a clear error."""
        data = load_versioned(path, FEATURE_NETS_FORMAT, FEATURE_NETS_VERSION, "NCFM feature-networks file")
        return cls(data["names"], data["init"], data["trained"], data.get("metadata"))


def _net_config(net: nn.Module) -> dict[str, Any] | None:
    get_config = getattr(net, "get_config", None)
    if callable(get_config):
        return {"class_path": f"{type(net).__module__}.{type(net).__qualname__}", "init_args": get_config()}
    return None


def pretrain_feature_networks(
    datamodule,
    net: nn.Module,
    num_nets: int = 20,
    epochs: int = 60,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    dsa: Any | None = True,
    cutmix: float = 0.5,
    seed: int = 0,
    device: torch.device | str | None = None,
    save_path: str | Path | None = None,
    progress: bool = False,
) -> FeatureNetworks:
    """Train ``num_nets`` copies of ``net`` on the real training split, keeping initial and trained weights.

    The official ``pretrain_script.py``: SGD (``lr``, ``momentum``, ``weight_decay``), MultiStepLR x0.2
    at 2/3 and 5/6 of the epochs, DSA on every batch (per-sample parameters), CutMix (beta 1) with
    probability ``cutmix``. Net ``i`` gets its own initialisation and data order (seeded from
    ``seed`` and ``i``); the global RNG is untouched.

    Args:
        datamodule: a ``ClassificationDataModule``.
        net: the architecture (re-initialised per net; never trained in place).
        num_nets, epochs: K networks, epochs each (official 20 x 60).
        dsa: ``True`` (the default :class:`~lightning_eff.distill.DSA`), a ``DSA``, or ``None``/``False``.
        cutmix: probability of CutMix per batch (0 disables it).
        device: where to train (default: the CPU).
        save_path: also write the result there (atomically).
        progress: tqdm bar over networks.

    Example::

        >>> from lightning_eff.data import DigitsDataModule
        >>> from lightning_eff.models import ConvNet
        >>> fn = pretrain_feature_networks(DigitsDataModule(), ConvNet(1, 10, width=8, depth=2, image_size=8),
        ...                                num_nets=2, epochs=1)
        >>> len(fn), len(fn.metadata["test_acc"])
        (2, 2)
    """
    from lightning_eff.distill.augment import DSA, CutMix
    from lightning_eff.distill.evaluate import _test_tensors

    for name, value in (("num_nets", num_nets), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pretrain_feature_networks: `{name}` must be an integer >= 1, got {value!r}")
    if not 0.0 <= float(cutmix) <= 1.0:
        raise ValueError(f"pretrain_feature_networks: `cutmix` must be a probability in [0, 1], got {cutmix!r}")
    if dsa is True:
        dsa = DSA()
    elif dsa is False:
        dsa = None
    cutmixer = CutMix(beta=1.0, prob=float(cutmix)) if cutmix > 0 else None
    device = torch.device(device) if device is not None else torch.device("cpu")
    datamodule.setup("fit")
    images = torch.cat([datamodule.class_images(c) for c in range(datamodule.num_classes)]).to(device)
    labels = torch.cat(
        [torch.full((len(datamodule.class_indices(c)),), c) for c in range(datamodule.num_classes)]
    ).to(device)
    test_x, test_y = _test_tensors(datamodule)
    milestones = [2 * epochs // 3, 5 * epochs // 6]
    inits, trained, accs = [], [], []
    iterator = range(num_nets)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="NCFM feature networks")
    for i in iterator:
        gen = torch.Generator().manual_seed(_seed_from(seed, i, "ncfm-feature-data"))
        model = reinitialized(net, _seed_from(seed, i, "ncfm-feature-init"), device).train()
        inits.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.2)
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=gen).to(device)
            for start in range(0, images.shape[0], batch_size):
                idx = order[start : start + batch_size]
                x, y = images[idx], labels[idx]
                if dsa is not None:
                    x = dsa(x, generator=gen)
                opt.zero_grad(set_to_none=True)
                if cutmixer is not None:
                    x, ya, yb, lam = cutmixer(x, y, generator=gen)
                    out = model(x)
                    loss = lam * F.cross_entropy(out, ya) + (1 - lam) * F.cross_entropy(out, yb)
                else:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            sched.step()
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(xb.to(device)).argmax(1) == yb.to(device)).sum())
                for xb, yb in zip(test_x.split(512), test_y.split(512))
            )
        accs.append(correct / len(test_y))
    result = FeatureNetworks.from_states(
        inits, trained, net=_net_config(net), epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
        cutmix=float(cutmix), dsa=None if dsa is None else dsa.config(), seed=seed,
        dataset=type(datamodule).__name__, test_acc=accs,
    )
    if save_path is not None:
        result.save(save_path)
    return result


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------
def _default_image_optimizer(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=5e-4)


def _default_psi_optimizer(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.5, weight_decay=5e-4)


class NCFM(DistillationModule):
    """Neural characteristic function matching on the distillation base (see the module docstring).

    Args:
        net: feature-network template with ``features(x) -> [B, D]`` (``ConvNet``).
        ipc: stored synthetic images per class (the storage budget).
        factor: multi-formation factor: each stored image decodes to ``factor**2`` images (1: off).
        batch_real: real images per class per iteration (official 1024).
        num_freqs: frequencies per class and iteration (official 4096).
        alpha: amplitude weight of the discrepancy (official 0.5).
        loss_scale: the official ``300`` in front of the discrepancy.
        use_sampling_net: learn the frequency distribution with psi (the minmax); ``False`` draws ``N(0, I)``.
        psi_optimizer: optimizer of psi (official SGD lr 1e-3, momentum 0.5, weight decay 5e-4).
        psi_repeat: row repetition of psi (official 16).
        feature_dim: dimension of ``net.features`` (default: ``net.feature_dim``); needed for psi.
        calib_weight: weight of the calibration cross-entropy of the trained net on the decoded set (0: off).
        num_feature_nets: K pretrained feature networks (official 20).
        pretrain_epochs, pretrain_lr, pretrain_momentum, pretrain_weight_decay, pretrain_batch_size,
            pretrain_cutmix: their pretraining (:func:`pretrain_feature_networks`).
        feature_nets_path: where the feature networks live: loaded if the file exists, else pretrained
            (rank 0) and written there. Default ``<save_dir>/feature_networks.pt``.
        plateau_patience, plateau_factor: ReduceLROnPlateau on the image (and psi) optimizer, stepped with
            the iteration's loss averaged over ranks (``None``: off).
        memory_efficient: per-class activation checkpointing of the synthetic forward.
        image_optimizer: default AdamW lr 0.01, weight decay 5e-4.
        clamp: keep images in the valid pixel range (default on, as the official code).
        (the rest as :class:`~lightning_eff.distill.DistillationModule`)

    Example::

        >>> from lightning_eff.models import ConvNet
        >>> m = NCFM(ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=16), ipc=1,
        ...          use_sampling_net=True, num_freqs=64)
        >>> m.method_name, m.psi.feature_dim
        ('ncfm', 256)
    """

    method_name = "ncfm"

    def __init__(
        self,
        net: nn.Module,
        ipc: int = 10,
        factor: int = 2,
        batch_real: int = 1024,
        num_freqs: int = 4096,
        alpha: float = 0.5,
        loss_scale: float = 300.0,
        use_sampling_net: bool = False,
        psi_optimizer: OptimizerCallable = _default_psi_optimizer,
        psi_repeat: int = 16,
        feature_dim: int | None = None,
        calib_weight: float = 1.0,
        num_feature_nets: int = 20,
        pretrain_epochs: int = 60,
        pretrain_lr: float = 0.01,
        pretrain_momentum: float = 0.9,
        pretrain_weight_decay: float = 5e-4,
        pretrain_batch_size: int = 128,
        pretrain_cutmix: float = 0.5,
        feature_nets_path: str | None = None,
        plateau_patience: int | None = 500,
        plateau_factor: float = 0.5,
        memory_efficient: bool = False,
        init: str = "real",
        image_optimizer: OptimizerCallable = _default_image_optimizer,
        dsa: Any | None = None,
        plugins: list[DistillPlugin] | None = None,
        clamp: bool = True,
        save_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(net, ipc, init, image_optimizer, dsa, plugins, clamp, save_dir, seed)
        name = "NCFM"
        _check_factor(factor, name)
        for arg, value in (("batch_real", batch_real), ("num_freqs", num_freqs), ("psi_repeat", psi_repeat),
                           ("num_feature_nets", num_feature_nets), ("pretrain_epochs", pretrain_epochs),
                           ("pretrain_batch_size", pretrain_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: `{arg}` must be an integer >= 1, got {value!r}")
        for arg, value, low, high in (("alpha", alpha, 0.0, 1.0), ("pretrain_cutmix", pretrain_cutmix, 0.0, 1.0),
                                      ("plateau_factor", plateau_factor, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
                raise ValueError(f"{name}: `{arg}` must be a float in [{low}, {high}], got {value!r}")
        for arg, value in (("loss_scale", loss_scale), ("calib_weight", calib_weight), ("pretrain_lr", pretrain_lr),
                           ("pretrain_momentum", pretrain_momentum),
                           ("pretrain_weight_decay", pretrain_weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
                raise ValueError(f"{name}: `{arg}` must be a float >= 0, got {value!r}")
        if not loss_scale > 0:
            raise ValueError(f"{name}: `loss_scale` must be > 0, got {loss_scale!r}")
        if plateau_patience is not None and (
            isinstance(plateau_patience, bool) or not isinstance(plateau_patience, int) or plateau_patience < 0
        ):
            raise ValueError(f"{name}: `plateau_patience` must be None or an integer >= 0, got {plateau_patience!r}")
        if not isinstance(use_sampling_net, bool):
            raise TypeError(f"{name}: `use_sampling_net` must be a bool, got {use_sampling_net!r}")
        if not isinstance(memory_efficient, bool):
            raise TypeError(f"{name}: `memory_efficient` must be a bool, got {memory_efficient!r}")
        if not callable(getattr(net, "features", None)):
            raise TypeError(f"{name}: net {type(net).__name__} needs a features(x) -> [B, D] embedding method")
        if feature_dim is None:
            feature_dim = getattr(net, "feature_dim", None)
        if use_sampling_net and (isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1):
            raise ValueError(
                f"{name}: use_sampling_net=True needs the feature dimension: pass `feature_dim` (the net "
                f"{type(net).__name__} has no integer `feature_dim` attribute), got {feature_dim!r}"
            )
        self.factor = factor
        self.batch_real = batch_real
        self.num_freqs = num_freqs
        self.alpha = float(alpha)
        self.loss_scale = float(loss_scale)
        self.use_sampling_net = use_sampling_net
        self.psi_optimizer = psi_optimizer
        self.feature_dim = feature_dim
        self.calib_weight = float(calib_weight)
        self.num_feature_nets = num_feature_nets
        self.pretrain = {
            "epochs": pretrain_epochs, "lr": float(pretrain_lr), "momentum": float(pretrain_momentum),
            "weight_decay": float(pretrain_weight_decay), "batch_size": pretrain_batch_size,
            "cutmix": float(pretrain_cutmix),
        }
        self.feature_nets_path = feature_nets_path
        self.plateau_patience = plateau_patience
        self.plateau_factor = float(plateau_factor)
        self.memory_efficient = memory_efficient
        self.psi: SamplingNet | None = None
        if use_sampling_net:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed_from(self.seed, "ncfm-psi"))
                self.psi = SamplingNet(feature_dim, num_freqs=num_freqs, repeat=psi_repeat)
        # networks that must not be registered (no DDP synchronisation, not in the checkpoint)
        self.__dict__["_feat_net"] = None
        self.__dict__["_calib_net"] = None
        self._feature_nets: FeatureNetworks | None = None
        self.save_hyperparameters(ignore=["net", "image_optimizer", "psi_optimizer", "dsa", "plugins"])

    # ------------------------------------------------------------------ set-up
    def _initial_set(self, dm) -> SyntheticSet:
        if self.init != "real" or self.factor == 1:
            try:
                return super()._initial_set(dm)
            except ValueError as err:
                if self.factor > 1 and "expected" in str(err):
                    raise ValueError(
                        f"{err} (with factor={self.factor}, init must be a *stored* set: the synthetic_set_stored.pt "
                        f"that NCFM writes next to synthetic_set.pt, not the decoded set)"
                    ) from None
                raise
        try:
            return multi_formation_init(dm, self.ipc, self.factor, seed=self.seed, method=self.method_name)
        except ValueError as err:
            raise ValueError(f"NCFM: {err}") from None

    def setup_method(self, datamodule) -> None:
        h, w = datamodule.image_shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"NCFM: the images ({h}x{w}) are not divisible by factor={self.factor}")
        with torch.no_grad():
            dim = self.net_template.features(torch.zeros(2, *datamodule.image_shape)).shape[1]
        if self.psi is not None and dim != self.psi.feature_dim:
            raise ValueError(
                f"NCFM: net.features gives {dim}-dimensional features but the sampling net was built for "
                f"feature_dim={self.psi.feature_dim}"
            )
        if self._feature_nets is None:
            self._feature_nets = self._obtain_feature_nets(datamodule)
        self.__dict__["_feat_net"] = copy.deepcopy(self.net_template).requires_grad_(False)
        self.__dict__["_calib_net"] = copy.deepcopy(self.net_template).requires_grad_(False)

    def _obtain_feature_nets(self, datamodule) -> FeatureNetworks:
        path = Path(self.feature_nets_path) if self.feature_nets_path else self._save_dir() / "feature_networks.pt"
        nets = None
        if self.trainer.is_global_zero:
            if path.is_file():
                nets = FeatureNetworks.load(path)
            else:
                nets = pretrain_feature_networks(
                    datamodule, self.net_template, num_nets=self.num_feature_nets, dsa=True, seed=self.seed,
                    device=self.trainer.strategy.root_device, save_path=path,
                    progress=self.trainer.progress_bar_callback is not None, **self.pretrain,
                )
            nets = nets.to("cpu")
        nets = self.trainer.strategy.broadcast(nets)
        nets.check_compatible(self.net_template, where=f"NCFM ({path}): ")
        if len(nets) < self.num_feature_nets:
            raise ValueError(
                f"NCFM: {path} holds {len(nets)} feature networks but num_feature_nets={self.num_feature_nets}; "
                f"delete the file to pretrain again, or lower num_feature_nets"
            )
        return nets.subset(self.num_feature_nets)

    def set_feature_networks(self, nets: FeatureNetworks) -> None:
        """Use these feature networks (e.g. shared between runs in one process) instead of pretraining."""
        nets.check_compatible(self.net_template, where="NCFM.set_feature_networks: ")
        self._feature_nets = nets.subset(min(len(nets), self.num_feature_nets))

    @property
    def feature_networks(self) -> FeatureNetworks | None:
        return self._feature_nets

    # ------------------------------------------------------------------ optimizers
    def extra_parameters(self) -> list[dict[str, Any]]:
        if self.psi is None:
            return []
        return [{"optimizer": self.psi_optimizer(self.psi.parameters())}]

    def configure_optimizers(self):
        optimizers = super().configure_optimizers()
        if self.plateau_patience is None:
            return optimizers
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
        schedulers = [plateau(optimizers[0], mode="min", factor=self.plateau_factor, patience=self.plateau_patience)]
        if self.psi is not None:
            schedulers.append(
                plateau(optimizers[1], mode="min", factor=self.plateau_factor, patience=self.plateau_patience)
            )
        return optimizers, schedulers

    def after_step(self, step: DistillStep) -> None:
        if self._trainer is None:
            return
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        loss = self.trainer.strategy.reduce(step.logs["match_loss"].detach(), reduce_op="mean")
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            sched.step(float(loss))
        optimizers = self.optimizers()
        first = optimizers[0] if isinstance(optimizers, list) else optimizers
        step.logs["image_lr"] = float(first.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ the iteration
    def decoded_class(self, c: int) -> Tensor:
        """The decoded synthetic images of class ``c`` (``factor**2 * ipc`` images, differentiable)."""
        return decode_multi_formation(self.syn_class(c), self.factor)

    def training_class(self, c: int) -> Tensor:
        return self.decoded_class(c)

    def training_images(self) -> tuple[Tensor, Tensor]:
        """The decoded set (classes in order, as :meth:`synthetic_set`), differentiable."""
        images = [self.decoded_class(c) for c in range(self.num_classes)]
        labels = [torch.full((x.shape[0],), c, dtype=torch.long, device=x.device) for c, x in enumerate(images)]
        return torch.cat(images), torch.cat(labels)

    def frequencies(self, feature_dim: int, generator: torch.Generator) -> Tensor:
        """``num_freqs`` frequencies: psi's (with reversed gradient) or ``N(0, I)``."""
        if self.psi is None:
            return torch.randn(self.num_freqs, feature_dim, generator=generator, device=generator.device).to(
                self.device
            )
        return ascent_gradient(self.psi(generator=generator))

    def _class_discrepancy(self, syn: Tensor, real_features: Tensor, t: Tensor) -> Tensor:
        syn_features = F.normalize(self._feat_net.features(syn), dim=1)
        return self.loss_scale * ncfd(real_features, syn_features, t, self.alpha)

    def _class_calibration(self, x: Tensor, c: int) -> Tensor:
        labels = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
        return F.cross_entropy(self._calib_net(x), labels)

    def _features(self, batches: list[Tensor], grad: bool) -> list[Tensor]:
        """L2-normalised features of each batch. On an accelerator the batches go through in one forward
        (the nets normalise per sample, so this changes nothing but the speed); on the CPU one forward
        per batch is faster (the activations stay in cache)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.device.type == "cpu":
                return [F.normalize(self._feat_net.features(b), dim=1) for b in batches]
            x = torch.cat(batches)
            chunks = x.split(_REAL_CHUNK) if not grad else (x,)
            feats = torch.cat([F.normalize(self._feat_net.features(xb), dim=1) for xb in chunks])
            return list(feats.split([b.shape[0] for b in batches]))

    def _prepare_nets(self, step: DistillStep) -> None:
        nets = self._feature_nets
        if nets is None:
            raise RuntimeError("NCFM: no feature networks yet (fit with a DataModule first)")
        if nets.device != self.device:
            nets = self._feature_nets = nets.to(self.device)
        for net in (self._feat_net, self._calib_net):
            if next(net.parameters()).device != self.device:
                net.to(self.device)
        k = int(torch.randint(len(nets), (1,), generator=step.shared))
        lam = float(torch.rand((), generator=step.shared))
        nets.load_into(self._feat_net, nets.interpolated(k, lam))
        self._feat_net.train()
        if self.calib_weight > 0:
            nets.load_into(self._calib_net, nets.trained_state(k))
            self._calib_net.train()
        step.net = self._feat_net
        step.logs["feature_net"] = float(k)
        step.logs["lambda"] = lam

    def matching_loss(self, step: DistillStep) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        self._prepare_nets(step)
        seed = int(torch.randint(0, 2**62, (1,), generator=step.shared))
        freq_gen = torch.Generator(device=self.device).manual_seed(seed)
        classes = range(self.num_classes)
        # per class: a real batch and the decoded synthetic images under one siamese DSA draw
        reals, syns = [], []
        for c in classes:
            real, syn = self.augment(
                self.sample_real(c, self.batch_real, step.local), self.decoded_class(c), generator=step.shared
            )
            reals.append(real)
            syns.append(syn)
        real_features = self._features(reals, grad=False)
        if not self.memory_efficient:
            syn_features = self._features(syns, grad=True)
        match = self.syn_images.new_zeros(())
        for c in classes:
            t = self.frequencies(real_features[c].shape[1], freq_gen)
            if self.memory_efficient:  # recompute this class's forward in the backward
                match = match + checkpoint(self._class_discrepancy, syns[c], real_features[c], t, use_reentrant=False)
            else:
                match = match + self.loss_scale * ncfd(real_features[c], syn_features[c], t, self.alpha)
        step.logs["ncfd_loss"] = match.detach()
        if self.calib_weight == 0:
            return match
        # calibration: per class, the mean cross-entropy of the trained net on the augmented decoded
        # images, summed over the classes (the official per-class calibration steps)
        xs = []
        for c in classes:
            x = self.decoded_class(c)
            xs.append(self.dsa(x, generator=step.shared) if self.dsa is not None else x)
        if self.memory_efficient:
            calib = sum(checkpoint(self._class_calibration, xs[c], c, use_reentrant=False) for c in classes)
        elif self.device.type == "cpu":
            calib = sum(self._class_calibration(xs[c], c) for c in classes)
        else:
            x = torch.cat(xs)
            y = torch.cat([torch.full((xc.shape[0],), c, dtype=torch.long, device=x.device) for c, xc in enumerate(xs)])
            per_sample = F.cross_entropy(self._calib_net(x), y, reduction="none")
            calib = sum(chunk.mean() for chunk in per_sample.split([xc.shape[0] for xc in xs]))
        step.logs["calib_loss"] = calib.detach()
        return match + self.calib_weight * calib

    # ------------------------------------------------------------------ the result
    def _metadata(self) -> dict[str, Any]:
        meta = dict(self._data_meta)
        meta.update(
            method=self.method_name, ipc=self.ipc, seed=self.seed, iterations=int(self.iteration), factor=self.factor,
            stored_ipc=self.ipc, decoded_ipc=self.ipc * self.factor**2, sampling_net=self.use_sampling_net,
        )
        return meta

    def synthetic_set(self) -> SyntheticSet:
        """The decoded, evaluable set: ``factor**2 * ipc`` full-size images per class.

        ``metadata["ipc"]`` and ``metadata["stored_ipc"]`` are the stored budget, ``metadata["factor"]``
        the multi-formation factor, ``metadata["decoded_ipc"]`` the images per class of this set.
        """
        if self.syn_images is None:
            raise RuntimeError("NCFM: no synthetic set yet (call trainer.fit first)")
        synset = decode_synthetic_set(self.stored_set(), self.factor)
        for plugin in self.plugins:
            synset = plugin.on_synthetic_set(self, synset)
        return synset

    def stored_set(self) -> SyntheticSet:
        """The stored (encoded) set: ``ipc`` images per class, each packing ``factor**2`` tiles.

        Pass its file as ``init=`` to continue distilling from it.
        """
        if self.syn_images is None:
            raise RuntimeError("NCFM: no synthetic set yet (call trainer.fit first)")
        meta = self._metadata()
        meta["formation"] = "stored" if self.factor > 1 else "decoded"
        with torch.no_grad():
            images = self.syn_images.detach().cpu().clone()
        return SyntheticSet(images, self.syn_labels.cpu().clone(), metadata=meta)

    @rank_zero_only
    def save_synthetic_set(self) -> Path | None:
        """``synthetic_set.pt`` (decoded) + ``synthetic_grid.png``, and ``synthetic_set_stored.pt`` when ``factor > 1``."""
        path = super().save_synthetic_set()
        if path is not None and self.factor > 1:
            self.stored_set().save(Path(path).parent / "synthetic_set_stored.pt")
        return path
