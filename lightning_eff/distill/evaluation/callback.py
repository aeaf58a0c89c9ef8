"""Evaluate the synthetic set of a distillation module during training: :class:`SyntheticEvalCallback`."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_eff.distill.evaluation.functional import _protocol_with, evaluate_synthetic
from lightning_eff.distill.evaluation.protocol import StudentProtocol
from lightning_eff.utils.checks import check_int

__all__ = ["SyntheticEvalCallback"]

#: the callback's protocol when none is given: the standard one, shortened to 100 epochs (a monitor, not a result)
DEFAULT_CALLBACK_PROTOCOL = StudentProtocol(epochs=100)


class SyntheticEvalCallback(Callback):
    """Evaluate the synthetic set of a distillation module every ``every_n_steps`` and at the end of fit.

    The module must provide ``synthetic_set()`` (the current :class:`SyntheticSet`, detached), as
    :class:`~lightning_eff.distill.DistillationModule` does. Rank 0 runs :func:`evaluate_synthetic`
    against ``trainer.datamodule`` (or ``datamodule``) on the module's device; the result is
    broadcast so every rank logs the same ``distill/eval_acc`` and ``distill/eval_acc_std`` (through
    ``pl_module.log`` during training; directly to the loggers at the end of fit, where
    ``self.log`` is not allowed). Every result is kept in :attr:`history`.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` crosses a multiple of this (``>= 1``).
        num_students: students per evaluation.
        protocol: how the students are trained (:class:`~lightning_eff.distill.StudentProtocol`); default
            ``StudentProtocol(epochs=100)``. In a LightningCLI config:
            ``init_args: {protocol: {epochs: 300, dsa: true}}`` (the fields it does not set take
            ``StudentProtocol``'s defaults, e.g. 300 epochs).
        on_fit_end: also evaluate at the end of fit (unless the last step was just evaluated).
        datamodule: the DataModule to test on (default: ``trainer.datamodule``).
        net: student template (default: :func:`~lightning_eff.distill.evaluation.functional.default_student`).
        teacher: the mode-M teacher (``protocol.use_soft_labels="M"``).
        feature_layer: the student's ``E(x)`` layer for privileged information (default: the set's).
        seed: seed of the students (the same at every evaluation: the changes of the set are compared on the
            same initialisations and data orders).
        **protocol_fields: deprecated: protocol fields as keywords (``epochs=50, dsa=True``), which replace
            ``protocol``'s; pass ``protocol=StudentProtocol(...)`` instead (LightningCLI cannot type-check them).

    Example::

        >>> cb = SyntheticEvalCallback(every_n_steps=100, num_students=2, protocol=StudentProtocol(epochs=50, dsa=True))
        >>> cb.every_n_steps, cb.protocol.epochs, cb.protocol.dsa["strategy"]
        (100, 50, 'color_crop_cutout_flip_scale_rotate')
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_students: int = 3,
        protocol: StudentProtocol | None = None,
        on_fit_end: bool = True,
        datamodule: Any = None,
        net: nn.Module | None = None,
        teacher: nn.Module | None = None,
        feature_layer: str | None = None,
        seed: int = 0,
        **protocol_fields: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", minimum=1, owner=name)
        self.num_students = check_int(num_students, "num_students", minimum=1, owner=name)
        if not isinstance(on_fit_end, bool):
            raise TypeError(f"{name}: `on_fit_end` must be a bool, got {on_fit_end!r}.")
        for arg, value in (("net", net), ("teacher", teacher)):
            if value is not None and not isinstance(value, nn.Module):
                raise TypeError(f"{name}: `{arg}` must be an nn.Module or None, got {type(value).__name__}.")
        if feature_layer is not None and not isinstance(feature_layer, str):
            raise TypeError(f"{name}: `feature_layer` must be a submodule name or None, got {feature_layer!r}.")
        self.protocol = _protocol_with(
            protocol if protocol is not None else DEFAULT_CALLBACK_PROTOCOL, protocol_fields, name
        )
        if protocol_fields:
            warnings.warn(
                f"{name}: protocol fields as keywords ({', '.join(sorted(protocol_fields))}) are deprecated; pass "
                f"protocol=StudentProtocol(...) (in YAML: init_args.protocol: {{...}}).",
                DeprecationWarning,
                stacklevel=2,
            )
        if isinstance(self.protocol.lr, tuple) and len(self.protocol.lr) != self.num_students:
            raise ValueError(
                f"{name}: protocol.lr has {len(self.protocol.lr)} values but num_students={self.num_students}; give "
                f"one lr per student."
            )
        self.evaluate_on_fit_end = on_fit_end
        self.datamodule = datamodule
        self.net, self.teacher, self.feature_layer = net, teacher, feature_layer
        self.seed = check_int(seed, "seed", minimum=-(2**63), owner=name)
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    @property
    def epochs(self) -> int:
        """The students' training epochs (``protocol.epochs``)."""
        return self.protocol.epochs

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self.history = list(state_dict.get("history", []))

    def _evaluate(self, trainer, pl_module) -> tuple[float, float]:
        synset_fn = getattr(pl_module, "synthetic_set", None)
        if not callable(synset_fn):
            raise TypeError(
                f"{type(self).__name__} needs a module with a synthetic_set() method (a DistillationModule), got "
                f"{type(pl_module).__name__}."
            )
        synset = synset_fn()  # on every rank: the module may gather inside
        payload = None
        if trainer.is_global_zero:
            dm = self.datamodule if self.datamodule is not None else getattr(trainer, "datamodule", None)
            if dm is None:
                raise ValueError(
                    f"{type(self).__name__}: no DataModule to test on: fit with a datamodule or pass datamodule=."
                )
            res = evaluate_synthetic(
                synset, dm, self.protocol, net=self.net, num_students=self.num_students, seed=self.seed,
                teacher=self.teacher, feature_layer=self.feature_layer, device=pl_module.device,
            )
            payload = {"step": int(trainer.global_step), "mean": res.mean, "std": res.std,
                       "accuracies": res.accuracies, "seconds": res.seconds}
        payload = trainer.strategy.broadcast(payload, src=0)
        self.history.append(payload)
        self._last_step = int(trainer.global_step)
        return payload["mean"], payload["std"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step <= 0 or step // self.every_n_steps <= max(self._last_step, 0) // self.every_n_steps:
            return
        mean, std = self._evaluate(trainer, pl_module)
        pl_module.log("distill/eval_acc", mean, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log("distill/eval_acc_std", std, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        # the end of fit, but before the strategy moves the module to the CPU (as it does before on_fit_end)
        if not self.evaluate_on_fit_end or int(trainer.global_step) == self._last_step:
            return
        mean, std = self._evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({"distill/eval_acc": mean, "distill/eval_acc_std": std}, step=int(trainer.global_step))

