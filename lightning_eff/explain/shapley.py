"""Shapley-value math on tensors: exact values, kernel masks, KernelSHAP, the AutoGnothi losses, faithfulness.

Paper: Wang et al., "Gnothi Seauton: Empowering Faithful Self-Interpretability in Black-Box Models", ICLR 2025
(arXiv 2410.21815), building on ViT-Shapley (Covert et al., ICLR 2023) and FastSHAP (Jethani et al., ICLR
2022). The equations below are labelled (E1)-(E7) here; they are the ones of the paper's method section and
of ViT-Shapley's Sec. 3 (the paper numbers them differently between arXiv versions, so this module uses its
own labels throughout).

A *game* is a value function ``v`` on subsets ``S`` of ``N`` players, written as boolean masks ``m in {0,1}^N``
(``True`` = player present). Values may be vectors (one entry per class).

(E1) Shapley value, by enumeration of the ``2^N`` subsets (:func:`exact_shapley`)::

    phi_i = sum_{S not containing i} |S|! (N - |S| - 1)! / N!  * (v(S + i) - v(S))

(E2) Shapley kernel over subset sizes, used to draw explainer masks (:func:`shapley_kernel_masks`)::

    p(k) proportional to 1 / (k (N - k)),   k = 1 .. N - 1,

    each mask drawn as: k ~ p, then a uniformly random subset of size k; it is followed by its complement
    (paired sampling), which keeps the estimator of (E5) unbiased and halves its variance.

(E3) Surrogate masks (:func:`uniform_size_masks`): the number of kept players is uniform on ``{0, ..., N}``,
    then a uniformly random subset of that size. The surrogate is trained with
    ``KL(p_model(x) || p_surrogate(x_m))`` (:func:`surrogate_kl_loss`).

(E4) Efficiency normalisation (additive, :func:`normalize_efficiency`)::

    phi_i <- phi_i + ((v(1) - v(0)) - sum_j phi_j) / N

(E5) Explainer loss (:func:`shapley_regression_loss`), the weighted least-squares characterisation of the
    Shapley value (Charnes et al. 1988; FastSHAP eq. 4) estimated with masks from (E2)::

    L = N * mean_{m, c} (v(0)_c + m . phi_c - v(m)_c)^2

(E6) KernelSHAP (:func:`kernel_shap`, Lundberg & Lee 2017 with the paired sampling of Covert & Lee 2021): the
    constrained least-squares solution of (E5) for one input with ``A = E[m m^T]``, ``b = E[m (v(m) - v(0))]``::

    phi = A^-1 (b - 1 (1^T A^-1 b - (v(1) - v(0))) / (1^T A^-1 1))

(E7) Insertion / deletion (:func:`insertion_deletion_auc`): players sorted by decreasing attribution are added
    to the empty set (insertion) or removed from the full set (deletion); the area under the value of the
    explained class against the fraction of players, by the trapezoid rule.

Departures from the official code (gszfwsb/AutoGnothi ``models/shapley.py``), each on purpose:

* Kernel masks: the official ``mask_shapley_new`` thresholds uniform noise at ``k/N``, so the drawn subsets
  have a *binomial* size around ``k`` (and sizes ``0`` and ``N`` occur). Here the size is exactly ``k``, as (E2)
  states; the size distribution is tested with a chi-square test.
* Surrogate KL: the official ``loss_logits_kl_divergence`` applies ``log_softmax`` / ``softmax`` to outputs that
  are already probabilities (softmax twice). Here the KL is between the model's and the surrogate's softmax
  of their logits.
* Variable player counts (text with padding) are supported through a ``valid`` mask: invalid players are
  never present, get ``phi = 0``, and ``N`` in (E4)/(E5) is the per-input count of valid players.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_eff.utils.checks import check_int

__all__ = [
    "MAX_EXACT_PLAYERS",
    "InsertionDeletion",
    "all_subsets",
    "exact_shapley",
    "insertion_deletion_auc",
    "kernel_shap",
    "kernel_shap_from_samples",
    "normalize_efficiency",
    "shapley_kernel_masks",
    "shapley_kernel_size_probs",
    "shapley_regression_loss",
    "surrogate_kl_loss",
    "uniform_size_masks",
]

#: Largest number of players :func:`exact_shapley` enumerates (2^24 = 16.8M value-function evaluations).
MAX_EXACT_PLAYERS = 24


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _check_valid(fn: str, valid: Tensor | None, batch_size: int, num_players: int, device) -> Tensor:
    """A boolean ``[B, N]`` mask of valid players (all ``True`` when ``valid`` is ``None``)."""
    if valid is None:
        return torch.ones(batch_size, num_players, dtype=torch.bool, device=device)
    if not isinstance(valid, Tensor) or valid.shape != (batch_size, num_players):
        shape = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(
            f"{fn}: `valid` must be a boolean tensor [batch_size, num_players] = [{batch_size}, {num_players}], "
            f"got {shape}."
        )
    return valid.to(device=device, dtype=torch.bool)


def _random_subsets(sizes: Tensor, valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniformly random subsets of the valid players with exactly ``sizes[r]`` members in row ``r``."""
    keys = torch.rand(valid.shape, generator=generator, device=valid.device)
    keys = keys.masked_fill(~valid, 2.0)  # invalid players sort last, so they are never chosen
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return ranks < sizes.unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# (E1) exact Shapley values
# --------------------------------------------------------------------------------------------------
def all_subsets(num_players: int, device: torch.device | str | None = None) -> Tensor:
    """All ``2^N`` subsets as a boolean tensor ``[2^N, N]``; row ``r`` holds player ``j`` iff bit ``j`` of ``r`` is 1.

    Example::

        >>> all_subsets(2).int().tolist()
        [[0, 0], [1, 0], [0, 1], [1, 1]]
    """
    check_int(num_players, "num_players", minimum=0, owner="all_subsets")
    rows = torch.arange(2**num_players, device=device)
    bits = torch.arange(num_players, device=device)
    return (rows.unsqueeze(1) >> bits).bitwise_and(1).bool()


def exact_shapley(
    value_fn: Callable[[Tensor], Tensor],
    num_players: int,
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Exact Shapley values (E1) of one game by evaluating all ``2^N`` subsets.

    Args:
        value_fn: maps a boolean mask ``[M, N]`` (``True`` = player present) to values ``[M, C]`` (or ``[M]``).
        num_players: ``N``, between 1 and :data:`MAX_EXACT_PLAYERS` (16 players = 65,536 evaluations).
        chunk_size: number of masks passed to ``value_fn`` per call.
        device: device of the masks handed to ``value_fn`` (default CPU).
        progress: show a tqdm bar over the chunks.

    Returns:
        ``phi`` of shape ``[N, C]`` (``[N]`` if ``value_fn`` returns ``[M]``), in the dtype of the values;
        accumulated in float64.

    Example::

        >>> w = torch.tensor([1.0, -2.0, 0.5])
        >>> exact_shapley(lambda m: (m.float() * w).sum(1, keepdim=True), 3).squeeze(1)  # additive game
        tensor([ 1.0000, -2.0000,  0.5000])
        >>> exact_shapley(lambda m: m.all(1, keepdim=True).float(), 2).squeeze(1)  # unanimity game
        tensor([0.5000, 0.5000])
    """
    fn = "exact_shapley"
    if not callable(value_fn):
        raise TypeError(f"{fn}: `value_fn` must be callable mask [M, N] -> values [M, C], got {value_fn!r}.")
    check_int(num_players, "num_players", minimum=1, owner=fn)
    if num_players > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"{fn}: `num_players`={num_players} needs 2^{num_players} evaluations; at most {MAX_EXACT_PLAYERS} "
            f"players are allowed. Use `kernel_shap` to estimate larger games."
        )
    check_int(chunk_size, "chunk_size", minimum=1, owner=fn)
    masks = all_subsets(num_players, device=device)
    total = masks.shape[0]
    starts = range(0, total, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="exact Shapley", leave=False)
    chunks = []
    for start in starts:
        block = masks[start : start + chunk_size]
        out = value_fn(block)
        if not isinstance(out, Tensor) or out.ndim not in (1, 2) or out.shape[0] != block.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{fn}: `value_fn` must map masks [M, N] to values [M] or [M, C]; got {got} for M={len(block)}."
            )
        chunks.append(out.detach())
    values = torch.cat(chunks)
    squeeze = values.ndim == 1
    values64 = values.reshape(total, -1).to(torch.float64)

    rows = torch.arange(total, device=values64.device)
    sizes = masks.to(values64.device).sum(1)
    # weight of a coalition S of size s that does not contain i: s! (N - s - 1)! / N! = 1 / (N * C(N-1, s))
    weights = torch.tensor(
        [1.0 / (num_players * math.comb(num_players - 1, s)) for s in range(num_players)],
        dtype=torch.float64,
        device=values64.device,
    )
    phi = torch.empty(num_players, values64.shape[1], dtype=torch.float64, device=values64.device)
    for i in range(num_players):
        without = rows[(rows >> i).bitwise_and(1) == 0]
        with_i = without | (1 << i)
        w = weights[sizes[without]].unsqueeze(1)
        phi[i] = (w * (values64[with_i] - values64[without])).sum(0)
    phi = phi.to(values.dtype if values.is_floating_point() else torch.float32)
    return phi.squeeze(1) if squeeze else phi


# --------------------------------------------------------------------------------------------------
# (E2), (E3) masks
# --------------------------------------------------------------------------------------------------
def shapley_kernel_size_probs(num_players: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``p(k)`` proportional to ``1 / (k (N - k))`` for ``k = 1 .. N-1`` (E2), as a tensor ``[N - 1]``.

    Example::

        >>> shapley_kernel_size_probs(4)
        tensor([0.3636, 0.2727, 0.3636], dtype=torch.float64)
    """
    check_int(num_players, "num_players", minimum=2, owner="shapley_kernel_size_probs")
    k = torch.arange(1, num_players, dtype=dtype)
    p = 1.0 / (k * (num_players - k))
    return p / p.sum()


def shapley_kernel_masks(
    batch_size: int,
    num_players: int,
    num_samples: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Paired masks from the Shapley kernel (E2): ``[batch_size, num_samples, num_players]`` booleans.

    Sample ``2j + 1`` is the complement of sample ``2j`` (within the valid players). Each first-of-pair mask has
    exactly ``k`` players, ``k ~ p(k) = 1/(k (n - k))`` normalised over ``1 .. n-1``, where ``n`` is the number of
    valid players of the row; since ``p`` is symmetric, the complements follow the same distribution.

    Args:
        batch_size: number of inputs ``B``.
        num_players: ``N`` (at least 2).
        num_samples: masks per input; must be even (pairs).
        generator: ``torch.Generator`` for reproducible draws (on ``device``).
        device: device of the result (default: the generator's, else CPU).
        valid: optional boolean ``[B, N]``: players that exist for each input (e.g. non-padding tokens);
            each row needs at least 2. Invalid players are absent from every mask.

    Example::

        >>> m = shapley_kernel_masks(2, 5, 4, generator=torch.Generator().manual_seed(0))
        >>> m.shape, bool((m[:, 0::2] ^ m[:, 1::2]).all()), sorted(set(m[:, 0::2].sum(-1).flatten().tolist())) < [5]
        (torch.Size([2, 4, 5]), True, True)
    """
    fn = "shapley_kernel_masks"
    check_int(batch_size, "batch_size", minimum=1, owner=fn)
    check_int(num_players, "num_players", minimum=2, owner=fn)
    check_int(num_samples, "num_samples", minimum=2, owner=fn)
    if num_samples % 2:
        raise ValueError(
            f"{fn}: `num_samples` must be even (each mask is paired with its complement), got {num_samples}."
        )
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    valid = _check_valid(fn, valid, batch_size, num_players, device)
    counts = valid.sum(1)
    if bool((counts < 2).any()):
        bad = int(counts.argmin())
        raise ValueError(
            f"{fn}: every input needs at least 2 valid players for a Shapley-kernel mask; input {bad} has "
            f"{int(counts[bad])}."
        )
    half = num_samples // 2
    rows_valid = valid.repeat_interleave(half, dim=0)  # [B * half, N]
    n = counts.repeat_interleave(half).to(torch.float64)  # [B * half]
    k = torch.arange(1, num_players, device=device, dtype=torch.float64)  # [N - 1]
    probs = torch.where(
        k < n.unsqueeze(1),
        1.0 / (k * (n.unsqueeze(1) - k)),
        torch.zeros((), dtype=torch.float64, device=device),
    )
    cdf = probs.cumsum(1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(n.shape[0], 1, generator=generator, device=device, dtype=torch.float64)
    sizes = (u > cdf).sum(1) + 1  # inverse CDF: k with cdf(k-1) < u <= cdf(k)
    sizes = torch.minimum(sizes, counts.repeat_interleave(half) - 1)  # guards against rounding at u ~ 1
    first = _random_subsets(sizes, rows_valid, generator)
    second = rows_valid & ~first
    masks = torch.stack([first, second], dim=1)  # [B * half, 2, N]
    return masks.reshape(batch_size, num_samples, num_players)


def uniform_size_masks(
    batch_size: int,
    num_players: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Surrogate-training masks (E3): ``[batch_size, num_players]`` booleans with a uniform number of players.

    The size is uniform on ``{0, ..., n}`` (``n`` = valid players of the row), then the subset is uniform among
    those of that size.

    Example::

        >>> m = uniform_size_masks(4, 6, generator=torch.Generator().manual_seed(0))
        >>> m.shape, m.dtype
        (torch.Size([4, 6]), torch.bool)
    """
    fn = "uniform_size_masks"
    check_int(batch_size, "batch_size", minimum=1, owner=fn)
    check_int(num_players, "num_players", minimum=1, owner=fn)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    valid = _check_valid(fn, valid, batch_size, num_players, device)
    counts = valid.sum(1)
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    sizes = torch.minimum((u * (counts + 1)).floor().long(), counts)
    return _random_subsets(sizes, valid, generator)


# --------------------------------------------------------------------------------------------------
# (E4), (E5) explainer
# --------------------------------------------------------------------------------------------------
def _player_counts(phi: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    b, n = phi.shape[:2]
    valid = _check_valid("normalize_efficiency", valid, b, n, phi.device)
    return valid, valid.sum(1).clamp_min(1).to(phi.dtype)


def normalize_efficiency(phi: Tensor, grand: Tensor, null: Tensor, valid: Tensor | None = None) -> Tensor:
    """Additive efficiency normalisation (E4): afterwards ``phi.sum(1) == grand - null`` for every input.

    Args:
        phi: raw attributions ``[B, N, C]``.
        grand: ``v(1)``, values of the full input ``[B, C]``.
        null: ``v(0)``, values of the empty input ``[C]``, ``[1, C]`` or ``[B, C]``.
        valid: optional boolean ``[B, N]`` of existing players; invalid ones are set to 0 and not counted.

    Example::

        >>> phi = torch.tensor([[[1.0], [2.0]]])
        >>> normalize_efficiency(phi, torch.tensor([[4.0]]), torch.tensor([1.0]))
        tensor([[[1.],
                 [2.]]])
        >>> normalize_efficiency(phi, torch.tensor([[1.0]]), torch.tensor([0.0])).squeeze().tolist()
        [0.0, 1.0]
    """
    if phi.ndim != 3:
        raise ValueError(f"normalize_efficiency: `phi` must be [B, N, C], got shape {tuple(phi.shape)}.")
    valid, counts = _player_counts(phi, valid)
    null = null.reshape(-1, phi.shape[2]) if null.ndim < 2 else null
    phi = phi * valid.unsqueeze(2)
    gap = (grand - null) - phi.sum(1)  # [B, C]
    return (phi + (gap / counts.unsqueeze(1)).unsqueeze(1)) * valid.unsqueeze(2)


def shapley_regression_loss(
    phi: Tensor, masks: Tensor, values: Tensor, null: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Explainer loss (E5): ``mean_b n_b * mean_{s,c} (v(0) + m_s . phi - v(m_s))^2``.

    Args:
        phi: attributions ``[B, N, C]``.
        masks: boolean ``[B, S, N]``.
        values: surrogate values of the masked inputs ``[B, S, C]``.
        null: ``v(0)`` as ``[C]``, ``[1, C]`` or ``[B, C]``.
        valid: optional boolean ``[B, N]``; ``n_b`` is its row sum (default ``N``).

    Example::

        >>> phi = torch.tensor([[[1.0], [2.0]]]); null = torch.zeros(1)
        >>> masks = torch.tensor([[[True, False], [False, True]]])
        >>> shapley_regression_loss(phi, masks, torch.tensor([[[1.0], [2.0]]]), null)
        tensor(0.)
        >>> shapley_regression_loss(phi, masks, torch.tensor([[[0.0], [2.0]]]), null)  # 2 * (1^2 + 0) / 2
        tensor(1.)
    """
    if phi.ndim != 3 or masks.ndim != 3 or values.ndim != 3:
        raise ValueError(
            "shapley_regression_loss: expected phi [B, N, C], masks [B, S, N], values [B, S, C]; got "
            f"{tuple(phi.shape)}, {tuple(masks.shape)}, {tuple(values.shape)}."
        )
    valid, counts = _player_counts(phi, valid)
    null = null.reshape(-1, phi.shape[2]) if null.ndim < 2 else null
    approx = null.unsqueeze(1) + masks.to(phi.dtype) @ phi  # [B, S, C]
    per_input = (approx - values).pow(2).mean(dim=(1, 2))
    return (counts * per_input).mean()


def surrogate_kl_loss(model_logits: Tensor, surrogate_logits: Tensor) -> Tensor:
    """``KL(softmax(model_logits) || softmax(surrogate_logits))``, averaged over the batch (E3).

    Example::

        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(surrogate_kl_loss(z, z))
        0.0
        >>> p = z.softmax(-1); q = torch.zeros(1, 3).softmax(-1)
        >>> torch.allclose(surrogate_kl_loss(z, torch.zeros(1, 3)), (p * (p.log() - q.log())).sum())
        True
    """
    log_p = F.log_softmax(model_logits, dim=-1)
    log_q = F.log_softmax(surrogate_logits, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


# --------------------------------------------------------------------------------------------------
# (E6) KernelSHAP
# --------------------------------------------------------------------------------------------------
def kernel_shap(
    value_fn: Callable[[Tensor], Tensor],
    num_players: int,
    num_samples: int = 512,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """KernelSHAP estimate (E6) of one game from ``num_samples`` paired Shapley-kernel masks.

    Uses ``num_samples + 2`` evaluations of ``value_fn`` (the masks plus the empty and full sets), batched in
    one call. Converges to :func:`exact_shapley` as ``num_samples`` grows and satisfies efficiency exactly.

    Args:
        value_fn: boolean masks ``[M, N]`` -> values ``[M, C]`` (or ``[M]``).
        num_players: ``N`` (at least 2).
        num_samples: even number of sampled masks.
        generator: ``torch.Generator`` for the masks.
        device: device of the masks.

    Returns:
        ``[N, C]`` (or ``[N]``).

    Example::

        >>> w = torch.tensor([1.0, -2.0, 0.5, 3.0])
        >>> phi = kernel_shap(lambda m: m.float() @ w, 4, 64, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(phi, w, atol=1e-5)
        True
    """
    fn = "kernel_shap"
    if not callable(value_fn):
        raise TypeError(f"{fn}: `value_fn` must be callable, got {value_fn!r}.")
    masks = shapley_kernel_masks(1, num_players, num_samples, generator=generator, device=device)[0]
    ends = torch.stack(
        [
            torch.zeros(num_players, dtype=torch.bool, device=masks.device),
            torch.ones(num_players, dtype=torch.bool, device=masks.device),
        ]
    )
    out = value_fn(torch.cat([ends, masks]))
    squeeze = out.ndim == 1
    values = out.detach().reshape(num_samples + 2, -1)
    phi = kernel_shap_from_samples(masks, values[2:], values[0], values[1])
    phi = phi.to(out.dtype if out.is_floating_point() else torch.float32)
    return phi.squeeze(1) if squeeze else phi


def kernel_shap_from_samples(masks: Tensor, values: Tensor, empty: Tensor, full: Tensor) -> Tensor:
    """The constrained least-squares solve of (E6) from given kernel masks and their values, batched.

    :func:`kernel_shap` is this solve after one call of the value function; giving masks and values lets many
    games be evaluated together (e.g. the masked inputs of many images in one batched model pass) and solved
    at once.

    Args:
        masks: Shapley-kernel masks ``[..., S, N]`` (from :func:`shapley_kernel_masks`, paired).
        values: ``v(m)`` for each mask, ``[..., S, C]``.
        empty: ``v(0)``, ``[..., C]``.
        full: ``v(1)``, ``[..., C]``.

    Returns:
        ``phi`` ``[..., N, C]`` in float64; ``sum_i phi_i = v(1) - v(0)`` exactly.

    Example::

        >>> w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)  # two additive games
        >>> m = shapley_kernel_masks(2, 3, 8, generator=torch.Generator().manual_seed(0))
        >>> v = (m.double() * w.unsqueeze(1)).sum(-1, keepdim=True)
        >>> phi = kernel_shap_from_samples(m, v, torch.zeros(2, 1), w.sum(-1, keepdim=True))
        >>> torch.allclose(phi[..., 0], w)
        True
    """
    fn = "kernel_shap_from_samples"
    if masks.ndim < 2 or values.shape[:-1] != masks.shape[:-1]:
        raise ValueError(
            f"{fn}: `masks` [..., S, N] and `values` [..., S, C] must share their leading shape; got "
            f"{tuple(masks.shape)} and {tuple(values.shape)}."
        )
    if empty.shape != values.shape[:-2] + values.shape[-1:] or full.shape != empty.shape:
        raise ValueError(
            f"{fn}: `empty` and `full` must be [..., C] = {tuple(values.shape[:-2] + values.shape[-1:])}; got "
            f"{tuple(empty.shape)} and {tuple(full.shape)}."
        )
    num_samples, num_players = masks.shape[-2:]
    z = masks.to(torch.float64)
    v0, v1 = empty.to(torch.float64), full.to(torch.float64)
    vs = values.to(torch.float64)
    a = z.transpose(-1, -2) @ z / num_samples  # [..., N, N]
    b = z.transpose(-1, -2) @ (vs - v0.unsqueeze(-2)) / num_samples  # [..., N, C]
    a_inv_b = torch.linalg.lstsq(a, b).solution
    ones = torch.ones(*a.shape[:-1], 1, dtype=torch.float64, device=a.device)
    a_inv_1 = torch.linalg.lstsq(a, ones).solution  # [..., N, 1]
    gap = (a_inv_b.sum(-2) - (v1 - v0)) / a_inv_1.sum(-2)  # [..., C]
    return a_inv_b - a_inv_1 * gap.unsqueeze(-2)


# --------------------------------------------------------------------------------------------------
# (E7) insertion / deletion
# --------------------------------------------------------------------------------------------------
class InsertionDeletion(NamedTuple):
    """Result of :func:`insertion_deletion_auc`: the two areas and the two curves (``N + 1`` points each).

    Example::

        >>> r = insertion_deletion_auc(lambda m: m.float().sum(1), torch.tensor([2.0, 1.0]))
        >>> r.insertion_curve.tolist(), r.insertion_auc
        ([0.0, 1.0, 2.0], 1.0)
    """

    insertion_auc: float
    deletion_auc: float
    insertion_curve: Tensor
    deletion_curve: Tensor


def insertion_deletion_auc(
    value_fn: Callable[[Tensor], Tensor],
    attributions: Tensor,
    target: int | None = None,
) -> InsertionDeletion:
    """Insertion and deletion curves and areas (E7) of one explanation.

    Players are ranked by decreasing ``attributions`` (ties by index). The insertion curve is the value with
    the top-``k`` players present, the deletion curve with the top-``k`` players removed, for ``k = 0 .. N``;
    areas are trapezoid integrals over the fraction ``k / N`` in ``[0, 1]``. A faithful explanation has a
    high insertion and a low deletion area (compare with a random ranking).

    Args:
        value_fn: boolean masks ``[M, N]`` -> values ``[M, C]`` or ``[M]`` (e.g. class probabilities).
        attributions: ``[N]`` scores of the explained class.
        target: class index into ``C`` when ``value_fn`` returns ``[M, C]``.

    Example::

        >>> w = torch.tensor([0.1, 0.5, 0.2, 0.2])
        >>> r = insertion_deletion_auc(lambda m: m.float() @ w, w)
        >>> [round(v, 2) for v in r.insertion_curve.tolist()], round(r.insertion_auc, 4), round(r.deletion_auc, 4)
        ([0.0, 0.5, 0.7, 0.9, 1.0], 0.65, 0.35)
    """
    fn = "insertion_deletion_auc"
    if not isinstance(attributions, Tensor) or attributions.ndim != 1 or attributions.numel() < 1:
        raise ValueError(f"{fn}: `attributions` must be a 1-d tensor [N], got {attributions!r}.")
    n = attributions.numel()
    order = torch.sort(attributions.detach().float().cpu(), descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    steps = torch.arange(n + 1).unsqueeze(1)
    insert = rank.unsqueeze(0) < steps  # row k: top-k present
    delete = ~insert
    masks = torch.cat([insert, delete]).to(attributions.device)
    out = value_fn(masks)
    if out.ndim == 2:
        if target is None:
            raise ValueError(f"{fn}: `value_fn` returns [M, C] values; give the explained class as `target`.")
        out = out[:, target]
    elif out.ndim != 1:
        raise ValueError(f"{fn}: `value_fn` must return [M] or [M, C], got shape {tuple(out.shape)}.")
    out = out.detach().float().cpu()
    ins, dele = out[: n + 1], out[n + 1 :]
    x = torch.linspace(0.0, 1.0, n + 1)
    return InsertionDeletion(float(torch.trapezoid(ins, x)), float(torch.trapezoid(dele, x)), ins, dele)
