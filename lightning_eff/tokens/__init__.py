"""Token compression: one API (selectors + appliers), DART and baselines, a Lightning callback, metrics.

* selectors: :class:`DART` (duplication-aware, arXiv 2502.11494), :class:`Random`, :class:`FastV`
  (attention importance, eager attention only), :class:`Pool` (merging), :class:`Indices` (fixed);
* pure rule: :func:`dart_keep_indices`;
* appliers: :class:`DecoderTokenPruner` (inside a ``transformers`` Llama/Qwen2/Mistral decoder at layer K,
  with the KV cache, also as the language model of LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL) and :class:`ViTTokenPruner` (torchvision and ``transformers`` ViT, at block K);
* :class:`TokenCompression`: the Lightning ``Callback`` that attaches either to the model inside any
  ``LightningModule``; :class:`TinyVLM`: a small image-to-decoder classifier to try it on digits;
* metrics (``torchmetrics``): :class:`KeptTokenRatio`, :class:`FLOPsSaved`, :class:`KVCacheSaved`,
  :class:`PrefillLatency`.
"""

from lightning_eff.tokens.api import Indices, Selection, SelectionContext, TokenSelector, build_keep_index
from lightning_eff.tokens.baselines import FastV, Pool, Random
from lightning_eff.tokens.callback import TokenCompression
from lightning_eff.tokens.dart import DART, dart_keep_indices, dart_num_kept, dart_select
from lightning_eff.tokens.decoder import DecoderTokenPruner, PruneRecord, find_decoder
from lightning_eff.tokens.metrics import (
    FLOPsSaved,
    KeptTokenRatio,
    KVCacheSaved,
    PrefillLatency,
    decoder_flops,
    kv_cache_bytes,
)
from lightning_eff.tokens.vit import ViTTokenPruner
from lightning_eff.tokens.vlm import TinyVLM

__all__ = [
    "DART",
    "FLOPsSaved",
    "FastV",
    "DecoderTokenPruner",
    "Indices",
    "KeptTokenRatio",
    "KVCacheSaved",
    "Pool",
    "PrefillLatency",
    "PruneRecord",
    "Random",
    "Selection",
    "SelectionContext",
    "TinyVLM",
    "TokenCompression",
    "TokenSelector",
    "ViTTokenPruner",
    "build_keep_index",
    "dart_keep_indices",
    "dart_num_kept",
    "dart_select",
    "decoder_flops",
    "find_decoder",
    "kv_cache_bytes",
]
