"""Differentiable siamese augmentation (DSA) and CutMix for dataset distillation.

DSA: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021
(arXiv:2102.08259); official code VICO-UoE/DatasetCondensation ``utils.py`` (``ParamDiffAug``,
``DiffAugment``). A transform ``A_w`` with random parameters ``w`` is differentiable w.r.t. the
image, and the *same* ``w`` is applied to the real and the synthetic batch (Sec. 3.2, eq. 4):
``min_S D(grad L(A_w(S)), grad L(A_w(T)))``. The families (Sec. 3.3) and their default strengths
(``ParamDiffAug``) are:

=========  ==========================================================================================
``color``  brightness ``x + (u - 0.5) * brightness``; saturation ``(x - mean_c x) * (u * saturation)
           + mean_c x``; contrast ``(x - mean x) * (u + contrast) + mean x`` (all three, in order)
``crop``   translation by an integer ``t ~ U{-s..s}`` pixels per axis, ``s = int(H * crop + 0.5)``,
           zero fill (pad-and-crop)
``cutout`` a square of side ``int(H * cutout + 0.5)`` set to zero around a uniform centre
``flip``   horizontal flip with probability ``flip``
``scale``  ``affine_grid`` with ``diag(sx, sy)``, ``sx, sy ~ U[1/scale, scale]``, bilinear, zero fill
``rotate`` ``affine_grid`` rotation by ``theta ~ U[-rotate, rotate]`` degrees, bilinear, zero fill
=========  ==========================================================================================

``u ~ U[0, 1)`` per sample. Like the official code, everything acts on *normalised* images (zero
fill is the dataset mean) and, in the default ``mode="single"`` (the official ``aug_mode='S'``),
one family is drawn per call and applied to the whole batch, each sample with its own parameters;
``mode="multiple"`` (``aug_mode='M'``) applies every family in strategy order.

Departures from the official code, all on the RNG side (the transforms are the same):

* the official siamese mode re-seeds the *global* torch RNG before every draw (``seed``,
  ``seed + 1``, ...) from the wall clock; here parameters are drawn from an explicit
  ``torch.Generator`` (never the global one unless none is given) into a :class:`DSAParams`
  object, so the same draw can be applied to any number of batches, inspected, or replayed;
* :meth:`DSA.siamese` transforms all batches in one call (they are concatenated when their image
  shapes agree), instead of one ``DiffAugment`` call per batch.

CutMix: Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
Features", ICCV 2019: ``lam ~ Beta(beta, beta)``, a box of area ``(1 - lam) H W`` pasted from a
permuted batch, ``lam`` corrected to the pasted area; targets mixed ``lam y_a + (1 - lam) y_b``.
DD-Ranking (arXiv:2505.13300) evaluates with it (``beta = 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DSA", "DSAParams", "CutMix", "CutMixParams", "DSA_OPS"]

#: The augmentation families DSA knows, in the official naming.
DSA_OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
_MODES = ("single", "multiple")


def _check_real(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"DSA: `{name}` must be a float, got {value!r} ({type(value).__name__}).")
    value = float(value)
    ok = (value > low if low_open else value >= low) and value <= high and math.isfinite(value)
    if not ok:
        lo = "(" if low_open else "["
        raise ValueError(f"DSA: `{name}` must be in {lo}{low}, {high}], got {value!r}.")
    return value


def _uniform(n: int, generator: torch.Generator | None, gen_device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=gen_device)


@dataclass
class DSAParams:
    """Per-sample parameters of one DSA draw (what :meth:`DSA.sample` returns).

    All tensors have ``n`` rows (one per image). Values are the transform itself, not the raw
    uniforms, so a test or a caller can write them by hand.

    Attributes:
        ops: the strategy's families, in application order (columns of ``active``).
        active: ``[n, len(ops)]`` bool, which families transform each image.
        flip: ``[n]`` bool, flip horizontally.
        brightness: ``[n]`` additive shift.
        saturation: ``[n]`` factor on the deviation from the per-pixel channel mean.
        contrast: ``[n]`` factor on the deviation from the image mean.
        translate: ``[n, 2]`` long, ``(rows, cols)``: output pixel ``(i, j)`` reads input
            ``(i + rows, j + cols)`` (zero outside), i.e. the content moves up/left for positive values.
        cutout_center: ``[n, 2]`` long, ``(row, col)`` of the erased square's centre.
        cutout_size: ``(height, width)`` of the erased square (same for the batch).
        image_size: ``(H, W)`` the draw was made for (translation range and cutout size depend on it).
        scale: ``[n, 2]`` float ``(sx, sy)``: output coordinate ``(x, y)`` samples the input at
            ``(sx x, sy y)`` (normalised coordinates, ``sx < 1`` zooms in).
        angle: ``[n]`` float, rotation in degrees (positive: counter-clockwise sampling matrix
            ``[[cos, -sin], [sin, cos]]``, the official convention; 90 equals ``torch.rot90(x, 1, (-2, -1))``).
    """

    ops: tuple[str, ...]
    active: Tensor
    flip: Tensor
    brightness: Tensor
    saturation: Tensor
    contrast: Tensor
    translate: Tensor
    cutout_center: Tensor
    cutout_size: tuple[int, int]
    scale: Tensor
    angle: Tensor
    image_size: tuple[int, int] | None = None
    active_mask: Tensor | None = None  # ``active`` on the device of the other tensors (set by ``to``)

    _VALUES = ("flip", "brightness", "saturation", "contrast", "translate", "cutout_center", "scale", "angle")

    def __post_init__(self) -> None:
        self.active = self.active.cpu()  # control flow only: deciding never waits for an accelerator

    def __len__(self) -> int:
        return self.active.shape[0]

    def _map(self, fn, fn_active=None) -> DSAParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in (*self._VALUES, "active_mask"):
            if values[name] is not None:
                values[name] = fn(values[name])
        values["active"] = (fn_active or fn)(values["active"])
        return DSAParams(**values)

    def to(self, device: torch.device | str) -> DSAParams:
        """The same parameters on ``device``, moved in two packed copies (one float, one integer)."""
        device = torch.device(device)
        if self.flip.device == device and (self.active_mask is not None or device.type == "cpu"):
            return self
        floats = torch.cat(
            [
                torch.stack([self.flip.float(), self.brightness, self.saturation, self.contrast, self.angle], 1),
                self.scale,
                self.active.float(),
            ],
            dim=1,
        ).to(device)
        ints = torch.cat([self.translate, self.cutout_center], dim=1).to(device)
        return DSAParams(
            ops=self.ops, active=self.active, flip=floats[:, 0] > 0.5, brightness=floats[:, 1],
            saturation=floats[:, 2], contrast=floats[:, 3], angle=floats[:, 4], scale=floats[:, 5:7],
            translate=ints[:, :2], cutout_center=ints[:, 2:], cutout_size=self.cutout_size,
            image_size=self.image_size, active_mask=floats[:, 7:] > 0.5,
        )

    def index(self, idx: Tensor | slice) -> DSAParams:
        """The parameters of the images selected by ``idx``."""

        def pick(t: Tensor) -> Tensor:
            return t[idx.to(t.device) if isinstance(idx, Tensor) else idx]

        return self._map(pick)

    def expand(self, n: int) -> DSAParams:
        """Repeat a single draw (``len == 1``) for ``n`` images: the siamese broadcast."""
        if len(self) != 1:
            raise ValueError(f"DSAParams.expand needs a single draw (len 1), got len {len(self)}")
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(params: list[DSAParams]) -> DSAParams:
        """Concatenate draws (same strategy and image size) along the batch."""
        if not params:
            raise ValueError("DSAParams.cat needs at least one DSAParams")
        first = params[0]
        for p in params[1:]:
            if p.ops != first.ops or p.cutout_size != first.cutout_size or p.image_size != first.image_size:
                raise ValueError("DSAParams.cat: all draws must share the strategy and the image size")
        values = {f.name: getattr(first, f.name) for f in fields(first)}
        for name in (*DSAParams._VALUES, "active"):
            values[name] = torch.cat([getattr(p, name) for p in params])
        values["active_mask"] = None
        return DSAParams(**values)


class DSA:
    """Differentiable siamese augmentation (Zhao & Bilen, ICML 2021) on normalised images.

    Args:
        strategy: families joined by ``_`` from ``color, crop, cutout, flip, scale, rotate``
            (``"none"`` or ``""`` for the identity).
        flip: probability of a horizontal flip, in ``[0, 1]``.
        rotate: maximum rotation in degrees, ``>= 0``.
        saturation: saturation factor range ``[0, saturation)``, ``>= 0``.
        brightness: brightness shift range ``[-brightness/2, brightness/2)``, ``>= 0``.
        contrast: contrast factor range ``[contrast, contrast + 1)``, ``>= 0``.
        scale: scale ratio ``r >= 1``; each axis is scaled by ``U[1/r, r]``.
        crop: maximum translation as a fraction of the side, in ``[0, 1]``.
        cutout: side of the erased square as a fraction of the image side, in ``[0, 1]``.
        mode: ``"single"`` (one family per call, the official default) or ``"multiple"`` (all
            families in strategy order).

    ``dsa(x, params)`` applies given parameters, ``dsa(x, generator=g)`` draws per-sample ones, and
    ``dsa.siamese(real, syn, generator=g)`` draws *one* parameter set and applies it to every image of
    every batch. All of them are differentiable w.r.t. the images.

    Example::

        >>> dsa = DSA(strategy="flip", flip=1.0)
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> dsa(x, generator=torch.Generator().manual_seed(0))[0, 0]
        tensor([[1., 0.],
                [3., 2.]])
        >>> real, syn = DSA().siamese(torch.randn(8, 3, 16, 16), torch.randn(2, 3, 16, 16),
        ...                           generator=torch.Generator().manual_seed(0))
        >>> real.shape, syn.shape
        (torch.Size([8, 3, 16, 16]), torch.Size([2, 3, 16, 16]))
    """

    def __init__(
        self,
        strategy: str = "color_crop_cutout_flip_scale_rotate",
        flip: float = 0.5,
        rotate: float = 15.0,
        saturation: float = 2.0,
        brightness: float = 1.0,
        contrast: float = 0.5,
        scale: float = 1.2,
        crop: float = 0.125,
        cutout: float = 0.5,
        mode: str = "single",
    ) -> None:
        if not isinstance(strategy, str):
            raise TypeError(f"DSA: `strategy` must be a string like 'color_crop_cutout', got {strategy!r}.")
        ops = () if strategy.lower() in ("", "none") else tuple(strategy.split("_"))
        unknown = [op for op in ops if op not in DSA_OPS]
        if unknown:
            raise ValueError(
                f"DSA: `strategy`={strategy!r} has unknown operation(s) {unknown}; allowed: {list(DSA_OPS)} "
                f"joined by '_' (or 'none')."
            )
        if len(set(ops)) != len(ops):
            raise ValueError(f"DSA: `strategy`={strategy!r} repeats an operation; name each at most once.")
        if mode not in _MODES:
            raise ValueError(f"DSA: `mode` must be one of {_MODES}, got {mode!r}.")
        self.strategy = "_".join(ops) if ops else "none"
        self.ops = ops
        self.mode = mode
        self.flip = _check_real("flip", flip, 0.0, 1.0)
        self.rotate = _check_real("rotate", rotate, 0.0, 180.0)
        self.saturation = _check_real("saturation", saturation, 0.0)
        self.brightness = _check_real("brightness", brightness, 0.0)
        self.contrast = _check_real("contrast", contrast, 0.0)
        self.scale = _check_real("scale", scale, 1.0)
        self.crop = _check_real("crop", crop, 0.0, 1.0)
        self.cutout = _check_real("cutout", cutout, 0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"DSA(strategy={self.strategy!r}, flip={self.flip}, rotate={self.rotate}, saturation={self.saturation}, "
            f"brightness={self.brightness}, contrast={self.contrast}, scale={self.scale}, crop={self.crop}, "
            f"cutout={self.cutout}, mode={self.mode!r})"
        )

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable)."""
        return {
            "strategy": self.strategy, "flip": self.flip, "rotate": self.rotate, "saturation": self.saturation,
            "brightness": self.brightness, "contrast": self.contrast, "scale": self.scale, "crop": self.crop,
            "cutout": self.cutout, "mode": self.mode,
        }

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        image_size: tuple[int, int] | int = 32,
    ) -> DSAParams:
        """Draw per-sample parameters for ``n`` images of side(s) ``image_size``.

        Every family's parameters are drawn (in a fixed order) whatever the strategy, so a seeded
        generator gives the same stream for any strategy. Draws happen on the generator's device
        (CPU when ``generator`` is None) and are then moved to ``device``, so the same seed gives the
        same parameters on every device.

        Args:
            n: number of images.
            generator: the random source (global RNG if None).
            device: where the returned tensors live (default: the generator's device).
            image_size: ``H`` or ``(H, W)``; sets the integer translation range and cutout size.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"DSA.sample: `n` must be an int >= 0, got {n!r}.")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        gdev = generator.device if generator is not None else torch.device("cpu")
        g = generator
        n_ops = len(self.ops)
        if self.mode == "single":
            choice = torch.randint(0, max(n_ops, 1), (1,), generator=g, device=gdev).expand(n)
            active = torch.zeros(n, n_ops, dtype=torch.bool, device=gdev)
            if n_ops:
                active[torch.arange(n, device=gdev), choice] = True
        else:
            active = torch.ones(n, n_ops, dtype=torch.bool, device=gdev)
        flip = _uniform(n, g, gdev) < self.flip
        brightness = (_uniform(n, g, gdev) - 0.5) * self.brightness
        saturation = _uniform(n, g, gdev) * self.saturation
        contrast = _uniform(n, g, gdev) + self.contrast
        sh, sw = int(h * self.crop + 0.5), int(w * self.crop + 0.5)
        translate = torch.stack(
            [
                torch.randint(-sh, sh + 1, (n,), generator=g, device=gdev),
                torch.randint(-sw, sw + 1, (n,), generator=g, device=gdev),
            ],
            dim=1,
        )
        ch, cw = int(h * self.cutout + 0.5), int(w * self.cutout + 0.5)
        cutout_center = torch.stack(
            [
                torch.randint(0, h + (1 - ch % 2), (n,), generator=g, device=gdev),
                torch.randint(0, w + (1 - cw % 2), (n,), generator=g, device=gdev),
            ],
            dim=1,
        )
        r = self.scale
        scale = torch.rand(n, 2, generator=g, device=gdev) * (r - 1.0 / r) + 1.0 / r
        angle = (_uniform(n, g, gdev) - 0.5) * 2.0 * self.rotate
        params = DSAParams(
            ops=self.ops, active=active, flip=flip, brightness=brightness, saturation=saturation,
            contrast=contrast, translate=translate, cutout_center=cutout_center, cutout_size=(ch, cw),
            scale=scale, angle=angle, image_size=(h, w),
        )
        return params if device is None else params.to(device)

    # ------------------------------------------------------------------ application
    def __call__(
        self, x: Tensor, params: DSAParams | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Augment ``x`` ``[B, C, H, W]`` with ``params`` (drawn per sample from ``generator`` if None)."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"DSA: expected images [B, C, H, W], got {tuple(getattr(x, 'shape', ()))}.")
        if params is None:
            params = self.sample(x.shape[0], generator=generator, device=x.device, image_size=tuple(x.shape[-2:]))
        if len(params) != x.shape[0]:
            raise ValueError(f"DSA: {len(params)} parameter rows for a batch of {x.shape[0]} images.")
        return apply_dsa(x, params)

    def siamese(self, *batches: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """One random draw applied identically to every image of every batch (the DSA siamese mode).

        Args:
            *batches: image batches ``[B_i, C, H, W]`` (same ``H, W``; e.g. a real and a synthetic batch).
            generator: the random source (global RNG if None).

        Returns:
            The augmented batches, as a tuple in the input order.
        """
        if not batches:
            raise ValueError("DSA.siamese needs at least one batch")
        for b in batches:
            if not isinstance(b, Tensor) or b.ndim != 4:
                raise ValueError(f"DSA.siamese: expected image batches [B, C, H, W], got {tuple(getattr(b, 'shape', ()))}.")
        size = tuple(batches[0].shape[-2:])
        if any(tuple(b.shape[-2:]) != size for b in batches):
            raise ValueError(f"DSA.siamese: all batches need the same image size, got {[tuple(b.shape) for b in batches]}.")
        device = batches[0].device
        one = self.sample(1, generator=generator, device=device, image_size=size)
        shapes = {tuple(b.shape[1:]) for b in batches}
        if len(shapes) == 1 and len({b.device for b in batches}) == 1 and len(batches) > 1:
            sizes = [b.shape[0] for b in batches]
            out = apply_dsa(torch.cat(batches), one.expand(sum(sizes)))
            return tuple(out.split(sizes))
        return tuple(apply_dsa(b, one.to(b.device).expand(b.shape[0])) for b in batches)


# ---------------------------------------------------------------------------------------------
# the transforms (pure functions on tensors)
# ---------------------------------------------------------------------------------------------
def dsa_color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    """Brightness, then saturation, then contrast (official ``rand_brightness/saturation/contrast``)."""
    x = x + brightness.view(-1, 1, 1, 1).to(x.dtype)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * saturation.view(-1, 1, 1, 1).to(x.dtype) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast.view(-1, 1, 1, 1).to(x.dtype) + mean


def dsa_crop(x: Tensor, translate: Tensor) -> Tensor:
    """Integer translation with zero fill: ``out[i, j] = x[i + t_r, j + t_c]`` (official ``rand_crop``)."""
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h) + translate[:, :1] + 1
    cols = torch.arange(w, device=x.device).view(1, w) + translate[:, 1:] + 1
    rows, cols = rows.clamp(0, h + 1), cols.clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # advanced indices separated by a slice put their dims first: [n, h, w, C]
    out = padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2)


def dsa_cutout(x: Tensor, center: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero the ``size`` square whose centre is ``center`` (clipped at the border; official ``rand_cutout``)."""
    n, _, h, w = x.shape
    top = center[:, :1] - size[0] // 2
    left = center[:, 1:] - size[1] // 2
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    in_rows = (r >= top) & (r < top + size[0])
    in_cols = (c >= left) & (c < left + size[1])
    erased = in_rows.view(n, h, 1) & in_cols.view(n, 1, w)
    return x * (~erased).unsqueeze(1).to(x.dtype)


def dsa_flip(x: Tensor, flip: Tensor) -> Tensor:
    """Horizontal flip of the images where ``flip`` is True."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def dsa_scale(x: Tensor, scale: Tensor) -> Tensor:
    """Axis scaling by ``diag(sx, sy)`` in normalised coordinates (official ``rand_scale``)."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = scale[:, 0].to(x.dtype)
    theta[:, 1, 1] = scale[:, 1].to(x.dtype)
    return _affine(x, theta)


def dsa_rotate(x: Tensor, angle: Tensor) -> Tensor:
    """Rotation by ``angle`` degrees, sampling matrix ``[[cos, -sin], [sin, cos]]`` (official ``rand_rotate``)."""
    precise = torch.float32 if angle.device.type == "mps" else torch.float64  # MPS has no float64
    rad = angle.to(precise) * (math.pi / 180.0)
    cos, sin = torch.cos(rad).to(x.dtype), torch.sin(rad).to(x.dtype)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    return _affine(x, theta.to(x.device))


def _apply_op(op: str, x: Tensor, p: DSAParams) -> Tensor:
    if op == "color":
        return dsa_color(x, p.brightness, p.saturation, p.contrast)
    if op == "crop":
        return dsa_crop(x, p.translate)
    if op == "cutout":
        return dsa_cutout(x, p.cutout_center, p.cutout_size)
    if op == "flip":
        return dsa_flip(x, p.flip)
    if op == "scale":
        return dsa_scale(x, p.scale)
    if op == "rotate":
        return dsa_rotate(x, p.angle)
    raise ValueError(f"unknown DSA operation {op!r}; allowed: {list(DSA_OPS)}")


def apply_dsa(x: Tensor, params: DSAParams) -> Tensor:
    """Apply the families of ``params`` (in order) to the images where they are active.

    A family active for the whole batch runs on it directly; one active for some images only (a
    batch that joins several students' draws, each with its own family) runs on the whole batch and
    is kept where active (``torch.where``: no indexing, no host-device round trip).
    """
    if params.image_size is not None and tuple(x.shape[-2:]) != tuple(params.image_size):
        raise ValueError(
            f"DSA: the parameters were drawn for {params.image_size[0]}x{params.image_size[1]} images, got "
            f"{x.shape[-2]}x{x.shape[-1]}; pass image_size= to DSA.sample."
        )
    if params.flip.device != x.device:
        params = params.to(x.device)
    active = params.active
    for g, op in enumerate(params.ops):
        column = active[:, g]
        if bool(column.all()):
            x = _apply_op(op, x, params)
        elif bool(column.any()):
            mask = params.active_mask[:, g] if params.active_mask is not None else column.to(x.device)
            x = torch.where(mask.view(-1, 1, 1, 1), _apply_op(op, x, params), x)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------
# CutMix
# ---------------------------------------------------------------------------------------------
@dataclass
class CutMixParams:
    """One CutMix draw for a batch.

    Attributes:
        apply: whether this batch is mixed (drawn with probability ``prob``).
        box: ``(top, left, bottom, right)`` of the pasted region (rows ``top:bottom``, cols ``left:right``).
        perm: ``[B]`` long, the image each row takes the patch from.
        lam: weight of the original targets, ``1 - box area / (H W)`` (1.0 when not applied).
    """

    apply: bool
    box: tuple[int, int, int, int]
    perm: Tensor
    lam: float


class CutMix:
    """CutMix (Yun et al., ICCV 2019) for training students on a reduced set.

    Args:
        beta: the Beta(beta, beta) parameter of the mixing ratio, ``> 0``.
        prob: probability that a batch is mixed, in ``[0, 1]``.

    ``cutmix(x, labels)`` with integer labels returns ``(mixed, labels_a, labels_b, lam)`` (loss
    ``lam CE(out, a) + (1 - lam) CE(out, b)``); with soft targets ``[B, K]`` it returns
    ``(mixed, lam * t + (1 - lam) * t[perm])``.

    Example::

        >>> cm = CutMix(beta=1.0)
        >>> x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> mixed, ya, yb, lam = cm(x, y, generator=torch.Generator().manual_seed(0))
        >>> mixed.shape, bool(torch.equal(ya, y)), 0.0 <= lam <= 1.0
        (torch.Size([4, 1, 8, 8]), True, True)
    """

    def __init__(self, beta: float = 1.0, prob: float = 1.0) -> None:
        if isinstance(beta, bool) or not isinstance(beta, Real) or not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"CutMix: `beta` must be a finite float > 0, got {beta!r}.")
        if isinstance(prob, bool) or not isinstance(prob, Real) or not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"CutMix: `prob` must be a float in [0, 1], got {prob!r}.")
        self.beta = float(beta)
        self.prob = float(prob)

    def __repr__(self) -> str:
        return f"CutMix(beta={self.beta}, prob={self.prob})"

    def config(self) -> dict[str, Any]:
        return {"beta": self.beta, "prob": self.prob}

    def sample(
        self, n: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> CutMixParams:
        """Draw whether to mix, the ratio, the box and the partner permutation for ``n`` images."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        u_apply, u_lam, u_cy, u_cx = torch.rand(4, generator=generator, device=gdev, dtype=torch.float64).tolist()
        perm = torch.randperm(n, generator=generator, device=gdev)
        if u_apply >= self.prob:
            return CutMixParams(False, (0, 0, 0, 0), perm, 1.0)
        if self.beta == 1.0:
            lam = u_lam
        else:  # inverse CDF of Beta(beta, beta): reproducible from the torch generator
            from scipy.special import betaincinv

            lam = float(betaincinv(self.beta, self.beta, u_lam))
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = min(int(u_cy * height), height - 1), min(int(u_cx * width), width - 1)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return CutMixParams(True, (top, left, bottom, right), perm, lam)

    @staticmethod
    def apply(x: Tensor, params: CutMixParams) -> Tensor:
        """Paste ``params.box`` of ``x[perm]`` into ``x`` (out of place, differentiable)."""
        if not params.apply:
            return x
        top, left, bottom, right = params.box
        out = x.clone()
        perm = params.perm.to(x.device)
        out[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
        return out

    @staticmethod
    def mix_targets(targets: Tensor, params: CutMixParams) -> Tensor:
        """``lam * t + (1 - lam) * t[perm]`` for float targets (soft labels, features)."""
        if not params.apply:
            return targets
        return params.lam * targets + (1.0 - params.lam) * targets[params.perm.to(targets.device)]

    def __call__(self, x: Tensor, targets: Tensor, generator: torch.Generator | None = None):
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"CutMix: expected images [B, C, H, W], got {tuple(getattr(x, 'shape', ()))}.")
        if targets.shape[0] != x.shape[0]:
            raise ValueError(f"CutMix: {targets.shape[0]} targets for {x.shape[0]} images.")
        params = self.sample(x.shape[0], x.shape[-2], x.shape[-1], generator=generator)
        mixed = self.apply(x, params)
        if targets.is_floating_point():
            return mixed, self.mix_targets(targets, params)
        return mixed, targets, targets[params.perm.to(targets.device)], params.lam
