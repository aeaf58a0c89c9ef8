"""Optimizers: KO, the kinetics-inspired optimizer, and the condensation measure it targets."""

from lightning_eff.optim.condensation import CondensationMonitor, condensation_stats
from lightning_eff.optim.ko import KO, collide, hard_collide

__all__ = ["KO", "collide", "hard_collide", "CondensationMonitor", "condensation_stats"]
