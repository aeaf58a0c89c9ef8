"""DreamerV3 networks: BEV/vector encoder and decoder, the RSSM with discrete latents, heads, actor and critic.

Structure after DreamerV3 (arXiv 2301.04104, Sec. 3 and Appendix B) and its PyTorch ports (NM512's
``networks.py``, sheeprl's ``dreamer_v3/agent.py``); written here from the equations:

* RSSM: ``h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])``; prior ``p(z_t | h_t)``; posterior
  ``q(z_t | h_t, e_t)``; ``z`` is ``groups`` one-hot categoricals of ``classes`` each, sampled with
  straight-through gradients and 1% unimix.
* Every layer is Linear/Conv + LayerNorm + SiLU; reward and critic output layers start at zero.
* The CNN halves the resolution with stride-2 4x4 convolutions until 4x4, doubling the channels from
  ``cnn_depth``; the decoder mirrors it.

Speed (CPU): the convolutions run in channels-last memory format (2-4x faster forward + backward than
NCHW at the small size; :class:`ChannelNorm`'s permute is then free), and :meth:`RSSM.observe` splits
the first layers of its input and posterior MLPs, ``W [z, a]`` and ``W [h, e]``, so that the action and
embedding halves are one matrix product over the whole sequence, leaving only the recurrent halves in
the per-step loop; the prior is evaluated once on all deterministic states after the loop. These are
the same functions of the same parameters (equal up to float rounding; ``tests/test_rl_speed.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.rl.dreamer.functional import symlog, unimix_logits

__all__ = ["RSSMState", "DreamerMLP", "MLP", "ChannelNorm", "Encoder", "Decoder", "RSSM"]


@dataclass
class RSSMState:
    """Deterministic ``deter [B, D]``, stochastic one-hot ``stoch [B, G, K]`` and its ``logits [B, G, K]``.

    Example::

        >>> s = RSSMState(torch.zeros(2, 8), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
        >>> s.feat().shape  # deter + groups * classes
        torch.Size([2, 20])
    """

    deter: Tensor
    stoch: Tensor
    logits: Tensor

    def feat(self) -> Tensor:
        return torch.cat([self.deter, self.stoch.flatten(-2)], dim=-1)

    def detach(self) -> RSSMState:
        return RSSMState(self.deter.detach(), self.stoch.detach(), self.logits.detach())


class DreamerMLP(nn.Sequential):
    """``layers`` x (Linear, LayerNorm, SiLU), then an optional Linear output (``zero_init`` for heads).

    Example::

        >>> DreamerMLP(8, 16, layers=2, out_dim=3)(torch.zeros(5, 8)).shape
        torch.Size([5, 3])
    """

    def __init__(self, in_dim: int, units: int, layers: int, out_dim: int | None = None, zero_init: bool = False) -> None:
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers):
            mods += [nn.Linear(dim, units, bias=False), nn.LayerNorm(units), nn.SiLU()]
            dim = units
        if out_dim is not None:
            head = nn.Linear(dim, out_dim)
            if zero_init:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            mods.append(head)
        super().__init__(*mods)
        self.out_features = out_dim if out_dim is not None else dim


#: The former name (kept for imports); ``lightning_eff.models.MLP`` is the image MLP that ``--model.net MLP`` means.
MLP = DreamerMLP


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel of ``[B, C, H, W]`` maps.

    Example::

        >>> y = ChannelNorm(3)(torch.randn(2, 3, 4, 4))
        >>> bool(y.mean(1).abs().max() < 1e-5)
        True
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _stages(image_size: int) -> int:
    stages = int(round(math.log2(image_size / 4)))
    if image_size < 4 or 4 * 2**stages != image_size:
        raise ValueError(f"BEV size must be 4 * 2**k (4, 8, 16, 32, 64, 128, ...), got {image_size}.")
    return stages


class Encoder(nn.Module):
    """BEV CNN + symlog vector MLP -> embedding ``[B, embed_dim]``.

    Example::

        >>> enc = Encoder(bev_channels=3, bev_size=16, vec_dim=4, cnn_depth=4, mlp_units=8, mlp_layers=1)
        >>> enc(torch.zeros(2, 3, 16, 16), torch.zeros(2, 4)).shape == (2, enc.embed_dim)
        True
    """

    def __init__(self, bev_channels: int, bev_size: int, vec_dim: int, cnn_depth: int, mlp_units: int, mlp_layers: int) -> None:
        super().__init__()
        stages = _stages(bev_size)
        mods: list[nn.Module] = []
        ch_in = bev_channels
        for i in range(stages):
            ch = cnn_depth * 2**i
            mods += [nn.Conv2d(ch_in, ch, 4, stride=2, padding=1, bias=False), ChannelNorm(ch), nn.SiLU()]
            ch_in = ch
        self.cnn = nn.Sequential(*mods)
        self.cnn_out = ch_in * 16
        self.mlp = DreamerMLP(vec_dim, mlp_units, mlp_layers)
        self.embed_dim = self.cnn_out + self.mlp.out_features

    def forward(self, bev: Tensor, vec: Tensor) -> Tensor:
        bev = bev.to(torch.float32, memory_format=torch.channels_last)
        return torch.cat([self.cnn(bev).flatten(1), self.mlp(symlog(vec))], dim=-1)


class Decoder(nn.Module):
    """Features -> BEV logits ``[B, C, H, W]`` (Bernoulli per pixel) and symlog vector ``[B, vec_dim]``.

    Example::

        >>> dec = Decoder(feat_dim=10, bev_channels=3, bev_size=16, vec_dim=4, cnn_depth=4, mlp_units=8, mlp_layers=1)
        >>> [t.shape for t in dec(torch.zeros(2, 10))]
        [torch.Size([2, 3, 16, 16]), torch.Size([2, 4])]
    """

    def __init__(
        self, feat_dim: int, bev_channels: int, bev_size: int, vec_dim: int, cnn_depth: int, mlp_units: int, mlp_layers: int
    ) -> None:
        super().__init__()
        stages = _stages(bev_size)
        self.top = cnn_depth * 2 ** max(stages - 1, 0)
        self.proj = nn.Linear(feat_dim, self.top * 16)
        mods: list[nn.Module] = []
        ch_in = self.top
        for i in reversed(range(stages)):
            last = i == 0
            ch = bev_channels if last else cnn_depth * 2 ** (i - 1)
            mods.append(nn.ConvTranspose2d(ch_in, ch, 4, stride=2, padding=1, bias=last))
            if not last:
                mods += [ChannelNorm(ch), nn.SiLU()]
            ch_in = ch
        if stages == 0:
            mods.append(nn.Conv2d(ch_in, bev_channels, 1))
        self.cnn = nn.Sequential(*mods)
        self.mlp = DreamerMLP(feat_dim, mlp_units, mlp_layers, out_dim=vec_dim)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """BEV logits (in channels-last memory format) and the symlog vector prediction."""
        x = self.proj(feat).view(-1, self.top, 4, 4).contiguous(memory_format=torch.channels_last)
        return self.cnn(x), self.mlp(feat)


class RSSM(nn.Module):
    """Recurrent state-space model with discrete latents (DreamerV3 Eq. 1).

    Args:
        embed_dim: encoder output size.
        num_actions: size of the one-hot action.
        deter: GRU state size.
        groups, classes: the stochastic state is ``groups`` categoricals of ``classes`` values.
        units: hidden width of the input, prior and posterior layers.
        unimix: uniform mixture of the latent categoricals.

    Example::

        >>> rssm = RSSM(embed_dim=6, num_actions=3, deter=8, groups=2, classes=4, units=8)
        >>> s = rssm.initial(5)
        >>> s = rssm.observe_step(s, torch.zeros(5, 3), torch.zeros(5, 6))
        >>> s.feat().shape
        torch.Size([5, 16])
    """

    def __init__(
        self, embed_dim: int, num_actions: int, deter: int, groups: int, classes: int, units: int, unimix: float = 0.01
    ) -> None:
        super().__init__()
        self.deter_dim, self.groups, self.classes, self.unimix = deter, groups, classes, unimix
        self.num_actions = num_actions
        self.inp = DreamerMLP(groups * classes + num_actions, units, 1)
        self.gru = nn.GRUCell(units, deter)
        self.gru_norm = nn.LayerNorm(deter)
        self.prior_net = DreamerMLP(deter, units, 1, out_dim=groups * classes)
        self.post_net = DreamerMLP(deter + embed_dim, units, 1, out_dim=groups * classes)
        self.feat_dim = deter + groups * classes

    def initial(self, batch: int, device: torch.device | None = None) -> RSSMState:
        device = device or self.gru.weight_hh.device
        z = torch.zeros(batch, self.groups, self.classes, device=device)
        return RSSMState(torch.zeros(batch, self.deter_dim, device=device), z, z.clone())

    def _dist(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Straight-through sample of ``groups`` categoricals with unimix; returns ``(sample, mixed logits)``."""
        logits = logits.view(*logits.shape[:-1], self.groups, self.classes)
        probs = logits.softmax(-1)
        if self.unimix > 0.0:
            probs = (1.0 - self.unimix) * probs + self.unimix / self.classes
            logits = torch.log(probs)  # = unimix_logits(logits), whose softmax is probs
        idx = torch.multinomial(probs.reshape(-1, self.classes), 1).view(probs.shape[:-1])
        onehot = F.one_hot(idx, self.classes).to(probs.dtype)
        return onehot + (probs - probs.detach()), logits

    def _mode(self, logits: Tensor) -> Tensor:
        return F.one_hot(logits.argmax(-1), self.classes).to(logits.dtype)

    # The first Linear of ``inp`` acts on [z, a] and that of ``post_net`` on [h, e]: W [x, y] = W_x x + W_y y.
    def _inp_weights(self) -> tuple[Tensor, Tensor]:
        w = self.inp[0].weight
        k = self.groups * self.classes
        return w[:, :k], w[:, k:]

    def _post_weights(self) -> tuple[Tensor, Tensor]:
        w = self.post_net[0].weight
        return w[:, : self.deter_dim], w[:, self.deter_dim :]

    def _action_proj(self, action: Tensor) -> Tensor:
        """``W_a a`` for one-hot ``[..., A]`` actions or integer ``[...]`` action indices."""
        w_a = self._inp_weights()[1]
        if action.dtype in (torch.int64, torch.int32):
            return w_a.t()[action]
        return F.linear(action, w_a)

    def _recurrent(self, state: RSSMState, action_proj: Tensor) -> Tensor:
        """``h' = LN(GRU(h, SiLU(LN(W_z z + W_a a))))`` given ``W_a a``."""
        x = F.linear(state.stoch.flatten(-2), self._inp_weights()[0]) + action_proj
        x = self.inp[2](self.inp[1](x))
        return self.gru_norm(self.gru(x, state.deter))

    def _posterior(self, deter: Tensor, embed_proj: Tensor) -> Tensor:
        """Posterior logits given ``W_e e`` (the embedding half of ``post_net``'s first layer)."""
        x = F.linear(deter, self._post_weights()[0]) + embed_proj
        return self.post_net[3](self.post_net[2](self.post_net[1](x)))

    def prior_logits(self, deter: Tensor) -> Tensor:
        """Unimix prior logits ``[..., groups, classes]`` of deterministic states ``[..., deter]``."""
        logits = self.prior_net(deter)
        return unimix_logits(logits.view(*logits.shape[:-1], self.groups, self.classes), self.unimix)

    def reset_where(self, state: RSSMState, is_first: Tensor) -> RSSMState:
        """Replace the state by the initial one where ``is_first`` (``[B]``) is 1."""
        keep = (1.0 - is_first.float()).view(-1, 1)
        return RSSMState(state.deter * keep, state.stoch * keep.unsqueeze(-1), state.logits * keep.unsqueeze(-1))

    def imagine_step(self, state: RSSMState, action: Tensor, sample: bool = True) -> RSSMState:
        """Prior step: ``h' = GRU(h, [z, a])``, ``z' ~ p(z' | h')``; ``action``: one-hot ``[B, A]`` or indices ``[B]``."""
        deter = self._recurrent(state, self._action_proj(action))
        stoch, logits = self._dist(self.prior_net(deter))
        if not sample:
            stoch = self._mode(logits)
        return RSSMState(deter, stoch, logits)

    def observe_step(self, state: RSSMState, action: Tensor, embed: Tensor, sample: bool = True) -> RSSMState:
        """Posterior step; the returned ``logits`` are the posterior's (the prior's are in :meth:`observe`)."""
        deter = self._recurrent(state, self._action_proj(action))
        stoch, logits = self._dist(self._posterior(deter, F.linear(embed, self._post_weights()[1])))
        if not sample:
            stoch = self._mode(logits)
        return RSSMState(deter, stoch, logits)

    def observe(
        self, embed: Tensor, actions: Tensor, is_first: Tensor, state: RSSMState | None = None
    ) -> tuple[RSSMState, Tensor]:
        """Filter a sequence (time first).

        Args:
            embed: ``[T, B, E]``; actions: ``[T, B, A]`` one-hot *previous* actions; is_first: ``[T, B]``.

        Returns:
            ``(posteriors, prior_logits)``: a stacked :class:`RSSMState` with ``[T, B, ...]`` fields, and the
            prior logits ``[T, B, G, K]``.
        """
        steps = embed.shape[0]
        state = state or self.initial(embed.shape[1], embed.device)
        keep = 1.0 - is_first.float().unsqueeze(-1)  # [T, B, 1]
        # The halves of the input and posterior layers that do not depend on the recurrent state, for all
        # steps at once (the action of an episode's first step is zeroed, as the state is).
        action_proj = self._action_proj(actions * keep)
        embed_proj = F.linear(embed, self._post_weights()[1])
        deters, stochs, post_logits = [], [], []
        deter, stoch = state.deter, state.stoch
        resets = is_first.bool().any(-1).tolist()  # steps where some sequence starts an episode
        for t in range(steps):
            if resets[t]:
                k = keep[t]
                deter, stoch = deter * k, stoch * k.unsqueeze(-1)
            deter = self._recurrent(RSSMState(deter, stoch, stoch), action_proj[t])
            stoch, post = self._dist(self._posterior(deter, embed_proj[t]))
            deters.append(deter)
            stochs.append(stoch)
            post_logits.append(post)
        deter_seq = torch.stack(deters)
        stacked = RSSMState(deter_seq, torch.stack(stochs), torch.stack(post_logits))
        return stacked, self.prior_logits(deter_seq)
