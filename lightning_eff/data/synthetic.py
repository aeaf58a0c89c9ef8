"""``SyntheticSetDataModule``: train on a saved synthetic (or selected) set, validate and test on real data.

The last step of a distillation study is a student trained on the distilled set and tested on the real
test split. This DataModule makes that step a plain ``lightning-eff fit``: its training split is a saved
:class:`~lightning_eff.data.SyntheticSet` (``synthetic_set.pt`` of a distillation fit, a selected subset,
a DRUPI-labelled set), its validation and test splits are those of the real DataModule the set was made
from, so any ``LightningModule`` (e.g. :class:`~lightning_eff.models.ImageClassifier` with the KO optimizer)
trains on it unchanged::

    data:
      class_path: lightning_eff.data.SyntheticSetDataModule
      init_args:
        path: outputs/distill/ncfm_digits_ipc10/synthetic_set.pt
        batch_size: 64
        real:
          class_path: lightning_eff.data.DigitsDataModule
          init_args: {image_size: 16, channels: 1}
        augment:                  # DSA on the training batches (the distillation evaluation protocol)
          class_path: lightning_eff.distill.DSA
          init_args: {strategy: color_crop_cutout}

The set is read in :meth:`~SyntheticSetDataModule.setup` and checked against the real data (image shape,
class count, normalisation). Only images and labels are served: privileged information (DRUPI) and the
learned learning rate stay on :attr:`~SyntheticSetDataModule.synthetic_set` for modules that use them.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lightning_eff.data.base import ClassificationDataModule, ImageTensorDataset
from lightning_eff.data.synthetic_set import SyntheticSet
from lightning_eff.utils.checks import check_int

__all__ = ["SyntheticSetDataModule"]

_STATS_RTOL = 1e-3


class SyntheticSetDataModule(ClassificationDataModule):
    """Training split: a saved synthetic set; validation and test splits: those of a real DataModule.

    Args:
        path: a file written by :meth:`SyntheticSet.save <lightning_eff.data.SyntheticSet.save>`
            (``synthetic_set.pt`` of a distillation fit). Read in ``setup``, so it may be produced by an
            earlier step of the same pipeline.
        real: the :class:`ClassificationDataModule` the set was made from (same image shape, class count and
            normalisation); its ``val_set`` and ``test_set`` are used as they are.
        batch_size: batch size of the three loaders (a distilled set is small: 64 gives several steps an
            epoch at IPC 10 on 10 classes).
        num_workers: dataloader worker processes.
        use_soft_labels: serve the set's soft labels (as probabilities: ``softmax`` of stored logits, or the
            stored probabilities when ``metadata["soft_label_kind"] == "probabilities"``) as ``[num_classes]``
            float targets instead of the hard labels; the module must accept probability targets. The set
            must have soft labels.
        augment: a callable ``augment(images, generator=g) -> images`` applied to each *training* batch after
            it reaches the device (:class:`~lightning_eff.distill.DSA`, as in the evaluation protocol of
            distilled data); ``None``: no augmentation. Validation and test batches are never augmented.
        seed: seed of the augmentation draws (their generator is saved in checkpoints, so a resumed fit
            continues the same sequence).
        use_privileged: serve ``(image, target, F)`` with DRUPI's privileged labels ``F``; ``ImageClassifier``
            then adds ``weight * MSE(pool(E(x)), F)`` as the set's ``metadata["privileged"]`` says
            (:attr:`privileged_info`). The set must have privileged information.

    Raises:
        FileNotFoundError: (in ``setup``) ``path`` does not exist.
        ValueError: (in ``setup``) the file is not a readable synthetic set, or it does not match ``real``.

    Example::

        >>> import os, tempfile
        >>> from lightning_eff.data import DigitsDataModule
        >>> from lightning_eff.distill import SyntheticSet
        >>> real = DigitsDataModule(); real.setup()
        >>> path = os.path.join(tempfile.mkdtemp(), "set.pt")
        >>> _ = SyntheticSet.from_real(real, ipc=2).save(path)
        >>> dm = SyntheticSetDataModule(path, DigitsDataModule(), batch_size=8)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set), dm.num_classes, dm.image_shape
        (20, 180, 10, (1, 8, 8))
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((8, 1, 8, 8), torch.int64)
    """

    def __init__(
        self,
        path: str,
        real: ClassificationDataModule,
        batch_size: int = 64,
        num_workers: int = 0,
        use_soft_labels: bool = False,
        augment: Any | None = None,
        seed: int = 0,
        use_privileged: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        name = type(self).__name__
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise TypeError(f"{name}: `path` must be the path of a saved synthetic set (a str), got {path!r}.")
        if not isinstance(real, ClassificationDataModule):
            raise TypeError(
                f"{name}: `real` must be a lightning_eff ClassificationDataModule (the data the set was made "
                f"from, e.g. DigitsDataModule), got {real!r} ({type(real).__name__})."
            )
        if isinstance(real, SyntheticSetDataModule):
            raise TypeError(f"{name}: `real` must be a real-data DataModule, not another {name}.")
        if not isinstance(use_soft_labels, bool):
            raise TypeError(f"{name}: `use_soft_labels` must be a bool, got {use_soft_labels!r}.")
        if not isinstance(use_privileged, bool):
            raise TypeError(f"{name}: `use_privileged` must be a bool, got {use_privileged!r}.")
        if augment is not None and not callable(augment):
            raise TypeError(
                f"{name}: `augment` must be None or a callable `(images, generator=...) -> images` such as "
                f"lightning_eff.distill.DSA, got {augment!r}."
            )
        self.path = path
        self.real = real
        self.use_soft_labels = use_soft_labels
        self.use_privileged = use_privileged
        self.augment = augment
        self.seed = check_int(seed, "seed", owner=name)
        self.save_hyperparameters(ignore=["real", "augment"])
        self._synset: SyntheticSet | None = None
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # the real data's description (available as soon as the real DataModule knows it)
    # ------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.real.image_shape

    @property
    def mean(self) -> tuple[float, ...]:
        return self.real.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.real.std

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names

    @property
    def val_set(self) -> Dataset:
        """The real DataModule's validation set."""
        return self.real.val_set

    @property
    def test_set(self) -> Dataset:
        """The real DataModule's test set."""
        return self.real.test_set

    @property
    def privileged_info(self) -> dict[str, Any] | None:
        """``metadata["privileged"]`` of the set (kind, pooling, layer, weight) when its labels are served."""
        if not self.use_privileged or self._synset is None:
            return None
        return dict(self._synset.metadata.get("privileged") or {"kind": "feature", "pooling": "avg"})

    @property
    def synthetic_set(self) -> SyntheticSet:
        """The loaded :class:`~lightning_eff.data.SyntheticSet` (with its privileged information, lr, metadata)."""
        return self._require("synthetic_set", self._synset)

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """The real DataModule's ``prepare_data`` (nothing downloads in lightning-eff)."""
        self.real.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Set up the real DataModule, read the synthetic set and check that the two match."""
        self.real.setup(stage)
        if self._synset is None:
            synset = self._load()
            self._check_against_real(synset)
            self._synset = synset
            images, labels = synset.images.float(), synset.labels.long()
            if self.use_privileged:
                if synset.privileged is None:
                    raise ValueError(
                        f"{type(self).__name__}: use_privileged=True but the set at {self.path!r} has no privileged "
                        f"information (learn it with the DRUPI plug-in)."
                    )
                targets = self._soft_targets(synset) if self.use_soft_labels else labels
                self._train_set = TensorDataset(images, targets, synset.privileged.float())
            elif self.use_soft_labels:
                self._train_set = TensorDataset(images, self._soft_targets(synset))
            else:
                self._train_set = ImageTensorDataset(images, labels)
            self._plain_train_set = ImageTensorDataset(images, labels)
            self._train_targets = labels
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)

    def _load(self) -> SyntheticSet:
        name = type(self).__name__
        if not os.path.isfile(self.path):
            where = "a folder, not a file" if os.path.isdir(self.path) else "no such file"
            raise FileNotFoundError(
                f"{name}: path={self.path!r}: {where}. Give the synthetic_set.pt written by a distillation "
                f"fit (in its model.init_args.save_dir) or by SyntheticSet.save."
            )
        try:
            return SyntheticSet.load(self.path)
        except ValueError as err:
            raise ValueError(f"{name}: path={self.path!r} cannot be used: {err}") from None

    def _check_against_real(self, synset: SyntheticSet) -> None:
        name, real_name = type(self).__name__, type(self.real).__name__
        where = f"{name}: the synthetic set at {self.path!r}"
        if tuple(synset.image_shape) != tuple(self.real.image_shape):
            raise ValueError(
                f"{where} holds images of shape {tuple(synset.image_shape)} but {real_name} yields "
                f"{tuple(self.real.image_shape)}; configure `real` as the data the set was made from."
            )
        if synset.num_classes != self.real.num_classes:
            raise ValueError(
                f"{where} has num_classes={synset.num_classes} but {real_name} has {self.real.num_classes}."
            )
        for stat in ("mean", "std"):
            stored = synset.metadata.get(stat)
            if stored is None:
                continue
            actual = getattr(self.real, stat)
            if len(stored) != len(actual) or not all(
                math.isclose(float(a), float(b), rel_tol=_STATS_RTOL, abs_tol=1e-6) for a, b in zip(stored, actual)
            ):
                raise ValueError(
                    f"{where} was normalised with {stat}={list(stored)} but {real_name} uses {stat}={list(actual)}; "
                    f"its images would be mis-scaled against the real validation/test data. Configure `real` "
                    f"as the data the set was made from."
                )
        made_from = synset.metadata.get("dataset")
        if made_from is not None and made_from != real_name:
            warnings.warn(f"{where} was made from {made_from} but is used with {real_name}.", stacklevel=3)
        if self.use_soft_labels and synset.soft_labels is None:
            raise ValueError(f"{where} has no soft labels; use use_soft_labels=False (hard labels).")

    @staticmethod
    def _soft_targets(synset: SyntheticSet) -> Tensor:
        kind = synset.metadata.get("soft_label_kind", "logits")
        soft = synset.soft_labels.float()
        if kind == "probabilities":
            return soft
        if kind == "logits":
            return soft.softmax(dim=1)
        raise ValueError(
            f"SyntheticSetDataModule: metadata['soft_label_kind'] must be 'logits' or 'probabilities', got {kind!r}."
        )

    def _train_images(self, indices: Tensor) -> Tensor:
        return self.synthetic_set.images[indices].float()

    # ------------------------------------------------------------------------------------------
    # augmentation of training batches
    # ------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply ``augment`` to the images of training batches (not validation, test or predict batches)."""
        trainer = getattr(self, "trainer", None)
        if self.augment is None or trainer is None or not trainer.training:
            return batch
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        x, *rest = batch
        return (self.augment(x, generator=self._generator), *rest)

    def state_dict(self) -> dict[str, Any]:
        """The augmentation generator's state (saved in checkpoints)."""
        return {} if self._generator is None else {"augment_generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("augment_generator")
        if state is None:
            return
        self._generator_state = state
        if self._generator is not None:
            self._generator.set_state(state)
