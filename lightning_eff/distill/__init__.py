"""Dataset distillation: synthetic sets, the distillation base, the matching methods and plug-ins.

Methods (one file each): :class:`DistributionMatching` (``dm.py``), :class:`GradientMatching`
(``gm.py``), :class:`TrajectoryMatching` (``mtt.py``, with expert trajectories), :class:`NCFM`
(``ncfm.py``). Plug-ins for every method: :class:`SDC` (``sdc.py``, sample difficulty correction)
and :class:`DRUPI` (``drupi.py``, privileged feature/attention labels; :class:`StaticSet` keeps the
images of any saved set fixed while DRUPI learns). The base
(``base.py``) holds the synthetic set as parameters; ``synthetic.py`` the saved artefact.
"""

from lightning_eff.distill.augment import DSA, CutMix
from lightning_eff.distill.base import DistillationModule, DistillPlugin, DistillStep
from lightning_eff.distill.dm import DistributionMatching
from lightning_eff.distill.drupi import DRUPI, StaticSet
from lightning_eff.distill.evaluation import (
    EvaluationResult,
    StudentProtocol,
    SyntheticEvalCallback,
    evaluate_synthetic,
    evaluate_synthetic_sets,
)
from lightning_eff.distill.gm import GradientMatching
from lightning_eff.distill.mtt import (
    ExpertTrajectory,
    ExpertTrajectoryRecorder,
    TrajectoryMatching,
    load_experts,
    train_experts,
)
from lightning_eff.distill.ncfm import NCFM, FeatureNetworks, SamplingNet, ncfd, pretrain_feature_networks
from lightning_eff.distill.sdc import SDC, sample_difficulty
from lightning_eff.distill.synthetic import SyntheticSet, SyntheticSetDataset

__all__ = [
    "SyntheticSet",
    "SyntheticSetDataset",
    "DistillationModule",
    "DistillPlugin",
    "DistillStep",
    "DistributionMatching",
    "GradientMatching",
    "TrajectoryMatching",
    "ExpertTrajectory",
    "ExpertTrajectoryRecorder",
    "train_experts",
    "load_experts",
    "DSA",
    "CutMix",
    "evaluate_synthetic",
    "evaluate_synthetic_sets",
    "StudentProtocol",
    "EvaluationResult",
    "SyntheticEvalCallback",
    "NCFM",
    "SamplingNet",
    "FeatureNetworks",
    "pretrain_feature_networks",
    "ncfd",
    "SDC",
    "sample_difficulty",
    "DRUPI",
    "StaticSet",
]
