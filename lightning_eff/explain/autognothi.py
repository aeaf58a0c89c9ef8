"""``AutoGnothi``: a side network that makes a frozen classifier explain itself with Shapley values.

Paper: Wang et al., "Gnothi Seauton: Empowering Faithful Self-Interpretability in Black-Box Models", ICLR 2025
(arXiv 2410.21815); official code gszfwsb/AutoGnothi (``models/ltt_vit.py``, ``models/ltt_bert.py``,
``scripts/train_surrogate.py``, ``scripts/train_explainer.py``). Predecessor: ViT-Shapley (Covert et al.,
ICLR 2023; suinleelab/vit-shapley), which fine-tunes two full copies of the backbone instead.

Two stages, one class (``stage=``), equation labels from :mod:`lightning_eff.explain.shapley`:

1. ``"surrogate"``: a ladder side branch (:class:`~lightning_eff.explain.side.SideBranch`, width ``d / side_ratio``)
   reads every layer of the frozen backbone run on a masked input (players removed inside attention) and a
   linear head on its CLS token learns ``KL(p_model(x) || p_surrogate(x_m))`` with uniform-size masks (E3).
   The surrogate's class probabilities ``v(m)`` are the value function being explained.
2. ``"explainer"``: loads stage 1 from ``surrogate_checkpoint``, freezes it, and trains a second side branch
   (initialised from the surrogate's) plus :class:`~lightning_eff.explain.side.ExplainerHead` to output
   ``phi [players x classes]`` from the *unmasked* input, efficiency-normalised (E4) with ``v(1)`` (the
   surrogate on the full input, same backbone pass) and ``v(0)`` (the surrogate with every player removed,
   input-independent, cached in the buffer ``surrogate_null``), trained with the loss (E5) on paired
   Shapley-kernel masks (E2).

The final model's ``forward`` runs the backbone once and returns its logits unchanged (bit-identical to the
backbone's own forward), the surrogate's logits and ``phi``.

Departures from the official code (on purpose):

* Masked players are removed from attention with ``-inf`` (``attention_masking="exclude"``); the official
  code multiplies the scores by the 0/1 mask before the softmax, which leaves masked keys with weight
  ``exp(0)``; that variant is ``attention_masking="multiply"``.
* The surrogate KL is taken between softmaxes of logits (the official code softmaxes probabilities again).
* Kernel masks have exactly the drawn size (official: binomial around it), see :mod:`~lightning_eff.explain.shapley`.
* The image players may be coarser than the patches (``player_grid``); a player's phi is the mean of the
  explainer outputs of its patch tokens.
* Text: players are the non-padding tokens after ``[CLS]`` (the official BERT recipe uses every position up to
  ``max_position_embeddings``, padding included); BERT's side pooler is replaced by the CLS token.
* The backbone runs without gradient (only the side branches learn), which is where LST's memory saving
  comes from; the official code runs it with autograd and frozen parameters.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_eff.explain.backbones import load_backbone, load_backbone_weights, make_adapter
from lightning_eff.explain.players import PlayerLayout
from lightning_eff.explain.shapley import (
    normalize_efficiency,
    shapley_kernel_masks,
    shapley_regression_loss,
    surrogate_kl_loss,
    uniform_size_masks,
)
from lightning_eff.explain.side import ATTENTION_MODES, ExplainerHead, SideBranch
from lightning_eff.explain.surrogate import CHECKPOINT_FORMAT_VERSION, load_surrogate_parts
from lightning_eff.utils.checks import check_choice, check_float, check_int
from lightning_eff.utils.distributed import ProcessGroupCleanup
from lightning_eff.utils.hparams import save_plain_hyperparameters
from lightning_eff.utils.optim import optimizer_config

__all__ = ["CHECKPOINT_FORMAT_VERSION", "AutoGnothi", "ExplainOutput"]

STAGES = ("surrogate", "explainer")


class ExplainOutput(NamedTuple):
    """What :meth:`AutoGnothi.forward` returns.

    Attributes:
        logits: the frozen backbone's logits ``[B, C]`` (bit-identical to calling the backbone).
        phi: Shapley values ``[B, N, C]`` (``None`` in stage ``"surrogate"``); zero for invalid players.
        surrogate_logits: the surrogate's logits on the full input ``[B, C]``.
        valid: boolean ``[B, N]`` of the players that exist (all ``True`` for images).

    Example::

        >>> out = ExplainOutput(torch.zeros(1, 2), None, torch.zeros(1, 2), torch.ones(1, 4, dtype=torch.bool))
        >>> out.phi is None, out.valid.shape
        (True, torch.Size([1, 4]))
    """

    logits: Tensor
    phi: Tensor | None
    surrogate_logits: Tensor
    valid: Tensor


class AutoGnothi(ProcessGroupCleanup, L.LightningModule):
    """Self-explaining classifier: frozen backbone + ladder side branches for a surrogate and a Shapley explainer.

    Args:
        backbone: the classifier to explain: a torchvision ``VisionTransformer`` (e.g. :class:`TinyViT`), a
            ``transformers`` ``ViTForImageClassification`` or BERT-like sequence classifier, given as a module
            (or module config), a local ``transformers`` folder, or a Lightning ``.ckpt`` of an
            :class:`~lightning_eff.models.ImageClassifier`. It is frozen and kept in eval mode.
        stage: ``"surrogate"`` (stage 1) or ``"explainer"`` (stage 2).
        surrogate_checkpoint: stage 2: path of a stage-1 checkpoint (loaded at ``setup``, or at the first
            ``forward``, if it does not exist yet at construction; its backbone weights must equal this backbone's).
        backbone_weights: optional weights for ``backbone`` (a Lightning checkpoint such as an ImageClassifier's,
            a state dict, ``.safetensors`` or a transformers folder); loaded at construction if the file exists,
            else at ``setup`` / the first ``forward``.
        player_grid: image players as an ``int`` or ``[rows, cols]`` grid dividing the patch grid (default: one
            player per patch). Not allowed for text.
        side_ratio: side width is ``hidden_dim / side_ratio`` (8 in the paper).
        side_heads: heads of the side blocks (default: the backbone's).
        side_dropout: dropout inside the side blocks.
        attention_masking: ``"exclude"`` (-inf, default) or ``"multiply"`` (the official code's variant).
        explainer_layers: side attention blocks in the explainer head (1 in the paper).
        explainer_hidden_dim: width of the explainer MLP (3072 in the paper).
        num_mask_samples: paired Shapley-kernel masks per input in stage 2 (even).
        normalize: apply the efficiency normalisation (E4).
        masked_chunk_size: largest number of masked inputs run through the backbone at once.
        num_heatmaps: validation images drawn in the Shapley heatmap each epoch (0 = none; images only).
        optimizer: callable ``params -> Optimizer`` over the trainable (side) parameters.
        lr_scheduler: optional callable ``optimizer -> LRScheduler``.

    Example::

        >>> from lightning_eff.explain import TinyViT
        >>> vit = TinyViT(image_size=8, patch_size=2, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
        >>> model = AutoGnothi(vit, stage="surrogate", side_ratio=4).eval()
        >>> x = torch.randn(3, 1, 8, 8)
        >>> out = model(x)
        >>> torch.equal(out.logits, vit(x)), tuple(out.surrogate_logits.shape), out.phi is None
        (True, (3, 10), True)
        >>> model.num_players
        16
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        stage: str = "surrogate",
        surrogate_checkpoint: str | None = None,
        backbone_weights: str | None = None,
        player_grid: int | list[int] | None = None,
        side_ratio: int = 8,
        side_heads: int | None = None,
        side_dropout: float = 0.0,
        attention_masking: str = "exclude",
        explainer_layers: int = 1,
        explainer_hidden_dim: int = 3072,
        num_mask_samples: int = 32,
        normalize: bool = True,
        masked_chunk_size: int = 4096,
        num_heatmaps: int = 8,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_choice(stage, "stage", STAGES, owner="AutoGnothi")
        if stage == "explainer" and not surrogate_checkpoint:
            raise ValueError(
                "AutoGnothi: stage 'explainer' needs `surrogate_checkpoint`, the path of a checkpoint written by a "
                "stage 'surrogate' run (e.g. its last.ckpt)."
            )
        if surrogate_checkpoint is not None and not isinstance(surrogate_checkpoint, str):
            raise TypeError(
                f"AutoGnothi: `surrogate_checkpoint` must be a path string, got {surrogate_checkpoint!r}."
            )
        check_choice(attention_masking, "attention_masking", ATTENTION_MODES, owner="AutoGnothi")
        check_int(side_ratio, "side_ratio", minimum=1, owner="AutoGnothi")
        check_int(explainer_layers, "explainer_layers", minimum=0, owner="AutoGnothi")
        check_int(explainer_hidden_dim, "explainer_hidden_dim", minimum=1, owner="AutoGnothi")
        check_int(num_mask_samples, "num_mask_samples", minimum=2, owner="AutoGnothi")
        if num_mask_samples % 2:
            raise ValueError(
                f"AutoGnothi: `num_mask_samples` must be even (masks come in complementary pairs), got {num_mask_samples}."
            )
        check_int(masked_chunk_size, "masked_chunk_size", minimum=1, owner="AutoGnothi")
        check_int(num_heatmaps, "num_heatmaps", minimum=0, owner="AutoGnothi")
        check_float(side_dropout, "side_dropout", low=0.0, high=1.0, high_open=True, owner="AutoGnothi")
        if not isinstance(normalize, bool):
            raise TypeError(f"AutoGnothi: `normalize` must be a bool, got {normalize!r}.")
        if not callable(optimizer):
            raise TypeError(
                f"AutoGnothi: `optimizer` must be a callable params -> Optimizer, got {optimizer!r}."
            )
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"AutoGnothi: `lr_scheduler` must be None or callable, got {lr_scheduler!r}.")

        self.stage = stage
        self.surrogate_checkpoint = surrogate_checkpoint
        self.attention_masking = attention_masking
        self.num_mask_samples = num_mask_samples
        self.normalize = normalize
        self.masked_chunk_size = masked_chunk_size
        self.num_heatmaps = num_heatmaps
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._backbone_arg = backbone

        if backbone_weights is not None and not isinstance(backbone_weights, str):
            raise TypeError(
                f"AutoGnothi: `backbone_weights` must be a path string or None, got {backbone_weights!r}."
            )
        self.backbone_weights = backbone_weights
        self.backbone = load_backbone(backbone)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.adapter = make_adapter(self.backbone)
        if self.adapter.modality == "text" and player_grid is not None:
            raise ValueError(
                f"AutoGnothi: `player_grid` applies to image backbones; text players are tokens, got {player_grid!r}."
            )
        if isinstance(player_grid, list):
            player_grid = tuple(player_grid)
        self.layout = PlayerLayout(self.adapter.modality, self.adapter.token_grid, player_grid)
        self.num_classes = self.adapter.num_classes

        hidden = self.adapter.hidden_dim
        if hidden % side_ratio:
            raise ValueError(
                f"AutoGnothi: `side_ratio`={side_ratio} must divide the backbone width {hidden}."
            )
        self.side_dim = hidden // side_ratio
        heads = self.adapter.num_heads
        if side_heads is not None:
            heads = check_int(side_heads, "side_heads", minimum=1, owner="AutoGnothi")
        if self.side_dim % heads:
            raise ValueError(
                f"AutoGnothi: the side width {self.side_dim} (= {hidden} / side_ratio {side_ratio}) is not divisible by "
                f"{heads} heads; set `side_heads` to a divisor of {self.side_dim}."
            )
        layers = self.adapter.num_layers
        self.surrogate_branch = SideBranch(hidden, layers, self.side_dim, heads, dropout=side_dropout)
        self.surrogate_head = nn.Linear(self.side_dim, self.num_classes)
        if stage == "explainer":
            self.explainer_branch = SideBranch(hidden, layers, self.side_dim, heads, dropout=side_dropout)
            self.explainer_head = ExplainerHead(
                self.side_dim,
                heads,
                self.num_classes,
                explainer_hidden_dim,
                explainer_layers,
                dropout=side_dropout,
            )
            self.surrogate_branch.requires_grad_(False)
            self.surrogate_head.requires_grad_(False)
        self.register_buffer("surrogate_null", torch.zeros(self.num_classes))
        self.register_buffer("null_ready", torch.tensor(False))
        self.register_buffer("surrogate_loaded", torch.tensor(False))
        self.register_buffer("backbone_loaded", torch.tensor(backbone_weights is None))
        if backbone_weights is not None and os.path.exists(os.path.expanduser(backbone_weights)):
            self._load_backbone_weights()
        self._heatmap_batch: tuple[Tensor, Tensor, Tensor] | None = None
        self.last_heatmap_path: str | None = None
        self._save_plain_hyperparameters(
            stage=stage,
            surrogate_checkpoint=surrogate_checkpoint,
            backbone_weights=backbone_weights,
            player_grid=list(player_grid) if isinstance(player_grid, tuple) else player_grid,
            side_ratio=side_ratio,
            side_heads=side_heads,
            side_dropout=side_dropout,
            attention_masking=attention_masking,
            explainer_layers=explainer_layers,
            explainer_hidden_dim=explainer_hidden_dim,
            num_mask_samples=num_mask_samples,
            normalize=normalize,
            masked_chunk_size=masked_chunk_size,
            num_heatmaps=num_heatmaps,
        )

    # ------------------------------------------------------------------------------------------
    # hyperparameters
    # ------------------------------------------------------------------------------------------
    def _save_plain_hyperparameters(self, **plain: Any) -> None:
        save_plain_hyperparameters(
            self,
            plain,
            nets={"backbone": self._backbone_arg if isinstance(self._backbone_arg, str) else self.backbone},
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
        )

    # ------------------------------------------------------------------------------------------
    # properties and mode
    # ------------------------------------------------------------------------------------------
    @property
    def num_players(self) -> int | None:
        """Players per image (``None`` for text, where it is the sequence length minus one)."""
        return self.layout.num_players

    def train(self, mode: bool = True) -> AutoGnothi:
        """Set train/eval mode; the backbone (and in stage 2 the surrogate) always stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        if self.stage == "explainer":
            self.surrogate_branch.eval()
            self.surrogate_head.eval()
        return self

    def _frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {"backbone": self.backbone}
        if self.stage == "explainer":
            frozen.update(surrogate_branch=self.surrogate_branch, surrogate_head=self.surrogate_head)
        return frozen

    def check_frozen(self) -> None:
        """Raise ``RuntimeError`` if a parameter of the backbone (or the stage-2 surrogate) requires grad."""
        for prefix, module in self._frozen_modules().items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    raise RuntimeError(
                        f"AutoGnothi: `{prefix}.{name}` requires grad, but the {prefix} must stay frozen (AutoGnothi "
                        f"only trains side branches; a fine-tuned backbone would change the model being explained). "
                        f"Do not unfreeze it (e.g. with BackboneFinetuning)."
                    )

    # ------------------------------------------------------------------------------------------
    # stage 2: loading the surrogate
    # ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Load ``backbone_weights`` and (stage 2) ``surrogate_checkpoint`` if not done yet.

        Both are loaded lazily so that a config may name files that an earlier command writes; a resumed run or
        ``load_from_checkpoint`` restores them from the checkpoint instead.
        """
        super().setup(stage)  # ProcessGroupCleanup
        self.ensure_loaded()

    def ensure_loaded(self) -> None:
        """Load the deferred ``backbone_weights`` and ``surrogate_checkpoint`` (raises if a file is missing)."""
        if not bool(self.backbone_loaded):
            self._load_backbone_weights()
        if self.stage == "explainer" and not bool(self.surrogate_loaded):
            self.load_surrogate(self.surrogate_checkpoint)

    def _load_backbone_weights(self) -> None:
        load_backbone_weights(self.backbone, self.backbone_weights)
        self.backbone.requires_grad_(False)
        self.backbone_loaded.fill_(True)
        self.null_ready.fill_(False)

    def load_surrogate(self, path: str) -> None:
        """Load the surrogate side branch and head of a stage-1 checkpoint; initialise the explainer branch from it.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the checkpoint has no surrogate, different side sizes, or a different backbone.
        """
        if self.stage != "explainer":
            raise RuntimeError("AutoGnothi.load_surrogate: only a stage 'explainer' model loads a surrogate.")
        parts = {"surrogate_branch": self.surrogate_branch, "surrogate_head": self.surrogate_head}
        load_surrogate_parts(path, parts, self.backbone)
        # stage 2 starts from the surrogate's side branch (official `_conv_surrogate_explainer`)
        self.explainer_branch.load_state_dict(self.surrogate_branch.state_dict())
        self.surrogate_branch.requires_grad_(False)
        self.surrogate_head.requires_grad_(False)
        self.surrogate_loaded.fill_(True)
        self.null_ready.fill_(False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["autognothi_format"] = CHECKPOINT_FORMAT_VERSION

    # ------------------------------------------------------------------------------------------
    # building blocks
    # ------------------------------------------------------------------------------------------
    def _side_keep(self, token_valid: Tensor) -> Tensor | None:
        return None if self.adapter.modality == "image" else token_valid

    def _run_backbone(self, inputs: Any, keep: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            return self.adapter.run(self.backbone, inputs, keep, self.attention_masking)

    def _surrogate(self, hiddens: list[Tensor], keep: Tensor | None) -> Tensor:
        return self.surrogate_head(self.surrogate_branch(hiddens, keep, self.attention_masking)[:, 0])

    def surrogate_values(self, inputs: Any, player_masks: Tensor) -> Tensor:
        """Surrogate class probabilities ``v(m)`` ``[B, S, C]`` for player masks ``[B, S, N]`` (no gradient).

        The ``B * S`` masked inputs go through the backbone in chunks of ``masked_chunk_size``.
        """
        b, s, n = player_masks.shape
        token_valid = self.adapter.token_valid(inputs)
        expected = self.layout.players_for(token_valid)
        if n != expected or b != token_valid.shape[0]:
            raise ValueError(
                f"AutoGnothi.surrogate_values: masks must be [B={token_valid.shape[0]}, S, N={expected}], got "
                f"{tuple(player_masks.shape)}."
            )
        flat = player_masks.reshape(b * s, n)
        rows = torch.arange(b, device=flat.device).repeat_interleave(s)
        out = []
        with torch.no_grad():
            for start in range(0, b * s, self.masked_chunk_size):
                idx = rows[start : start + self.masked_chunk_size]
                chunk_inputs = self.adapter.select(inputs, idx)
                keep = self.layout.keep_tokens(flat[start : start + self.masked_chunk_size], token_valid[idx])
                _, hiddens = self._run_backbone(chunk_inputs, keep)
                out.append(self._surrogate(hiddens, keep).softmax(-1))
        return torch.cat(out).view(b, s, -1)

    def null_value(self, inputs: Any) -> Tensor:
        """``v(0)`` ``[C]``: surrogate probabilities with every player removed (input-independent; cached)."""
        if not bool(self.null_ready):
            one = self.adapter.select(inputs, slice(0, 1))
            n = self.layout.players_for(self.adapter.token_valid(one))
            empty = torch.zeros(1, 1, n, dtype=torch.bool, device=self.surrogate_null.device)
            self.surrogate_null.copy_(self.surrogate_values(one, empty)[0, 0])
            self.null_ready.fill_(True)
        return self.surrogate_null

    def _explain(
        self, hiddens: list[Tensor], side_keep: Tensor | None, valid: Tensor, grand: Tensor, inputs: Any
    ) -> Tensor:
        feats = self.explainer_branch(hiddens, side_keep, self.attention_masking)
        per_token = self.explainer_head(feats, side_keep, self.attention_masking)[:, 1:]
        phi = self.layout.pool(per_token) * valid.unsqueeze(-1)
        if self.normalize:
            phi = normalize_efficiency(phi, grand, self.null_value(inputs), valid)  # (E4)
        return phi

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def forward(self, inputs: Any) -> ExplainOutput:
        """One backbone pass: its logits (unchanged), the surrogate's logits and, in stage 2, ``phi [B, N, C]``.

        Args:
            inputs: images ``[B, C, H, W]``, or for text a dict with ``input_ids`` and ``attention_mask``.
        """
        self.adapter.check_inputs(inputs)
        self.ensure_loaded()
        token_valid = self.adapter.token_valid(inputs)
        side_keep = self._side_keep(token_valid)
        valid = self.layout.valid_players(token_valid)
        logits, hiddens = self._run_backbone(inputs)
        surrogate_logits = self._surrogate(hiddens, side_keep)
        phi = None
        if self.stage == "explainer":
            phi = self._explain(hiddens, side_keep, valid, surrogate_logits.softmax(-1), inputs)
        return ExplainOutput(logits, phi, surrogate_logits, valid)

    def value_function(self, inputs: Any):
        """The surrogate's value function of one input: boolean masks ``[M, N]`` -> probabilities ``[M, C]``.

        ``inputs`` holds exactly one input (a batch of one). Use it with
        :func:`~lightning_eff.explain.exact_shapley`, :func:`~lightning_eff.explain.kernel_shap` and
        :func:`~lightning_eff.explain.insertion_deletion_auc`.
        """
        if self.adapter.batch_size(inputs) != 1:
            raise ValueError("AutoGnothi.value_function: give a batch of exactly one input.")

        def value_fn(masks: Tensor) -> Tensor:
            return self.surrogate_values(inputs, masks.to(self.surrogate_null.device).unsqueeze(0))[0]

        return value_fn

    # ------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _split_batch(batch: Any) -> tuple[Any, Tensor | None]:
        if isinstance(batch, dict):
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            return inputs, batch.get("labels")
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def _check_finite(self, loss: Tensor, where: str, batch_idx: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"AutoGnothi: the {where} loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}; lower "
                f"the learning rate or check the inputs."
            )

    def _log_loss(self, loss: Tensor, stage: str, key: str, split: str, batch_idx: int, b: int) -> None:
        """Raise on a non-finite ``loss``, then log it as ``{stage}/{split}_{key}`` (per step too in training)."""
        self._check_finite(loss, f"{stage} {split}", batch_idx)
        self.log(
            f"{stage}/{split}_{key}",
            loss,
            on_step=split == "train",
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=b,
        )

    def _log_backbone_acc(self, logits: Tensor, labels: Tensor | None, split: str, b: int) -> None:
        """Log the frozen backbone's accuracy as ``backbone/{split}_acc`` when the batch has labels."""
        if labels is not None:
            acc = (logits.argmax(-1) == labels).float().mean()
            self.log(f"backbone/{split}_acc", acc, on_epoch=True, sync_dist=True, batch_size=b)

    def _generator(self, split: str, batch_idx: int) -> torch.Generator | None:
        """Fixed masks for validation/test (seeded by batch index), the global RNG for training."""
        if split == "train":
            return None
        return torch.Generator(device=self.device).manual_seed(
            10_007 * batch_idx + (1 if split == "test" else 0)
        )

    def _surrogate_step(self, inputs: Any, labels: Tensor | None, split: str, batch_idx: int) -> Tensor:
        token_valid = self.adapter.token_valid(inputs)
        valid = self.layout.valid_players(token_valid)
        b, n = valid.shape
        logits, full_hiddens = self._run_backbone(inputs)
        gen = self._generator(split, batch_idx)
        masks = uniform_size_masks(b, n, generator=gen, device=self.device, valid=valid)  # (E3)
        keep = self.layout.keep_tokens(masks, token_valid)
        _, hiddens = self._run_backbone(inputs, keep)
        surrogate_logits = self._surrogate(hiddens, keep)
        loss = surrogate_kl_loss(logits, surrogate_logits)
        self._log_loss(loss, "surrogate", "kl", split, batch_idx, b)
        if split != "train":
            with torch.no_grad():
                full = self._surrogate(full_hiddens, self._side_keep(token_valid))
            agree = (full.argmax(-1) == logits.argmax(-1)).float().mean()
            self.log(f"surrogate/{split}_agreement", agree, on_epoch=True, sync_dist=True, batch_size=b)
            masked_agree = (surrogate_logits.argmax(-1) == logits.argmax(-1)).float().mean()
            self.log(
                f"surrogate/{split}_masked_agreement",
                masked_agree,
                on_epoch=True,
                sync_dist=True,
                batch_size=b,
            )
            self._log_backbone_acc(logits, labels, split, b)
        return loss

    def _explainer_step(self, inputs: Any, labels: Tensor | None, split: str, batch_idx: int) -> Tensor:
        token_valid = self.adapter.token_valid(inputs)
        side_keep = self._side_keep(token_valid)
        valid = self.layout.valid_players(token_valid)
        b, n = valid.shape
        logits, hiddens = self._run_backbone(inputs)
        with torch.no_grad():
            grand = self._surrogate(hiddens, side_keep).softmax(-1)  # v(1)
        null = self.null_value(inputs)  # v(0)
        phi = self._explain(hiddens, side_keep, valid, grand, inputs)
        masks = shapley_kernel_masks(
            b,
            n,
            self.num_mask_samples,
            generator=self._generator(split, batch_idx),
            device=self.device,
            valid=valid,
        )  # (E2)
        values = self.surrogate_values(inputs, masks)
        loss = shapley_regression_loss(phi, masks, values, null, valid)  # (E5)
        self._log_loss(loss, "explainer", "loss", split, batch_idx, b)
        if split != "train":
            gap = (phi.sum(1) - (grand - null)).abs().mean()
            self.log(f"explainer/{split}_efficiency_gap", gap, on_epoch=True, sync_dist=True, batch_size=b)
            self._log_backbone_acc(logits, labels, split, b)
            if split == "val" and batch_idx == 0 and self.num_heatmaps and self.adapter.modality == "image":
                k = min(self.num_heatmaps, b)
                self._heatmap_batch = (
                    inputs[:k].detach().cpu(),
                    phi[:k].detach().cpu(),
                    logits[:k].argmax(-1).cpu(),
                )
        return loss

    def _step(self, batch: Any, batch_idx: int, split: str) -> Tensor:
        inputs, labels = self._split_batch(batch)
        self.adapter.check_inputs(inputs)
        if self.stage == "surrogate":
            return self._surrogate_step(inputs, labels, split, batch_idx)
        return self._explainer_step(inputs, labels, split, batch_idx)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Stage 1: KL of the masked surrogate (E3); stage 2: the Shapley regression loss (E5)."""
        return self._step(batch, batch_idx, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Validation loss with fixed masks, surrogate agreement / efficiency gap, heatmap inputs."""
        return self._step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Test loss with fixed masks."""
        return self._step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> ExplainOutput:
        """:class:`ExplainOutput` of a batch (labels, if any, are ignored)."""
        inputs, _ = self._split_batch(batch)
        return self(inputs)

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.check_frozen()

    def on_train_epoch_start(self) -> None:
        self.check_frozen()

    def on_validation_epoch_end(self) -> None:
        batch, self._heatmap_batch = self._heatmap_batch, None
        trainer = self._trainer
        if batch is None or trainer is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.save_heatmaps(*batch)

    def save_heatmaps(self, images: Tensor, phi: Tensor, classes: Tensor, path: str | None = None) -> str:
        """Draw ``phi`` of ``classes`` over ``images``, save the PNG (atomically) and log it to the trainer's loggers.

        The default path is ``<log_dir>/heatmaps/epoch=<E>.png``. Returns the path.
        """
        import matplotlib.pyplot as plt

        from lightning_eff.explain.plots import log_figure, save_figure_png, shapley_heatmap_figure

        trainer = self._trainer
        names = None
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        try:
            names = list(datamodule.class_names) if datamodule is not None else None
        except Exception:
            names = None
        fig = shapley_heatmap_figure(
            images,
            phi,
            self.layout.grid,
            classes,
            names,
            title=f"AutoGnothi phi (predicted class), epoch {self.current_epoch}",
        )
        if path is None:
            root = (trainer.log_dir if trainer is not None else None) or os.getcwd()
            path = os.path.join(root, "heatmaps", f"epoch={self.current_epoch:03d}.png")
        save_figure_png(fig, path, metadata={"method": "AutoGnothi", "epoch": str(self.current_epoch)})
        if trainer is not None:
            log_figure(trainer.loggers, "explainer/heatmap", fig, path, step=self.global_step)
        plt.close(fig)
        self.last_heatmap_path = path
        return path

    def configure_optimizers(self) -> Any:
        """``optimizer`` over the trainable side parameters (plus ``lr_scheduler`` when given)."""
        params = [p for p in self.parameters() if p.requires_grad]
        monitor = f"{self.stage}/val_{'kl' if self.stage == 'surrogate' else 'loss'}"
        return optimizer_config(self.optimizer, params, self.lr_scheduler, monitor=monitor)
