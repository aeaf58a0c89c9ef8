"""Dataset distillation: synthetic sets, the evaluation protocol, the matching methods and plug-ins."""

from lightning_eff.distill.synthetic import SyntheticSet, SyntheticSetDataset

__all__ = ["SyntheticSet", "SyntheticSetDataset"]
