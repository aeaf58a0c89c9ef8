"""Think2Drive: model-based RL in a latent world model for driving, as a ``LightningModule``.

Paper: Q. Li, X. Jia, S. Wang, J. Yan, "Think2Drive: Efficient Reinforcement Learning by Thinking in
Latent World Model for Quasi-Realistic Autonomous Driving (in CARLA-v2)", ECCV 2024, arXiv 2402.16720.
There is no official code; the unofficial JAX reproduction is jkli-2/CaRL (``Think2Drive/``). The
learner is DreamerV3 (Hafner et al., arXiv 2301.04104; PyTorch ports NM512/dreamerv3-torch and
Eclectic-Sheep/sheeprl), equation numbers below are DreamerV3's:

* World model (Eq. 1, 5): RSSM with discrete latents; BEV decoder (Bernoulli per mask pixel), vector
  decoder (symlog MSE), reward head (two-hot over symlog bins, Eq. 9-11), continuation head
  (Bernoulli); loss ``b_pred L_pred + b_dyn L_dyn + b_rep L_rep`` with KL balancing and free bits.
* Actor-critic in imagination (Eq. 6-8), horizon 15: lambda-returns, a two-hot critic trained on
  them and regularised towards its slow EMA copy, REINFORCE actor on returns normalised by the
  5-95 percentile range, entropy bonus, 1% unimix.
* Think2Drive's bricks: (1) planner reset (``planner_reset_interval``: actor, critic and their
  optimisers re-initialised, world model kept); (3) termination-priority replay and (5) warm-up
  curriculum and (7) parallel environments (in :class:`~lightning_eff.rl.data.DrivingDataModule`);
  (4) steering cost (in the environment's reward); (6) planner train ratio rising linearly from
  ``planner_ratio_start`` to ``planner_ratio_end`` actor-critic updates per world-model update.
  Brick (2), short scenario-dense routes, is the scenario suite of the environment.

Three optimisers with manual optimisation (world model, actor, critic). ``trainer.global_step``
counts every optimiser step; the interaction budget is set in environment steps by the data module
(``env_steps_per_epoch`` x ``max_epochs``). DDP: each rank steps its own environments and replay;
with ``planner_ratio_end > 1`` the extra actor-critic updates leave the world model out of their
backward pass, so use ``strategy="ddp_find_unused_parameters_true"`` (both are tested on 2 CPU ranks:
the ranks end with identical weights).

Departures:

* The BEV decoder is a per-pixel Bernoulli (the masks are binary) instead of DreamerV3's MSE on images.
* Think2Drive's BEV is 128x128x34 in CARLA; on highway-env there are no lights, signs or walkers, so
  the stack has 10 channels (see :class:`~lightning_eff.rl.envs.BEVRasterizer`).
* The GRU is ``torch.nn.GRUCell`` followed by LayerNorm (DreamerV3 uses its own normalised GRU).
* Imagined continuations enter the lambda-returns and loss weights as the continue head's probability;
  DreamerV3's code takes its mode (0 or 1). The start state's continuation is the real one, as there.

Cost (``docs/methods/think2drive_agent.md``, ``benchmarks/rl_update_speed.py``): the actor-critic update
dominates (15 imagined steps from every posterior state of the batch, 255-bin heads on all imagined
states). ``imagine_last`` (DreamerV3's ``imag_last``) starts imagination from the last ``K`` steps of each
sequence only, and fewer ``bins`` shrink the heads; both default to DreamerV3's choice (all steps, 255).
"""

from __future__ import annotations

import copy
import io
import math
import os
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.rl.dreamer import (
    RSSM,
    Decoder,
    DreamerMLP,
    Encoder,
    ReturnNormalizer,
    RSSMState,
    kl_balance_loss,
    lambda_returns,
    symexp,
    symlog,
    twohot_decode,
    twohot_encode,
    unimix_logits,
)
from lightning_eff.rl.policies import Policy
from lightning_eff.utils.checks import check_float, check_int
from lightning_eff.utils.distributed import ProcessGroupCleanup
from lightning_eff.utils.io import atomic_write_bytes

__all__ = ["Think2Drive", "AgentPolicy"]

FORMAT_VERSION = 1
class Think2Drive(ProcessGroupCleanup, L.LightningModule):
    """Dreamer-style world-model RL for driving (see the module docstring).

    Args:
        num_actions: size of the environment's discrete action table.
        bev_channels, bev_size: BEV stack shape ``(C, size, size)``; ``size`` must be ``4 * 2**k``.
        vec_dim: size of the vector observation.
        deter: GRU state size. units: width of dense layers. mlp_layers: hidden layers per MLP.
        cnn_depth: channels of the first CNN stage (doubling at each stage).
        stoch_groups, stoch_classes: discrete latent ``groups x classes``.
        bins: two-hot bins of reward and critic (symlog space, ``[-20, 20]``).
        pred_scale, dyn_scale, rep_scale, free_bits: world-model loss weights and free nats.
        unimix: uniform mixture of every categorical.
        horizon: imagination horizon (>= 1). gamma, lambda_: discount and TD(lambda).
        imagine_last: imagination starts from the posterior states of the last ``imagine_last`` steps of
            each replayed sequence (DreamerV3's ``imag_last``; 0: all ``T`` steps, DreamerV3's default).
            The actor-critic update costs about ``imagine_last / T`` of its cost with all starts.
        entropy_coef: actor entropy bonus. slow_critic_fraction: EMA step of the slow critic.
        slow_reg: weight of the critic's regulariser towards the slow critic.
        return_decay: EMA decay of the return percentiles.
        world_model_lr, actor_lr, critic_lr, adam_eps: Adam settings of the three optimisers.
        world_model_clip, actor_clip, critic_clip: gradient-norm clipping.
        planner_ratio_start, planner_ratio_end, planner_ratio_steps: actor-critic updates per world-model
            update, rising linearly over ``planner_ratio_steps`` world-model updates (brick 6).
        planner_reset_interval: world-model updates between planner resets (0: never; brick 1).
        eval_greedy: evaluation drives with the actor's most likely action.
        rollout_images: save (and log) a BEV strip of the first evaluation episode.

    Example::

        >>> model = Think2Drive(num_actions=5, bev_channels=3, bev_size=16, vec_dim=4, deter=16, units=16,
        ...                     mlp_layers=1, cnn_depth=4, stoch_groups=2, stoch_classes=4, bins=15, horizon=3)
        >>> obs = {"bev": np.zeros((2, 3, 16, 16), np.uint8), "vec": np.zeros((2, 4), np.float32)}
        >>> actions, state = model.policy_step(obs, None, np.ones(2, bool))
        >>> actions.shape, bool(((0 <= actions) & (actions < 5)).all())
        ((2,), True)
    """

    def __init__(
        self,
        num_actions: int = 35,
        bev_channels: int = 10,
        bev_size: int = 64,
        vec_dim: int = 4,
        deter: int = 512,
        units: int = 512,
        mlp_layers: int = 2,
        cnn_depth: int = 32,
        stoch_groups: int = 32,
        stoch_classes: int = 32,
        bins: int = 255,
        pred_scale: float = 1.0,
        dyn_scale: float = 0.5,
        rep_scale: float = 0.1,
        free_bits: float = 1.0,
        unimix: float = 0.01,
        horizon: int = 15,
        imagine_last: int = 0,
        gamma: float = 0.997,
        lambda_: float = 0.95,
        entropy_coef: float = 3e-4,
        slow_critic_fraction: float = 0.02,
        slow_reg: float = 1.0,
        return_decay: float = 0.99,
        world_model_lr: float = 1e-4,
        actor_lr: float = 3e-5,
        critic_lr: float = 3e-5,
        adam_eps: float = 1e-8,
        world_model_clip: float = 1000.0,
        actor_clip: float = 100.0,
        critic_clip: float = 100.0,
        planner_ratio_start: float = 1.0,
        planner_ratio_end: float = 4.0,
        planner_ratio_steps: int = 10_000,
        planner_reset_interval: int = 0,
        eval_greedy: bool = True,
        rollout_images: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_actions", num_actions, 1),
            ("bev_channels", bev_channels, 1),
            ("bev_size", bev_size, 4),
            ("vec_dim", vec_dim, 1),
            ("deter", deter, 1),
            ("units", units, 1),
            ("mlp_layers", mlp_layers, 0),
            ("cnn_depth", cnn_depth, 1),
            ("stoch_groups", stoch_groups, 1),
            ("stoch_classes", stoch_classes, 2),
            ("bins", bins, 3),
            ("horizon", horizon, 1),
            ("imagine_last", imagine_last, 0),
            ("planner_ratio_steps", planner_ratio_steps, 1),
            ("planner_reset_interval", planner_reset_interval, 0),
        ):
            check_int(value, name, minimum=low, owner="Think2Drive")
        if bev_size < 4 or 4 * 2 ** int(round(math.log2(bev_size / 4))) != bev_size:
            raise ValueError(f"Think2Drive: bev_size must be 4 * 2**k (4, 8, 16, 32, 64, 128, ...), got {bev_size!r}.")
        for name, value in (("pred_scale", pred_scale), ("dyn_scale", dyn_scale), ("rep_scale", rep_scale),
                            ("free_bits", free_bits), ("entropy_coef", entropy_coef), ("slow_reg", slow_reg)):
            check_float(value, name, low=0.0, high=1e9, owner="Think2Drive")
        check_float(unimix, "unimix", low=0.0, high=1.0, owner="Think2Drive")
        check_float(gamma, "gamma", low=0.0, high=1.0, owner="Think2Drive")
        check_float(lambda_, "lambda_", low=0.0, high=1.0, owner="Think2Drive")
        check_float(
            slow_critic_fraction,
            "slow_critic_fraction",
            low=0.0,
            high=1.0,
            low_open=True,
            owner="Think2Drive",
        )
        check_float(return_decay, "return_decay", low=0.0, high=0.999999, owner="Think2Drive")
        for name, value in (("world_model_lr", world_model_lr), ("actor_lr", actor_lr), ("critic_lr", critic_lr),
                            ("adam_eps", adam_eps), ("world_model_clip", world_model_clip),
                            ("actor_clip", actor_clip), ("critic_clip", critic_clip)):
            check_float(value, name, low=0.0, high=1e12, low_open=True, owner="Think2Drive")
        check_float(
            planner_ratio_start, "planner_ratio_start", low=0.0, high=1e6, low_open=True, owner="Think2Drive"
        )
        check_float(
            planner_ratio_end, "planner_ratio_end", low=0.0, high=1e6, low_open=True, owner="Think2Drive"
        )
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.encoder = Encoder(bev_channels, bev_size, vec_dim, cnn_depth, units, mlp_layers)
        self.rssm = RSSM(self.encoder.embed_dim, num_actions, deter, stoch_groups, stoch_classes, units, unimix)
        feat = self.rssm.feat_dim
        self.decoder = Decoder(feat, bev_channels, bev_size, vec_dim, cnn_depth, units, mlp_layers)
        self.reward_head = DreamerMLP(feat, units, mlp_layers, out_dim=bins, zero_init=True)
        self.continue_head = DreamerMLP(feat, units, mlp_layers, out_dim=1)
        self.actor = DreamerMLP(feat, units, mlp_layers, out_dim=num_actions)
        self.critic = DreamerMLP(feat, units, mlp_layers, out_dim=bins, zero_init=True)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.return_norm = ReturnNormalizer(decay=return_decay)
        self.register_buffer("bins", torch.linspace(-20.0, 20.0, bins), persistent=False)
        self.wm_updates = 0
        self.planner_updates = 0
        self.planner_resets = 0
        self._planner_credit = 0.0
        self._eval_records: list[list[float]] = []
        self._eval_frames: np.ndarray | None = None

    # -- parameters -----------------------------------------------------------------------------------
    def world_model_parameters(self) -> list[nn.Parameter]:
        mods = (self.encoder, self.rssm, self.decoder, self.reward_head, self.continue_head)
        return [p for m in mods for p in m.parameters()]

    def configure_optimizers(self):
        h = self.hparams
        wm = torch.optim.Adam(self.world_model_parameters(), lr=h.world_model_lr, eps=h.adam_eps, foreach=True)
        actor = torch.optim.Adam(self.actor.parameters(), lr=h.actor_lr, eps=h.adam_eps, foreach=True)
        critic = torch.optim.Adam(self.critic.parameters(), lr=h.critic_lr, eps=h.adam_eps, foreach=True)
        return [wm, actor, critic]

    # -- checks ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)  # ProcessGroupCleanup
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "num_actions"):
            return
        h = self.hparams
        if dm.num_actions != h.num_actions:
            raise ValueError(
                f"Think2Drive: num_actions={h.num_actions} but the environment's action table has {dm.num_actions} "
                f"actions; set model.num_actions to {dm.num_actions} (or change the action table)."
            )
        expected = (h.bev_channels, h.bev_size, h.bev_size)
        if tuple(dm.bev_shape) != expected:
            raise ValueError(
                f"Think2Drive: the model expects BEV stacks {expected} but the environment gives {tuple(dm.bev_shape)}; "
                "make bev_channels / bev_size match the data module's BEV."
            )
        if dm.vec_dim != h.vec_dim:
            raise ValueError(f"Think2Drive: vec_dim={h.vec_dim} but the environment's vector observation has {dm.vec_dim}.")

    # -- acting ---------------------------------------------------------------------------------------
    def _obs_tensors(self, bev: Any, vec: Any) -> tuple[Tensor, Tensor]:
        bev = torch.as_tensor(np.asarray(bev), device=self.device).float()
        vec = torch.as_tensor(np.asarray(vec), device=self.device).float()
        return bev, vec

    @torch.no_grad()
    def policy_step(
        self, obs: dict[str, np.ndarray], state: Any, is_first: np.ndarray, explore: bool = True
    ) -> tuple[np.ndarray, Any]:
        """One decision for a batch of environments: filter the observation into the latent state, act.

        Args:
            obs: ``{"bev": [N, C, H, W], "vec": [N, D]}``.
            state: the previous ``(RSSMState, one-hot action)`` or ``None`` at the start.
            is_first: ``[N]`` whether each environment just started an episode.
            explore: sample from the actor (training) rather than take its mode.

        Returns:
            ``(actions [N] int64, new state)``.
        """
        bev, vec = self._obs_tensors(obs["bev"], obs["vec"])
        n = bev.shape[0]
        if state is None:
            state = (self.rssm.initial(n, self.device), torch.zeros(n, self.hparams.num_actions, device=self.device))
        latent, prev_action = state
        first = torch.as_tensor(np.asarray(is_first), device=self.device).float()
        latent = self.rssm.reset_where(latent, first)
        prev_action = prev_action * (1.0 - first).unsqueeze(-1)
        embed = self.encoder(bev, vec)
        latent = self.rssm.observe_step(latent, prev_action, embed, sample=explore)
        logits = unimix_logits(self.actor(latent.feat()), self.hparams.unimix)
        if explore:
            action = torch.distributions.Categorical(logits=logits).sample()
        else:
            action = logits.argmax(-1)
        onehot = F.one_hot(action, self.hparams.num_actions).float()
        return action.cpu().numpy(), (latent, onehot)

    # -- world model ----------------------------------------------------------------------------------
    def world_model_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, RSSMState, dict[str, Tensor]]:
        """DreamerV3 Eq. 5 on a ``[B, T]`` replay batch; returns ``(loss, posteriors [T, B], metrics)``.

        Only the RSSM filter runs time-first; the encoder, decoder and heads see the batch in its stored
        (batch-first) order, so that the ``[B, T, C, H, W]`` BEV is converted to float once, without a
        transposing copy.
        """
        h = self.hparams
        batch_size, steps = batch["reward"].shape
        bev = batch["bev"].flatten(0, 1).to(torch.float32, memory_format=torch.channels_last)  # [B*T, C, H, W]
        vec = batch["vec"].flatten(0, 1).float()
        embed = self.encoder(bev, vec).view(batch_size, steps, -1).transpose(0, 1)
        action = batch["action"].transpose(0, 1)
        onehot = F.one_hot(action.clamp(min=0), h.num_actions).float() * (action >= 0).unsqueeze(-1).float()
        post, prior_logits = self.rssm.observe(embed, onehot, batch["is_first"].transpose(0, 1))
        flat = post.feat().transpose(0, 1).flatten(0, 1)  # [B*T, F], batch-first like the targets
        bev_logits, vec_pred = self.decoder(flat)
        bev_loss = F.binary_cross_entropy_with_logits(bev_logits, bev, reduction="none").sum((1, 2, 3))
        vec_loss = ((vec_pred - symlog(vec)) ** 2).sum(-1)
        reward = batch["reward"].flatten().float()
        reward_logits = self.reward_head(flat)
        reward_target = twohot_encode(symlog(reward), self.bins)
        reward_loss = -(reward_target * F.log_softmax(reward_logits, -1)).sum(-1)
        cont_logit = self.continue_head(flat).squeeze(-1)
        cont_target = 1.0 - batch["terminal"].flatten().float()
        cont_loss = F.binary_cross_entropy_with_logits(cont_logit, cont_target, reduction="none")
        dyn, rep, kl = kl_balance_loss(post.logits, prior_logits, h.free_bits)
        pred = bev_loss + vec_loss + reward_loss + cont_loss
        loss = (h.pred_scale * pred + (h.dyn_scale * dyn + h.rep_scale * rep).t().flatten()).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Think2Drive: non-finite world-model loss (bev {bev_loss.mean().item():.3g}, vec "
                f"{vec_loss.mean().item():.3g}, reward {reward_loss.mean().item():.3g}, kl {kl.mean().item():.3g})."
            )
        with torch.no_grad():
            reward_pred = symexp(twohot_decode(reward_logits.softmax(-1), self.bins))
            metrics = {
                "wm/loss": loss.detach(),
                "wm/bev_loss": bev_loss.mean().detach(),
                "wm/vec_loss": vec_loss.mean().detach(),
                "wm/reward_loss": reward_loss.mean().detach(),
                "wm/continue_loss": cont_loss.mean().detach(),
                "wm/kl": kl.mean(),
                "wm/reward_mae": (reward_pred - reward).abs().mean(),
                "wm/bev_pixel_acc": (bev_logits > 0).eq(batch["bev"].flatten(0, 1).bool()).sum() / bev.numel(),
            }
        return loss, post, metrics

    # -- behaviour ------------------------------------------------------------------------------------
    def _actor_probs(self, logits: Tensor) -> Tensor:
        probs = logits.softmax(-1)
        if self.hparams.unimix > 0:
            probs = (1.0 - self.hparams.unimix) * probs + self.hparams.unimix / probs.shape[-1]
        return probs

    def imagine(self, start: RSSMState, horizon: int, actor_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Roll the actor in the world model (no gradient into the world model).

        Returns features ``[H + 1, N, F]``, actions ``[H, N]`` and the actor's logits ``[H, N, A]`` at the
        first ``H`` states (with a gradient into the actor if ``actor_grad``, so that the actor loss
        reuses them instead of running the actor again). Actions are drawn as
        ``torch.distributions.Categorical`` draws them (``multinomial`` with replacement), without its
        argument checks.
        """
        feats, actions, logits = [start.feat().detach()], [], []
        state = start.detach()
        for _ in range(horizon):
            with torch.set_grad_enabled(actor_grad and torch.is_grad_enabled()):
                step_logits = self.actor(feats[-1])
            with torch.no_grad():
                action = torch.multinomial(self._actor_probs(step_logits.detach()), 1, True).squeeze(-1)
                state = self.rssm.imagine_step(state, action)
            feats.append(state.feat())
            actions.append(action)
            logits.append(step_logits)
        return torch.stack(feats), torch.stack(actions), torch.stack(logits)

    def imagination_starts(self, post: RSSMState, terminal: Tensor) -> tuple[RSSMState, Tensor]:
        """Detached starting states of imagination and their continuation flags, ``[K * B]`` each.

        ``post`` holds the ``[T, B]`` posteriors of :meth:`world_model_loss`, ``terminal`` the batch's ``[B, T]``
        flags; the starts are the last ``K = min(imagine_last or T, T)`` steps of every sequence.
        """
        steps = post.deter.shape[0]
        k = min(self.hparams.imagine_last or steps, steps)
        start = RSSMState(*(x[-k:].flatten(0, 1) for x in (post.deter, post.stoch, post.logits))).detach()
        start_continue = 1.0 - terminal.transpose(0, 1)[-k:].flatten().float()
        return start, start_continue

    def _critic_value(self, net: nn.Module, feat: Tensor) -> Tensor:
        return symexp(twohot_decode(net(feat).softmax(-1), self.bins))

    def behaviour_losses(self, start: RSSMState, start_continue: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Actor and critic losses on trajectories imagined from ``start`` (DreamerV3 Eq. 6-8).

        The actor's logits of the imagination are those of its loss, and the critic runs once on each
        imagined state: its detached output gives the values of the lambda-returns, the rest its loss.
        """
        h = self.hparams
        feats, actions, actor_logits = self.imagine(start, h.horizon, actor_grad=True)
        critic_logits = self.critic(feats[:-1])
        with torch.no_grad():
            rewards = symexp(twohot_decode(self.reward_head(feats[1:]).softmax(-1), self.bins))
            conts = torch.sigmoid(self.continue_head(feats[1:]).squeeze(-1))
            discounts = h.gamma * conts
            values = symexp(twohot_decode(critic_logits.detach().softmax(-1), self.bins))
            values = torch.cat([values, self._critic_value(self.critic, feats[-1:])])
            returns = lambda_returns(rewards, values[:-1], discounts, values[-1], h.lambda_)
            weight = torch.cumprod(torch.cat([start_continue.unsqueeze(0), discounts[:-1]], dim=0), dim=0)
            scale = self.return_norm.update(self._gather(returns))
            advantage = (returns - values[:-1]) / scale
            slow_value = self._critic_value(self.slow_critic, feats[:-1])

        log_probs = F.log_softmax(unimix_logits(actor_logits, h.unimix), -1)
        log_pi = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        actor_loss = -(weight * (log_pi * advantage + h.entropy_coef * entropy)).mean()

        critic_log_probs = F.log_softmax(critic_logits, -1)
        target = twohot_encode(symlog(returns), self.bins)
        slow_target = twohot_encode(symlog(slow_value), self.bins)
        critic_nll = -(target * critic_log_probs).sum(-1)
        slow_nll = -(slow_target * critic_log_probs).sum(-1)
        critic_loss = (weight * (critic_nll + h.slow_reg * slow_nll)).mean()
        metrics = {
            "planner/actor_loss": actor_loss.detach(),
            "planner/critic_loss": critic_loss.detach(),
            "planner/entropy": entropy.mean().detach(),
            "planner/return": returns.mean(),
            "planner/value": values.mean(),
            "planner/return_scale": scale.detach(),
            "planner/imagined_reward": rewards.mean(),
        }
        return actor_loss, critic_loss, metrics

    def _gather(self, x: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.all_gather(x).flatten()
        return x

    @torch.no_grad()
    def _update_slow_critic(self) -> None:
        mix = self.hparams.slow_critic_fraction
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.mul_(1.0 - mix).add_(mix * fast.detach())

    def planner_ratio(self) -> float:
        """Actor-critic updates per world-model update at the current step (brick 6)."""
        h = self.hparams
        frac = min(self.wm_updates / h.planner_ratio_steps, 1.0)
        return h.planner_ratio_start + frac * (h.planner_ratio_end - h.planner_ratio_start)

    def reset_planner(self) -> None:
        """Re-initialise actor, critic, slow critic, their optimiser states and the return scale (brick 1)."""
        for net in (self.actor, self.critic):
            for m in net.modules():
                if isinstance(m, (nn.Linear, nn.LayerNorm)):
                    m.reset_parameters()
        last = self.critic[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.slow_critic.load_state_dict(self.critic.state_dict())
        self.return_norm.reset()
        if self._trainer is not None:
            for opt in self.optimizers()[1:]:
                opt.optimizer.state.clear()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank re-draws from its own RNG: take rank 0's draw so that the replicas stay equal
            for net in (self.actor, self.critic, self.slow_critic):
                for p in net.parameters():
                    torch.distributed.broadcast(p.data, src=0)
        self.planner_resets += 1

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        h = self.hparams
        opts = self.optimizers()
        clips = (h.world_model_clip, h.actor_clip, h.critic_clip)
        # As DreamerV3: world-model, actor and critic losses from the same parameters, one backward pass
        # (their parameter sets are disjoint: the behaviour losses see detached latent states), then
        # each optimiser steps with its own clipping.
        wm_loss, post, metrics = self.world_model_loss(batch)
        start, start_continue = self.imagination_starts(post, batch["terminal"])
        self._planner_credit += self.planner_ratio()
        planner_now = self._planner_credit >= 1.0
        total = wm_loss
        if planner_now:
            self._planner_credit -= 1.0
            actor_loss, critic_loss, ac_metrics = self.behaviour_losses(start, start_continue)
            total = total + actor_loss + critic_loss
            metrics.update(ac_metrics)
        active = [0, 1, 2] if planner_now else [0]
        for i in active:
            opts[i].zero_grad()
        self.manual_backward(total)
        for i in active:
            self.clip_gradients(opts[i], gradient_clip_val=clips[i], gradient_clip_algorithm="norm")
            opts[i].step()
        self.wm_updates += 1
        if planner_now:
            self._update_slow_critic()
            self.planner_updates += 1
        # Planner train ratio > 1 (brick 6): further actor-critic updates on the same starting states,
        # imagined with the updated world model.
        while self._planner_credit >= 1.0:
            self._planner_credit -= 1.0
            actor_loss, critic_loss, ac_metrics = self.behaviour_losses(start, start_continue)
            opts[1].zero_grad()
            opts[2].zero_grad()
            self.manual_backward(actor_loss + critic_loss)
            for i in (1, 2):
                self.clip_gradients(opts[i], gradient_clip_val=clips[i], gradient_clip_algorithm="norm")
                opts[i].step()
            self._update_slow_critic()
            self.planner_updates += 1
            metrics.update(ac_metrics)
        if h.planner_reset_interval and self.wm_updates % h.planner_reset_interval == 0:
            self.reset_planner()

        metrics["train/planner_ratio"] = torch.tensor(self.planner_ratio())
        metrics["train/termination_batch_fraction"] = batch["from_termination"].float().mean()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "env_steps"):
            metrics["train/env_steps"] = torch.tensor(float(dm.env_steps))
            episodes = dm.pop_finished_episodes()
            if episodes:
                for key in ("return", "route_completion", "collision", "completed"):
                    metrics[f"train/episode_{key}"] = torch.tensor(float(np.mean([e[key] for e in episodes])))
        self.log_dict({k: v.float() for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      prog_bar=False, batch_size=batch["reward"].shape[0])
        self.log("wm/loss_epoch", metrics["wm/loss"], on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch["reward"].shape[0])

    # -- evaluation -----------------------------------------------------------------------------------
    _EVAL_FIELDS = ("driving_score", "weighted_driving_score", "route_completion", "collision",
                    "collision_vehicle", "collision_static", "route_deviation", "timeout", "route_timeout",
                    "completed", "return", "length")

    def on_validation_epoch_start(self) -> None:
        self._eval_records, self._eval_frames = [], None

    on_test_epoch_start = on_validation_epoch_start

    def _eval_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from lightning_eff.rl.policies import run_episode

        dm = self.trainer.datamodule
        env = dm.eval_env()
        record = run_episode(
            env, AgentPolicy(self, greedy=self.hparams.eval_greedy), batch["scenario"], int(batch["seed"]),
            record_frames=self.hparams.rollout_images and self._eval_frames is None,
        )
        if "frames" in record:
            self._eval_frames = record.pop("frames")
        scenario_id = float(env.unwrapped.SCENARIOS.index(record["scenario"]))
        self._eval_records.append([scenario_id] + [float(record[k]) for k in self._EVAL_FIELDS])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def _eval_epoch_end(self, stage: str) -> None:
        width = 1 + len(self._EVAL_FIELDS)
        local = torch.tensor(self._eval_records, dtype=torch.float64, device=self.device).reshape(-1, width)
        table = self.all_gather(local).reshape(-1, width) if self.trainer.world_size > 1 else local
        if len(table) == 0:
            return
        env_cls = type(self.trainer.datamodule.eval_env().unwrapped)
        means = table[:, 1:].mean(0)
        out = {f"{stage}/{k}": means[i] for i, k in enumerate(self._EVAL_FIELDS)}
        out[f"{stage}/episodes"] = torch.tensor(float(len(table)))
        for sid in table[:, 0].unique().tolist():
            rows = table[table[:, 0] == sid]
            name = env_cls.SCENARIOS[int(sid)]
            for key in ("driving_score", "route_completion", "collision"):
                out[f"{stage}/{name}/{key}"] = rows[:, 1 + self._EVAL_FIELDS.index(key)].mean()
        self.log_dict({k: v.float() for k, v in out.items()}, prog_bar=False, rank_zero_only=False, sync_dist=False)
        self.log(f"{stage}/ds", out[f"{stage}/driving_score"].float(), prog_bar=True)
        # trainer.log_dir broadcasts from rank 0: every rank asks, only rank 0 writes.
        root = self.trainer.log_dir or self.trainer.default_root_dir
        if self._eval_frames is not None and self.trainer.is_global_zero:
            self._save_rollout_strip(stage, self._eval_frames, root)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _save_rollout_strip(self, stage: str, frames: np.ndarray, root: str, max_frames: int = 12) -> str | None:
        """Save a PNG strip of BEV frames (atomically) and log it to loggers that take images."""
        from PIL import Image

        from lightning_eff.rl.envs import colorize

        channels = tuple(self.trainer.datamodule.eval_env().bev_channels)
        idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
        tiles = [colorize(frames[i], channels) for i in idx]
        pad = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
        strip = np.concatenate([x for t in tiles for x in (t, pad)][:-1], axis=1)
        scale = max(1, 128 // strip.shape[0])
        strip = strip.repeat(scale, 0).repeat(scale, 1)
        folder = os.path.join(root, "rollouts")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{stage}_epoch{self.current_epoch:04d}_step{self.global_step}.png")
        buffer = io.BytesIO()
        Image.fromarray(strip).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"{stage}/rollout", images=[path], step=self.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image(f"{stage}/rollout", strip, self.global_step, dataformats="HWC")
        self.last_rollout_path = path
        return path

    # -- checkpointing --------------------------------------------------------------------------------
    def environment_spec(self) -> tuple[str, dict[str, Any]] | None:
        """``(env_name, env_kwargs)`` of the attached :class:`~lightning_eff.rl.DrivingDataModule` (``None`` if
        there is none): what :func:`~lightning_eff.rl.load_agent` needs to rebuild the training environment."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "env_kwargs"):
            return None
        return str(getattr(dm, "env_name", "highway-bev")), dict(dm.env_kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["think2drive"] = {
            "format_version": FORMAT_VERSION,
            "wm_updates": self.wm_updates,
            "planner_updates": self.planner_updates,
            "planner_resets": self.planner_resets,
            "planner_credit": self._planner_credit,
        }
        spec = self.environment_spec()
        if spec is not None:  # read by lightning_eff.rl.load_agent
            checkpoint["think2drive"]["env_name"], checkpoint["think2drive"]["env_kwargs"] = spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("think2drive")
        if state is None:
            return
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"Think2Drive: unsupported checkpoint format {state.get('format_version')!r}.")
        self.wm_updates = int(state.get("wm_updates", 0))
        self.planner_updates = int(state.get("planner_updates", 0))
        self.planner_resets = int(state.get("planner_resets", 0))
        self._planner_credit = float(state.get("planner_credit", 0.0))


class AgentPolicy(Policy):
    """Drives one environment with a :class:`Think2Drive` module (evaluation and the benchmark).

    Example::

        >>> from lightning_eff.rl.envs import HighwayBEVEnv
        >>> from lightning_eff.rl.policies import run_episode
        >>> env = HighwayBEVEnv("merge", bev_size=16, resolution=4.0)
        >>> model = Think2Drive(bev_size=16, deter=16, units=16, mlp_layers=1, cnn_depth=4, stoch_groups=2,
        ...                     stoch_classes=4, bins=15)
        >>> run_episode(env, AgentPolicy(model), seed=0)["length"] > 0
        True
    """

    def __init__(self, module: Think2Drive, greedy: bool = True) -> None:
        self.module, self.greedy = module, greedy
        self.state: Any = None
        self.first = True

    def reset(self, env: Any) -> None:
        self.state, self.first = None, True

    def act(self, obs: dict[str, np.ndarray], env: Any) -> int:
        batch = {"bev": obs["bev"][None], "vec": obs["vec"][None]}
        was_training = self.module.training
        self.module.eval()
        try:
            action, self.state = self.module.policy_step(batch, self.state, np.array([self.first]), explore=not self.greedy)
        finally:
            self.module.train(was_training)
        self.first = False
        return int(action[0])
