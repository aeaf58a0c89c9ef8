"""The DreamerV3 math, as plain functions on tensors.

Paper: D. Hafner, J. Pasukonis, J. Ba, T. Lillicrap, "Mastering Diverse Domains through World Models"
(DreamerV3), arXiv 2301.04104. Equation numbers refer to its 2023 version.

* ``symlog(x) = sign(x) log(1 + |x|)`` and its inverse ``symexp`` (Eq. 9).
* Two-hot encoding over fixed bins (Eq. 10-11): ``x`` is split between its two neighbouring bins in
  proportion to its distance to each, so that the expected bin value is ``x`` exactly.
* lambda-returns (Eq. 7)::

      R_t = r_t + c_t * ((1 - lambda) * v_{t+1} + lambda * R_{t+1}),   R_H = v_H = bootstrap

  with ``r_t`` the reward of the transition ``t -> t+1``, ``c_t`` its discount ``gamma * continue``
  and ``v_t`` the value of state ``t``.
* KL balancing with free bits (Eq. 5): ``L_dyn = max(1, KL[sg(q) || p])``, ``L_rep = max(1, KL[q || sg(p)])``,
  KL summed over the latent groups.
* Return normalisation (Eq. 8): ``S = EMA(Per(R, 95) - Per(R, 5))``, advantages divided by ``max(1, S)``.
* Unimix (Sec. 3): categorical distributions are mixed with 1% uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "symlog",
    "symexp",
    "twohot_encode",
    "twohot_decode",
    "lambda_returns",
    "kl_balance_loss",
    "unimix_logits",
    "ReturnNormalizer",
]


def symlog(x: Tensor) -> Tensor:
    """``sign(x) * log(1 + |x|)`` (DreamerV3 Eq. 9).

    Example::

        >>> symlog(torch.tensor([-(torch.e - 1), 0.0, torch.e - 1])).tolist()
        [-1.0, 0.0, 1.0]
    """
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """``sign(x) * (exp(|x|) - 1)``, the inverse of :func:`symlog`.

    Example::

        >>> [round(v, 9) for v in symexp(symlog(torch.tensor([-1000.0, 2.5], dtype=torch.float64))).tolist()]
        [-1000.0, 2.5]
    """
    return torch.sign(x) * torch.expm1(torch.abs(x))


def _check_bins(bins: Tensor) -> None:
    if bins.ndim != 1 or bins.numel() < 2:
        raise ValueError(f"bins must be a 1-D tensor of >= 2 values, got shape {tuple(bins.shape)}.")


def twohot_encode(x: Tensor, bins: Tensor) -> Tensor:
    """Two-hot encoding of ``x`` over sorted ``bins`` (DreamerV3 Eq. 10): ``[...] -> [..., K]``.

    Values outside ``[bins[0], bins[-1]]`` are clamped to the end bins.

    Example::

        >>> bins = torch.tensor([0.0, 1.0, 2.0])
        >>> twohot_encode(torch.tensor([0.25, 2.0]), bins).tolist()
        [[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]]
    """
    _check_bins(bins)
    bins = bins.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    x = x.to(bins.dtype).clamp(bins[0], bins[-1])
    k = bins.numel()
    above = torch.searchsorted(bins, x.contiguous(), right=True).clamp(1, k - 1)
    below = above - 1
    lo, hi = bins[below], bins[above]
    w_hi = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    out = torch.zeros(*x.shape, k, dtype=bins.dtype, device=x.device)
    out.scatter_(-1, below.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, above.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def twohot_decode(probs: Tensor, bins: Tensor) -> Tensor:
    """Expected bin value ``sum_k probs_k * bins_k`` (DreamerV3 Eq. 11, before ``symexp``): ``[..., K] -> [...]``.

    Example::

        >>> bins = torch.linspace(-2, 2, 5)
        >>> twohot_decode(twohot_encode(torch.tensor([0.3, -1.7]), bins), bins).tolist()
        [0.30000001192092896, -1.7000000476837158]
    """
    _check_bins(bins)
    if probs.shape[-1] != bins.numel():
        raise ValueError(f"twohot_decode: last dim {probs.shape[-1]} != number of bins {bins.numel()}.")
    return (probs * bins.to(probs)).sum(-1)


def lambda_returns(
    rewards: Tensor, values: Tensor, continues: Tensor, bootstrap: Tensor, lambda_: float = 0.95
) -> Tensor:
    """TD(lambda) returns over an imagined trajectory (DreamerV3 Eq. 7), time first.

    Args:
        rewards: ``[H, ...]`` reward of the transition ``t -> t + 1``.
        values: ``[H, ...]`` value of state ``t`` (``values[0]`` is not used: each return bootstraps
            from the *next* state's value).
        continues: ``[H, ...]`` discount of the transition, ``gamma * P(continue)``.
        bootstrap: ``[...]`` value of the last state ``H``.
        lambda_: mixing between one-step (0) and Monte-Carlo (1) returns, in ``[0, 1]``.

    Returns:
        ``[H, ...]`` returns ``R_0 .. R_{H-1}``.

    Example::

        >>> r = torch.tensor([1.0, 1.0]); c = torch.tensor([0.5, 0.5])
        >>> lambda_returns(r, torch.zeros(2), c, torch.tensor(4.0), lambda_=1.0).tolist()  # 1 + .5 (1 + .5 * 4)
        [2.5, 3.0]
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_returns: lambda_ must be in [0, 1], got {lambda_!r}.")
    if rewards.shape != values.shape or rewards.shape != continues.shape:
        raise ValueError(
            f"lambda_returns: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and continues "
            f"{tuple(continues.shape)} must have the same shape."
        )
    if bootstrap.shape != rewards.shape[1:]:
        raise ValueError(f"lambda_returns: bootstrap must have shape {tuple(rewards.shape[1:])}, got {tuple(bootstrap.shape)}.")
    horizon = rewards.shape[0]
    next_values = torch.cat([values[1:], bootstrap.unsqueeze(0)], dim=0)
    out = []
    ret = bootstrap
    for t in reversed(range(horizon)):
        ret = rewards[t] + continues[t] * ((1.0 - lambda_) * next_values[t] + lambda_ * ret)
        out.append(ret)
    return torch.stack(out[::-1], dim=0)


def _categorical_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL[p || q] of categoricals ``[..., groups, classes]``, summed over groups and classes."""
    p_log = F.log_softmax(p_logits, dim=-1)
    q_log = F.log_softmax(q_logits, dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=(-1, -2))


def kl_balance_loss(
    post_logits: Tensor, prior_logits: Tensor, free_bits: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """DreamerV3's dynamics and representation losses (Eq. 5) on ``[..., groups, classes]`` logits.

    Returns:
        ``(dyn, rep, kl)``: ``max(free_bits, KL[sg(q) || p])``, ``max(free_bits, KL[q || sg(p)])`` and the
        raw KL, each of shape ``[...]``.

    Example::

        >>> logits = torch.zeros(2, 4, 3)
        >>> [t.tolist() for t in kl_balance_loss(logits, logits)]
        [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    """
    dyn = _categorical_kl(post_logits.detach(), prior_logits)
    rep = _categorical_kl(post_logits, prior_logits.detach())
    return dyn.clamp(min=free_bits), rep.clamp(min=free_bits), dyn.detach()


def unimix_logits(logits: Tensor, unimix: float = 0.01) -> Tensor:
    """Logits of ``(1 - unimix) * softmax(logits) + unimix / K`` (DreamerV3 Sec. 3).

    Example::

        >>> p = unimix_logits(torch.tensor([0.0, -1e9]), 0.1).softmax(-1)
        >>> [round(v, 3) for v in p.tolist()]
        [0.95, 0.05]
    """
    if unimix <= 0.0:
        return logits
    probs = F.softmax(logits, dim=-1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


class ReturnNormalizer(nn.Module):
    """Running 5th-95th percentile range of returns (DreamerV3 Eq. 8), kept in buffers (checkpointed).

    ``update(returns)`` folds the batch percentiles into exponential moving averages (decay 0.99);
    :attr:`scale` is ``max(1, hi - lo)``, the divisor of the advantages.

    Example::

        >>> norm = ReturnNormalizer(decay=0.0)
        >>> float(norm.update(torch.arange(101.0)))  # 95 - 5
        90.0
    """

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95, limit: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ReturnNormalizer: decay must be in [0, 1), got {decay!r}.")
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"ReturnNormalizer: need 0 <= low < high <= 1, got low={low!r}, high={high!r}.")
        self.decay, self.low, self.high, self.limit = decay, low, high, limit
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, returns: Tensor) -> Tensor:
        flat = returns.detach().float().flatten()
        q = torch.quantile(flat, torch.tensor([self.low, self.high], device=flat.device))
        if not bool(self.initialized):
            self.lo.copy_(q[0])
            self.hi.copy_(q[1])
            self.initialized.fill_(True)
        else:
            self.lo.mul_(self.decay).add_((1 - self.decay) * q[0])
            self.hi.mul_(self.decay).add_((1 - self.decay) * q[1])
        return self.scale

    @property
    def scale(self) -> Tensor:
        return torch.clamp(self.hi - self.lo, min=self.limit)

    def reset(self) -> None:
        self.lo.zero_()
        self.hi.zero_()
        self.initialized.fill_(False)
