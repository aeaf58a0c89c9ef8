"""NCFM: neural characteristic function matching, with a minmax that really trains.

The package (split from the former ``ncfm.py`` in issue 21; ``lightning_eff.distill.ncfm`` still exports
every name): :mod:`~lightning_eff.distill.ncfm.functional` (the discrepancy and the gradient reversal),
:mod:`~lightning_eff.distill.ncfm.multi_formation` (packing / decoding), :mod:`~lightning_eff.distill.ncfm.sampling_net`
(psi), :mod:`~lightning_eff.distill.ncfm.feature_nets` (the pretrained feature networks, their file and their
pretraining recipe :class:`FeatureNetPretraining`), :mod:`~lightning_eff.distill.ncfm.module` (the
``LightningModule`` :class:`NCFM`).

Paper: S. Wang, Y. Yang, Z. Liu, C. Sun, X. Hu, C. He, L. Zhang, "Dataset Distillation with Neural
Characteristic Function: A Minmax Perspective", CVPR 2025 (arXiv:2502.20653). Official code:
gszfwsb/NCFM (``NCFM/NCFM.py``, ``NCFM/SampleNet.py``, ``condenser/compute_loss.py``,
``condenser/Condenser.py``, ``condenser/decode.py``, ``config/ipc*/``).

The loss (the paper's neural characteristic function discrepancy, NCFD; the official ``CFLossFunc``). For L2-normalised penultimate features ``f(x)`` of a feature
network and frequencies ``t``, the empirical characteristic function of a set ``X`` is
``Phi_X(t) = mean_{x in X} exp(i <t, f(x)>)``; with amplitudes ``|Phi|`` and the phase difference
written through real and imaginary parts, the neural characteristic function discrepancy is::

    NCFD = mean_t sqrt( alpha (|Phi_r| - |Phi_s|)^2
                        + (1 - alpha) 2 (|Phi_r||Phi_s| - Re_r Re_s - Im_r Im_s) )

(:func:`ncfd`; at ``alpha = 0.5`` the integrand is ``|Phi_r - Phi_s| / sqrt(2)``). The module
minimises ``scale * NCFD`` (``scale = 300`` as in the code) summed over classes.

The minmax (min over the synthetic set, max over psi): the frequencies come either from ``N(0, I)`` or from a sampling network psi
(:class:`SamplingNet`: noise -> 3 x [Linear, BatchNorm1d, LeakyReLU(0.2) / Tanh last], each row
repeated 16 times, SGD lr 1e-3); the synthetic images *minimise* the discrepancy and psi
*maximises* it. Here psi's frequencies pass through a gradient-reversal node
(:func:`ascent_gradient`), so one backward pass gives the images ``+dL/dS`` and psi ``-dL/dpsi``,
and a descent step of psi's optimizer is an ascent step on ``L``. Under DDP both gradients are
all-reduced by the same backward.

Procedure (``config/ipc10/cifar10.yaml``; :class:`NCFM`):

1. :func:`pretrain_feature_networks` trains K ConvNets (SGD lr 0.01, momentum 0.9, MultiStepLR x0.2
   at 2/3 and 5/6 of the epochs, DSA + CutMix p 0.5) and keeps each net's initial and trained
   weights (:class:`FeatureNetworks`, saved atomically with a format version).
2. The synthetic set starts from real images; with ``factor = 2`` each stored image packs four
   downsampled real images ("multi-formation", from IDC, Kim et al. ICML 2022, which the official
   code reuses) and is decoded to four full-size images (:func:`decode_multi_formation`).
3. Each iteration draws a net k and ``lambda ~ U(0, 1)`` and matches, per class, the CF of a real
   batch and of the decoded synthetic images of the class under the net with weights
   ``lambda init_k + (1 - lambda) trained_k``, both augmented with the same siamese DSA draw; a
   calibration term ``calib_weight * sum_c CE(trained_k(A(S_c)), c)`` is added; images stay in the valid
   pixel range; ReduceLROnPlateau(0.5, patience 500) on the images (and psi).

Departures from the official code, and why:

* psi is trained: the official ``compute_match_loss`` calls ``loss.backward(retain_graph=True)``,
  steps the images, then ``(-loss).backward()`` and steps psi without zeroing psi's gradient in
  between, so psi's two gradients cancel and psi never moves (its issues #3 and #14). The tests
  show one psi step here raises the loss and one image step lowers it.
* One iteration is one optimizer step on the loss summed over the classes (and the per-class
  calibration terms summed as well); the official code steps the image optimizer once per class,
  then once per class for calibration. The gradient of each class's images is the same; the number
  of optimizer steps per iteration differs (1 here, ``2 C`` there).
* The discrepancy is exactly 0 for identical sets: the phase term is computed as
  ``|Phi_r - Phi_s|^2 - (|Phi_r| - |Phi_s|)^2`` (the same quantity without the cancellation of
  two nearly equal products, which leaves ~5e-5 per frequency in float32), and the square root
  is taken only where its argument exceeds 1e-12 (zero value and gradient below), instead of
  clamping the phase term to 1e-12.
* Images live in the DataModule's normalised space (as in every method of this package), so the
  official pixel-space learning rates are divided by the std (Adam) or its square (SGD) in the
  configs; the initial packing downsamples with ``area`` (the official code: ``nearest``).
* Frequencies, nets, lambdas and augmentations come from the per-iteration generators of the
  base, so runs are reproducible, resume exactly, and are the same on every rank.
* ``memory_efficient=True`` recomputes each class's synthetic forward in the backward
  (activation checkpointing) so memory no longer grows with the number of classes; the gradients
  are the same.
"""

from lightning_eff.distill.ncfm.feature_nets import (
    FEATURE_NETS_FORMAT,
    FEATURE_NETS_VERSION,
    FeatureNetPretraining,
    FeatureNetworks,
    pretrain_feature_networks,
)
from lightning_eff.distill.ncfm.functional import ascent_gradient, characteristic_function, ncfd
from lightning_eff.distill.ncfm.module import NCFM
from lightning_eff.distill.ncfm.multi_formation import (
    decode_multi_formation,
    decode_synthetic_set,
    multi_formation_init,
    pack_multi_formation,
)
from lightning_eff.distill.ncfm.sampling_net import SamplingNet

__all__ = [
    "NCFM",
    "SamplingNet",
    "FeatureNetworks",
    "FeatureNetPretraining",
    "pretrain_feature_networks",
    "ncfd",
    "characteristic_function",
    "ascent_gradient",
    "pack_multi_formation",
    "decode_multi_formation",
    "multi_formation_init",
    "decode_synthetic_set",
    "FEATURE_NETS_FORMAT",
    "FEATURE_NETS_VERSION",
]
