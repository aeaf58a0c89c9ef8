"""The Think2Drive losses computed the way the module computed them before the speed work (commit 07e3277).

A slow, straightforward reference: NCHW convolutions, the batch transposed to time-first before the encoder,
one RSSM step at a time with the prior inside the loop, ``torch.distributions.Categorical`` sampling in
imagination, the critic evaluated twice, ``binary_cross_entropy_with_logits``. It uses the module's own
parameters, so the optimised module must give the same losses on the same batch and random seed
(``tests/test_rl_speed.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_eff.rl.dreamer import (
    RSSMState,
    kl_balance_loss,
    lambda_returns,
    symexp,
    symlog,
    twohot_decode,
    twohot_encode,
    unimix_logits,
)


def _dist(rssm, logits):
    logits = unimix_logits(logits.view(*logits.shape[:-1], rssm.groups, rssm.classes), rssm.unimix)
    probs = logits.softmax(-1)
    idx = torch.multinomial(probs.reshape(-1, rssm.classes), 1).view(probs.shape[:-1])
    onehot = F.one_hot(idx, rssm.classes).to(probs.dtype)
    return onehot + probs - probs.detach(), logits


def _reset_where(state, is_first):
    keep = (1.0 - is_first.float()).view(-1, 1)
    return RSSMState(state.deter * keep, state.stoch * keep.unsqueeze(-1), state.logits * keep.unsqueeze(-1))


def observe(rssm, embed, actions, is_first):
    steps = embed.shape[0]
    state = rssm.initial(embed.shape[1], embed.device)
    deters, stochs, post_logits, prior_logits = [], [], [], []
    for t in range(steps):
        state = _reset_where(state, is_first[t])
        act = actions[t] * (1.0 - is_first[t].float()).unsqueeze(-1)
        x = rssm.inp(torch.cat([state.stoch.flatten(-2), act], dim=-1))
        deter = rssm.gru_norm(rssm.gru(x, state.deter))
        prior = unimix_logits(rssm.prior_net(deter).view(-1, rssm.groups, rssm.classes), rssm.unimix)
        stoch, post = _dist(rssm, rssm.post_net(torch.cat([deter, embed[t]], dim=-1)))
        state = RSSMState(deter, stoch, post)
        deters.append(deter)
        stochs.append(stoch)
        post_logits.append(post)
        prior_logits.append(prior)
    stacked = RSSMState(torch.stack(deters), torch.stack(stochs), torch.stack(post_logits))
    return stacked, torch.stack(prior_logits)


def imagine_step(rssm, state, action):
    x = rssm.inp(torch.cat([state.stoch.flatten(-2), action], dim=-1))
    deter = rssm.gru_norm(rssm.gru(x, state.deter))
    stoch, logits = _dist(rssm, rssm.prior_net(deter))
    return RSSMState(deter, stoch, logits)


def world_model_loss(model, batch):
    """Returns ``(loss, posteriors [T, B], metrics)`` as the module did at 07e3277."""
    h = model.hparams
    data = {k: v.transpose(0, 1) for k, v in batch.items() if v.ndim >= 2}
    data["bev"] = data["bev"].float()
    steps, batch_size = data["reward"].shape
    bev, vec = data["bev"], data["vec"]
    enc = model.encoder
    flat_bev = bev.flatten(0, 1).contiguous()
    embed = torch.cat([enc.cnn(flat_bev).flatten(1), enc.mlp(symlog(vec.flatten(0, 1)))], dim=-1)
    embed = embed.view(steps, batch_size, -1)
    action = data["action"]
    onehot = F.one_hot(action.clamp(min=0), h.num_actions).float() * (action >= 0).unsqueeze(-1).float()
    post, prior_logits = observe(model.rssm, embed, onehot, data["is_first"])
    flat = post.feat().flatten(0, 1)
    dec = model.decoder
    bev_logits = dec.cnn(dec.proj(flat).view(-1, dec.top, 4, 4))
    vec_pred = dec.mlp(flat)
    bev_loss = F.binary_cross_entropy_with_logits(bev_logits, flat_bev, reduction="none").sum((1, 2, 3))
    vec_loss = ((vec_pred - symlog(vec.flatten(0, 1))) ** 2).sum(-1)
    reward_logits = model.reward_head(flat)
    reward_target = twohot_encode(symlog(data["reward"].flatten()), model.bins)
    reward_loss = -(reward_target * F.log_softmax(reward_logits, -1)).sum(-1)
    cont_logit = model.continue_head(flat).squeeze(-1)
    cont_loss = F.binary_cross_entropy_with_logits(cont_logit, 1.0 - data["terminal"].flatten(), reduction="none")
    dyn, rep, kl = kl_balance_loss(post.logits, prior_logits, h.free_bits)
    pred = bev_loss + vec_loss + reward_loss + cont_loss
    loss = (h.pred_scale * pred + h.dyn_scale * dyn.flatten() + h.rep_scale * rep.flatten()).mean()
    reward_pred = symexp(twohot_decode(reward_logits.detach().softmax(-1), model.bins))
    metrics = {
        "wm/loss": loss.detach(),
        "wm/bev_loss": bev_loss.mean().detach(),
        "wm/vec_loss": vec_loss.mean().detach(),
        "wm/reward_loss": reward_loss.mean().detach(),
        "wm/continue_loss": cont_loss.mean().detach(),
        "wm/kl": kl.mean(),
        "wm/reward_mae": (reward_pred - data["reward"].flatten()).abs().mean(),
        "wm/bev_pixel_acc": ((bev_logits.detach() > 0).float() == flat_bev).float().mean(),
    }
    return loss, post, metrics


@torch.no_grad()
def imagine(model, start, horizon):
    feats, actions = [start.feat()], []
    state = start
    for _ in range(horizon):
        logits = unimix_logits(model.actor(state.feat()), model.hparams.unimix)
        action = torch.distributions.Categorical(logits=logits).sample()
        state = imagine_step(model.rssm, state, F.one_hot(action, model.hparams.num_actions).float())
        feats.append(state.feat())
        actions.append(action)
    return torch.stack(feats), torch.stack(actions)


def behaviour_losses(model, start, start_continue):
    """Returns ``(actor_loss, critic_loss, metrics)`` as the module did at 07e3277 (updates the return scale)."""
    h = model.hparams

    def value(net, feat):
        return symexp(twohot_decode(net(feat).softmax(-1), model.bins))

    feats, actions = imagine(model, start.detach(), h.horizon)
    with torch.no_grad():
        rewards = symexp(twohot_decode(model.reward_head(feats[1:]).softmax(-1), model.bins))
        conts = torch.sigmoid(model.continue_head(feats[1:]).squeeze(-1))
        discounts = h.gamma * conts
        values = value(model.critic, feats)
        returns = lambda_returns(rewards, values[:-1], discounts, values[-1], h.lambda_)
        weight = torch.cumprod(torch.cat([start_continue.unsqueeze(0), discounts[:-1]], dim=0), dim=0)
        scale = model.return_norm.update(returns)
        advantage = (returns - values[:-1]) / scale
        slow_value = value(model.slow_critic, feats[:-1])
    logits = unimix_logits(model.actor(feats[:-1]), h.unimix)
    log_probs = F.log_softmax(logits, -1)
    log_pi = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    actor_loss = -(weight * (log_pi * advantage + h.entropy_coef * entropy)).mean()
    critic_log_probs = F.log_softmax(model.critic(feats[:-1]), -1)
    target = twohot_encode(symlog(returns), model.bins)
    slow_target = twohot_encode(symlog(slow_value), model.bins)
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
