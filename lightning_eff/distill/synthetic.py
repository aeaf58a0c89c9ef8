"""The saved synthetic (or selected) set, re-exported from its home :mod:`lightning_eff.data.synthetic_set`.

``SyntheticSet`` is a data artefact (served by :class:`~lightning_eff.data.SyntheticSetDataModule`), so it
lives in ``lightning_eff.data`` since issue 21; this module keeps ``from lightning_eff.distill.synthetic
import SyntheticSet`` working. The file format did not change.
"""

from lightning_eff.data.synthetic_set import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SyntheticSet,
    SyntheticSetDataset,
)

__all__ = ["SyntheticSet", "SyntheticSetDataset", "FORMAT_NAME", "FORMAT_VERSION"]
