"""Players: which tokens of a transformer input a Shapley player stands for.

* Images: the patch tokens of a ViT form a ``gh x gw`` grid; players are the cells of a coarser (or equal)
  ``ph x pw`` grid, each grouping ``(gh / ph) x (gw / pw)`` neighbouring patch tokens. The class token is never a
  player and is always kept.
* Text: every token after the leading ``[CLS]`` whose attention mask is 1 is a player; ``[CLS]`` and padding
  never are. The number of players varies per input (``valid`` masks).

A player mask ``[B, N]`` (``True`` = present) becomes a token keep-mask ``[B, T]`` with :meth:`PlayerLayout.keep_tokens`;
per-token features ``[B, T - 1, D]`` become per-player features with :meth:`PlayerLayout.pool` (mean over the
player's tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PlayerLayout", "image_player_index"]


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"PlayerLayout: `{name}` must be an int or a pair of ints, got {value!r}.")
    if isinstance(value, int):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"PlayerLayout: `{name}` must be an int or a pair of ints, got {value!r}.")
    if min(value) < 1:
        raise ValueError(f"PlayerLayout: `{name}` must be positive, got {tuple(value)}.")
    return int(value[0]), int(value[1])


def image_player_index(token_grid: int | Sequence[int], player_grid: int | Sequence[int]) -> Tensor:
    """Player id of each patch token (row-major), ``LongTensor [gh * gw]``.

    Args:
        token_grid: ``(gh, gw)`` patch tokens of the ViT (an int means square).
        player_grid: ``(ph, pw)`` players; each side must divide the token grid's.

    Example::

        >>> image_player_index(4, 2).view(4, 4).tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    """
    gh, gw = _pair("token_grid", token_grid)
    ph, pw = _pair("player_grid", player_grid)
    if ph > gh or pw > gw:
        raise ValueError(
            f"PlayerLayout: `player_grid`={(ph, pw)} has more players than the backbone has patch tokens "
            f"{(gh, gw)}; use a grid of at most {(gh, gw)} that divides it."
        )
    if gh % ph or gw % pw:
        raise ValueError(
            f"PlayerLayout: `player_grid`={(ph, pw)} must divide the token grid {(gh, gw)} (each player is a block "
            f"of whole patches)."
        )
    rows = torch.arange(gh).unsqueeze(1) // (gh // ph)
    cols = torch.arange(gw).unsqueeze(0) // (gw // pw)
    return (rows * pw + cols).flatten()


class PlayerLayout:
    """Maps player masks to token keep-masks and token features to player features.

    Args:
        kind: ``"image"`` or ``"text"``.
        token_grid: for images, the ``(gh, gw)`` grid of patch tokens.
        player_grid: for images, the ``(ph, pw)`` grid of players (default: one player per patch token).

    Example::

        >>> layout = PlayerLayout("image", token_grid=4, player_grid=2)
        >>> layout.num_players, layout.grid
        (4, (2, 2))
        >>> keep = layout.keep_tokens(torch.tensor([[True, False, False, False]]), torch.ones(1, 17, dtype=torch.bool))
        >>> keep.int().tolist()
        [[1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
        >>> text = PlayerLayout("text")
        >>> text.valid_players(torch.tensor([[1, 1, 1, 0]])).tolist()
        [[True, True, False]]
    """

    def __init__(
        self,
        kind: str,
        token_grid: int | Sequence[int] | None = None,
        player_grid: int | Sequence[int] | None = None,
    ) -> None:
        if kind not in ("image", "text"):
            raise ValueError(f"PlayerLayout: `kind` must be 'image' or 'text', got {kind!r}.")
        self.kind = kind
        self.index: Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self.num_players: int | None = None
        self._pool_matrix: Tensor | None = None
        if kind == "image":
            if token_grid is None:
                raise ValueError("PlayerLayout: image players need the backbone's `token_grid`.")
            token_grid = _pair("token_grid", token_grid)
            self.grid = _pair("player_grid", player_grid) if player_grid is not None else token_grid
            self.index = image_player_index(token_grid, self.grid)
            self.num_players = self.grid[0] * self.grid[1]
            counts = torch.bincount(self.index, minlength=self.num_players).float()
            pool = torch.zeros(self.num_players, self.index.numel())
            pool[self.index, torch.arange(self.index.numel())] = 1.0
            self._pool_matrix = pool / counts.unsqueeze(1)
            self.identity = bool(self.num_players == self.index.numel())
        elif player_grid is not None:
            raise ValueError(
                f"PlayerLayout: `player_grid` applies to images only; text players are tokens, got {player_grid!r}."
            )
        else:
            self.identity = True

    def players_for(self, token_valid: Tensor) -> int:
        """Number of player slots ``N`` for inputs with token validity ``[B, T]``."""
        return self.num_players if self.num_players is not None else token_valid.shape[1] - 1

    def valid_players(self, token_valid: Tensor) -> Tensor:
        """Boolean ``[B, N]``: the players that exist for each input (text: non-padding tokens after CLS)."""
        token_valid = token_valid.bool()
        if self.kind == "image":
            return torch.ones(
                token_valid.shape[0], self.num_players, dtype=torch.bool, device=token_valid.device
            )
        return token_valid[:, 1:]

    def keep_tokens(self, player_mask: Tensor, token_valid: Tensor) -> Tensor:
        """Token keep-mask ``[B, T]`` (CLS kept, padding dropped) from a player mask ``[B, N]``."""
        token_valid = token_valid.bool()
        if self.kind == "image":
            per_token = player_mask[:, self.index.to(player_mask.device)]
        else:
            per_token = player_mask
        cls = torch.ones_like(per_token[:, :1])
        return torch.cat([cls, per_token], dim=1) & token_valid

    def pool(self, token_values: Tensor) -> Tensor:
        """Per-player values ``[B, N, D]`` from per-token values ``[B, T - 1, D]`` (mean over each player's tokens)."""
        if self.identity:
            return token_values
        pool = self._pool_matrix.to(device=token_values.device, dtype=token_values.dtype)
        return torch.einsum("nt,btd->bnd", pool, token_values)
