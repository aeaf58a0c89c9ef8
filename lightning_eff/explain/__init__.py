"""AutoGnothi: self-explaining classifiers with Shapley values, and the Shapley math behind it.

* :mod:`~lightning_eff.explain.shapley`: exact Shapley values, Shapley-kernel and uniform masks, KernelSHAP,
  the efficiency normalisation, the explainer and surrogate losses, insertion/deletion AUC (plain functions).
* :class:`AutoGnothi`: the ``LightningModule`` (stage ``"surrogate"`` then ``"explainer"``) around a frozen ViT or
  BERT-like classifier; :class:`TinyViT` is a small torchvision ViT for the bundled digits. Its stage-1 checkpoints
  (format, checked loading) are in :mod:`~lightning_eff.explain.surrogate`.
* :class:`SyntheticTextDataModule`: generated cue-word sequences for text backbones.
"""

from lightning_eff.explain.autognothi import AutoGnothi, ExplainOutput
from lightning_eff.explain.backbones import TinyViT, load_backbone, make_adapter
from lightning_eff.explain.players import PlayerLayout, image_player_index
from lightning_eff.explain.plots import save_figure_png, shapley_heatmap_figure
from lightning_eff.explain.shapley import (
    InsertionDeletion,
    all_subsets,
    exact_shapley,
    insertion_deletion_auc,
    kernel_shap,
    kernel_shap_from_samples,
    normalize_efficiency,
    shapley_kernel_masks,
    shapley_kernel_size_probs,
    shapley_regression_loss,
    surrogate_kl_loss,
    uniform_size_masks,
)
from lightning_eff.explain.side import ExplainerHead, SideBlock, SideBranch, masked_attention
from lightning_eff.explain.text_data import SyntheticTextDataModule, TokenDataset

__all__ = [
    "AutoGnothi",
    "ExplainOutput",
    "ExplainerHead",
    "InsertionDeletion",
    "PlayerLayout",
    "SideBlock",
    "SideBranch",
    "SyntheticTextDataModule",
    "TinyViT",
    "TokenDataset",
    "all_subsets",
    "exact_shapley",
    "image_player_index",
    "insertion_deletion_auc",
    "kernel_shap",
    "kernel_shap_from_samples",
    "load_backbone",
    "make_adapter",
    "masked_attention",
    "normalize_efficiency",
    "save_figure_png",
    "shapley_heatmap_figure",
    "shapley_kernel_masks",
    "shapley_kernel_size_probs",
    "shapley_regression_loss",
    "surrogate_kl_loss",
    "uniform_size_masks",
]
