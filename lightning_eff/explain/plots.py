"""Shapley heatmaps: phi of the predicted class over the image, saved as PNG (atomically) and logged."""

from __future__ import annotations

import io
import os
from typing import Any

import torch  # noqa: F401 (the doctests use it)
from torch import Tensor

from lightning_eff.utils.io import atomic_write_bytes

__all__ = ["HEATMAP_FORMAT_VERSION", "log_figure", "save_figure_png", "shapley_heatmap_figure"]

#: Written into the PNG metadata (``lightning_eff_format``) of every saved heatmap.
HEATMAP_FORMAT_VERSION = 1


def _display(image: Tensor) -> Tensor:
    """``[C, H, W]`` -> ``[H, W]`` or ``[H, W, 3]`` in ``[0, 1]`` (per-image min-max)."""
    image = image.detach().float().cpu()
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo).clamp_min(1e-8)
    return image[0] if image.shape[0] == 1 else image[:3].permute(1, 2, 0)


def shapley_heatmap_figure(
    images: Tensor,
    phi: Tensor,
    grid: tuple[int, int],
    classes: Tensor,
    class_names: list[str] | None = None,
    title: str | None = None,
):
    """A matplotlib figure: each image (top row) and its Shapley heatmap for one class (bottom row).

    Args:
        images: ``[K, C, H, W]`` (any normalisation; shown min-max scaled).
        phi: ``[K, N, num_classes]`` attributions, ``N = grid[0] * grid[1]`` players in row-major order.
        grid: ``(ph, pw)`` player grid.
        classes: ``[K]`` class shown for each image (e.g. the prediction).
        class_names: optional names indexed by class.
        title: optional figure title.

    Example::

        >>> fig = shapley_heatmap_figure(torch.rand(2, 1, 8, 8), torch.randn(2, 4, 3), (2, 2), torch.tensor([0, 2]))
        >>> len(fig.axes)
        4
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    k = images.shape[0]
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k + 0.4, 3.4), squeeze=False)
    for j in range(k):
        c = int(classes[j])
        values = phi[j, :, c].detach().float().cpu().view(1, 1, *grid)
        up = F.interpolate(values, size=images.shape[-2:], mode="nearest")[0, 0].numpy()
        bound = float(values.abs().max().clamp_min(1e-8))
        shown = _display(images[j]).numpy()
        axes[0, j].imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        name = class_names[c] if class_names is not None else str(c)
        axes[0, j].set_title(f"class {name}", fontsize=8)
        grey = shown if shown.ndim == 2 else shown.mean(-1)
        axes[1, j].imshow(grey, cmap="gray")
        axes[1, j].imshow(up, cmap="bwr", vmin=-bound, vmax=bound, alpha=0.6)
        axes[1, j].set_title(f"|phi|<={bound:.2g}", fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure_png(fig: Any, path: str, metadata: dict[str, str] | None = None) -> str:
    """Save ``fig`` as PNG at ``path`` atomically (:func:`~lightning_eff.utils.io.atomic_write_bytes`), with a
    format version in its metadata.

    Example::

        >>> import matplotlib.pyplot as plt, tempfile, os
        >>> fig = plt.figure(); path = os.path.join(tempfile.mkdtemp(), "a", "h.png")
        >>> save_figure_png(fig, path) == path and os.path.getsize(path) > 0
        True
    """
    meta = {"lightning_eff_format": str(HEATMAP_FORMAT_VERSION), **(metadata or {})}
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata=meta)
    atomic_write_bytes(path, buffer.getvalue())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the temp file was created 0600; give the PNG the usual permissions
    return path


def log_figure(loggers: list[Any], key: str, fig: Any, path: str, step: int) -> list[str]:
    """Log a saved figure to every logger that takes images (W&B ``log_image``, TensorBoard ``add_figure``).

    Returns the class names of the loggers it was logged to.

    Example::

        >>> log_figure([], "explainer/heatmap", None, "unused.png", step=0)
        []
    """
    done = []
    for logger in loggers:
        log_image = getattr(logger, "log_image", None)
        experiment = None
        if callable(log_image):
            log_image(key=key, images=[path], step=step)
            done.append(type(logger).__name__)
            continue
        try:
            experiment = logger.experiment
        except Exception:  # pragma: no cover - loggers without an experiment object
            experiment = None
        if experiment is not None and callable(getattr(experiment, "add_figure", None)):
            experiment.add_figure(key, fig, global_step=step, close=False)
            done.append(type(logger).__name__)
    return done
