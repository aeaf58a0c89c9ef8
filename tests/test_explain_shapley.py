"""Shapley math of lightning_eff.explain against independent references (hand values, permutations, shap)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_eff.explain import (
    all_subsets,
    exact_shapley,
    insertion_deletion_auc,
    kernel_shap,
    normalize_efficiency,
    shapley_kernel_masks,
    shapley_kernel_size_probs,
    shapley_regression_loss,
    surrogate_kl_loss,
    uniform_size_masks,
)


def table_game(num_players: int, num_classes: int = 2, seed: int = 0):
    """A random game given by a value table over all subsets (bit j of the index = player j)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(2**num_players, num_classes, generator=g, dtype=torch.float64)
    powers = 2 ** torch.arange(num_players)

    def value_fn(masks):
        return table[(masks.long() * powers).sum(1)]

    return value_fn, table


def permutation_shapley(value_fn, num_players: int) -> torch.Tensor:
    """Shapley values as the mean marginal contribution over all N! orderings (the definition)."""
    total = None
    for order in itertools.permutations(range(num_players)):
        mask = torch.zeros(1, num_players, dtype=torch.bool)
        prev = value_fn(mask)[0]
        contrib = torch.zeros(num_players, prev.numel(), dtype=torch.float64)
        for player in order:
            mask = mask.clone()
            mask[0, player] = True
            cur = value_fn(mask)[0]
            contrib[player] = cur - prev
            prev = cur
        total = contrib if total is None else total + contrib
    return total / math.factorial(num_players)


# --------------------------------------------------------------------------------------------------
# exact Shapley
# --------------------------------------------------------------------------------------------------
def test_all_subsets_enumerates_each_subset_once():
    masks = all_subsets(4)
    assert masks.shape == (16, 4)
    assert len({tuple(m.tolist()) for m in masks}) == 16


def test_exact_shapley_additive_game_gives_the_weights():
    w = torch.tensor([[1.0, 0.0], [-2.0, 3.0], [0.5, 0.5], [0.0, -1.0], [4.0, 2.0]], dtype=torch.float64)
    phi = exact_shapley(lambda m: m.double() @ w + 7.0, 5)  # constant offset goes to nobody
    torch.testing.assert_close(phi, w)


def test_exact_shapley_symmetric_game_splits_equally():
    f = torch.tensor([0.0, 1.0, 5.0, 6.0, 10.0, 11.0], dtype=torch.float64)  # v depends only on |S|
    phi = exact_shapley(lambda m: f[m.sum(1)], 5)
    torch.testing.assert_close(phi, torch.full((5,), (f[5] - f[0]).item() / 5, dtype=torch.float64))


def test_exact_shapley_dummy_player_gets_zero_and_efficiency_holds():
    value_fn, _ = table_game(4, seed=1)

    def with_dummy(masks):  # player 4 never changes the value
        return value_fn(masks[:, :4])

    phi = exact_shapley(with_dummy, 5)
    torch.testing.assert_close(phi[4], torch.zeros(2, dtype=torch.float64))
    full, empty = (
        with_dummy(torch.ones(1, 5, dtype=torch.bool))[0],
        with_dummy(torch.zeros(1, 5, dtype=torch.bool))[0],
    )
    torch.testing.assert_close(phi.sum(0), full - empty)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_exact_shapley_matches_the_permutation_definition(n):
    value_fn, _ = table_game(n, num_classes=3, seed=n)
    torch.testing.assert_close(exact_shapley(value_fn, n, chunk_size=3), permutation_shapley(value_fn, n))


def test_exact_shapley_sixteen_players_efficiency():
    value_fn, table = table_game(16, num_classes=1, seed=3)
    phi = exact_shapley(value_fn, 16)
    assert phi.shape == (16, 1)
    torch.testing.assert_close(phi.sum(0), table[-1] - table[0])


def test_exact_shapley_matches_shap_kernel_explainer():
    shap = pytest.importorskip("shap")
    import numpy as np

    n = 6
    value_fn, _ = table_game(n, num_classes=1, seed=7)
    explainer = shap.KernelExplainer(
        lambda z: value_fn(torch.as_tensor(z > 0.5))[:, 0].numpy(), np.zeros((1, n)), silent=True
    )
    # with a budget above 2^N - 2 shap enumerates every coalition and solves exactly
    ref = explainer.shap_values(np.ones((1, n)), nsamples=2**n + 100, silent=True)
    ref = torch.as_tensor(np.asarray(ref)).reshape(n)
    torch.testing.assert_close(exact_shapley(value_fn, n)[:, 0], ref, atol=1e-8, rtol=1e-6)


def test_exact_shapley_errors():
    with pytest.raises(ValueError, match="at most 24 players"):
        exact_shapley(lambda m: m.float(), 25)
    with pytest.raises(ValueError, match=r"`num_players` must be an int >= 1"):
        exact_shapley(lambda m: m.float(), 0)
    with pytest.raises(ValueError, match=r"must map masks \[M, N\] to values"):
        exact_shapley(lambda m: m.float().unsqueeze(-1), 3)
    with pytest.raises(TypeError, match="must be callable"):
        exact_shapley("not a function", 3)


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------
def test_kernel_size_probs_formula():
    n = 7
    k = torch.arange(1, n, dtype=torch.float64)
    expected = (1 / (k * (n - k))) / (1 / (k * (n - k))).sum()
    torch.testing.assert_close(shapley_kernel_size_probs(n), expected)


def test_kernel_masks_are_complementary_pairs_with_kernel_sizes():
    from scipy.stats import chisquare

    n, draws = 10, 40_000
    masks = shapley_kernel_masks(4, n, draws // 4, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (4, draws // 4, n) and masks.dtype == torch.bool
    first, second = masks[:, 0::2], masks[:, 1::2]
    assert torch.equal(second, ~first)  # each mask is followed by its complement
    sizes = first.sum(-1).flatten()
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= n - 1
    observed = torch.bincount(sizes, minlength=n)[1:n].double()
    expected = shapley_kernel_size_probs(n) * sizes.numel()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # within a size every player is equally likely: inclusion frequency is 1/2 by symmetry of p(k)
    freq = first.double().mean(dim=(0, 1))
    assert torch.allclose(freq, torch.full((n,), 0.5, dtype=torch.float64), atol=0.02)


def test_kernel_masks_respect_valid_players():
    valid = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    masks = shapley_kernel_masks(2, 6, 400, generator=torch.Generator().manual_seed(1), valid=valid)
    assert not (masks & ~valid.unsqueeze(1)).any()
    torch.testing.assert_close(masks[:, 0::2] ^ masks[:, 1::2], valid.unsqueeze(1).expand(2, 200, 6))
    sizes_row1 = masks[1, 0::2].sum(-1)
    assert set(sizes_row1.tolist()) <= {1, 2}


def test_kernel_masks_bad_arguments():
    with pytest.raises(ValueError, match="`num_samples` must be even"):
        shapley_kernel_masks(2, 5, 7)
    with pytest.raises(ValueError, match="`num_players` must be an int >= 2"):
        shapley_kernel_masks(2, 1, 4)
    with pytest.raises(ValueError, match="at least 2 valid players"):
        shapley_kernel_masks(1, 3, 2, valid=torch.tensor([[True, False, False]]))


def test_kernel_masks_are_reproducible_with_a_generator():
    a = shapley_kernel_masks(3, 8, 6, generator=torch.Generator().manual_seed(5))
    b = shapley_kernel_masks(3, 8, 6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_uniform_size_masks_have_uniform_sizes():
    from scipy.stats import chisquare

    n, draws = 8, 27_000
    sizes = uniform_size_masks(draws, n, generator=torch.Generator().manual_seed(0)).sum(1)
    observed = torch.bincount(sizes, minlength=n + 1).double().numpy()
    assert chisquare(observed).pvalue > 1e-3  # uniform on {0, ..., 8}


# --------------------------------------------------------------------------------------------------
# efficiency normalisation, losses, KernelSHAP
# --------------------------------------------------------------------------------------------------
def test_normalize_efficiency_is_exact_and_additive():
    g = torch.Generator().manual_seed(0)
    phi, grand, null = (
        torch.randn(5, 7, 3, generator=g),
        torch.rand(5, 3, generator=g),
        torch.rand(3, generator=g),
    )
    out = normalize_efficiency(phi, grand, null)
    torch.testing.assert_close(out.sum(1), grand - null)
    shift = out - phi  # the same shift for every player of an input
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))
    # hand value of the shift
    torch.testing.assert_close(shift[:, 0], ((grand - null) - phi.sum(1)) / 7)


def test_normalize_efficiency_with_padding():
    phi = torch.ones(2, 4, 1)
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = normalize_efficiency(phi, torch.tensor([[1.0], [1.0]]), torch.zeros(1), valid)
    assert torch.equal(out[1, 2:], torch.zeros(2, 1))
    torch.testing.assert_close(out.sum(1), torch.ones(2, 1))
    torch.testing.assert_close(out[1, :2], torch.full((2, 1), 0.5))


def test_shapley_regression_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    b, s, n, c = 3, 4, 5, 2
    phi, values, null = (
        torch.randn(b, n, c, generator=g),
        torch.randn(b, s, c, generator=g),
        torch.randn(c, generator=g),
    )
    masks = torch.rand(b, s, n, generator=g) > 0.5
    expected = 0.0
    for i in range(b):
        err = 0.0
        for j in range(s):
            for k in range(c):
                pred = null[k] + sum(float(phi[i, p, k]) for p in range(n) if masks[i, j, p])
                err += (pred - float(values[i, j, k])) ** 2
        expected += n * err / (s * c)
    expected /= b
    assert abs(float(shapley_regression_loss(phi, masks, values, null)) - expected) < 1e-4


def test_kernel_weighted_least_squares_characterises_the_shapley_value():
    """(E5): minimising E_{m ~ kernel}[(v0 + m.phi - v(m))^2] subject to efficiency gives the Shapley value."""
    n = 5
    value_fn, table = table_game(n, num_classes=1, seed=11)
    masks = all_subsets(n)[1:-1]
    sizes = masks.sum(1)
    p = shapley_kernel_size_probs(n)[sizes - 1] / torch.tensor(
        [math.comb(n, int(k)) for k in sizes], dtype=torch.float64
    )
    z = masks.double()
    a = (z * p.unsqueeze(1)).T @ z
    bvec = (z * p.unsqueeze(1)).T @ (table[1:-1, 0] - table[0, 0])
    a_inv_b, a_inv_1 = torch.linalg.solve(a, bvec), torch.linalg.solve(a, torch.ones(n, dtype=torch.float64))
    phi = a_inv_b - a_inv_1 * (a_inv_b.sum() - (table[-1, 0] - table[0, 0])) / a_inv_1.sum()
    torch.testing.assert_close(phi, exact_shapley(value_fn, n)[:, 0])


def test_kernel_shap_exact_on_additive_and_consistent_on_general_games():
    w = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.7, 1.5], dtype=torch.float64)
    torch.testing.assert_close(
        kernel_shap(lambda m: m.double() @ w, 6, 32, generator=torch.Generator().manual_seed(0)), w
    )
    value_fn, table = table_game(6, num_classes=2, seed=2)
    exact = exact_shapley(value_fn, 6)
    est = kernel_shap(value_fn, 6, 40_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est.sum(0), table[-1] - table[0])  # efficiency holds exactly
    assert (est - exact).abs().max() < 0.03
    small = kernel_shap(value_fn, 6, 16, generator=torch.Generator().manual_seed(0))
    assert (small - exact).abs().max() > (est - exact).abs().max()  # more samples, closer


def test_surrogate_kl_loss_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    p, q = a.softmax(-1), b.softmax(-1)
    torch.testing.assert_close(surrogate_kl_loss(a, b), (p * (p.log() - q.log())).sum(-1).mean())
    assert float(surrogate_kl_loss(a, a)) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# insertion / deletion
# --------------------------------------------------------------------------------------------------
def test_insertion_deletion_by_hand_and_against_random_order():
    w = torch.tensor([0.1, 0.5, 0.2, 0.2])
    res = insertion_deletion_auc(lambda m: m.float() @ w, w)
    torch.testing.assert_close(res.insertion_curve, torch.tensor([0.0, 0.5, 0.7, 0.9, 1.0]))
    torch.testing.assert_close(res.deletion_curve, torch.tensor([1.0, 0.5, 0.3, 0.1, 0.0]))
    assert res.insertion_auc == pytest.approx(0.25 * (0.25 + 0.6 + 0.8 + 0.95))
    assert res.deletion_auc == pytest.approx(0.35)

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(12, generator=g)
    values = lambda m: torch.stack([m.float() @ weights, -(m.float() @ weights)], 1)  # noqa: E731
    good = insertion_deletion_auc(values, weights, target=0)
    rand = insertion_deletion_auc(values, torch.rand(12, generator=g), target=0)
    assert good.insertion_auc > rand.insertion_auc and good.deletion_auc < rand.deletion_auc
    with pytest.raises(ValueError, match="give the explained class as `target`"):
        insertion_deletion_auc(values, weights)


def test_kernel_shap_from_samples_batches_games_and_matches_exact():
    from lightning_eff.explain import kernel_shap_from_samples

    games = [table_game(6, num_classes=2, seed=s) for s in (3, 4, 5)]
    masks = shapley_kernel_masks(3, 6, 20_000, generator=torch.Generator().manual_seed(0))
    values = torch.stack([fn(m) for (fn, _), m in zip(games, masks)])
    empty = torch.stack([t[0] for _, t in games])
    full = torch.stack([t[-1] for _, t in games])
    phi = kernel_shap_from_samples(masks, values, empty, full)
    assert phi.shape == (3, 6, 2)
    for (fn, table), est, m in zip(games, phi, masks):
        torch.testing.assert_close(est.sum(0), table[-1] - table[0])  # efficiency per game
        assert (est - exact_shapley(fn, 6)).abs().max() < 0.05  # each game against its own exact values
        # the same solve as one game at a time (kernel_shap draws these masks for seed 0 only for game 0)
        torch.testing.assert_close(est, kernel_shap_from_samples(m, fn(m), table[0], table[-1]))
    swapped = kernel_shap_from_samples(masks, values.flip(0), empty, full)  # values of the wrong games
    assert (swapped[0] - exact_shapley(games[0][0], 6)).abs().max() > 0.1
    single = kernel_shap(games[0][0], 6, 64, generator=torch.Generator().manual_seed(7))
    m7 = shapley_kernel_masks(1, 6, 64, generator=torch.Generator().manual_seed(7))[0]
    torch.testing.assert_close(
        single, kernel_shap_from_samples(m7, games[0][0](m7), games[0][1][0], games[0][1][-1])
    )
    with pytest.raises(ValueError, match="share their leading shape"):
        kernel_shap_from_samples(masks, values[:2], empty, full)
