"""The ladder side network of AutoGnothi (after Sung et al., "LST: Ladder Side-Tuning", NeurIPS 2022).

For backbone layers ``i = 1 .. L`` with hidden states ``h_i [B, T, d]``, the side state ``s [B, T, d_s]``
(``d_s = d / side_ratio``) starts at 0 and is updated as (AutoGnothi, official ``LttViTMultiEncoder``)::

    s <- s + GELU(W_i h_i)          W_i: d -> d_s
    s <- SideBlock_i(s, keep)       a pre-LN transformer layer of width d_s (MLP 4 x d_s)

and a final LayerNorm. Players removed from the input are removed from every attention of the side network
too (``keep``). The surrogate reads the CLS token of ``s``; the explainer adds :class:`ExplainerHead`.

Attention masking, ``mode``:

* ``"exclude"`` (default): masked keys get ``-inf`` before the softmax, i.e. they are removed.
* ``"multiply"``: the official code's variant: scores are multiplied by the 0/1 mask before the softmax, so a
  masked key keeps a score of 0 (weight ``exp(0)``) instead of vanishing.
"""

from __future__ import annotations

import math

import torch  # noqa: F401 (the doctests use it)
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTENTION_MODES", "ExplainerHead", "SideBlock", "SideBranch", "masked_attention"]

ATTENTION_MODES = ("exclude", "multiply")


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, mode: str = "exclude", dropout: float = 0.0
) -> Tensor:
    """Scaled dot-product attention over ``[B, H, T, hd]`` with keys dropped by ``keep [B, T]``.

    Args:
        q, k, v: queries, keys, values ``[B, H, T, hd]``.
        keep: boolean ``[B, T]`` of keys that may be attended to (``None`` = all).
        mode: ``"exclude"`` (masked scores ``-inf``) or ``"multiply"`` (scores times the 0/1 mask).
        dropout: attention-probability dropout (applied only when > 0).

    Example::

        >>> q = k = v = torch.randn(1, 1, 3, 2)
        >>> keep = torch.tensor([[True, True, False]])
        >>> out = masked_attention(q, k, v, keep)
        >>> v2 = v.clone(); v2[..., 2, :] = 100.0  # a removed token cannot influence the output
        >>> torch.allclose(out, masked_attention(q, k, v2, keep))
        True
    """
    if keep is None or mode == "exclude":
        mask = None if keep is None else keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if mode != "multiply":
        raise ValueError(f"masked_attention: `mode` must be one of {ATTENTION_MODES}, got {mode!r}.")
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores * keep[:, None, None, :].to(scores.dtype)
    probs = scores.softmax(dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    return probs @ v


class SideBlock(nn.Module):
    """Pre-LN transformer layer of the side network (width ``dim``, ``num_heads`` heads, MLP ``mlp_ratio x dim``).

    Args:
        dim: width ``d_s``.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout on attention probabilities and residual branches.
        first_norm: apply the LayerNorm before attention (the explainer's first block skips it, as the
            official code does, since its input is already normalised).

    Example::

        >>> blk = SideBlock(8, 2)
        >>> blk(torch.randn(2, 5, 8), keep=torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0, first_norm: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SideBlock: `num_heads`={num_heads} must divide the side width {dim}.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim) if first_norm else nn.Identity()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor | None = None, mode: str = "exclude") -> Tensor:
        """``x [B, T, dim]`` -> ``[B, T, dim]``; keys outside ``keep [B, T]`` are masked (see ``mode``)."""
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        attn = masked_attention(q, k, v, keep, mode, self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class SideBranch(nn.Module):
    """Ladder side branch reading every backbone layer (see the module docstring).

    Args:
        hidden_dim: backbone width ``d``.
        num_layers: number of backbone layers ``L`` (one map and one block each).
        side_dim: side width ``d_s``.
        num_heads: heads of the side blocks.
        mlp_ratio: MLP ratio of the side blocks.
        dropout: dropout inside the side blocks.

    Example::

        >>> branch = SideBranch(hidden_dim=16, num_layers=3, side_dim=4, num_heads=2)
        >>> branch([torch.randn(2, 5, 16)] * 3).shape
        torch.Size([2, 5, 4])
    """

    def __init__(
        self,
        hidden_dim: int,
        num_layers: int,
        side_dim: int,
        num_heads: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(hidden_dim, side_dim) for _ in range(num_layers))
        self.blocks = nn.ModuleList(
            SideBlock(side_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(side_dim)

    def forward(self, hiddens: list[Tensor], keep: Tensor | None = None, mode: str = "exclude") -> Tensor:
        """Side features ``[B, T, d_s]`` from the ``L`` backbone hidden states ``[B, T, d]``."""
        if len(hiddens) != len(self.maps):
            raise ValueError(
                f"SideBranch: expected {len(self.maps)} hidden states (one per layer), got {len(hiddens)}."
            )
        s = None
        for h, lin, blk in zip(hiddens, self.maps, self.blocks):
            u = F.gelu(lin(h))
            s = u if s is None else s + u
            s = blk(s, keep, mode)
        return self.norm(s)


class ExplainerHead(nn.Module):
    """Explainer head: ``num_layers`` side blocks, then ``LN -> Linear -> GELU -> Linear -> GELU -> Linear(C)``.

    Args:
        side_dim: side width ``d_s``.
        num_heads: heads of the side blocks.
        num_classes: ``C``.
        hidden_dim: width of the MLP (3072 in the paper for ViT-B/16).
        num_layers: side attention blocks before the MLP (1 in the paper).
        mlp_ratio: MLP ratio of the blocks.
        dropout: dropout inside the blocks.

    Example::

        >>> head = ExplainerHead(side_dim=8, num_heads=2, num_classes=3, hidden_dim=16)
        >>> head(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 3])
    """

    def __init__(
        self,
        side_dim: int,
        num_heads: int,
        num_classes: int,
        hidden_dim: int = 3072,
        num_layers: int = 1,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SideBlock(side_dim, num_heads, mlp_ratio, dropout, first_norm=i > 0) for i in range(num_layers)
        )
        self.mlp = nn.Sequential(
            nn.LayerNorm(side_dim),
            nn.Linear(side_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, x: Tensor, keep: Tensor | None = None, mode: str = "exclude") -> Tensor:
        """Per-token class scores ``[B, T, C]`` from side features ``[B, T, d_s]``."""
        for blk in self.blocks:
            x = blk(x, keep, mode)
        return self.mlp(x)
