"""DART's selection rule (``dart_keep_indices`` / ``dart_select``) against an independent, direct implementation,
and the baselines' pure parts (pooling vs torch's adaptive pooling, FastV's ranking, Random)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_eff.tokens import (
    DART,
    FastV,
    Indices,
    Pool,
    Random,
    SelectionContext,
    build_keep_index,
    dart_keep_indices,
    dart_num_kept,
    dart_select,
)
from lightning_eff.tokens.baselines import pool_matrix


def reference_dart(hidden, keys, start, length, p_img, p_txt, max_kept):
    """The rule as the paper/official code states it, written with Python lists (float64 similarities)."""
    seq_len = hidden.shape[0]
    l1 = [float(keys[i].double().abs().sum()) for i in range(seq_len)]
    image = list(range(start, start + length))
    text = list(range(start + length, seq_len))
    img_piv = sorted(image, key=lambda i: -l1[i])[:p_img]
    txt_piv = sorted(text, key=lambda i: -l1[i])[:p_txt]
    topk = max_kept // (p_img + p_txt)
    kept = set(img_piv)
    candidates = [i for i in image if i not in img_piv]
    for piv in sorted(img_piv + txt_piv):  # ascending position order
        sims = {
            j: float(F.cosine_similarity(hidden[piv].double(), hidden[j].double(), dim=0)) for j in candidates
        }
        chosen = sorted(candidates, key=lambda j: sims[j])[:topk]  # least similar first
        kept.update(chosen)
        candidates = [j for j in candidates if j not in chosen]
    return sorted(kept)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("p_img,p_txt,max_kept", [(4, 4, 16), (4, 4, 24), (2, 3, 11), (3, 0, 9), (1, 2, 30)])
def test_dart_keep_indices_matches_direct_rule(seed, p_img, p_txt, max_kept):
    g = torch.Generator().manual_seed(seed)
    seq_len, start, length = 70, 5 + seed % 4, 48
    hidden = torch.randn(seq_len, 32, generator=g)
    keys = torch.randn(seq_len, 24, generator=g)
    got = dart_keep_indices(hidden, keys, start, length, p_img, p_txt, max_kept)
    want = reference_dart(hidden, keys, start, length, p_img, p_txt, max_kept)
    assert got.tolist() == want
    assert (
        len(want)
        == p_img + (p_img + p_txt) * (max_kept // (p_img + p_txt))
        == dart_num_kept(max_kept, p_img, p_txt)
    )


def test_dart_hand_computed_example():
    """Image span [1, 5); key L1 norms make position 2 the image pivot and 6 the text pivot; TOPK = 2 // 2 = 1.

    Pivot 2 (first, ascending order): candidates 1, 3, 4 with cos 0.6, 0.8, -1 -> keeps 4.
    Pivot 6: candidates 1, 3 with cos 0 (orthogonal) and 1 -> keeps 1.  Kept: 2 (pivot), 4, 1.
    """
    hidden = torch.tensor(
        [[0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.8, 0.6], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    )
    keys = torch.tensor([[0.0], [1.0], [5.0], [1.0], [1.0], [2.0], [3.0], [1.0]])
    assert dart_keep_indices(
        hidden, keys, 1, 4, num_image_pivots=1, num_text_pivots=1, max_kept=2
    ).tolist() == [1, 2, 4]


def test_dart_kept_count_formula_and_selector_budget():
    assert dart_num_kept(128) == 4 + 8 * 16 == 132
    assert dart_num_kept(64) == 68
    assert DART(num_kept=128).num_kept_for(576) == 132
    # keep_ratio gives max_kept = round(0.111 * 576) = 64
    assert DART(keep_ratio=0.111).num_kept_for(576) == 68
    assert DART(num_kept=9, num_image_pivots=3, num_text_pivots=0).num_kept_for(20) == 3 + 3 * 3


def test_dart_select_batch_equals_rows_with_padding_and_different_starts():
    g = torch.Generator().manual_seed(3)
    b, seq_len, length = 3, 60, 40
    hidden, keys = torch.randn(b, seq_len, 16, generator=g), torch.randn(b, seq_len, 16, generator=g)
    starts = torch.tensor([2, 6, 10])
    valid = torch.ones(b, seq_len, dtype=torch.bool)
    valid[0, 55:] = False  # right padding of sequence 0: never a text pivot
    got = dart_select(hidden, keys, starts, length, valid, 4, 4, 16)
    for i in range(b):
        n = int(valid[i].sum())
        want = reference_dart(hidden[i, :n], keys[i, :n], int(starts[i]), length, 4, 4, 16)
        assert got[i].tolist() == want
    # padding with a huge key norm would be a text pivot if it were not excluded
    keys[0, 58] = 100.0
    assert dart_select(hidden, keys, starts, length, valid, 4, 4, 16)[0].tolist() == got[0].tolist()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_start=30, image_len=40), "out of range"),
        (dict(image_start=-1, image_len=10), "out of range"),
        (dict(image_start=0, image_len=10, max_kept=64), "budget keeps"),
        (dict(image_start=0, image_len=40, num_text_pivots=4, max_kept=8), "tokens after its image span"),
        (dict(image_start=0, image_len=10, num_image_pivots=-1), "num_image_pivots"),
        (dict(image_start=0, image_len=10, max_kept=0), "max_kept"),
        (dict(image_start=0, image_len=10, num_image_pivots=0, num_text_pivots=0), "at least one pivot"),
    ],
)
def test_dart_bad_inputs(kwargs, match):
    hidden, keys = torch.randn(40, 8), torch.randn(40, 8)
    with pytest.raises(ValueError, match=match):
        dart_keep_indices(hidden, keys, **kwargs)


def test_dart_bad_shapes_and_types():
    with pytest.raises(ValueError, match="same L"):
        dart_keep_indices(torch.randn(10, 4), torch.randn(9, 4), 0, 5)
    with pytest.raises(TypeError, match="image_start"):
        dart_keep_indices(torch.randn(10, 4), torch.randn(10, 4), 0.5, 5)


def test_selector_budget_errors():
    with pytest.raises(ValueError, match="exactly one of `num_kept`"):
        DART()
    with pytest.raises(ValueError, match="exactly one of `num_kept`"):
        Random(num_kept=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"`keep_ratio` must be in \(0.0, 1.0\], got 1.5"):
        Pool(keep_ratio=1.5)
    with pytest.raises(ValueError, match="`num_kept` must be an int >= 1, got 0"):
        FastV(num_kept=0)
    with pytest.raises(ValueError, match="`query` must be 'last' or 'mean'"):
        FastV(num_kept=2, query="first")
    with pytest.raises(ValueError, match="grid"):
        Pool(num_kept=2, grid=(2, 0))
    ctx = SelectionContext(torch.zeros(1, 10, 2), torch.tensor([0]), 5, torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="budget keeps 6 tokens but the compressible span has only 5"):
        Random(num_kept=6).select(ctx)


def test_pool_matches_torch_adaptive_pooling():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 30, 8, generator=g)
    starts = torch.tensor([3, 5])
    ctx = SelectionContext(h, starts, 24, torch.ones(2, 30, dtype=torch.bool))
    sel = Pool(num_kept=7).select(ctx)
    for i in range(2):
        s = int(starts[i])
        want = F.adaptive_avg_pool1d(h[i, s : s + 24].T.unsqueeze(0), 7)[0].T
        torch.testing.assert_close(sel.values[i], want)
    assert (sel.indices.diff(dim=1) > 0).all()
    # 2-D: a 6x4 grid pooled to 3x2 cells (aspect 1.5 kept) equals AdaptiveAvgPool2d
    sel2 = Pool(num_kept=6, grid=(6, 4)).select(ctx)
    for i in range(2):
        s = int(starts[i])
        img = h[i, s : s + 24].T.reshape(8, 6, 4)
        want = F.adaptive_avg_pool2d(img, (3, 2)).reshape(8, 6).T
        torch.testing.assert_close(sel2.values[i], want)
    w, rep = pool_matrix(24, 6, (6, 4))
    assert rep.tolist() == [0 * 4 + 0, 0 * 4 + 2, 2 * 4 + 0, 2 * 4 + 2, 4 * 4 + 0, 4 * 4 + 2]
    assert torch.allclose(w.sum(1), torch.ones(6))


def test_fastv_ranks_by_last_token_and_mean_attention():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(2, 3, 12, 12, generator=g).softmax(-1)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 10:] = False  # right padding: the last valid token of sequence 1 is 9
    ctx = SelectionContext(torch.zeros(2, 12, 4), torch.tensor([2, 2]), 6, valid, attentions=attn)
    got = FastV(num_kept=3).select(ctx).indices
    for i, last in enumerate([11, 9]):
        score = attn[i].mean(0)[last, 2:8]
        assert got[i].tolist() == sorted((torch.argsort(score, descending=True)[:3] + 2).tolist())
    got_mean = FastV(num_kept=3, query="mean").select(ctx).indices
    score = attn[1].mean(0)[:10].mean(0)[2:8]
    assert got_mean[1].tolist() == sorted((torch.argsort(score, descending=True)[:3] + 2).tolist())
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        FastV(num_kept=3).select(SelectionContext(torch.zeros(1, 12, 4), torch.tensor([2]), 6, valid[:1]))


def test_random_is_seeded_uniform_subset():
    ctx = SelectionContext(
        torch.zeros(2, 20, 2), torch.tensor([3, 4]), 10, torch.ones(2, 20, dtype=torch.bool)
    )
    a, b = Random(num_kept=4, seed=7).select(ctx).indices, Random(num_kept=4, seed=7).select(ctx).indices
    assert torch.equal(a, b) and a.shape == (2, 4)
    assert ((a[0] >= 3) & (a[0] < 13)).all() and ((a[1] >= 4) & (a[1] < 14)).all()
    counts = torch.zeros(10)
    sel = Random(keep_ratio=0.3, seed=0)
    for _ in range(300):
        counts += torch.bincount(sel.select(ctx).indices[0] - 3, minlength=10)
    assert counts.sum() == 900 and counts.min() > 50 and counts.max() < 130  # ~90 each


def test_indices_and_build_keep_index():
    ctx = SelectionContext(torch.zeros(2, 9, 2), torch.tensor([1, 3]), 4, torch.ones(2, 9, dtype=torch.bool))
    assert Indices([2, 0]).select(ctx).indices.tolist() == [[1, 3], [3, 5]]
    with pytest.raises(ValueError, match="outside the span"):
        Indices([4]).select(ctx)
    keep = build_keep_index(torch.tensor([1, 3]), 4, 9, torch.tensor([[1, 3], [3, 5]]))
    assert keep.tolist() == [[0, 1, 3, 5, 6, 7, 8], [0, 1, 2, 3, 5, 7, 8]]
