"""``SyntheticTextDataModule``: generated token sequences for BERT-like classifiers (no tokenizer, no download).

Each sequence is ``[CLS] w_1 .. w_L [SEP]`` padded to ``max_len + 2``. Token ids: ``0`` = ``[PAD]``, ``1`` = ``[CLS]``,
``2`` = ``[SEP]``; ids ``3 .. 3 + num_classes * words_per_class - 1`` are *cue* words, ``words_per_class`` per class;
the rest are neutral. A sequence of class ``y`` holds ``n_y`` cue words of class ``y`` (1 to 3) and fewer of every
other class, so the label is the class with the most cue words: which words matter, and by how much, is
known in advance, which is what an explanation should recover.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_eff.utils.checks import check_float, check_int
from lightning_eff.utils.loaders import SplitDataLoaders

__all__ = ["SyntheticTextDataModule", "TokenDataset"]

PAD, CLS, SEP = 0, 1, 2


class TokenDataset(Dataset):
    """``({"input_ids", "attention_mask"}, label)`` items from tensors ``[N, T]``, ``[N, T]``, ``[N]``.

    Example::

        >>> ds = TokenDataset(torch.tensor([[1, 5, 2, 0]]), torch.tensor([[1, 1, 1, 0]]), torch.tensor([1]))
        >>> x, y = ds[0]
        >>> x["input_ids"].tolist(), y
        ([1, 5, 2, 0], 1)
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> None:
        if input_ids.shape != attention_mask.shape or input_ids.shape[0] != labels.shape[0]:
            raise ValueError(
                f"TokenDataset: shapes {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(labels.shape)} "
                f"do not match ([N, T], [N, T], [N])."
            )
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}, int(self.labels[i])

class SyntheticTextDataModule(SplitDataLoaders, L.LightningDataModule):
    """Generated cue-word classification (see the module docstring); splits are seeded and fixed.

    Args:
        num_samples: sequences in total.
        num_classes: classes (>= 2).
        words_per_class: cue words per class.
        vocab_size: total vocabulary (special + cue + neutral ids).
        min_len: fewest words per sequence (without CLS/SEP).
        max_len: most words per sequence.
        val_fraction: fraction used for validation.
        test_fraction: fraction used for testing.
        seed: generation and split seed.
        batch_size: dataloader batch size.
        num_workers: dataloader workers.

    Example::

        >>> dm = SyntheticTextDataModule(num_samples=100, max_len=6)
        >>> dm.setup()
        >>> (x, y) = dm.train_set[0]
        >>> x["input_ids"].shape, int(x["input_ids"][0]), dm.num_classes, dm.max_length
        (torch.Size([8]), 1, 2, 8)
    """

    def __init__(
        self,
        num_samples: int = 2000,
        num_classes: int = 2,
        words_per_class: int = 4,
        vocab_size: int = 32,
        min_len: int = 4,
        max_len: int = 12,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.num_samples = check_int(num_samples, "num_samples", minimum=10, owner="SyntheticTextDataModule")
        self.num_classes = check_int(num_classes, "num_classes", minimum=2, owner="SyntheticTextDataModule")
        self.words_per_class = check_int(
            words_per_class, "words_per_class", minimum=1, owner="SyntheticTextDataModule"
        )
        self.vocab_size = check_int(
            vocab_size,
            "vocab_size",
            minimum=3 + num_classes * words_per_class + 1,
            owner="SyntheticTextDataModule",
        )
        self.min_len = check_int(min_len, "min_len", minimum=3, owner="SyntheticTextDataModule")
        self.max_len = check_int(max_len, "max_len", minimum=min_len, owner="SyntheticTextDataModule")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            check_float(
                frac, name, low=0.0, high=1.0, low_open=True, high_open=True, owner="SyntheticTextDataModule"
            )
        if val_fraction + test_fraction >= 1:
            raise ValueError("SyntheticTextDataModule: `val_fraction` + `test_fraction` must be < 1.")
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.seed = check_int(seed, "seed", minimum=0, owner="SyntheticTextDataModule")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1, owner="SyntheticTextDataModule")
        self.num_workers = check_int(num_workers, "num_workers", minimum=0, owner="SyntheticTextDataModule")
        self.save_hyperparameters()
        self.train_set: TokenDataset | None = None
        self.val_set: TokenDataset | None = None
        self.test_set: TokenDataset | None = None

    @property
    def max_length(self) -> int:
        """Padded sequence length (``max_len + 2``)."""
        return self.max_len + 2

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    def cue_words(self, c: int) -> list[int]:
        """Token ids of the cue words of class ``c``."""
        start = 3 + c * self.words_per_class
        return list(range(start, start + self.words_per_class))

    def generate(self) -> tuple[Tensor, Tensor, Tensor]:
        """All sequences: ``input_ids [N, T]``, ``attention_mask [N, T]``, ``labels [N]`` (deterministic in ``seed``)."""
        g = torch.Generator().manual_seed(self.seed)
        n, t = self.num_samples, self.max_length
        first_neutral = 3 + self.num_classes * self.words_per_class
        ids = torch.full((n, t), PAD, dtype=torch.long)
        mask = torch.zeros(n, t, dtype=torch.long)
        labels = torch.randint(self.num_classes, (n,), generator=g)
        for i in range(n):
            length = int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=g))
            y = int(labels[i])
            n_y = int(torch.randint(1, min(3, length) + 1, (1,), generator=g))
            words: list[int] = []
            for _ in range(n_y):
                words.append(
                    3 + y * self.words_per_class + int(torch.randint(self.words_per_class, (1,), generator=g))
                )
            for c in range(self.num_classes):
                if c == y:
                    continue
                room = min(n_y - 1, length - len(words))
                n_c = int(torch.randint(0, room + 1, (1,), generator=g)) if room > 0 else 0
                for _ in range(n_c):
                    words.append(
                        3
                        + c * self.words_per_class
                        + int(torch.randint(self.words_per_class, (1,), generator=g))
                    )
            while len(words) < length:
                words.append(int(torch.randint(first_neutral, self.vocab_size, (1,), generator=g)))
            order = torch.randperm(length, generator=g).tolist()
            seq = [CLS] + [words[j] for j in order] + [SEP]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return ids, mask, labels

    def setup(self, stage: str | None = None) -> None:
        """Generate and split (idempotent)."""
        if self.train_set is not None:
            return
        ids, mask, labels = self.generate()
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + 1))
        n_test = max(1, round(self.test_fraction * self.num_samples))
        n_val = max(1, round(self.val_fraction * self.num_samples))
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        self.test_set = TokenDataset(ids[test], mask[test], labels[test])
        self.val_set = TokenDataset(ids[val], mask[val], labels[val])
        self.train_set = TokenDataset(ids[train], mask[train], labels[train])
