"""The evaluation protocol of dataset distillation: train fresh students on a reduced set, test on real data.

``protocol.py``: :class:`StudentProtocol`, the training settings of a student (validated once).
"""

from lightning_eff.distill.evaluation.protocol import StudentProtocol

__all__ = ["StudentProtocol"]
