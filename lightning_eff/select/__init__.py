"""Data selection for LLM fine-tuning: Data Whisperer and its baselines as a ``LightningDataModule``.

* :class:`DataWhispererDataModule`: scores the training set in ``setup("fit")`` with a :class:`Scorer` plug-in,
  keeps the top ``ratio`` (seeded random tie-breaking) and serves only that subset; cached, DDP-reduced,
  exported as JSON.
* Scorers, chosen by ``class_path``: :class:`DataWhispererScorer`, :class:`RandomScorer`, :class:`EL2NScorer`,
  :class:`GraNdScorer` (:mod:`lightning_eff.select.scorers`).
* :func:`demonstration_weights`, :func:`layer_attention`, :func:`data_whisperer_scores`: the method's pure parts
  (:mod:`lightning_eff.select.data_whisperer`, which runs the procedure; the scoring math is in ``scoring``, the
  attention re-run in ``attention``, the prompt plan in ``planning``, generation in ``generation``).
* :func:`el2n_from_logits`, :func:`el2n_scores`, :func:`grand_scores`, :func:`random_scores`: baselines.
"""

from lightning_eff.select.baselines import (
    el2n_from_logits,
    el2n_scores,
    grand_scores,
    random_scores,
    warmup_finetune,
)
from lightning_eff.select.data_whisperer import (
    accumulate_scores,
    data_whisperer_scores,
    default_attention_layer,
    demonstration_weights,
    layer_attention,
    matched_share,
    plan_prompts,
    query_scores,
    token_spans,
)
from lightning_eff.select.datamodule import (
    DataWhispererDataModule,
    SelectionToTuningRatio,
    load_selection,
    model_fingerprint,
    top_k,
)
from lightning_eff.select.prompts import ICLPrompt, ICLTemplate, build_icl_prompt
from lightning_eff.select.scorers import (
    SCORERS,
    DataWhispererScorer,
    EL2NScorer,
    GraNdScorer,
    RandomScorer,
    Scorer,
    ScoringContext,
    scorer_from_method,
)

__all__ = [
    "SCORERS",
    "DataWhispererDataModule",
    "DataWhispererScorer",
    "EL2NScorer",
    "GraNdScorer",
    "RandomScorer",
    "Scorer",
    "ScoringContext",
    "scorer_from_method",
    "ICLPrompt",
    "ICLTemplate",
    "SelectionToTuningRatio",
    "accumulate_scores",
    "build_icl_prompt",
    "data_whisperer_scores",
    "default_attention_layer",
    "demonstration_weights",
    "el2n_from_logits",
    "el2n_scores",
    "grand_scores",
    "layer_attention",
    "load_selection",
    "matched_share",
    "model_fingerprint",
    "plan_prompts",
    "query_scores",
    "random_scores",
    "token_spans",
    "top_k",
    "warmup_finetune",
]
