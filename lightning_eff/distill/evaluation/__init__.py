"""The evaluation protocol of dataset distillation: train fresh students on a reduced set, test on real data.

Protocol (Zhao et al., ICLR 2021, Sec. 4; DSA, ICML 2021; DM, WACV 2023; MTT, CVPR 2022 — the
``evaluate_synset`` of VICO-UoE/DatasetCondensation): fresh ConvNet-3 students are trained only on
the synthetic set with SGD (lr 0.01, momentum 0.9, weight decay 5e-4, batch 256), the learning
rate divided by 10 at half of the epochs, optionally with DSA augmentation (per-sample parameters),
and tested on the real test split; the mean and standard deviation over students are reported.

How a student is trained is one :class:`StudentProtocol` (``protocol.py``), validated once; the extensions
used by later methods are its opt-in fields:

* DD-Ranking (arXiv:2505.13300, Sec. 3): test every ``eval_every`` epochs and report the best
  checkpoint besides the final one; a learning-rate grid (one lr per student, trained together);
  CutMix; soft labels, mode S (stored ``soft_labels``) or mode M (a ``teacher`` labels every
  augmented batch), with the soft cross-entropy ``SCE = -sum softmax(t / T) log softmax(s / T)``
  or ``KL(softmax(t / T) || softmax(s / T)) T^2`` (batch mean).
* DRUPI (arXiv:2410.01611, eq. 3 / Sec. 3.3): ``L = CE(f(x), y) + lambda MSE(pool(E(x)), F)`` with
  the stored privileged information ``F``; ``E`` is the student's last conv block
  (``ConvNet.encoder``), ``pool`` the identity for feature labels and average/max pooling over
  space for attention labels.

Speed: on an accelerator the students train *together*. Their parameters are stacked
(``torch.func.stack_module_state``) and one step trains every student on its own batch (own data
order, own augmentation): for a plain ``ConvNet`` with :func:`stacked_convnet_forward` (students'
channels side by side: grouped convs, fused group norms, one ``baddbmm``), for any other network
with ``torch.func.vmap(functional_call)``. A hand-written SGD with a per-student learning-rate tensor
does what ``torch.optim.SGD`` does per student (``d = g + wd p``, ``b = mu b + d``, ``p -= lr b``, as
fused ``_foreach`` ops), which the tests check against the sequential loop (``vectorize=False``) to
2e-5. The random draws of a block of epochs are made ahead on the CPU and moved in a few packed
copies, so steps do not wait on the host. The gain is largest when one student leaves an accelerator
idle (small images, few images per class) and smallest when one student already keeps it busy; measured
speed-ups (``benchmarks/distill_eval.py``) are in the README section "DD-Ranking". On the CPU the step
is compute-bound and grouped convolutions are slower than plain ones, so the default there is the loop.
Networks with BatchNorm (running statistics) always use the loop, with a warning.

:func:`evaluate_synthetic_sets` trains the students of several sets of equal size in one call (one step for
all of them when vectorised); student ``j`` of set ``i`` is seeded from that set's seed alone, so each set
gets exactly the result of its own :func:`evaluate_synthetic` call. DD-Ranking trains all cells of a ranking
this way.

Departures from the official code (documented in :attr:`EvaluationResult.protocol`):

* exactly ``epochs`` epochs, lr x0.1 from epoch ``max(1, epochs // 2)`` on, momentum kept across
  the decay (DD-Ranking's ``StepLR``); the official DC code runs ``epochs + 1`` epochs and rebuilds
  the optimiser at epoch ``epochs // 2 + 1``, which also drops the momentum buffer;
* all randomness (initialisation, data order, augmentation, CutMix) comes from per-student seeded
  generators; the global RNG is left untouched;
* accuracies are fractions in ``[0, 1]``; the standard deviation is the population one
  (``ddof = 0``, like ``np.std`` in the official scripts).

Layout (each file one concept): ``protocol.py`` :class:`StudentProtocol`; ``functional.py``
:func:`evaluate_synthetic`, :func:`evaluate_synthetic_sets`, :func:`default_student`; ``trainers.py`` the
vectorised and sequential student trainers and :func:`stacked_convnet_forward`; ``batches.py`` the students'
batches and random streams; ``data.py`` :func:`load_test_tensors` (the cached real test split); ``losses.py`` the
soft-label losses; ``result.py`` :class:`EvaluationResult`; ``callback.py`` :class:`SyntheticEvalCallback`.
DRUPI's privileged-label term and the feature tap are in :mod:`lightning_eff.models.privileged` (classifiers use
them too). ``lightning_eff.distill.evaluate`` re-exports all of it (the former single module).
"""

from lightning_eff.distill.evaluation.callback import SyntheticEvalCallback
from lightning_eff.distill.evaluation.data import load_test_tensors
from lightning_eff.distill.evaluation.functional import (
    default_student,
    evaluate_synthetic,
    evaluate_synthetic_sets,
)
from lightning_eff.distill.evaluation.losses import soft_label_loss, soft_label_terms
from lightning_eff.distill.evaluation.protocol import StudentProtocol
from lightning_eff.distill.evaluation.result import EvaluationResult
from lightning_eff.distill.evaluation.trainers import stacked_convnet_forward

__all__ = [
    "StudentProtocol",
    "EvaluationResult",
    "evaluate_synthetic",
    "evaluate_synthetic_sets",
    "SyntheticEvalCallback",
    "default_student",
    "load_test_tensors",
    "soft_label_loss",
    "soft_label_terms",
    "stacked_convnet_forward",
]
