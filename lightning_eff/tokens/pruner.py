"""What the two appliers share: the record of one pruned call, and the life cycle of a pruner's hooks.

:class:`~lightning_eff.tokens.DecoderTokenPruner` and :class:`~lightning_eff.tokens.ViTTokenPruner` register
forward hooks on a model in ``attach`` and remove them in ``detach``; ``with pruner.attach(model):`` removes
them at the end of the block. Each pruned call appends a :class:`PruneRecord` to ``records``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

__all__ = ["PruneRecord", "HookedPruner"]

_P = TypeVar("_P", bound="HookedPruner")


@dataclass
class PruneRecord:
    """One pruned prefill: sizes (for kept-ratio, FLOPs and KV-cache metrics) and the kept positions.

    ``seq_len`` tokens entered layer K and ``kept_len`` left it (per sequence, fillers included);
    ``span_len`` / ``span_kept`` are the compressible tokens and those kept for a batch whose sequences hold
    the same number, and ``span_lens`` / ``span_kepts`` give them per sequence. ``fillers`` (``[B, kept_len]``,
    or None) marks the masked slots that left-pad shorter pruned sequences of a mixed batch.
    """

    batch_size: int
    seq_len: int
    kept_len: int
    span_len: int
    span_kept: int
    layer: int
    num_layers: int
    keep_index: Tensor
    latency_ms: float | None = None
    span_lens: tuple[int, ...] = ()
    span_kepts: tuple[int, ...] = ()
    fillers: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.span_lens:
            self.span_lens = (self.span_len,) * self.batch_size
            self.span_kepts = (self.span_kept,) * self.batch_size

    @property
    def span_total(self) -> int:
        """Compressible tokens over the batch (sequences may hold different numbers)."""
        return int(sum(self.span_lens))

    @property
    def kept_total(self) -> int:
        """Compressible tokens kept over the batch."""
        return int(sum(self.span_kepts))


class HookedPruner:
    """Base of the token pruners: hooks kept in ``_handles`` while attached, one record per pruned call.

    A subclass sets ``records`` and ``_handles`` (empty lists) in its ``__init__`` and implements ``attach``
    (register the hooks, return ``self``) and ``detach`` (remove them).
    """

    records: list[PruneRecord]
    _handles: list[Any]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def last_record(self) -> PruneRecord | None:
        return self.records[-1] if self.records else None

    def pop_records(self) -> list[PruneRecord]:
        out, self.records = self.records, []
        return out

    def detach(self) -> None:
        raise NotImplementedError

    def __enter__(self: _P) -> _P:
        if not self.attached:
            raise RuntimeError(f"{type(self).__name__}: use `with pruner.attach(model):`.")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()
