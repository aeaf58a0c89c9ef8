"""Image-classification ``LightningDataModule``\\ s: the embedded digits and local-root datasets.

All derive from :class:`ClassificationDataModule`, the API other components (dataset distillation,
selection, evaluation) rely on. Nothing here downloads: :class:`DigitsDataModule` uses scikit-learn's bundled
digits, the others read a local ``root``;
:class:`SyntheticSetDataModule` trains on a saved synthetic set (:class:`SyntheticSet`, the artefact of
distillation and selection) and validates/tests on a real DataModule.
"""

from lightning_eff.data.base import ClassificationDataModule, ImageTensorDataset
from lightning_eff.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_eff.data.digits import DigitsDataModule
from lightning_eff.data.folder import ImageFolderDataModule
from lightning_eff.data.synthetic import SyntheticSetDataModule
from lightning_eff.data.synthetic_set import SyntheticSet, SyntheticSetDataset

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageTensorDataset",
    "SyntheticSet",
    "SyntheticSetDataModule",
    "SyntheticSetDataset",
]
