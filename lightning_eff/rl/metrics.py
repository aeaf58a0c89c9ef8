"""Driving metrics of the CARLA leaderboard and Think2Drive.

* Driving Score (CARLA leaderboard 2.0; Think2Drive Sec. 4.1): for one route,
  ``DS = RC * prod_j p_j ** n_j``, route completion ``RC`` in [0, 1] times one penalty factor ``p_j``
  per infraction of kind ``j`` committed ``n_j`` times. The benchmark score is the mean over routes.
* Weighted Driving Score (Think2Drive Sec. 4.1, "WDS"): scenario-dense routes are penalised less per
  infraction, ``WDS = RC * prod_j p_j ** (n_j / density)``, with ``density`` the route's scenario
  density (``density = 1``: WDS = DS).

The default penalties are leaderboard 2.0's (:data:`CARLA_PENALTIES`), including its two
time-related ones: a *scenario time-out* (0.7 per count) and the *failure to keep a minimum speed*,
a percentage-type penalty (scenario_runner's ``MinimumSpeedRouteTest``; leaderboard
``statistics_manager``): each route checkpoint where the ego's mean speed was ``q`` % of the
traffic's (``q < 100``) multiplies the score by ``1 - (1 - 0.7) (1 - q / 100)``. Pass
``penalties=LEADERBOARD_1_PENALTIES`` for the 1.0 set, which has neither (both factors 1.0). Leaving
the route, being blocked without a scenario time-out and running out of route time are not
multiplied in: they end the route, and route completion accounts for them (as on the leaderboard).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["CARLA_PENALTIES", "LEADERBOARD_1_PENALTIES", "driving_score"]

#: Penalty factor per infraction (CARLA leaderboard 2.0).
CARLA_PENALTIES: dict[str, float] = {
    "collision_pedestrian": 0.5,
    "collision_vehicle": 0.6,
    "collision_static": 0.65,
    "red_light": 0.7,
    "stop_sign": 0.8,
    "scenario_timeout": 0.7,
    "yield_emergency_vehicle": 0.7,
    "min_speed": 0.7,
}

#: The leaderboard 1.0 set: the same collision / red-light / stop-sign factors, no time-related penalty.
LEADERBOARD_1_PENALTIES: dict[str, float] = {
    **CARLA_PENALTIES,
    "scenario_timeout": 1.0,
    "yield_emergency_vehicle": 1.0,
    "min_speed": 1.0,
}


def driving_score(
    route_completion: float | Tensor,
    infractions: Mapping[str, float | Tensor] | None = None,
    penalties: Mapping[str, float] | None = None,
    scenario_density: float | Tensor | None = None,
    min_speed_percentages: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Driving score of one route or of a batch of routes (not averaged).

    Args:
        route_completion: route completion in ``[0, 1]``, a scalar or a ``[N]`` tensor (one per route).
        infractions: infraction kind -> count (scalar or ``[N]``); kinds must be keys of ``penalties``.
        penalties: kind -> factor in ``(0, 1]`` (default :data:`CARLA_PENALTIES`).
        scenario_density: if given (``> 0``, scalar or ``[N]``), counts are divided by it: the weighted
            driving score of Think2Drive.
        min_speed_percentages: the route's minimum-speed infractions, each the ego's mean speed in % of
            the traffic's at one checkpoint (a sequence for one route, or a ``[N, K]`` tensor padded with
            NaN); each multiplies the score by ``1 - (1 - penalties["min_speed"]) (1 - q / 100)``
            (leaderboard 2.0's percentage penalty). Not divided by the scenario density.

    Returns:
        A float64 tensor with the shape of the broadcast inputs (``[]`` or ``[N]``), in ``[0, 1]``.

    Example::

        >>> round(float(driving_score(0.8, {"collision_vehicle": 1})), 6)  # 0.8 * 0.6
        0.48
        >>> driving_score(torch.tensor([1.0, 0.5]), {"collision_static": torch.tensor([2, 0])}).round(decimals=6).tolist()
        [0.4225, 0.5]
        >>> round(float(driving_score(1.0, {"red_light": 2}, scenario_density=2.0)), 6)  # 0.7 ** (2 / 2)
        0.7
        >>> round(float(driving_score(0.5, {"scenario_timeout": 1}, min_speed_percentages=[50.0])), 6)  # 0.5*0.7*0.85
        0.2975
        >>> float(driving_score(0.5, {"scenario_timeout": 1}, penalties=LEADERBOARD_1_PENALTIES,
        ...                     min_speed_percentages=[50.0]))
        0.5
    """
    penalties = dict(CARLA_PENALTIES if penalties is None else penalties)
    for kind, p in penalties.items():
        if not (isinstance(p, (int, float)) and 0.0 < float(p) <= 1.0):
            raise ValueError(f"driving_score: penalty for {kind!r} must be a number in (0, 1], got {p!r}.")
    rc = torch.as_tensor(route_completion, dtype=torch.float64)
    if torch.any(rc < 0) or torch.any(rc > 1) or not torch.isfinite(rc).all():
        raise ValueError(f"driving_score: route_completion must lie in [0, 1], got {rc.tolist()}.")
    log_factor = torch.zeros_like(rc)
    density = None
    if scenario_density is not None:
        density = torch.as_tensor(scenario_density, dtype=torch.float64)
        if torch.any(density <= 0):
            raise ValueError(f"driving_score: scenario_density must be > 0, got {density.tolist()}.")
    for kind, count in (infractions or {}).items():
        if kind not in penalties:
            raise ValueError(
                f"driving_score: unknown infraction kind {kind!r}; allowed kinds are {sorted(penalties)} "
                f"(pass `penalties=` to add one)."
            )
        n = torch.as_tensor(count, dtype=torch.float64)
        if torch.any(n < 0):
            raise ValueError(f"driving_score: infraction count for {kind!r} must be >= 0, got {n.tolist()}.")
        if density is not None:
            n = n / density
        log_factor = log_factor + n * torch.log(torch.tensor(float(penalties[kind]), dtype=torch.float64))
    if min_speed_percentages is not None and torch.as_tensor(min_speed_percentages).numel() > 0:
        if "min_speed" not in penalties:
            raise ValueError("driving_score: min_speed_percentages given but penalties has no 'min_speed' factor.")
        q = torch.as_tensor(min_speed_percentages, dtype=torch.float64)
        if q.ndim == 1 and rc.ndim == 1 and len(q) == len(rc) and len(rc) > 1:
            raise ValueError("driving_score: for a batch of routes pass min_speed_percentages as [N, K] (NaN padded).")
        valid = ~torch.isnan(q)
        if torch.any((q[valid] < 0) | (q[valid] > 100)):
            raise ValueError(f"driving_score: min_speed_percentages must lie in [0, 100], got {q.tolist()}.")
        factor = 1.0 - (1.0 - float(penalties["min_speed"])) * (1.0 - torch.where(valid, q, 100.0) / 100.0)
        log_factor = log_factor + torch.log(factor).sum(-1)
    return rc * torch.exp(log_factor)
