"""The students' training batches: the reduced set on the device and each student's own random stream."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_eff.distill.augment import CutMix, CutMixParams, DSAParams, apply_dsa

if TYPE_CHECKING:
    from lightning_eff.distill.synthetic import SyntheticSet

__all__: list[str] = []


class _Batches:
    """The synthetic set on the device, the students' random streams, and their training batches.

    Student ``s`` draws everything from ``generators[s]`` in a fixed order: per epoch its data order,
    then per batch its DSA parameters and its CutMix draw. The draws of a block of epochs are made
    ahead on the CPU and moved to the device in a few packed copies, so the training steps never wait
    on the host; the vectorised and the sequential trainers read the same streams, hence train the
    same students.
    """

    _BLOCK_SAMPLES = 1 << 18  # per-sample draws made ahead at a time (all students together)

    def __init__(self, synsets, which, device, mode, temperature, dsa, cutmix, use_priv, batch_size):
        # the distinct sets stacked ``[G, n, ...]``; student ``s`` trains on set ``which[s]``
        self.images = torch.stack([s.images for s in synsets]).to(device).detach().clone()
        self.labels = torch.stack([s.labels for s in synsets]).to(device).detach().clone()
        self.which = torch.as_tensor(which, dtype=torch.long, device=device)
        self.device = device
        self.num_classes = synsets[0].num_classes
        self.mode, self.temperature = mode, temperature
        self.dsa, self.cutmix = dsa, cutmix
        self.batch_size = batch_size
        self.soft = None
        if mode == "S":
            self.soft = torch.stack([self._soft(s, device, temperature) for s in synsets])
        self.priv = torch.stack([s.privileged for s in synsets]).to(device).float().clone() if use_priv else None
        self.size = tuple(self.images.shape[-2:])

    @staticmethod
    def _soft(synset: SyntheticSet, device, temperature: float) -> Tensor:
        soft = synset.soft_labels.to(device).float()
        kind = synset.metadata.get("soft_label_kind", "logits")
        if kind in ("probabilities", "probs"):
            return soft if temperature == 1.0 else torch.softmax(soft.clamp_min(1e-30).log() / temperature, -1)
        if kind == "logits":
            return torch.softmax(soft / temperature, dim=-1)
        raise ValueError(f"synset.metadata['soft_label_kind'] must be 'logits' or 'probabilities', got {kind!r}.")

    def __len__(self) -> int:
        return self.images.shape[1]

    def epochs(self, num_epochs: int, generators: list[torch.Generator]):
        """Yield, for each epoch, the list of its batches ``(idx [S, b], dsa_params | None, cutmix_draws | None)``."""
        n, s = len(self), len(generators)
        per_block = max(1, self._BLOCK_SAMPLES // max(1, n * s))
        for first in range(0, num_epochs, per_block):
            yield from self._block(min(per_block, num_epochs - first), generators)

    def _block(self, num_epochs: int, generators: list[torch.Generator]):
        n, bs = len(self), self.batch_size
        perms, dsa_draws, cutmix_draws = [], [], []
        for _ in range(num_epochs):
            perms.append(torch.stack([torch.randperm(n, generator=g) for g in generators]))
            for start in range(0, n, bs):
                b = min(bs, n - start)
                for g in generators:  # per student: DSA then CutMix (independent generators)
                    if self.dsa is not None:
                        dsa_draws.append(self.dsa.sample(b, generator=g, image_size=self.size))
                    if self.cutmix is not None:
                        cutmix_draws.append(self.cutmix.sample(b, *self.size, generator=g))
        perms_dev = torch.stack(perms).to(self.device)
        dsa_dev = DSAParams.cat(dsa_draws).to(self.device) if dsa_draws else None
        cm_perm_dev = torch.cat([d.perm for d in cutmix_draws]).to(self.device) if cutmix_draws else None
        row, k = 0, 0
        s = len(generators)
        for e in range(num_epochs):
            batches = []
            for start in range(0, n, bs):
                b = min(bs, n - start)
                dsa_params = dsa_dev.index(slice(row, row + s * b)) if dsa_dev is not None else None
                draws = None
                if cm_perm_dev is not None:
                    draws = [
                        dataclasses.replace(cutmix_draws[k + i], perm=cm_perm_dev[row + i * b : row + (i + 1) * b])
                        for i in range(s)
                    ]
                    k += s
                batches.append((perms_dev[e, :, start : start + b], dsa_params, draws))
                row += s * b
            yield batches

    def make(
        self, idx: Tensor, dsa_params: DSAParams | None, draws: list[CutMixParams] | None, teacher,
        students: slice | list[int] = slice(None),
    ):
        """Batches for the students ``students`` (all by default), with indices ``idx`` ``[S, b]`` and their draws.

        Returns ``(x [S, b, C, H, W], target_probs [S, b, K], privileged [S, b, ...] | None)``.
        """
        s, b = idx.shape
        rows = (self.which[students][:, None], idx)  # each student's own set
        x = self.images[rows].flatten(0, 1)
        if dsa_params is not None:
            x = apply_dsa(x, dsa_params)
        if self.soft is not None:
            targets = self.soft[rows]
        else:
            targets = F.one_hot(self.labels[rows], self.num_classes).to(x.dtype)
        priv = self.priv[rows] if self.priv is not None else None
        if draws is not None:
            x = torch.cat([CutMix.apply(chunk, d) for chunk, d in zip(x.split(b), draws)])
            targets = torch.stack([CutMix.mix_targets(targets[i], d) for i, d in enumerate(draws)])
            if priv is not None:
                priv = torch.stack([CutMix.mix_targets(priv[i], d) for i, d in enumerate(draws)])
        if teacher is not None:
            with torch.no_grad():
                targets = torch.softmax(teacher(x).float() / self.temperature, dim=-1).view(s, b, -1)
        return x.view(s, b, *x.shape[1:]), targets, priv
