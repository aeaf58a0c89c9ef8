"""DSA and CutMix: hand-computed transforms, siamese consistency, gradients, reproducibility, bad arguments."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_eff.distill.augment import DSA, DSA_OPS, CutMix, CutMixParams, DSAParams


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pixel_image(h: int = 5, w: int = 5, r: int = 1, c: int = 3, channels: int = 1) -> torch.Tensor:
    """An asymmetric single-pixel image [1, C, h, w] (value 1 at (r, c))."""
    x = torch.zeros(1, channels, h, w)
    x[0, :, r, c] = 1.0
    return x


def params_for(dsa: DSA, n: int, size: int | tuple[int, int], **values) -> DSAParams:
    """A draw with every family of the strategy active and some fields set by hand."""
    p = dsa.sample(n, generator=gen(), image_size=size)
    p = dataclasses.replace(p, active=torch.ones(n, len(dsa.ops), dtype=torch.bool))
    return dataclasses.replace(p, **values)


# ------------------------------------------------------------------------------ hand-computed transforms
def test_flip_only():
    x = torch.arange(12.0).view(1, 1, 3, 4).repeat(2, 1, 1, 1)
    out = DSA("flip", flip=1.0)(x, generator=gen())
    expected = torch.tensor([[3.0, 2, 1, 0], [7, 6, 5, 4], [11, 10, 9, 8]])
    assert torch.equal(out[0, 0], expected) and torch.equal(out[1, 0], expected)
    assert torch.equal(DSA("flip", flip=0.0)(x, generator=gen()), x)
    dsa = DSA("flip")
    p = params_for(dsa, 2, (3, 4), flip=torch.tensor([True, False]))
    out = dsa(x, p)
    assert torch.equal(out[0, 0], expected) and torch.equal(out[1], x[1])


def test_crop_only_translates_with_zero_fill():
    dsa = DSA("crop")
    x = pixel_image(r=1, c=3)
    # out[i, j] = x[i + 1, j - 1]: the pixel at (1, 3) moves to (0, 4)
    out = dsa(x, params_for(dsa, 1, 5, translate=torch.tensor([[1, -1]])))
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 0, 4] = 1.0
    assert torch.equal(out, expected)
    # a shift that pushes the pixel out of the frame leaves zeros
    out = dsa(x, params_for(dsa, 1, 5, translate=torch.tensor([[2, 0]])))
    assert torch.equal(out, torch.zeros(1, 1, 5, 5))
    # a ramp shifted left by 2 columns, filled with zeros on the right
    ramp = torch.arange(1.0, 6.0).view(1, 1, 1, 5).expand(1, 1, 5, 5)
    out = dsa(ramp, params_for(dsa, 1, 5, translate=torch.tensor([[0, 2]])))
    assert torch.equal(out[0, 0, 0], torch.tensor([3.0, 4, 5, 0, 0]))


def test_rotate_90_and_180():
    dsa = DSA("rotate")
    x = pixel_image(r=1, c=3)
    out = dsa(x, params_for(dsa, 1, 5, angle=torch.tensor([90.0])))
    # sampling matrix [[0, -1], [1, 0]]: out[r, c] = x[c, W - 1 - r]; the pixel (1, 3) goes to (1, 1)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 1, 1] = 1.0
    assert torch.allclose(out, expected, atol=1e-5)
    g = torch.randn(2, 3, 6, 6)
    out = dsa(g, params_for(dsa, 2, 6, angle=torch.tensor([90.0, 180.0])))
    assert torch.allclose(out[0], torch.rot90(g[0], 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(out[1], g[1].flip(-1).flip(-2), atol=1e-5)
    assert torch.allclose(dsa(g, params_for(dsa, 2, 6, angle=torch.zeros(2))), g, atol=1e-6)


def test_scale_identity_and_zoom_on_a_ramp():
    dsa = DSA("scale")
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    assert torch.allclose(dsa(ramp, params_for(dsa, 1, 4, scale=torch.tensor([[1.0, 1.0]]))), ramp, atol=1e-6)
    # sx = 0.5: output column j samples input x = ((0.5 * ((2j + 1) / 4 - 1) + 1) * 4 - 1) / 2 (bilinear on a ramp)
    out = dsa(ramp, params_for(dsa, 1, 4, scale=torch.tensor([[0.5, 1.0]])))
    assert torch.allclose(out[0, 0], torch.tensor([0.75, 1.25, 1.75, 2.25]).expand(4, 4), atol=1e-6)


def test_cutout_only():
    dsa = DSA("cutout", cutout=0.5)  # side int(6 * 0.5 + 0.5) = 3
    x = torch.ones(2, 2, 6, 6)
    p = params_for(dsa, 2, 6, cutout_center=torch.tensor([[1, 4], [0, 0]]))
    assert p.cutout_size == (3, 3)
    out = dsa(x, p)
    expected0 = torch.ones(6, 6)
    expected0[0:3, 3:6] = 0.0  # rows 1-1..1+1, cols 4-1..4+1
    expected1 = torch.ones(6, 6)
    expected1[0:2, 0:2] = 0.0  # clipped at the top-left corner
    for ch in range(2):
        assert torch.equal(out[0, ch], expected0) and torch.equal(out[1, ch], expected1)


def test_color_by_hand():
    dsa = DSA("color")
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 6.0]]]])  # [1, 2, 1, 2]
    # brightness only (saturation 1, contrast 1 are identities)
    out = dsa(x, params_for(dsa, 1, (1, 2), brightness=torch.tensor([0.25]), saturation=torch.ones(1), contrast=torch.ones(1)))
    assert torch.allclose(out, x + 0.25)
    # saturation 0: every pixel becomes its channel mean (2, 4)
    out = dsa(x, params_for(dsa, 1, (1, 2), brightness=torch.zeros(1), saturation=torch.zeros(1), contrast=torch.ones(1)))
    assert torch.allclose(out, torch.tensor([[[[2.0, 4.0]], [[2.0, 4.0]]]]))
    # contrast 2 around the image mean 3: 2 * (x - 3) + 3
    out = dsa(x, params_for(dsa, 1, (1, 2), brightness=torch.zeros(1), saturation=torch.ones(1), contrast=torch.full((1,), 2.0)))
    assert torch.allclose(out, 2 * (x - 3) + 3)


def test_sampled_ranges_follow_the_official_parameters():
    dsa = DSA()
    p = dsa.sample(4000, generator=gen(1), image_size=32)
    shift = int(32 * 0.125 + 0.5)  # 4
    assert p.translate.min() == -shift and p.translate.max() == shift
    assert p.cutout_size == (16, 16) and p.cutout_center.min() == 0 and p.cutout_center.max() == 32
    assert 1 / 1.2 <= p.scale.min() and p.scale.max() <= 1.2
    assert -15 <= p.angle.min() < -14 and 14 < p.angle.max() <= 15
    assert abs(p.flip.float().mean() - 0.5) < 0.05
    assert -0.5 <= p.brightness.min() and p.brightness.max() < 0.5
    assert 0 <= p.saturation.min() and p.saturation.max() < 2.0
    assert 0.5 <= p.contrast.min() and p.contrast.max() < 1.5


def test_single_mode_draws_one_family_per_call_and_multiple_applies_all():
    dsa = DSA()
    seen = set()
    for s in range(40):
        p = dsa.sample(8, generator=gen(s))
        assert torch.equal(p.active.sum(1), torch.ones(8, dtype=torch.long))  # one family per image
        assert (p.active == p.active[0]).all()  # the same family for the whole batch
        seen.add(int(p.active[0].nonzero()))
    assert seen == set(range(len(DSA_OPS)))
    assert DSA(mode="multiple").sample(3, generator=gen()).active.all()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(DSA("none")(x, generator=gen()), x)


def test_mixed_families_in_one_batch_equal_per_image_application():
    """Rows with different active families (several students in one batch) are transformed independently."""
    dsa = DSA("crop_flip_rotate")
    x = torch.randn(4, 2, 8, 8)
    p = dsa.sample(4, generator=gen(3), image_size=8)
    active = torch.tensor([[True, False, False], [False, True, False], [False, False, True], [True, False, False]])
    p = dataclasses.replace(p, active=active, flip=torch.ones(4, dtype=torch.bool))
    out = dsa(x, p)
    for i in range(4):
        single = dsa(x[i : i + 1], p.index(torch.tensor([i])))
        assert torch.allclose(out[i : i + 1], single, atol=1e-6)
    assert not torch.allclose(out, x)


# ------------------------------------------------------------------------------ siamese
@pytest.mark.parametrize("strategy", [*DSA_OPS, "color_crop_cutout_flip_scale_rotate"])
def test_siamese_applies_the_same_transform_to_every_batch(strategy):
    dsa = DSA(strategy, flip=1.0 if strategy == "flip" else 0.5)
    real = torch.randn(6, 3, 16, 16)
    syn = torch.cat([real[2:3], torch.randn(1, 3, 16, 16)])  # the synthetic batch holds real[2]
    changed = 0
    for s in range(5):
        out_real, out_syn = dsa.siamese(real, syn, generator=gen(s))
        assert torch.allclose(out_syn[0], out_real[2], atol=1e-6)
        # every image of the batch got the one draw: transforming real[4] alone with it gives the same
        one = dsa.sample(1, generator=gen(s), image_size=16)
        assert torch.allclose(dsa(real[4:5], one), out_real[4:5], atol=1e-6)
        changed += int(not torch.allclose(out_real, real, atol=1e-4))
    assert changed >= 1  # the augmentation is not the identity


def test_siamese_with_different_channel_counts_and_per_sample_mode_differs():
    dsa = DSA("crop_flip_rotate", flip=1.0)
    a = torch.randn(3, 3, 8, 8)
    b = a[:, :1].clone()
    out_a, out_b = dsa.siamese(a, b, generator=gen(2))
    assert torch.allclose(out_a[:, :1], out_b, atol=1e-6)
    # per-sample parameters: the same image repeated gets different transforms
    same = a[:1].repeat(16, 1, 1, 1)
    out = DSA(mode="multiple")(same, generator=gen(0))
    assert not torch.allclose(out[0], out[1])


# ------------------------------------------------------------------------------ gradients, reproducibility
@pytest.mark.parametrize("strategy", DSA_OPS)
def test_gradients_flow_to_the_images(strategy):
    dsa = DSA(strategy, flip=1.0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    p = dsa.sample(2, generator=gen(4), image_size=6)
    assert torch.autograd.gradcheck(lambda t: dsa(t, p), (x,))
    x32 = torch.randn(3, 3, 8, 8, requires_grad=True)
    a, b = dsa.siamese(x32, x32[:1], generator=gen(1))
    (a.square().sum() + b.sum()).backward()
    assert x32.grad is not None and torch.isfinite(x32.grad).all() and x32.grad.abs().sum() > 0


def test_seeded_generator_reproducibility_and_global_rng_untouched():
    dsa = DSA(mode="multiple")
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = dsa(x, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, dsa(x, generator=gen(7)))
    assert not torch.equal(a, dsa(x, generator=gen(8)))
    r1 = dsa.siamese(x, x[:2], generator=gen(5))
    r2 = dsa.siamese(x, x[:2], generator=gen(5))
    assert all(torch.equal(u, v) for u, v in zip(r1, r2))


def test_params_helpers():
    dsa = DSA()
    p = dsa.sample(3, generator=gen(), image_size=8)
    assert len(p) == 3 and len(p.index(torch.tensor([0, 2]))) == 2
    assert len(DSAParams.cat([p, p])) == 6
    assert len(dsa.sample(1, generator=gen()).expand(5)) == 5
    with pytest.raises(ValueError, match="single draw"):
        p.expand(4)
    with pytest.raises(ValueError, match="parameter rows"):
        dsa(torch.randn(2, 1, 8, 8), p)
    with pytest.raises(ValueError, match="drawn for 8x8 images, got 16x16"):
        dsa(torch.randn(3, 1, 16, 16), p)


# ------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strategy": "color_blur"}, ValueError, "allowed: .*color.*crop.*cutout.*flip.*scale.*rotate"),
        ({"strategy": "flip_flip"}, ValueError, "repeats"),
        ({"strategy": 3}, TypeError, "strategy"),
        ({"flip": 1.5}, ValueError, "flip"),
        ({"scale": 0.5}, ValueError, "scale"),
        ({"crop": -0.1}, ValueError, "crop"),
        ({"cutout": 2.0}, ValueError, "cutout"),
        ({"rotate": -1.0}, ValueError, "rotate"),
        ({"brightness": True}, TypeError, "brightness"),
        ({"saturation": float("nan")}, ValueError, "saturation"),
        ({"mode": "both"}, ValueError, "mode"),
    ],
)
def test_dsa_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DSA(**kwargs)


def test_dsa_bad_inputs():
    with pytest.raises(ValueError, match="B, C, H, W"):
        DSA()(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="same image size"):
        DSA().siamese(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="at least one"):
        DSA().siamese()


# ------------------------------------------------------------------------------ CutMix
def test_cutmix_hand_set_box():
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()  # image 0 all 0, image 1 all 1
    p = CutMixParams(apply=True, box=(1, 0, 3, 2), perm=torch.tensor([1, 0]), lam=1 - 4 / 16)
    out = CutMix.apply(x, p)
    expected0 = torch.zeros(4, 4)
    expected0[1:3, 0:2] = 1.0
    assert torch.equal(out[0, 0], expected0) and torch.equal(out[1, 0], 1 - expected0)
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(CutMix.mix_targets(soft, p), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


def test_cutmix_call_lam_matches_area_and_targets():
    cm = CutMix(beta=1.0)
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    y = torch.arange(8)
    for s in range(20):
        p = cm.sample(8, 16, 16, generator=gen(s))
        top, left, bottom, right = p.box
        assert p.apply and 0 <= top <= bottom <= 16 and 0 <= left <= right <= 16
        assert p.lam == pytest.approx(1 - (bottom - top) * (right - left) / 256)
        mixed, ya, yb, lam = cm(x, y, generator=gen(s))
        assert lam == pytest.approx(p.lam) and torch.equal(ya, y) and torch.equal(yb, y[p.perm])
        pasted = torch.zeros(16, 16, dtype=torch.bool)
        pasted[top:bottom, left:right] = True
        assert torch.equal(mixed[:, :, pasted], x[p.perm][:, :, pasted])
        assert torch.equal(mixed[:, :, ~pasted], x[:, :, ~pasted])
    mixed.sum().backward()
    assert x.grad is not None
    soft = torch.softmax(torch.randn(8, 10), -1)
    mixed, t = cm(x.detach(), soft, generator=gen(0))
    p = cm.sample(8, 16, 16, generator=gen(0))
    assert torch.allclose(t, p.lam * soft + (1 - p.lam) * soft[p.perm])
    assert torch.allclose(t.sum(-1), torch.ones(8))


def test_cutmix_prob_zero_and_beta():
    x = torch.randn(4, 1, 8, 8)
    y = torch.arange(4)
    mixed, ya, yb, lam = CutMix(prob=0.0)(x, y, generator=gen())
    assert torch.equal(mixed, x) and lam == 1.0
    lams = [CutMix(beta=0.2).sample(2, 64, 64, generator=gen(s)).lam for s in range(200)]
    # Beta(0.2, 0.2) puts most mass near 0 and 1: many batches barely mixed or almost replaced
    assert sum(v > 0.9 for v in lams) > 40
    a, b = (CutMix(beta=2.0).sample(2, 8, 8, generator=gen(1)) for _ in range(2))
    assert a.lam == b.lam and a.box == b.box and torch.equal(a.perm, b.perm)


@pytest.mark.parametrize(("kwargs", "match"), [({"beta": 0.0}, "beta"), ({"beta": "1"}, "beta"), ({"prob": 1.5}, "prob")])
def test_cutmix_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CutMix(**kwargs)
