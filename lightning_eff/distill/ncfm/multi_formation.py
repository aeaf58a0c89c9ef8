"""Multi-formation: each stored image packs ``factor**2`` downsampled images and decodes back to them.

From IDC (J.-H. Kim et al., "Dataset Condensation via Efficient Synthetic-Data Parameterization", ICML 2022),
which NCFM's official code reuses (``condenser/decode.py``, ``decode_zoom``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_eff.data.synthetic_set import SyntheticSet, check_ipc, prepared_datamodule, synthetic_metadata
from lightning_eff.utils.checks import check_int

__all__ = ["pack_multi_formation", "decode_multi_formation", "multi_formation_init", "decode_synthetic_set"]


def _check_factor(factor: Any, where: str) -> int:
    return check_int(factor, "factor", minimum=1, owner=where)


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
    check_ipc(ipc, owner="multi_formation_init")
    factor = _check_factor(factor, "multi_formation_init")
    dm = prepared_datamodule(datamodule)
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
    meta = synthetic_metadata(dm, method, ipc, seed, metadata)
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

