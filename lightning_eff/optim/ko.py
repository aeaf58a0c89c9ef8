"""KO: the kinetics-inspired optimizer.

Paper: M. Feng et al., "KO: Kinetics-inspired Neural Optimizer with PDE Simulation Approaches",
arXiv:2505.14777 (2025). No official repository is public; the first author's own code is the file
``ko.py`` of the public repository FengMingquan-sjtu/nanoGPT (``apply_gradient_collision`` for the
soft collision, ``apply_gradient_collision_v1`` for the hard one).

Each neuron (row of a weight matrix) is a particle. Before the usual *transport* step (SGD / Adam),
a *collision* step rewrites the gradient so that neurons whose weights *and* gradients point the
same way are pushed apart, which counters "parameter condensation" (rows collapsing onto a few
directions).

Soft collision, for ``W`` (N x D, one row per output neuron; conv weights viewed as
``(out_channels, -1)``) and its gradient ``G``::

    W_hat = W / ||W||_row,   G_hat = G / ||G||_row
    S     = (W_hat W_hat^T) * (G_hat G_hat^T)            # elementwise product, N x N
    S[S < threshold] = 0
    "wg"  : R = gamma * S G
    "wg_i": R = gamma * (S - I) G                        # self-interaction removed (default)
    "wg_e": R = (S - I) G, rescaled so that ||R||_F = gamma * ||G||_F
    G <- G - R + sigma * N(0, I)                         # sigma = noise_scale
    then the base optimizer step with the rewritten G.

Hard collision (the author's second, DSMC-style form; ``collision="hard"``): the *columns* of ``W``
are particles with position ``x_j = W[:, j]`` and velocity ``v_j = G[:, j]``. A pair (i, j)
collides when ``|v_i - v_j| / max_kl |v_k - v_l| * exp(-c |x_i - x_j|) > 1 - gamma`` (c = 0.05).
A colliding pair leaves with the centre-of-mass velocity plus half the relative speed along a
random unit direction ``e`` (opposite signs for the two particles)::

    v_i' = v_cm + |v_r| / 2 * e,   v_j' = v_cm - |v_r| / 2 * e

which conserves the pair's momentum and kinetic energy (an elastic collision).

Defaults, and where they differ from the author's code (``ko.py`` of FengMingquan-sjtu/nanoGPT at commit
b24ce7b; line numbers of that file):

* ``variant="wg_i"`` (self-interaction removed). The author's ``apply_gradient_collision`` defaults to
  ``collision_type="wg"`` (l. 132; both are marked "commonly used", l. 151-153), and the author's training
  script calls it with ``"wg"`` (``train.py`` l. 787 at commit ba1d14d). Our choice: with ``"wg"`` the diagonal ``S_ii = 1``
  adds ``-gamma G`` to every row, i.e. it only shrinks the step by ``1 - gamma`` before the
  neuron-neuron term; ``"wg_i"`` keeps the base optimizer's step size and leaves only the interaction.
  Pass ``variant="wg"`` for the author's default.
* ``collision_rate=0.1``, ``noise_scale=1e-4``, ``threshold=0``: as the author's soft collision (l. 132).
* ``collision="soft"``: as the author's training script (``train.py`` l. 787). The author's
  ``KiOptimizer`` wrapper (l. 175-179) calls the *hard* collision instead.
* Hard collision: each partner leaves with half the relative speed, ``v_cm +- |v_r| / 2 * e`` (an elastic
  collision of equal masses: the pair's momentum and kinetic energy are conserved). The author's
  ``project_to_antisymmetric`` gives each pair ``|v_r| * e`` (l. 229), so ``v' = v_cm +- |v_r| e``, which
  doubles the relative speed; and its ``e`` is normalised over the pairs (``dim=1``, l. 224), not to a
  unit vector per pair. The sign and the scaling by ``noise_scale`` are below.

Departures from the author's code, and why:

* Hard collision sign. The author's update for particle j is ``(v_j - v_i) / 2 + ...``, which moves
  colliding velocities *apart*; a physical collision moves each velocity toward the pair's centre
  of mass, ``(v_i - v_j) / 2``. We implement the physical one. The author's code also sums the
  changes over all partners of a particle and scales them by ``noise_scale``; we average over the
  partners (each particle makes one collision per step with a partner drawn uniformly among its
  candidates, in expectation) and add ``noise_scale`` Gaussian noise separately, as for the soft
  form. Random directions are drawn only for colliding pairs, so memory is O(n^2) for the distance
  matrices (``torch.cdist``) plus O(P * N) for P colliding pairs, not the author's O(N n^2).
* The author's code applies the collision to one chosen layer; KO applies it to every parameter
  with ``ndim >= 2`` of every parameter group whose ``collision`` is not ``"none"`` (1-D
  parameters — biases, norms — get no collision, as in the method page).
* Noise comes from the optimizer's own seeded generator, identical on every DDP rank (the seed is
  broadcast from rank 0), and its state is part of ``state_dict`` so a resumed run continues the
  same trajectory.
* ``S - I`` ("wg_i", "wg_e") is computed by zeroing the diagonal of S, i.e. the self-interaction
  is removed exactly. The author's code subtracts an identity from a diagonal that is 1 only up
  to rounding; the residual is harmless for "wg_i" but "wg_e" rescales R to a fixed norm, so when
  every pair is below the threshold (R = 0 in exact arithmetic) the author's code returns
  amplified rounding noise, while ours returns R = 0. The two differ otherwise only for a
  neuron whose weight row is exactly zero (S_ii = 0).
* For layers too large for a full N x N similarity matrix the rewritten gradient is computed in
  row blocks (``chunk_size``); the result is the same up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer

from lightning_eff.utils.checks import check_int

__all__ = ["KO", "collide", "hard_collide", "BASES", "VARIANTS", "COLLISIONS"]

BASES: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
VARIANTS = ("wg", "wg_i", "wg_e")
COLLISIONS = ("soft", "hard", "none")

# A full N x N similarity block is used while N * N stays below this many elements (64 MiB fp32).
_AUTO_BLOCK_ELEMENTS = 1 << 24


def _as_matrix(t: Tensor) -> Tensor:
    """View a parameter (or its gradient) as ``(out, -1)`` in float32 or wider."""
    m = t.reshape(t.shape[0], -1)
    return m if m.dtype in (torch.float32, torch.float64) else m.float()


def _check_collision_args(collision_rate: float, variant: str, threshold: float) -> None:
    if not isinstance(collision_rate, (int, float)) or not 0.0 <= collision_rate <= 1.0:
        raise ValueError(f"collision_rate must be a number in [0, 1], got {collision_rate!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [-1, 1] (a cosine product), got {threshold!r}")


def collide(
    weight: Tensor,
    grad: Tensor,
    collision_rate: float = 0.1,
    variant: str = "wg_i",
    threshold: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """The soft collision: the rewritten gradient ``G - R`` (no noise).

    Args:
        weight: parameter of shape ``(N, ...)``; rows (dim 0) are the particles.
        grad: its gradient, same shape.
        collision_rate: gamma in [0, 1].
        variant: ``"wg"`` (R = gamma S G), ``"wg_i"`` (R = gamma (S - I) G) or ``"wg_e"``
            ((S - I) G rescaled to norm gamma ||G||_F).
        threshold: entries of S below it are set to 0 before the self-term is removed.
        chunk_size: rows of S computed at once; ``None`` picks the full matrix when it has fewer
            than 2**24 entries, else blocks of that size. Same result either way.

    Returns:
        The rewritten gradient, same shape and dtype as ``grad``.

    Example::

        >>> import torch
        >>> w = torch.tensor([[1.0, 0.0], [1.0, 0.0]])   # two identical neurons
        >>> g = torch.tensor([[1.0, 0.0], [2.0, 0.0]])   # pushed the same way
        >>> collide(w, g, collision_rate=0.1, variant="wg_i")   # each loses 0.1 x the other's grad
        tensor([[0.8000, 0.0000],
                [1.9000, 0.0000]])
    """
    _check_collision_args(collision_rate, variant, threshold)
    if weight.shape != grad.shape:
        raise ValueError(f"weight and grad must have the same shape, got {tuple(weight.shape)} and {tuple(grad.shape)}")
    if weight.ndim < 2:
        raise ValueError(f"collide needs a parameter with ndim >= 2, got shape {tuple(weight.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    W, G = _as_matrix(weight.detach()), _as_matrix(grad.detach())
    n = W.shape[0]
    W_hat, G_hat = F.normalize(W, dim=1), F.normalize(G, dim=1)
    if chunk_size is None:
        chunk_size = n if n * n <= _AUTO_BLOCK_ELEMENTS else max(1, _AUTO_BLOCK_ELEMENTS // n)
    remove_self = variant != "wg"
    R = torch.empty_like(G)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        S = (W_hat[start:stop] @ W_hat.T) * (G_hat[start:stop] @ G_hat.T)  # rows start:stop of S
        S = S.masked_fill(S < threshold, 0.0)
        if remove_self:  # S - I with the self-term removed exactly (see the module notes)
            rows = torch.arange(stop - start, device=S.device)
            S[rows, rows + start] = 0.0
        R[start:stop] = S @ G
    if variant == "wg_e":
        R = R * (collision_rate * torch.linalg.vector_norm(G) / (torch.linalg.vector_norm(R) + 1e-20))
    else:
        R = R * collision_rate
    return (G - R).reshape(grad.shape).to(grad.dtype)


def hard_collide(
    weight: Tensor,
    grad: Tensor,
    collision_rate: float = 0.1,
    distance_scale: float = 0.05,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The hard (pairwise, DSMC-style) collision, with the physical sign convention.

    Columns of the ``(out, -1)`` view are the particles: positions ``W[:, j]``, velocities
    ``G[:, j]``. Colliding pairs are those with ``|v_r| / max|v_r| * exp(-distance_scale |x_r|) >
    1 - collision_rate``; each particle's velocity moves by the mean, over its colliding partners,
    of ``v' - v`` with ``v' = v_cm +- |v_r| / 2 * e`` (e a random unit vector per pair).

    Cost: two ``n x n`` distance matrices (n = columns) and ``O(P * out)`` for P colliding pairs.

    Example::

        >>> import torch
        >>> w = torch.zeros(3, 2)                  # two particles at the same place
        >>> g = torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]])
        >>> new = hard_collide(w, g, collision_rate=0.5, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(new.sum(1), g.sum(1))   # momentum conserved
        True
        >>> bool(torch.isclose(new.pow(2).sum(), g.pow(2).sum()))   # kinetic energy conserved
        True
    """
    if not isinstance(collision_rate, (int, float)) or not 0.0 <= collision_rate <= 1.0:
        raise ValueError(f"collision_rate must be a number in [0, 1], got {collision_rate!r}")
    if distance_scale < 0:
        raise ValueError(f"distance_scale must be >= 0, got {distance_scale!r}")
    if weight.shape != grad.shape or weight.ndim < 2:
        raise ValueError(
            f"weight and grad must have the same shape with ndim >= 2, got {tuple(weight.shape)} and {tuple(grad.shape)}"
        )
    X = _as_matrix(weight.detach()).T  # (n particles, d)
    V = _as_matrix(grad.detach()).T
    dv = torch.cdist(V, V)
    vmax = dv.max()
    if not torch.isfinite(vmax) or vmax <= 0:
        return grad.clone()
    score = dv / vmax * torch.exp(-distance_scale * torch.cdist(X, X))
    pairs = torch.triu(score > 1.0 - collision_rate, diagonal=1).nonzero()
    if pairs.numel() == 0:
        return grad.clone()
    i, j = pairs[:, 0], pairs[:, 1]
    e = torch.randn(pairs.shape[0], V.shape[1], generator=generator, device="cpu" if generator is None else generator.device)
    e = F.normalize(e.to(device=V.device, dtype=V.dtype), dim=1)
    v_cm = (V[i] + V[j]) / 2
    half = dv[i, j].unsqueeze(1) / 2 * e
    delta = torch.zeros_like(V)
    delta.index_add_(0, i, v_cm + half - V[i]).index_add_(0, j, v_cm - half - V[j])
    count = torch.zeros(V.shape[0], device=V.device, dtype=V.dtype)
    ones = torch.ones_like(i, dtype=V.dtype)
    count.index_add_(0, i, ones).index_add_(0, j, ones)
    V_new = V + delta / count.clamp(min=1).unsqueeze(1)
    return V_new.T.reshape(grad.shape).to(grad.dtype)


class KO(Optimizer):
    """Kinetics-inspired optimizer: a collision step on the gradients, then SGD / Adam / AdamW.

    Works as any ``torch.optim.Optimizer``: it calls the closure Lightning passes, keeps its state
    (the base optimizer's moments, its step counter and its noise generator) in ``state_dict``,
    supports parameter groups (each group may set its own ``lr``, ``collision``,
    ``collision_rate``, ``variant``, ``noise_scale``, ``threshold``, ``collision_every``; set
    ``collision="none"`` to turn it off for a group), AMP gradient scaling (``GradScaler.step``
    unscales before KO sees the gradients) and DDP (the collision runs on the already-reduced
    gradients, and the noise generator is seeded identically on every rank).

    With ``collision_rate=0`` and ``noise_scale=0`` (or ``collision="none"``) every step is exactly
    the base optimizer's.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        base: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        collision: ``"soft"`` (default, eq. above), ``"hard"`` (pairwise) or ``"none"``.
        collision_rate: gamma in [0, 1].
        variant: soft-collision variant, ``"wg"``, ``"wg_i"`` (default) or ``"wg_e"``.
        noise_scale: sigma of the Gaussian noise added to collided gradients.
        threshold: similarity products below it do not interact (soft collision).
        collision_every: apply the collision (and noise) every k-th step only, to cut its cost
            on very wide layers; 1 (default) is the method as published.
        chunk_size: row block for the N x N similarity (``None``: automatic).
        hard_distance_scale: c in ``exp(-c |x_i - x_j|)`` of the hard collision.
        betas, eps, amsgrad: Adam / AdamW arguments.
        weight_decay: the base optimizer's weight decay (``None``: its default, 0 for SGD and
            Adam, 0.01 for AdamW).
        momentum, dampening, nesterov: SGD arguments.
        maximize, foreach: as in ``torch.optim``.
        seed: seed of the noise generator; ``None`` uses ``torch.initial_seed()`` (so
            ``seed_everything`` fixes it), broadcast from rank 0 under DDP.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = KO(model.parameters(), lr=1e-2, base="adam", collision_rate=0.1)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> sorted(opt.state_dict()["ko"])
        ['rng', 'seed', 'steps']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        base: str = "adam",
        collision: str = "soft",
        collision_rate: float = 0.1,
        variant: str = "wg_i",
        noise_scale: float = 1e-4,
        threshold: float = 0.0,
        collision_every: int = 1,
        chunk_size: int | None = None,
        hard_distance_scale: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        seed: int | None = None,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"base must be one of {tuple(BASES)}, got {base!r}")
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if hard_distance_scale < 0:
            raise ValueError(f"hard_distance_scale must be >= 0, got {hard_distance_scale!r}")
        if base == "sgd":
            if tuple(betas) != (0.9, 0.999) or eps != 1e-8 or amsgrad:
                raise ValueError("betas, eps and amsgrad apply to base='adam' or 'adamw', not base='sgd'")
            base_kwargs: dict[str, Any] = dict(momentum=momentum, dampening=dampening, nesterov=nesterov)
        else:
            if momentum or dampening or nesterov:
                raise ValueError(
                    f"momentum, dampening and nesterov apply to base='sgd', not base={base!r} (use betas)"
                )
            base_kwargs = dict(betas=tuple(betas), eps=eps, amsgrad=amsgrad)
        if weight_decay is not None:
            base_kwargs["weight_decay"] = weight_decay
        base_kwargs.update(maximize=maximize, foreach=foreach)
        base_cls = BASES[base]
        # Let the base class validate its own arguments and tell us its full defaults.
        base_defaults = base_cls([torch.zeros(1, requires_grad=True)], lr=lr, **base_kwargs).defaults
        ko_defaults = dict(
            collision=collision,
            collision_rate=collision_rate,
            variant=variant,
            noise_scale=noise_scale,
            threshold=threshold,
            collision_every=collision_every,
        )
        self._check_group(ko_defaults, where="KO")
        self.base = base
        self.chunk_size = chunk_size
        self.hard_distance_scale = hard_distance_scale
        self._seed = seed
        self._steps = 0
        self._generators: dict[str, torch.Generator] = {}
        self._pending_rng: dict[str, Tensor] = {}
        super().__init__(params, {**base_defaults, **ko_defaults})
        self._base_optimizer = base_cls(self.param_groups, lr=lr, **base_kwargs)
        self._link_base()

    # ------------------------------------------------------------------ groups and state
    @staticmethod
    def _check_group(group: dict[str, Any], where: str = "param group") -> None:
        if group["collision"] not in COLLISIONS:
            raise ValueError(f"{where}: collision must be one of {COLLISIONS}, got {group['collision']!r}")
        try:
            _check_collision_args(group["collision_rate"], group["variant"], group["threshold"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not isinstance(group["noise_scale"], (int, float)) or group["noise_scale"] < 0:
            raise ValueError(f"{where}: noise_scale must be a number >= 0, got {group['noise_scale']!r}")
        every = group["collision_every"]
        check_int(every, "collision_every", minimum=1, owner=where)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _link_base(self) -> None:
        # The base optimizer works on KO's own groups and state: schedulers that change
        # ``KO.param_groups[i]["lr"]`` and checkpoints of ``KO.state`` reach it directly.
        self._base_optimizer.param_groups = self.param_groups
        self._base_optimizer.state = self.state

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["ko"] = {
            "steps": self._steps,
            "seed": self._seed,
            "rng": {dev: gen.get_state() for dev, gen in self._generators.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ko = state_dict.get("ko", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "ko"})
        self._link_base()
        self._steps = int(ko.get("steps", 0))
        self._seed = ko.get("seed", self._seed)
        self._generators = {}
        self._pending_rng = dict(ko.get("rng", {}))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_base_optimizer" in self.__dict__:
            self._link_base()

    # ------------------------------------------------------------------ noise generator
    def _resolve_seed(self) -> int:
        if self._seed is None:
            seed = torch.initial_seed() % (2**63 - 1)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                if torch.distributed.get_world_size() > 1:
                    backend = str(torch.distributed.get_backend())
                    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else "cpu"
                    t = torch.tensor([seed], dtype=torch.int64, device=dev)
                    torch.distributed.broadcast(t, src=0)
                    seed = int(t.item())
            self._seed = seed
        return self._seed

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            if key in self._pending_rng:
                gen.set_state(self._pending_rng.pop(key))
            else:
                gen.manual_seed(self._resolve_seed())
            self._generators[key] = gen
        return gen

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Collide every ``ndim >= 2`` gradient, then take the base optimizer's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._steps += 1
        for group in self.param_groups:
            mode = group["collision"]
            if mode == "none" or (self._steps - 1) % group["collision_every"]:
                continue
            rate, sigma = group["collision_rate"], group["noise_scale"]
            if rate == 0 and sigma == 0:
                continue
            for p in group["params"]:
                if p.grad is None or p.ndim < 2:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("KO does not support sparse gradients")
                if rate > 0 and mode == "soft":
                    new = collide(p, p.grad, rate, group["variant"], group["threshold"], self.chunk_size)
                elif rate > 0 and mode == "hard":
                    gen = self._generator(torch.device("cpu"))
                    new = hard_collide(p, p.grad, rate, self.hard_distance_scale, generator=gen)
                else:
                    new = p.grad
                if sigma > 0:
                    noise = torch.randn(p.grad.shape, generator=self._generator(p.device), device=p.device)
                    new = new + sigma * noise.to(p.grad.dtype)
                p.grad.copy_(new)
        self._base_optimizer.step()
        return loss

    def __repr__(self) -> str:
        return f"KO(base={self.base!r}, groups={len(self.param_groups)}, collision={self.defaults['collision']!r})"
