"""Parameter condensation: the measure KO is designed to lower, and a callback that logs it.

"Condensation" (KO paper, arXiv:2505.14777, Sec. 1 and the 2-layer experiment) is the collapse
of a layer's neurons onto a few directions. We measure it per weight matrix (rows = neurons, conv
weights viewed as ``(out_channels, -1)``) by the mean and max ``|cos|`` between distinct rows and
by the entropy-based effective rank (Roy & Vetterli, 2007) of the matrix.
"""

from __future__ import annotations

import re

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_eff.optim.ko import _AUTO_BLOCK_ELEMENTS, _as_matrix

__all__ = ["CondensationMonitor", "condensation_stats"]


def _effective_rank(singular_values: Tensor) -> Tensor:
    """exp(entropy of the normalised singular values) (Roy & Vetterli, 2007)."""
    p = singular_values / singular_values.sum().clamp_min(1e-30)
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def condensation_stats(weight: Tensor, chunk_size: int | None = None) -> dict[str, float]:
    """The "parameter condensation" measure of one weight (rows = neurons).

    Returns ``mean_abs_cos`` and ``max_abs_cos``, the mean and max of ``|cos(w_i, w_j)|`` over
    pairs ``i != j`` of rows of the ``(out, -1)`` view, and ``effective_rank``, the entropy-based
    effective rank of the matrix (1 when every row is parallel, ``min(N, D)`` at most). Rows are
    processed in blocks of ``chunk_size`` (automatic by default), so wide layers fit in memory.

    Example::

        >>> import torch
        >>> stats = condensation_stats(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]))
        >>> round(stats["mean_abs_cos"], 4), stats["max_abs_cos"]
        (0.3333, 1.0)
    """
    if weight.ndim < 2 or weight.shape[0] < 2:
        raise ValueError(f"condensation_stats needs a weight with ndim >= 2 and >= 2 rows, got {tuple(weight.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    W = _as_matrix(weight.detach())
    n = W.shape[0]
    W_hat = F.normalize(W, dim=1)
    if chunk_size is None:
        chunk_size = n if n * n <= _AUTO_BLOCK_ELEMENTS else max(1, _AUTO_BLOCK_ELEMENTS // n)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    largest = torch.zeros((), dtype=W.dtype, device=W.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        C = (W_hat[start:stop] @ W_hat.T).abs()
        rows = torch.arange(stop - start, device=C.device)
        C[rows, rows + start] = 0.0
        total += C.sum(dtype=torch.float64)
        largest = torch.maximum(largest, C.max())
    return {
        "mean_abs_cos": float(total / (n * (n - 1))),
        "max_abs_cos": float(largest),
        "effective_rank": float(_effective_rank(torch.linalg.svdvals(W))),
    }


class CondensationMonitor(L.Callback):
    """Logs the condensation measure of each weight matrix during training.

    For every parameter with ``ndim >= 2`` and at least two rows whose name matches one of
    ``layers`` (regular expressions; all of them by default), logs
    ``condensation/<name>/{mean_abs_cos,max_abs_cos,effective_rank}`` and the layer averages
    ``condensation/mean_abs_cos``, ``condensation/max_abs_cos``, at the end of each training
    epoch and, if ``every_n_steps`` is set, every that many optimizer steps. Weights are the same
    on every DDP rank, so nothing is reduced.

    Args:
        layers: regular expressions over parameter names (``"net.features.0.weight"``).
        every_n_steps: also log every that many global steps (``None``: epoch end only).
        chunk_size: row block of the cosine matrix (``None``: automatic).

    Example::

        >>> import lightning as L
        >>> monitor = CondensationMonitor(layers=[r"classifier"], every_n_steps=50)
        >>> trainer = L.Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self, layers: list[str] | None = None, every_n_steps: int | None = None, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        try:
            self._patterns = [re.compile(p) for p in (layers or [])]
        except re.error as err:
            raise ValueError(f"layers must be valid regular expressions, got {layers!r}: {err}") from err
        self.layers = layers
        self.every_n_steps = every_n_steps
        self.chunk_size = chunk_size

    def _selected(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        selected = {
            name: p
            for name, p in pl_module.named_parameters()
            if p.ndim >= 2 and p.shape[0] >= 2 and (not self._patterns or any(r.search(name) for r in self._patterns))
        }
        if not selected:
            rank_zero_warn(f"CondensationMonitor: no weight matrix matches layers={self.layers!r}")
        return selected

    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        """All the figures, keyed as they are logged."""
        out: dict[str, float] = {}
        per_layer = {name: condensation_stats(p, self.chunk_size) for name, p in self._selected(pl_module).items()}
        for name, stats in per_layer.items():
            for key, value in stats.items():
                out[f"condensation/{name}/{key}"] = value
        if per_layer:
            for key in ("mean_abs_cos", "max_abs_cos"):
                out[f"condensation/{key}"] = sum(s[key] for s in per_layer.values()) / len(per_layer)
        return out

    def _log(self, pl_module: L.LightningModule, on_step: bool) -> None:
        for key, value in self.measure(pl_module).items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, sync_dist=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(pl_module, on_step=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, on_step=False)
