"""``TokenCompression``: token compression as a Lightning model ``Callback``.

Attaches a selector (DART by default in the configs) to the ``transformers`` decoder (Llama/Qwen2/Mistral
layout) or the ViT encoder (torchvision / ``transformers``) inside any ``LightningModule``, with forward hooks
only (see :class:`~lightning_eff.tokens.DecoderTokenPruner` and :class:`~lightning_eff.tokens.ViTTokenPruner`),
during the stages asked for (by default validation, test and predict: DART is training-free), and detaches
when the stage ends, leaving the model exactly as it was.

Logged per epoch (``self.log`` from the callback; the values are ``torchmetrics`` metrics, reduced across
ranks): ``tokens/kept_ratio`` (kept / compressible tokens), ``tokens/flops_saved`` (estimated prefill FLOPs
saved), ``tokens/kv_saved_bytes`` (KV-cache bytes saved per sequence, decoders only; the position paper's
memory metric) with ``tokens/kv_saved_ratio``, and, with ``measure_latency=True``, ``tokens/prefill_ms``.
Lightning's ``predict`` loop does not log; there, and in every stage, the values of the last epoch are also
kept in :attr:`TokenCompression.summary`.

The model may be any ``transformers`` decoder with the Llama layout or a multimodal class built on one
(LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) held by the ``LightningModule`` (the usual ``self.model``); for
those, the image token comes from the model's config unless ``image_token_id`` or ``span`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_eff.tokens.api import TokenSelector
from lightning_eff.tokens.decoder import DecoderTokenPruner, find_decoder
from lightning_eff.tokens.hf_compat import config_image_token, id_carriers
from lightning_eff.tokens.metrics import (
    FLOPsSaved,
    KeptTokenRatio,
    KVCacheSaved,
    PrefillLatency,
    config_dims,
    decoder_flops,
    kv_cache_bytes,
)
from lightning_eff.tokens.vit import ViTTokenPruner, find_vit
from lightning_eff.utils.checks import check_int

__all__ = ["TokenCompression"]

_STAGES = ("fit", "validate", "test", "predict")


class TokenCompression(Callback):
    """Prune (or merge) compressible tokens inside the model of a ``LightningModule`` while it runs.

    Args:
        selector: a :class:`~lightning_eff.tokens.TokenSelector` (``DART``, ``Random``, ``FastV``, ``Pool``).
        layer: K: the decoder layer / ViT block that first sees the shorter sequence (DART: 2).
        image_token_id: decoder span = the run of this token id in ``input_ids``.
        span: decoder span by positions ``(start, length)``. Without ``span`` and ``image_token_id`` the
            module's ``token_span`` attribute is used (e.g. :class:`~lightning_eff.tokens.TinyVLM`), else the
            image token of the wrapped model's config (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).
        grid: ``(h, w)`` of the span for grid-aware selectors (default: the module's ``token_grid``).
        model_path: attribute path from the ``LightningModule`` to the model (default: found automatically).
        target: ``"auto"``, ``"decoder"`` or ``"vit"``.
        stages: stages during which the selector is attached, among ``fit``, ``validate``, ``test``,
            ``predict``.
        measure_latency: time each prefill (synchronises CUDA) and log ``tokens/prefill_ms``.
        log_prefix: namespace of the logged keys.

    Example::

        >>> import torch
        >>> from lightning_eff.tokens import DART, TinyVLM
        >>> cb = TokenCompression(DART(num_kept=8), layer=2)
        >>> model = TinyVLM(image_size=8, patch_size=1)
        >>> cb.setup(None, model, "validate")
        >>> with cb.attached_to(model):
        ...     logits = model(torch.randn(2, 1, 8, 8))
        >>> cb.pruner.last_record.kept_len    # 1 + 4 + 8 text tokens + DART's 4 + 8 * (8 // 8) image tokens
        25
    """

    def __init__(
        self,
        selector: TokenSelector,
        layer: int = 2,
        image_token_id: int | None = None,
        span: Sequence[int] | None = None,
        grid: Sequence[int] | None = None,
        model_path: str | None = None,
        target: Literal["auto", "decoder", "vit"] = "auto",
        stages: Sequence[str] = ("validate", "test", "predict"),
        measure_latency: bool = False,
        log_prefix: str = "tokens",
    ) -> None:
        super().__init__()
        if not isinstance(selector, TokenSelector):
            raise TypeError(
                f"TokenCompression: `selector` must be a TokenSelector (DART, Random, FastV, Pool), got {selector!r}."
            )
        check_int(layer, "layer", minimum=1, owner="TokenCompression")  # K
        if target not in ("auto", "decoder", "vit"):
            raise ValueError(
                f"TokenCompression: `target` must be 'auto', 'decoder' or 'vit', got {target!r}."
            )
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        bad = [s for s in stages if s not in _STAGES]
        if bad or not stages:
            raise ValueError(
                f"TokenCompression: `stages` must be a non-empty subset of {_STAGES}, got {stages!r}."
            )
        if span is not None:
            span = tuple(span)
            if len(span) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in span):
                raise ValueError(f"TokenCompression: `span` must be (start, length) ints, got {span!r}.")
        if image_token_id is not None and span is not None:
            raise ValueError("TokenCompression: give `image_token_id` or `span`, not both.")
        self.selector = selector
        self.layer = layer
        self.image_token_id = image_token_id
        self.span = span
        self.grid = None if grid is None else tuple(grid)
        self.model_path = model_path
        self.target = target
        self.stages = stages
        self.measure_latency = bool(measure_latency)
        self.log_prefix = log_prefix
        self.pruner: DecoderTokenPruner | ViTTokenPruner | None = None
        self._model: Any = None
        self._attach_path: str | None = None
        self._dims: dict[str, Any] = {}
        self._decoder: Any = None
        self.kept_ratio = KeptTokenRatio()
        self.flops_saved = FLOPsSaved()
        self.prefill_latency = PrefillLatency()
        self.kv_saved = KVCacheSaved()
        #: the values computed at the end of the last epoch of any stage (predict included)
        self.summary: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ setup
    def _build(self, pl_module: Any) -> None:
        errors = []
        if self.target in ("auto", "decoder"):
            try:
                decoder = find_decoder(pl_module, self.model_path)
            except ValueError as err:
                errors.append(str(err))
            else:
                span = self.span
                if self.image_token_id is None and span is None:
                    span = getattr(pl_module, "token_span", None)
                    if span is None and config_image_token(id_carriers(pl_module, decoder)) is None:
                        raise ValueError(
                            f"TokenCompression: give `image_token_id` or `span`, or expose `token_span` on "
                            f"{type(pl_module).__name__}, so that the compressible span is known (the model's "
                            f"config declares no image token)."
                        )
                grid = self.grid if self.grid is not None else getattr(pl_module, "token_grid", None)
                self.pruner = DecoderTokenPruner(
                    self.selector,
                    self.layer,
                    image_token_id=self.image_token_id,
                    span=None if span is None else tuple(span),
                    grid=grid,
                    measure_latency=self.measure_latency,
                )
                # attach at the LightningModule, so that the pruner also sees the ids of an outer
                # multimodal model (LLaVA, Qwen2-VL) that calls its language model with embeddings
                self._model, self._attach_path = pl_module, self.model_path
                self._decoder = decoder
                self._dims = config_dims(decoder.config, gated=True)
        if self.pruner is None and self.target in ("auto", "vit"):
            try:
                find_vit(pl_module)
            except ValueError as err:
                errors.append(str(err))
            else:
                self.pruner = ViTTokenPruner(self.selector, self.layer)
                self._model, self._attach_path = pl_module, self.model_path
        if self.pruner is None:
            raise ValueError(
                f"TokenCompression: no supported model in {type(pl_module).__name__}: " + " | ".join(errors)
            )
        # attach once to validate depth, attention implementation and structure early
        self.pruner.attach(self._model, self._attach_path)
        if isinstance(self.pruner, ViTTokenPruner):
            self._dims = self.pruner.flops_dims()
        self.pruner.detach()

    def setup(self, trainer: Any, pl_module: L.LightningModule, stage: str) -> None:
        if self.pruner is None:
            self._build(pl_module)
        for m in self._metrics():
            m.to(pl_module.device)

    def teardown(self, trainer: Any, pl_module: L.LightningModule, stage: str) -> None:
        self._set_attached(False)

    # ------------------------------------------------------------------------------------------ attach
    def _set_attached(self, on: bool) -> None:
        if self.pruner is None:
            return
        if on and not self.pruner.attached:
            self.pruner.attach(self._model, self._attach_path)
        elif not on and self.pruner.attached:
            self.pruner.detach()

    def attached_to(self, pl_module: L.LightningModule):
        """Context manager: the selector attached outside a Trainer (after :meth:`setup`)."""
        cb = self

        class _Ctx:
            def __enter__(self):
                if cb.pruner is None:
                    cb._build(pl_module)
                cb._set_attached(True)
                return cb.pruner

            def __exit__(self, *exc):
                cb._set_attached(False)

        return _Ctx()

    @staticmethod
    def _stage(trainer: Any) -> str | None:
        if trainer.sanity_checking or trainer.validating:
            return "validate"
        if trainer.training:
            return "fit"
        if trainer.testing:
            return "test"
        if trainer.predicting:
            return "predict"
        return None

    def _sync(self, trainer: Any) -> None:
        self._set_attached(self._stage(trainer) in self.stages)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._sync(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._set_attached(False)

    def on_test_start(self, trainer, pl_module) -> None:
        self._sync(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._set_attached(False)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._sync(trainer)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._set_attached(False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._set_attached(False)

    # ------------------------------------------------------------------------------------------ metrics
    def _metrics(self) -> tuple:
        return (self.kept_ratio, self.flops_saved, self.prefill_latency, self.kv_saved)

    def _consume(self) -> None:
        if self.pruner is None:
            return
        for r in self.pruner.pop_records():
            self.kept_ratio.update(r.kept_total, r.span_total)
            full_lens = [r.seq_len] * r.num_layers
            pruned_lens = [r.seq_len] * r.layer + [r.kept_len] * (r.num_layers - r.layer)
            full = decoder_flops(full_lens, **self._dims)
            pruned = decoder_flops(pruned_lens, **self._dims)
            self.flops_saved.update(r.batch_size * full, r.batch_size * pruned)
            if self._decoder is not None:
                p = next(self._decoder.parameters())
                kv = dict(num_kv_heads=self._dims["num_kv_heads"], head_dim=self._dims["head_dim"])
                self.kv_saved.update(
                    r.batch_size * kv_cache_bytes(full_lens, **kv, element_size=p.element_size()),
                    r.batch_size * kv_cache_bytes(pruned_lens, **kv, element_size=p.element_size()),
                    r.batch_size,
                )
            if r.latency_ms is not None:
                self.prefill_latency.update(r.latency_ms)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._consume()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._consume()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._consume()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._consume()

    def _log(self, pl_module: L.LightningModule, log: bool = True) -> None:
        p = self.log_prefix
        if self.kept_ratio._update_count > 0:
            values = {
                f"{p}/kept_ratio": self.kept_ratio.compute(),
                f"{p}/flops_saved": self.flops_saved.compute(),
            }
            if self.kv_saved._update_count:
                values[f"{p}/kv_saved_bytes"] = self.kv_saved.compute()
                values[f"{p}/kv_saved_ratio"] = self.kv_saved.ratio()
            if self.measure_latency and self.prefill_latency._update_count:
                values[f"{p}/prefill_ms"] = self.prefill_latency.compute()
            self.summary = {k: float(v) for k, v in values.items()}
            if log:
                for k, v in values.items():
                    pl_module.log(k, v, on_step=False, on_epoch=True)
        for m in self._metrics():
            m.reset()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if "fit" in self.stages:
            self._log(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(pl_module)
        else:
            for m in self._metrics():
                m.reset()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, log=False)  # Lightning's predict loop does not log: see `summary`
