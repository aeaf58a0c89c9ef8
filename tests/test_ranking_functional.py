"""DD-Ranking scores: against the method page, the formula written out and ddranking 0.2.0's numbers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_eff.ranking import AugmentationRobustScore, LabelRobustScore
from lightning_eff.ranking import functional as F

# CIFAR-10 IPC 10, soft labels: (HLR %, IOR %) from the DD-Ranking leaderboard (method page).
LEADERBOARD = {
    "DC": (36.70, 18.54),
    "DSA": (35.14, 19.62),
    "DM": (39.37, 16.12),
    "MTT": (23.73, 30.90),
    "DATM": (26.84, 35.05),
    "SRe2L": (67.82, -5.77),
    "RDED": (50.65, 1.11),
    "D4M": (39.88, 9.12),
}
# LRS with fractions, as listed on the method page.
PAGE_LRS = {"MTT": 0.2845, "DATM": 0.2868, "DC": 0.2320, "SRe2L": 0.1380, "RDED": 0.1756}


def lrs_written_out(hlr: float, ior: float, w: float = 0.5) -> float:
    alpha = w * ior - (1 - w) * hlr
    return (math.exp(alpha) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


def test_leaderboard_pairs_give_the_page_lrs_with_fractions():
    for name, value in PAGE_LRS.items():
        hlr, ior = LEADERBOARD[name]
        assert F.label_robust_score(hlr / 100, ior / 100) == pytest.approx(value, abs=5e-5), name


def test_lrs_equals_the_formula_written_out_and_lies_in_unit_interval():
    for name, (hlr, ior) in LEADERBOARD.items():
        for w in (0.0, 0.3, 0.5, 1.0):
            got = F.label_robust_score(hlr / 100, ior / 100, weight=w)
            assert got == pytest.approx(lrs_written_out(hlr / 100, ior / 100, w), rel=1e-12), (name, w)
            assert 0.0 <= got <= 1.0


def test_percent_reproduces_the_package_out_of_range_numbers():
    # the method page: MTT 15.18 with percentages plugged into exp (ddranking 0.2.0)
    assert F.label_robust_score(23.73, 30.90, percent=True) == pytest.approx(15.18, abs=5e-3)
    # a weak set goes below 0: (e^alpha - e^-1) / (e - e^-1) -> -e^-1 / (e - e^-1) for alpha << 0
    assert F.label_robust_score(67.82, -5.77, percent=True) == pytest.approx(
        -math.exp(-1) / (math.e - math.exp(-1))
    )
    assert F.label_robust_score(0.6782, -0.0577) == pytest.approx(0.1380, abs=5e-5)


def test_scores_stay_in_unit_interval_over_a_grid_of_valid_accuracies():
    grid = [0.0, 0.1, 0.37, 0.5, 0.82, 1.0]
    for full, syn_h, syn, rdm in itertools.product(grid, repeat=4):
        hlr = F.hard_label_recovery(full, syn_h)
        ior = F.improvement_over_random(syn, rdm)
        assert 0.0 <= F.label_robust_score(hlr, ior) <= 1.0
        assert 0.0 <= F.augmentation_robust_score(syn, rdm, syn_h, full) <= 1.0
    # the extremes map exactly onto 0 and 1
    assert F.label_robust_score(1.0, -1.0) == pytest.approx(0.0, abs=1e-15)
    assert F.label_robust_score(-1.0, 1.0) == pytest.approx(1.0)
    assert F.augmentation_robust_score(1.0, 0.0, 1.0, 0.0) == pytest.approx(1.0)
    assert F.augmentation_robust_score(0.0, 1.0, 0.0, 1.0) == pytest.approx(0.0, abs=1e-15)


def test_ars_written_out():
    sa, ra, sn, rn, g = 0.62, 0.55, 0.50, 0.46, 0.3
    beta = g * (sa - ra) + (1 - g) * (sn - rn)
    expected = (math.exp(beta) - math.exp(-1)) / (math.exp(1) - math.exp(-1))
    assert F.augmentation_robust_score(sa, ra, sn, rn, weight=g) == pytest.approx(expected, rel=1e-12)


def test_differences_and_types():
    assert F.hard_label_recovery(0.85, 0.6) == pytest.approx(0.25)
    assert F.improvement_over_random(0.6, 0.65) == pytest.approx(-0.05)
    assert isinstance(F.label_robust_score(0.1, 0.2), float)
    t = F.label_robust_score(torch.tensor([0.1, 0.3]), 0.2)
    assert isinstance(t, torch.Tensor) and t.shape == (2,)
    assert t[0].item() == pytest.approx(F.label_robust_score(0.1, 0.2))
    assert t[1].item() == pytest.approx(F.label_robust_score(0.3, 0.2))
    # integer tensors are promoted; float64 is kept
    out = F.hard_label_recovery(torch.tensor([80, 90]), torch.tensor([70, 60]), percent=True)
    assert out.is_floating_point() and out.tolist() == [10.0, 30.0]
    assert F.improvement_over_random(torch.tensor(0.5, dtype=torch.float64), 0.25).dtype == torch.float64


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"acc_full.*percent=True"):
        F.hard_label_recovery(62.5, 0.5)
    with pytest.raises(ValueError, match="acc_random"):
        F.improvement_over_random(0.5, torch.tensor([0.2, 1.5]))
    with pytest.raises(ValueError, match="acc_syn"):
        F.improvement_over_random(float("nan"), 0.3)
    with pytest.raises(ValueError, match="hlr"):
        F.label_robust_score(1.2, 0.0)
    with pytest.raises(ValueError, match="ior"):
        F.label_robust_score(10.0, 120.0, percent=True)
    with pytest.raises(ValueError, match="weight"):
        F.label_robust_score(0.1, 0.1, weight=1.5)
    with pytest.raises(TypeError, match="weight"):
        F.augmentation_robust_score(0.1, 0.1, 0.1, 0.1, weight=True)
    with pytest.raises(TypeError, match="acc_syn_aug"):
        F.augmentation_robust_score("0.1", 0.1, 0.1, 0.1)
    with pytest.raises(TypeError, match="acc_full"):
        F.hard_label_recovery(True, 0.5)
    with pytest.raises(ValueError, match="acc_rdm_noaug"):
        F.augmentation_robust_score(0.1, 0.1, 0.1, -0.1)


# ---------------------------------------------------------------------------------------------
# Reference numbers from the official package (ddranking 0.2.0, numpy 1.26.4), produced once in a throwaway
# venv under /tmp: LabelRobustScoreSoft / LabelRobustScoreHard / AugmentationRobustScore were created with
# object.__new__ (no dataset, no teachers), their training helpers (_compute_hard_label_metrics_helper,
# _compute_soft_label_metrics_helper, _compute_with/without_aug_metrics_helper, _get_random_data_helper)
# replaced by stubs returning the accuracies below run after run, and the package's own compute_metrics
# called (eval_full_data=True, num_eval=3). "percent": the accuracies as given (what the package sees);
# "fraction": the same accuracies / 100. LabelRobustScoreHard.compute_metrics appends each run's LRS twice
# and then crashes in save_results (pandas: arrays of different lengths); save_results was stubbed for it
# (duplicating every value changes neither the mean nor the population std).
# ---------------------------------------------------------------------------------------------
FULL = [80.0, 80.0, 80.0]
SYN_HARD = [45.5, 47.25, 44.0]
SYN_SOFT = [62.0, 60.5, 63.75]
RDM_SOFT = [55.0, 57.25, 54.5]
RDM_HARD = [40.0, 41.5, 39.25]
SYN_NOAUG = [50.25, 49.0, 51.5]
RDM_NOAUG = [46.0, 47.75, 45.5]
PACKAGE = {
    "percent": {
        "lrs_soft": (
            34.416666666666664,
            1.3281147875424355,
            6.5,
            2.4748737341529163,
            -0.15651721530646862,
            2.0249787142122173e-07,
        ),
        "lrs_hard": (
            34.416666666666664,
            1.3281147875424355,
            5.333333333333333,
            0.42491829279939874,
            -0.15651735357301622,
            2.1621870482079086e-07,
        ),
        "ars": (
            6.5,
            2.4748737341529163,
            3.8333333333333335,
            1.96143371598997,
            331.06910539831,
            384.973576061189,
        ),
    },
    "fraction": {
        "lrs_soft": (
            0.34416666666666673,
            0.013281147875424369,
            0.06499999999999999,
            0.024748737341529183,
            0.2135190712307994,
            0.002144423370849273,
        ),
        "lrs_hard": (
            0.34416666666666673,
            0.013281147875424369,
            0.05333333333333332,
            0.0042491829279939905,
            0.21137447452304337,
            0.0031923641439917712,
        ),
        "ars": (
            0.06499999999999999,
            0.024748737341529183,
            0.03833333333333333,
            0.01961433715989972,
            0.2916112274367421,
            0.00990596163844323,
        ),
    },
}


@pytest.mark.parametrize("unit", ["percent", "fraction"])
def test_metric_classes_match_the_package(unit):
    scale, percent = (1.0, True) if unit == "percent" else (0.01, False)
    s = lambda v: [x * scale for x in v]  # noqa: E731
    ref = PACKAGE[unit]
    for setting, syn, rdm in (("lrs_soft", SYN_SOFT, RDM_SOFT), ("lrs_hard", SYN_HARD, RDM_HARD)):
        m = LabelRobustScore(percent=percent)
        for run in range(3):  # one update per run, as the package loops
            m.update(s(FULL)[run], s(SYN_HARD)[run], s(syn)[run], s(rdm)[run])
        out = m.compute()
        got = [float(out[k][q]) for k in ("hlr", "ior", "lrs") for q in ("mean", "std")]
        assert got == pytest.approx(list(ref[setting]), rel=1e-9, abs=1e-12), setting
    m = AugmentationRobustScore(percent=percent)
    t = lambda v: torch.tensor(s(v), dtype=torch.float64)  # noqa: E731
    m.update(t(SYN_SOFT), t(RDM_SOFT), t(SYN_NOAUG), t(RDM_NOAUG))
    out = m.compute()
    got = [float(out[k][q]) for k in ("with_aug", "without_aug", "ars") for q in ("mean", "std")]
    assert got == pytest.approx(list(ref["ars"]), rel=1e-9, abs=1e-12)


def test_functional_per_run_matches_the_package_fraction_numbers():
    lrs = [
        F.label_robust_score(
            F.hard_label_recovery(f / 100, h / 100), F.improvement_over_random(a / 100, b / 100)
        )
        for f, h, a, b in zip(FULL, SYN_HARD, SYN_SOFT, RDM_SOFT)
    ]
    t = torch.tensor(lrs, dtype=torch.float64)
    assert float(t.mean()) == pytest.approx(PACKAGE["fraction"]["lrs_soft"][4], rel=1e-12)
    assert float(t.std(unbiased=False)) == pytest.approx(PACKAGE["fraction"]["lrs_soft"][5], rel=1e-9)


def test_metric_class_arguments_and_reset():
    with pytest.raises(ValueError, match="weight"):
        LabelRobustScore(weight=-0.1)
    with pytest.raises(TypeError, match="percent"):
        AugmentationRobustScore(percent="yes")
    m = LabelRobustScore(weight=1.0)  # only IOR counts
    m.update(torch.tensor([0.9, 0.9]), torch.tensor([0.1, 0.2]), torch.tensor([0.6, 0.7]), 0.5)
    out = m.compute()
    assert out["lrs"]["runs"].tolist() == pytest.approx(
        [lrs_written_out(0.8, 0.1, 1.0), lrs_written_out(0.7, 0.2, 1.0)]
    )
    with pytest.raises(ValueError, match="acc_full"):
        m.update(90.0, 0.1, 0.2, 0.3)
    m.reset()
    m.update(0.8, 0.5, 0.6, 0.6)
    assert float(m.compute()["ior"]["mean"]) == pytest.approx(0.0)
