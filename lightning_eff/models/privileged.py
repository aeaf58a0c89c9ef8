"""DRUPI's privileged-label term and the feature tap that reads ``E(x)``: used by evaluation and training alike.

DRUPI (Wang et al., arXiv:2410.01611, eq. 3 / Sec. 3.3) trains a student on a synthetic set with stored privileged
information ``F`` by ``L = CE(f(x), y) + lambda MSE(pool(E(x)), F)``: ``E`` is a feature layer of the student (the
last conv block ``ConvNet.encoder`` by default), ``pool`` the identity for feature labels (``kind="feature"``) and
average / max pooling over space for attention labels (``kind="attention"``). :class:`FeatureTap` keeps the output
of that layer during a forward pass (a forward hook), so one pass gives both the logits and ``E(x)``.

Users: :func:`~lightning_eff.distill.evaluate_synthetic` (the students of the evaluation protocol),
:class:`~lightning_eff.models.ImageClassifier` (training on a ``SyntheticSetDataModule(use_privileged=True)``) and
the :class:`~lightning_eff.distill.DRUPI` plug-in (which learns ``F``).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FeatureTap", "pool_privileged", "privileged_terms", "privileged_loss", "PRIVILEGED_KINDS", "POOLINGS"]

PRIVILEGED_KINDS: tuple[str, ...] = ("feature", "attention")
POOLINGS: tuple[str, ...] = ("avg", "max")


def pool_privileged(features: Tensor, kind: str = "feature", pooling: str = "avg") -> Tensor:
    """DRUPI's ``pool(E(x))``: ``features [..., C, h, w]`` as is (``"feature"``), or pooled over space to
    ``[..., C]`` (``"attention"``, ``pooling`` ``"avg"`` or ``"max"``)."""
    if kind == "feature":
        return features
    return features.mean(dim=(-2, -1)) if pooling == "avg" else features.amax(dim=(-2, -1))


def privileged_terms(features: Tensor, target: Tensor, kind: str = "feature", pooling: str = "avg") -> Tensor:
    """Per-sample DRUPI term over any leading dims: ``features [..., C, h, w]``, ``target [..., *F]`` -> ``[...]``."""
    pred = pool_privileged(features, kind, pooling)
    if kind == "feature":
        pred = pred.flatten(-3)
    return (pred - target.reshape(pred.shape)).square().mean(-1)


def privileged_loss(features: Tensor, target: Tensor, kind: str = "feature", pooling: str = "avg") -> Tensor:
    """DRUPI's ``MSE(pool(E(x)), F)``: ``features`` ``[B, C, h, w]``, ``target`` ``[B, ...]``.

    ``kind="feature"`` compares the flattened maps; ``"attention"`` pools ``E(x)`` over space
    (``pooling`` ``"avg"`` or ``"max"``) to ``[B, C]`` first.

    Example::

        >>> import torch
        >>> e = torch.ones(2, 3, 2, 2)
        >>> float(privileged_loss(e, torch.zeros(2, 3), kind="attention"))
        1.0
    """
    return privileged_terms(features, target, kind, pooling).mean()



class FeatureTap:
    """Forward hook that keeps the output of one submodule (DRUPI's ``E(x)``)."""

    def __init__(self, net: nn.Module, layer: str | None, where: str = "evaluate_synthetic: privileged information "
                 "needs the student's feature layer `feature_layer`"):
        self.value: Tensor | None = None
        self.active = False
        self.handle = None
        if layer is not None:
            try:
                module = net.get_submodule(layer)
            except AttributeError:
                names = [n for n, _ in net.named_modules() if n][:12]
                raise ValueError(
                    f"{where}={layer!r}, but {type(net).__name__} has no such submodule (it has: {', '.join(names)}"
                    f"{', ...' if len(names) == 12 else ''})."
                ) from None
            self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active:
            self.value = output

    def take(self) -> Tensor:
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()

