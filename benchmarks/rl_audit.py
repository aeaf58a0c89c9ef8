"""Why does a trained Think2Drive agent drive worse than its own value estimates say? (issue 17 audit)

Four measurements of a trained agent (``--agent``, default the committed 21k-step agent) on *validation* seeds
(``2**31 + 100000 + i``: neither training seeds nor the held-out test seeds of ``benchmarks/rl.py``):

``episodes``
    The agent drives ``--episodes`` episodes per scene, greedy and sampled. Along each real episode the world model
    filters the observations (posterior states, in 32-step chunks from a fresh state as in training) and the
    script compares, step by step, the reward head's prediction with the simulator's reward (correlation, mean
    absolute error, mean bias, and the least-squares coefficients of the prediction on the reward's four terms,
    whose true values are the reward weights 1 / 0.5 / 2 / 0.5), the critic's value with the real discounted return
    that followed (gamma of the agent; truncated episodes count what was earned until the time limit), the
    15-step reward sum that the world model *imagines* under the greedy actor from each posterior state with the
    real 15-step sum that followed, and the actor's entropy.
``probe`` (``--probe-rows`` > 0)
    Whether the world model's features hold the reward: on features of fresh training-seed episodes (the agent
    sampled and a random driver, alternating), a ridge-regularised linear read-out and the agent's own reward head
    fine-tuned for ``--probe-steps`` steps (batches of 512 rows, the online batch 16 x 32), each scored on the
    episodes of the first part. If a linear read-out predicts the reward far better than the head, the head is
    stale on the policy's states, not short of information.

Usage::

    python -m benchmarks.rl_audit --out benchmarks/results/rl_audit_t2d21k.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

VAL_SEED_OFFSET = 2**31 + 100_000
TERMS = ("speed", "travel", "deviation", "steering")


def _episode(env, policy, scenario, seed):
    obs, _ = env.reset(seed=seed, options={"scenario": scenario})
    policy.reset(env)
    rows = [dict(bev=obs["bev"], vec=obs["vec"], action=-1, reward=0.0, terminal=0.0, terms=None)]
    done = False
    while not done:
        a = policy.act(obs, env)
        obs, r, te, tr, info = env.step(a)
        done = te or tr
        rows.append(dict(bev=obs["bev"], vec=obs["vec"], action=int(a), reward=float(r), terminal=float(te),
                         terms=None if te else [info[f"reward_{k}"] for k in TERMS]))
    return rows


@torch.no_grad()
def _posterior(model, rows, chunk=32):
    """Posterior features ``[T, F]`` of one episode, filtered in ``chunk``-step pieces from a fresh state."""
    T = len(rows)
    batch = {"bev": torch.as_tensor(np.stack([r["bev"] for r in rows]))[None],
             "vec": torch.as_tensor(np.stack([r["vec"] for r in rows]))[None],
             "action": torch.tensor([r["action"] for r in rows])[None],
             "reward": torch.tensor([r["reward"] for r in rows])[None].float(),
             "terminal": torch.tensor([r["terminal"] for r in rows])[None], "is_first": torch.zeros(1, T)}
    batch["is_first"][0, ::chunk] = 1.0
    batch["action"][0, ::chunk] = -1
    _, post, _ = model.world_model_loss(batch)
    return post


def _decode(model, logits):
    from lightning_eff.rl.dreamer import symexp, twohot_decode

    return symexp(twohot_decode(logits.softmax(-1), model.bins))


@torch.no_grad()
def _imagined_sums(model, post, horizon):
    """Reward sum over ``horizon`` imagined steps under the greedy actor, from every posterior state ``[T]``."""
    from lightning_eff.rl.dreamer import RSSMState, unimix_logits

    state = RSSMState(post.deter[:, 0], post.stoch[:, 0], post.logits[:, 0])
    total = torch.zeros(state.deter.shape[0])
    alive = torch.ones_like(total)
    for _ in range(horizon):
        action = unimix_logits(model.actor(state.feat()), model.hparams.unimix).argmax(-1)
        state = model.rssm.imagine_step(state, action, sample=False)
        feat = state.feat()
        total += alive * _decode(model, model.reward_head(feat))
        alive = alive * torch.sigmoid(model.continue_head(feat).squeeze(-1))
    return total.numpy()


def _reward_scores(pred, real, terms):
    pred, real, terms = np.asarray(pred), np.asarray(real), np.asarray(terms)
    design = np.c_[terms, np.ones(len(terms))]
    return {"steps": int(len(real)), "corr": float(np.corrcoef(pred, real)[0, 1]),
            "mae": float(np.abs(pred - real).mean()), "bias": float((pred - real).mean()),
            "coef_pred": dict(zip((*TERMS, "const"), np.linalg.lstsq(design, pred, rcond=None)[0].round(3).tolist())),
            "coef_real": dict(zip((*TERMS, "const"), np.linalg.lstsq(design, real, rcond=None)[0].round(3).tolist())),
            "term_mean_per_step": dict(zip(TERMS, terms.mean(0).round(3).tolist()))}


def audit_episodes(model, policy, env, args):
    gamma, horizon = model.hparams.gamma, model.hparams.horizon
    out, kept = {}, {}
    for mode in ("greedy", "sampled"):
        policy.greedy = mode == "greedy"
        pred, real, terms, values, futures, imag, real_h, ent, top, returns, lengths = ([] for _ in range(11))
        eps = []
        for scenario in args.scenarios:
            for i in range(args.episodes):
                rows = _episode(env, policy, scenario, VAL_SEED_OFFSET + i)
                eps.append(rows)
                post = _posterior(model, rows)
                feat = post.feat()[:, 0]
                with torch.no_grad():
                    rp = _decode(model, model.reward_head(feat)).numpy()
                    val = _decode(model, model.critic(feat)).numpy()
                    logp = F.log_softmax(model.actor(feat), -1)
                ent += (-(logp.exp() * logp).sum(-1)).tolist()
                top += logp.exp().max(-1).values.tolist()
                r = np.array([x["reward"] for x in rows])
                future = np.zeros(len(r))  # sum_{k > t} gamma^(k-t-1) r_k: what the value of state t predicts
                acc = 0.0
                for t in reversed(range(len(r) - 1)):
                    acc = r[t + 1] + gamma * acc
                    future[t] = acc
                values += val[:-1].tolist()
                futures += future[:-1].tolist()
                sums = _imagined_sums(model, post, horizon)
                for t in range(len(r) - horizon):
                    imag.append(sums[t])
                    real_h.append(r[t + 1:t + 1 + horizon].sum())
                for t in range(1, len(rows)):
                    if rows[t]["terms"] is not None:
                        pred.append(rp[t]); real.append(r[t]); terms.append(rows[t]["terms"])  # noqa: E702
                returns.append(float(r.sum()))
                lengths.append(len(rows) - 1)
        values, futures = np.array(values), np.array(futures)
        out[mode] = {
            "episodes": len(returns), "mean_return": float(np.mean(returns)), "mean_length": float(np.mean(lengths)),
            "reward_head": _reward_scores(pred, real, terms),
            "critic_value_mean": float(values.mean()), "real_future_return_mean": float(futures.mean()),
            "critic_value_minus_real_mean": float((values - futures).mean()),
            "imagined_15step_reward_sum_mean": float(np.mean(imag)) if imag else None,
            "real_15step_reward_sum_mean": float(np.mean(real_h)) if real_h else None,
            "imagined_vs_real_15step_corr": float(np.corrcoef(imag, real_h)[0, 1]) if len(imag) > 2 else None,
            "actor_entropy_mean": float(np.mean(ent)), "actor_top_prob_mean": float(np.mean(top)),
            "max_entropy": float(np.log(model.hparams.num_actions)),
        }
        kept[mode] = eps
        o = out[mode]
        print(f"  {mode}: return {o['mean_return']:.1f} (len {o['mean_length']:.0f}); reward head corr "
              f"{o['reward_head']['corr']:.2f} MAE {o['reward_head']['mae']:.2f} bias {o['reward_head']['bias']:+.2f}; "
              f"value {o['critic_value_mean']:.1f} vs real {o['real_future_return_mean']:.1f}; imagined 15-step "
              f"{o['imagined_15step_reward_sum_mean']:.1f} vs real {o['real_15step_reward_sum_mean']:.1f}; entropy "
              f"{o['actor_entropy_mean']:.2f} / {o['max_entropy']:.2f}", flush=True)
    return out, kept


def _score(pred, real):
    p, y = pred.numpy(), real.numpy()
    return {"corr": float(np.corrcoef(p, y)[0, 1]), "mae": float(np.abs(p - y).mean()), "bias": float((p - y).mean())}


def probe_features(model, policy, env, held, args):
    from lightning_eff.rl.dreamer import symlog, twohot_encode
    from lightning_eff.rl.policies import RandomPolicy

    def table(eps):
        X, Y = [], []
        for rows in eps:
            feat = _posterior(model, rows).feat()[:, 0]
            for t in range(1, len(rows)):
                if rows[t]["terms"] is not None:
                    X.append(feat[t]); Y.append(rows[t]["reward"])  # noqa: E702
        return torch.stack(X), torch.tensor(Y)

    train, n, i = [], 0, 0
    policy.greedy = False
    while n < args.probe_rows:
        driver = policy if i % 2 == 0 else RandomPolicy(seed=i)
        rows = _episode(env, driver, args.scenarios[(i // 2) % len(args.scenarios)], 5000 + i)
        train.append(rows)
        n, i = n + len(rows), i + 1
    Xtr, Ytr = table(train)
    out = {"train_rows": int(len(Ytr)), "train_episodes": len(train)}
    design = torch.cat([Xtr, torch.ones(len(Xtr), 1)], 1).double()  # ridge (1e-2 per row) read-out
    gram = design.T @ design + 1e-2 * len(design) * torch.eye(design.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, design.T @ Ytr.double()[:, None])
    for mode, eps in held.items():
        Xte, Yte = table(eps)
        lin = (torch.cat([Xte, torch.ones(len(Xte), 1)], 1).double() @ w)[:, 0].float()
        with torch.no_grad():
            own = _decode(model, model.reward_head(Xte))
        head = copy.deepcopy(model.reward_head)
        opt = torch.optim.Adam(head.parameters(), lr=model.hparams.world_model_lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.probe_steps):
            idx = torch.randint(0, len(Ytr), (512,), generator=gen)
            loss = -(twohot_encode(symlog(Ytr[idx]), model.bins) * F.log_softmax(head(Xtr[idx]), -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            tuned = _decode(model, head(Xte))

        out[mode] = {"agent_reward_head": _score(own, Yte), "linear_readout": _score(lin, Yte),
                     f"agent_head_finetuned_{args.probe_steps}_steps": _score(tuned, Yte)}
        print(f"  {mode}: reward corr own head {out[mode]['agent_reward_head']['corr']:.2f}, linear read-out "
              f"{out[mode]['linear_readout']['corr']:.2f}, own head after {args.probe_steps} steps on fresh data "
              f"{out[mode][f'agent_head_finetuned_{args.probe_steps}_steps']['corr']:.2f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent", default="benchmarks/results/think2drive_cpu.ckpt")
    p.add_argument("--scenarios", nargs="+", default=["highway", "merge"])
    p.add_argument("--episodes", type=int, default=3, help="validation episodes per scene and mode")
    p.add_argument("--probe-rows", type=int, default=3000, help="training-seed rows of the feature probe (0: skip)")
    p.add_argument("--probe-steps", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lightning_eff.rl import load_agent
    from lightning_eff.rl.envs import make_env

    policy, env_kwargs = load_agent(args.agent)
    model = policy.module
    env = make_env(policy.env_name, scenarios=args.scenarios, **env_kwargs)
    print(f"agent {args.agent}: {model.wm_updates} world-model updates; validation seeds {VAL_SEED_OFFSET} + i", flush=True)
    t0 = time.time()
    results = {"args": vars(args), "env_kwargs": env_kwargs, "wm_updates": int(model.wm_updates),
               "reward_weights": dict(zip(TERMS, (env.reward_weights.speed, env.reward_weights.travel,
                                                  env.reward_weights.deviation, env.reward_weights.steering)))}
    results["episodes"], held = audit_episodes(model, policy, env, args)
    if args.probe_rows > 0:
        results["probe"] = probe_features(model, policy, env, held, args)
    results["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
