"""DD-Ranking: fair evaluation of distilled datasets (arXiv:2505.13300).

* :mod:`lightning_eff.ranking.functional`: the scores as plain functions (HLR, IOR, LRS, ARS);
* :class:`LabelRobustScore`, :class:`AugmentationRobustScore`: the same as ``torchmetrics`` metrics;
* :class:`DDRanking`: the evaluator (the protocol over one or more ``SyntheticSet``\\ s; the students' settings
  are a :class:`~lightning_eff.distill.StudentProtocol`, :data:`DEFAULT_PROTOCOL` the paper's);
* :class:`DDRankingCallback`: ranks the synthetic set at the end of a distillation fit;
* ``lightning-eff rank`` / ``python -m lightning_eff.ranking``: the command line (:mod:`.cli`).
"""

from lightning_eff.ranking import functional
from lightning_eff.ranking.callback import DDRankingCallback
from lightning_eff.ranking.evaluator import DEFAULT_LR_GRID, DEFAULT_PROTOCOL, DDRanking, load_teacher
from lightning_eff.ranking.functional import (
    augmentation_robust_score,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    normalized_score,
)
from lightning_eff.ranking.metrics import AugmentationRobustScore, LabelRobustScore
from lightning_eff.ranking.results import RankingReport, RankingResult, log_report

__all__ = [
    "functional",
    "hard_label_recovery",
    "improvement_over_random",
    "label_robust_score",
    "augmentation_robust_score",
    "normalized_score",
    "LabelRobustScore",
    "AugmentationRobustScore",
    "DDRanking",
    "DDRankingCallback",
    "DEFAULT_LR_GRID",
    "DEFAULT_PROTOCOL",
    "load_teacher",
    "RankingReport",
    "RankingResult",
    "log_report",
]
