"""The former single module of the evaluation protocol, now the package :mod:`lightning_eff.distill.evaluation`.

Everything it held is re-exported here, so ``from lightning_eff.distill.evaluate import X`` keeps working.
Where each name lives now:

- ``StudentProtocol`` (new): ``lightning_eff.distill.evaluation.protocol``;
- ``evaluate_synthetic``, ``evaluate_synthetic_sets``, ``default_student``: ``...evaluation.functional``;
- ``EvaluationResult``: ``...evaluation.result``;
- ``SyntheticEvalCallback``: ``...evaluation.callback``;
- ``stacked_convnet_forward`` and the student trainers: ``...evaluation.trainers``;
- the students' batches and random streams: ``...evaluation.batches``;
- ``soft_label_loss``, ``soft_label_terms``: ``...evaluation.losses``;
- ``_test_tensors``, now public as ``load_test_tensors``: ``...evaluation.data``;
- ``privileged_loss``, ``privileged_terms``, ``pool_privileged`` and ``_FeatureTap``, now public as
  ``FeatureTap``: ``lightning_eff.models.privileged`` (the classifier uses them too).
"""

from lightning_eff.distill import evaluation
from lightning_eff.distill.evaluation import *  # noqa: F403  (the names of evaluation.__all__)
from lightning_eff.distill.evaluation.data import _test_tensors  # noqa: F401  (former private name)
from lightning_eff.models.privileged import FeatureTap, pool_privileged, privileged_loss, privileged_terms

_FeatureTap = FeatureTap  # the former private names, still imported by distill/drupi.py (and _test_tensors by others)

__all__ = ["privileged_loss", "privileged_terms", "pool_privileged", "FeatureTap"]
__all__ += evaluation.__all__
