"""The evaluation protocol: vectorised == sequential, accuracy, lr grid, soft labels, DRUPI term, callback.

Most tests give the protocol's fields as keywords (``evaluate_synthetic(s, dm, epochs=2, lr=0.05)``), which is
``evaluate_synthetic(s, dm, StudentProtocol(epochs=2, lr=0.05))`` (tested below).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import digits_fixture
from torch import nn

from lightning_eff.data import DigitsDataModule
from lightning_eff.distill.augment import DSA, CutMix
from lightning_eff.distill.evaluate import (
    EvaluationResult,
    StudentProtocol,
    SyntheticEvalCallback,
    default_student,
    evaluate_synthetic,
    evaluate_synthetic_sets,
    privileged_loss,
    soft_label_loss,
    stacked_convnet_forward,
)
from lightning_eff.distill.synthetic import SyntheticSet
from lightning_eff.models import ConvNet

dm16 = digits_fixture(16)
dm8 = digits_fixture(8)


def tiny(width: int = 8, size: int = 16, depth: int = 2, norm: str = "instance") -> ConvNet:
    return ConvNet(in_channels=1, num_classes=10, width=width, depth=depth, image_size=size, norm=norm)


def small_set(dm, ipc: int = 2, seed: int = 0, **fields) -> SyntheticSet:
    s = SyntheticSet.random_subset(dm, ipc, seed=seed)
    return SyntheticSet(s.images, s.labels, lr=fields.pop("lr", None), metadata=dict(s.metadata, **fields.pop("meta", {})),
                        **fields)


def state_close(a: nn.Module, b: nn.Module, atol: float = 2e-5, rtol: float = 1e-4) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=atol, rtol=rtol) for k in sa)


# ------------------------------------------------------------------------------ vectorised == sequential
CONFIGS = {
    "hard+dsa": dict(dsa=DSA()),
    "soft-S-kl+cutmix": dict(use_soft_labels="S", soft_loss="kl", temperature=2.0, cutmix=CutMix(beta=1.0)),
    "privileged+dsa-multiple": dict(dsa=DSA(mode="multiple"), privileged_weight=0.5),
    "teacher-M+dsa": dict(use_soft_labels="M", dsa=DSA("crop_flip")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vectorized_equals_sequential(dm16, name):
    """Independent torch.optim.SGD per student == the stacked vmap students with a per-student lr tensor."""
    kwargs = dict(CONFIGS[name])
    fields = {}
    if kwargs.get("use_soft_labels") == "S":
        fields["soft_labels"] = torch.randn(20, 10, generator=torch.Generator().manual_seed(1))
    if "privileged_weight" in kwargs:  # attention labels: [N, width] pooled encoder outputs
        fields["privileged"] = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
        fields["meta"] = {"privileged": {"kind": "attention", "pooling": "max", "weight": 0.5}}
    if kwargs.get("use_soft_labels") == "M":
        kwargs["teacher"] = tiny(width=4)
    synset = small_set(dm16, ipc=2, **fields)
    common = dict(net=tiny(), num_students=3, epochs=4, lr=[0.01, 0.05, 0.1], batch_size=8, seed=3,
                  device="cpu", eval_every=2, return_students=True, **kwargs)
    seq = evaluate_synthetic(synset, dm16, vectorize=False, **common)
    assert not seq.protocol["vectorized"]
    for mode, impl in ((True, "stacked"), ("vmap", "vmap")):
        vec = evaluate_synthetic(synset, dm16, vectorize=mode, **common)
        assert vec.protocol["vectorized"] and vec.protocol["vectorized_impl"] == impl
        for a, b in zip(vec.students, seq.students):
            assert state_close(a, b)
        assert [h["epoch"] for h in vec.history] == [h["epoch"] for h in seq.history] == [2, 4]
        for hv, hs in zip(vec.history, seq.history):
            assert max(abs(u - v) for u, v in zip(hv["accuracies"], hs["accuracies"])) <= 2 / 359
    # the students really trained (parameters moved away from a fresh initialisation)
    assert not state_close(seq.students[2], tiny())


@pytest.mark.parametrize("norm", ["instance", "layer", "none"])
def test_stacked_convnet_forward_matches_each_student(norm):
    from torch.func import stack_module_state

    nets = [ConvNet(3, 7, width=6, depth=2, image_size=8, norm=norm, pooling=p) for p in ("avg", "avg", "avg")]
    for i, net in enumerate(nets):
        torch.manual_seed(i)
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    params, _ = stack_module_state(nets)
    x = torch.randn(3, 5, 3, 8, 8)
    logits, feats = stacked_convnet_forward(nets[0], params, x, 3)
    shared_logits, _ = stacked_convnet_forward(nets[0], params, x[0], 3)
    for i, net in enumerate(nets):
        assert torch.allclose(logits[i], net(x[i]), atol=1e-5)
        assert torch.allclose(feats[i], net.encoder(x[i]), atol=1e-5)
        assert torch.allclose(shared_logits[i], net(x[0]), atol=1e-5)


def test_students_do_not_interact(dm16):
    """Student 0 of a 3-student vectorised run is the 1-student run: no cross-talk in the stacked training."""
    synset = small_set(dm16, ipc=3)
    common = dict(net=tiny(), epochs=3, batch_size=16, dsa=DSA(), seed=11, device="cpu", vectorize=True,
                  return_students=True)
    three = evaluate_synthetic(synset, dm16, num_students=3, lr=[0.05, 0.01, 0.2], **common)
    one = evaluate_synthetic(synset, dm16, num_students=1, lr=[0.05], **common)
    assert state_close(three.students[0], one.students[0], atol=1e-6)
    assert three.accuracies[0] == pytest.approx(one.accuracies[0], abs=1 / 359)
    assert not state_close(three.students[0], three.students[1])


# ------------------------------------------------------------------------------ the protocol object
def test_protocol_object_equals_keywords_and_keywords_override_it(dm16):
    synset = small_set(dm16)
    p = StudentProtocol(epochs=2, lr=(0.05, 0.01), batch_size=8, dsa="crop_flip", eval_every=1)
    kw = dict(net=tiny(), seed=3, device="cpu", return_students=True)
    a = evaluate_synthetic(synset, dm16, p, **kw)
    assert len(a.accuracies) == 2 and a.lrs == [0.05, 0.01]  # num_students: one per lr of the list
    assert a.protocol["epochs"] == 2 and a.protocol["dsa"] == DSA("crop_flip").config()
    b = evaluate_synthetic(synset, dm16, epochs=2, lr=[0.05, 0.01], batch_size=8, dsa=DSA("crop_flip"),
                           eval_every=1, num_students=2, **kw)
    c = evaluate_synthetic(synset, dm16, p.replace(epochs=9, batch_size=4), epochs=2, batch_size=8, **kw)
    for other in (b, c):
        assert other.protocol == a.protocol and other.history == a.history
        assert all(state_close(u, v, atol=0, rtol=0) for u, v in zip(a.students, other.students))
    # the sets variant takes the same protocol
    (d,) = evaluate_synthetic_sets([synset], dm16, p, **kw)
    assert d.history == a.history


def test_protocol_argument_errors(dm16):
    s16 = small_set(dm16)
    with pytest.raises(TypeError, match=r"evaluate_synthetic: unknown argument\(s\) \['epoch'\]"):
        evaluate_synthetic(s16, dm16, epoch=3)
    with pytest.raises(TypeError, match="`protocol` must be a StudentProtocol.*net="):
        evaluate_synthetic(s16, dm16, tiny())  # the former third positional argument, net
    with pytest.raises(TypeError, match="`protocol` must be a StudentProtocol"):
        evaluate_synthetic_sets([s16], dm16, {"epochs": 2})
    with pytest.raises(ValueError, match="StudentProtocol: `batch_size`"):
        evaluate_synthetic(s16, dm16, StudentProtocol(), batch_size=0)


def test_public_helpers_and_former_private_names(dm16):
    from lightning_eff.distill import evaluate as old
    from lightning_eff.distill.evaluation import load_test_tensors
    from lightning_eff.models.privileged import FeatureTap

    x, y = load_test_tensors(dm16)
    assert old._test_tensors is load_test_tensors and old._FeatureTap is FeatureTap
    assert x.shape[1:] == (1, 16, 16) and len(x) == len(y) == len(dm16.test_set)
    assert torch.equal(y, torch.cat([b[1] for b in dm16.test_dataloader()]))
    net = tiny()
    tap = FeatureTap(net, "encoder")
    tap.active = True
    out = net(x[:3])
    assert out.shape == (3, 10) and torch.equal(tap.take(), net.encoder(x[:3]))


# ------------------------------------------------------------------------------ several sets in one call
@pytest.mark.parametrize("vectorize", [False, True, "vmap"])
@pytest.mark.parametrize("config", ["hard+dsa", "soft-S-kl+cutmix"])
def test_sets_trained_together_equal_separate_calls(dm16, vectorize, config):
    """Each set's students are what evaluate_synthetic gives for it alone (own seed, own lr list)."""
    kwargs = dict(CONFIGS[config])
    soft = kwargs.get("use_soft_labels") == "S"

    def make(seed):
        fields = {"soft_labels": torch.randn(20, 10, generator=torch.Generator().manual_seed(seed))} if soft else {}
        return small_set(dm16, ipc=2, seed=seed, **fields)

    a, b = make(0), make(1)
    common = dict(net=tiny(), num_students=2, epochs=3, batch_size=8, device="cpu", eval_every=2,
                  return_students=True, vectorize=vectorize, **kwargs)
    lrs = [[0.01, 0.05], [0.1, 0.02], [0.03, 0.03]]
    together = evaluate_synthetic_sets([a, b, a], dm16, lr=lrs, seed=[3, 4, 5], **common)
    assert len(together) == 3 and all(r.protocol["sets_trained_together"] == 3 for r in together)
    for res, synset, lr, seed in zip(together, (a, b, a), lrs, (3, 4, 5)):
        alone = evaluate_synthetic(synset, dm16, lr=lr, seed=seed, **common)
        assert res.lrs == lr and res.protocol["seed"] == seed and alone.protocol["sets_trained_together"] == 1
        for u, v in zip(res.students, alone.students):
            assert state_close(u, v, atol=1e-6)
        for hu, hv in zip(res.history, alone.history):
            assert max(abs(x - y) for x, y in zip(hu["accuracies"], hv["accuracies"])) <= 1 / 359
    # the same set with another seed trains other students; one seed for all = common random numbers
    assert not state_close(together[0].students[0], together[2].students[0])
    crn = evaluate_synthetic_sets([a, a], dm16, lr=0.05, seed=7, **common)
    assert crn[0].accuracies == crn[1].accuracies


def test_sets_trained_together_errors(dm16):
    a, b = small_set(dm16, ipc=2), small_set(dm16, ipc=3)
    common = dict(net=tiny(), num_students=1, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="same number of images"):
        evaluate_synthetic_sets([a, b], dm16, **common)
    with pytest.raises(ValueError, match="2 values for 1 sets"):
        evaluate_synthetic_sets([a], dm16, seed=[1, 2], **common)
    with pytest.raises(ValueError, match="per-set lists for 2 sets"):
        evaluate_synthetic_sets([a, a], dm16, lr=[[0.1]], **common)
    with pytest.raises(TypeError, match="non-empty sequence"):
        evaluate_synthetic_sets([], dm16, **common)
    with pytest.raises(TypeError, match=r"synsets\[1\]"):
        evaluate_synthetic_sets([a, "b"], dm16, **common)
    priv = small_set(dm16, ipc=2, privileged=torch.randn(20, 8),
                     meta={"privileged": {"kind": "attention", "pooling": "max", "weight": 0.5}})
    with pytest.raises(ValueError, match="same privileged information settings"):
        evaluate_synthetic_sets([a, priv], dm16, **common)
    # an explicit weight of 0 makes them compatible (the privileged information is ignored)
    assert len(evaluate_synthetic_sets([a, priv], dm16, privileged_weight=0.0, **common)) == 2


# ------------------------------------------------------------------------------ the protocol works
def test_random_real_ipc10_is_clearly_above_chance(dm16):
    synset = SyntheticSet.random_subset(dm16, 10, seed=0)
    res = evaluate_synthetic(synset, dm16, net=tiny(width=16, depth=3), num_students=2, epochs=30, device="cpu",
                             seed=0)
    assert res.mean > 0.6, res  # chance is 0.1
    assert len(res.accuracies) == 2 and res.best_accuracies is None
    assert res.std == pytest.approx(float(torch.tensor(res.accuracies).std(unbiased=False)))
    json.dumps(res.to_dict())
    assert res.protocol["lr"] == [0.01, 0.01] and res.protocol["momentum"] == 0.9
    assert res.protocol["weight_decay"] == 5e-4 and res.protocol["batch_size"] == 256
    assert res.seconds > 0


def test_per_student_lr_and_zero_lr_stays_at_initialisation(dm16):
    synset = SyntheticSet.random_subset(dm16, 10, seed=1)
    common = dict(net=tiny(width=16, depth=3), num_students=2, seed=5, device="cpu", vectorize=True,
                  return_students=True)
    res = evaluate_synthetic(synset, dm16, epochs=25, lr=[0.0, 0.05], **common)
    assert res.lrs == [0.0, 0.05]
    assert res.accuracies[0] < 0.3 < 0.6 < res.accuracies[1]
    # lr 0 changes nothing however long it trains: the same parameters after 1 and after 25 epochs
    short = evaluate_synthetic(synset, dm16, epochs=1, lr=[0.0, 0.05], **common)
    assert state_close(res.students[0], short.students[0], atol=0, rtol=0)
    assert res.accuracies[0] == short.accuracies[0]


def test_lr_from_the_synthetic_set(dm16):
    synset = small_set(dm16, lr=0.03)
    res = evaluate_synthetic(synset, dm16, net=tiny(), num_students=2, epochs=1, lr="synset", device="cpu")
    assert res.lrs == [0.03, 0.03]


def test_eval_every_reports_best_checkpoint(dm16):
    synset = small_set(dm16, ipc=5)
    res = evaluate_synthetic(synset, dm16, net=tiny(), num_students=2, epochs=5, eval_every=2, lr=0.05,
                             device="cpu")
    assert [h["epoch"] for h in res.history] == [2, 4, 5]
    assert res.accuracies == res.history[-1]["accuracies"]
    for s in range(2):
        assert res.best_accuracies[s] == max(h["accuracies"][s] for h in res.history)
        assert res.best_accuracies[s] >= res.accuracies[s]
    assert res.best_mean == pytest.approx(sum(res.best_accuracies) / 2)


def test_determinism_with_the_same_seed(dm16):
    synset = small_set(dm16, ipc=3)
    kw = dict(net=tiny(), num_students=2, epochs=3, dsa=DSA(), cutmix=CutMix(), device="cpu", return_students=True)
    torch.manual_seed(0)
    a = evaluate_synthetic(synset, dm16, seed=4, **kw)
    torch.manual_seed(99)  # the global RNG does not matter
    b = evaluate_synthetic(synset, dm16, seed=4, **kw)
    c = evaluate_synthetic(synset, dm16, seed=5, **kw)
    assert a.accuracies == b.accuracies
    assert all(state_close(u, v, atol=0, rtol=0) for u, v in zip(a.students, b.students))
    assert not state_close(a.students[0], c.students[0])


# ------------------------------------------------------------------------------ soft labels
def test_soft_label_losses_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    p = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]])
    t = 2.0
    logq = torch.log_softmax(s / t, -1)
    assert torch.isclose(soft_label_loss(s, p, "sce", t), -(p * logq).sum(-1).mean())
    assert torch.isclose(soft_label_loss(s, p, "kl", t), t * t * (p * (p.log() - logq)).sum() / 2)
    with pytest.raises(ValueError, match="kind"):
        soft_label_loss(s, p, "mse")


def test_one_hot_soft_labels_equal_hard_labels(dm16):
    base = small_set(dm16, ipc=3)
    onehot = F.one_hot(base.labels, 10).float()
    soft = SyntheticSet(base.images, base.labels, soft_labels=onehot,
                        metadata=dict(base.metadata, soft_label_kind="probabilities"))
    kw = dict(net=tiny(), num_students=2, epochs=3, dsa=DSA(), lr=0.05, seed=2, device="cpu", return_students=True)
    hard = evaluate_synthetic(base, dm16, **kw)
    sce = evaluate_synthetic(soft, dm16, use_soft_labels=True, soft_loss="sce", temperature=1.0, **kw)
    assert hard.accuracies == sce.accuracies
    assert all(state_close(u, v, atol=1e-6) for u, v in zip(hard.students, sce.students))


def test_soft_labels_are_what_the_students_learn(dm16):
    """Soft labels pointing at the next class (as logits) teach the shifted mapping: accuracy collapses."""
    base = SyntheticSet.random_subset(dm16, 10, seed=0)
    shifted = 20.0 * F.one_hot((base.labels + 1) % 10, 10).float()
    synset = SyntheticSet(base.images, base.labels, soft_labels=shifted, metadata=dict(base.metadata))
    kw = dict(net=tiny(width=16, depth=3), num_students=1, epochs=25, lr=0.05, seed=0, device="cpu")
    hard = evaluate_synthetic(synset, dm16, **kw)
    soft = evaluate_synthetic(synset, dm16, use_soft_labels="S", **kw)
    assert hard.mean > 0.6 and soft.mean < 0.1


class _ConstantTeacher(nn.Module):
    """Logits that always favour class 3; records what it was shown."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return 10.0 * F.one_hot(torch.full((x.shape[0],), 3), 10).float()


def test_teacher_mode_m_labels_every_augmented_batch(dm16):
    synset = small_set(dm16, ipc=2)
    teacher = _ConstantTeacher().train()
    res = evaluate_synthetic(synset, dm16, net=tiny(), num_students=2, epochs=10, lr=0.05, batch_size=8,
                             dsa=DSA("flip", flip=1.0), use_soft_labels="M", teacher=teacher, device="cpu",
                             vectorize=True)
    test_y = torch.cat([y for _, y in dm16.test_dataloader()])
    assert res.mean == pytest.approx(float((test_y == 3).float().mean()))  # everything predicted as class 3
    assert teacher.training  # mode restored
    assert len(teacher.seen) == 10 * 3  # one call per step (both students together): 10 epochs x 3 batches
    flipped = synset.images.flip(-1)
    first = teacher.seen[0].view(-1, *synset.image_shape)
    # the teacher saw the augmented (flipped) synthetic images, not the stored ones
    assert all(any(torch.equal(img, f) for f in flipped) for img in first)


# ------------------------------------------------------------------------------ DRUPI privileged information
def test_privileged_loss_by_hand():
    e = torch.arange(16.0).view(1, 4, 2, 2)
    f_att = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    avg = torch.tensor([[1.5, 5.5, 9.5, 13.5]])
    assert torch.isclose(privileged_loss(e, f_att, "attention", "avg"), ((avg - f_att) ** 2).mean())
    mx = torch.tensor([[3.0, 7.0, 11.0, 15.0]])
    assert torch.isclose(privileged_loss(e, f_att, "attention", "max"), ((mx - f_att) ** 2).mean())
    assert torch.isclose(privileged_loss(e, torch.zeros(1, 16), "feature"), (e**2).mean())


def _priv_set(dm, weight: float, kind: str = "feature", ipc: int = 3) -> SyntheticSet:
    base = small_set(dm, ipc=ipc)
    shape = (8, 4, 4) if kind == "feature" else (8,)
    meta = dict(base.metadata, privileged={"kind": kind, "pooling": "avg", "weight": weight})
    return SyntheticSet(base.images, base.labels, privileged=torch.zeros(len(base), *shape), metadata=meta)


def test_privileged_term_changes_training_and_weight_zero_has_no_effect(dm16):
    kw = dict(net=tiny(), num_students=2, epochs=6, lr=0.05, seed=1, device="cpu", return_students=True)
    plain = evaluate_synthetic(small_set(dm16, ipc=3), dm16, **kw)
    zero = evaluate_synthetic(_priv_set(dm16, 0.0), dm16, **kw)  # weight from the metadata: 0
    forced_zero = evaluate_synthetic(_priv_set(dm16, 20.0), dm16, privileged_weight=0.0, **kw)
    strong = evaluate_synthetic(_priv_set(dm16, 20.0), dm16, **kw)  # F = 0: pulls E(x) towards 0
    for other in (zero, forced_zero):
        assert all(state_close(u, v, atol=0, rtol=0) for u, v in zip(plain.students, other.students))
    assert strong.protocol["privileged_weight"] == 20.0 and zero.protocol["privileged"] is None
    images = small_set(dm16, ipc=3).images
    with torch.no_grad():
        norm_plain = plain.students[0].encoder(images).square().mean()
        norm_strong = strong.students[0].encoder(images).square().mean()
    assert norm_strong < 0.2 * norm_plain


def test_privileged_attention_vectorized_matches_sequential_on_feature_kind(dm16):
    kw = dict(net=tiny(), num_students=2, epochs=2, lr=0.05, seed=1, device="cpu", return_students=True,
              batch_size=8)
    a = evaluate_synthetic(_priv_set(dm16, 1.0, "feature"), dm16, vectorize=True, **kw)
    b = evaluate_synthetic(_priv_set(dm16, 1.0, "feature"), dm16, vectorize=False, **kw)
    assert all(state_close(u, v) for u, v in zip(a.students, b.students))


# ------------------------------------------------------------------------------ defaults, fallbacks, progress
def test_default_student_sizes(dm8):
    assert default_student((1, 8, 8), 10).depth == 2
    assert default_student((3, 16, 16), 10).depth == 3
    assert default_student((3, 32, 32), 10).depth == 3
    assert default_student((3, 64, 64), 10).depth == 4
    assert default_student((3, 128, 128), 100).depth == 5
    net = default_student((3, 32, 32), 10)
    assert net.width == 128 and net.norm == "instance" and net.num_classes == 10
    with pytest.raises(ValueError, match="square"):
        default_student((3, 32, 16), 10)
    res = evaluate_synthetic(small_set(dm8, ipc=1), dm8, num_students=1, epochs=1, device="cpu")
    assert res.protocol["net"]["config"]["depth"] == 2 and res.protocol["net"]["config"]["width"] == 128


def test_batchnorm_students_fall_back_to_the_loop(dm16):
    with pytest.warns(UserWarning, match="BatchNorm"):
        res = evaluate_synthetic(small_set(dm16), dm16, net=tiny(norm="batch"), num_students=2, epochs=2,
                                 device="cpu", vectorize=True)
    assert res.protocol["vectorized"] is False and "BatchNorm" in res.protocol["vectorize_fallback"]


def test_auto_vectorize_is_off_on_cpu_and_progress_bar(dm16, capsys):
    res = evaluate_synthetic(small_set(dm16), dm16, net=tiny(), num_students=2, epochs=2, device="cpu",
                             progress=True)
    assert res.protocol["vectorized"] is False
    assert "evaluate_synthetic" in capsys.readouterr().err


# ------------------------------------------------------------------------------ errors
def test_errors(dm16, dm8):
    s16 = small_set(dm16)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\).*\(1, 16, 16\)"):
        evaluate_synthetic(small_set(dm8), dm16, epochs=1)
    bad = SyntheticSet(s16.images, torch.full((20,), 11), metadata=dict(s16.metadata, num_classes=12))
    with pytest.raises(ValueError, match="labels go up to 11.*num_classes=10"):
        evaluate_synthetic(bad, dm16, epochs=1)
    with pytest.raises(ValueError, match="needs a `teacher`"):
        evaluate_synthetic(s16, dm16, use_soft_labels="M")
    with pytest.raises(ValueError, match="use_soft_labels='M'"):
        evaluate_synthetic(s16, dm16, teacher=tiny())
    with pytest.raises(ValueError, match="no soft_labels"):
        evaluate_synthetic(s16, dm16, use_soft_labels=True)
    with pytest.raises(ValueError, match="no privileged"):
        evaluate_synthetic(s16, dm16, privileged_weight=0.1)
    with pytest.raises(ValueError, match="one lr per student"):
        evaluate_synthetic(s16, dm16, lr=[0.1, 0.01], num_students=3)
    with pytest.raises(ValueError, match="no learned lr"):
        evaluate_synthetic(s16, dm16, lr="synset")
    with pytest.raises(ValueError, match="`lr`"):
        evaluate_synthetic(s16, dm16, lr=-0.1)
    with pytest.raises(ValueError, match="soft_loss"):
        evaluate_synthetic(s16, dm16, soft_loss="mse")
    with pytest.raises(ValueError, match="temperature"):
        evaluate_synthetic(s16, dm16, temperature=0.0)
    with pytest.raises(ValueError, match="eval_every"):
        evaluate_synthetic(s16, dm16, eval_every=0)
    with pytest.raises(ValueError, match="momentum"):
        evaluate_synthetic(s16, dm16, momentum=1.0)
    with pytest.raises(ValueError, match="vectorize"):
        evaluate_synthetic(s16, dm16, vectorize="yes")
    with pytest.raises(ValueError, match="num_students"):
        evaluate_synthetic(s16, dm16, num_students=0)
    with pytest.raises(TypeError, match="epochs"):
        evaluate_synthetic(s16, dm16, epochs=2.5)
    with pytest.raises(TypeError, match="`net`"):
        evaluate_synthetic(s16, dm16, net="ConvNet")
    with pytest.raises(TypeError, match="`dsa`"):
        evaluate_synthetic(s16, dm16, dsa=1)
    with pytest.raises(TypeError, match="`synset`"):
        evaluate_synthetic(s16.images, dm16)
    with pytest.raises(TypeError, match="datamodule"):
        evaluate_synthetic(s16, object())
    with pytest.raises(ValueError, match="8 values per image"):
        wrong = SyntheticSet(s16.images, s16.labels, privileged=torch.zeros(20, 5),
                             metadata=dict(s16.metadata, privileged={"kind": "attention", "weight": 1.0}))
        evaluate_synthetic(wrong, dm16, net=tiny(), epochs=1)
    bogus = SyntheticSet(s16.images, s16.labels, privileged=torch.zeros(20, 8),
                         metadata=dict(s16.metadata, privileged={"kind": "saliency", "weight": 1.0}))
    with pytest.raises(ValueError, match=r"`synset.metadata\['privileged'\]\['kind'\]` must be one of"):
        evaluate_synthetic(bogus, dm16, net=tiny(), epochs=1)
    with pytest.raises(ValueError, match="feature_layer"):
        evaluate_synthetic(_priv_set(dm16, 1.0), dm16, net=nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), epochs=1)


# ------------------------------------------------------------------------------ the callback
class _FakeDistillation(L.LightningModule):
    """A minimal distillation-like module: the synthetic images are a parameter nudged each step."""

    def __init__(self, synset: SyntheticSet):
        super().__init__()
        self.images = nn.Parameter(synset.images.clone())
        self.register_buffer("labels", synset.labels.clone())
        self.meta = dict(synset.metadata)

    def training_step(self, batch, batch_idx):
        return (self.images - self.images.detach() + 0.01).square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.cpu(), metadata=dict(self.meta))


def test_callback_logs_eval_accuracy(dm16, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    dm = DigitsDataModule(image_size=16, batch_size=64)
    module = _FakeDistillation(small_set(dm16, ipc=2))
    cb = SyntheticEvalCallback(every_n_steps=2, num_students=2, protocol=StudentProtocol(epochs=2, lr=0.05), net=tiny())
    trainer = L.Trainer(max_steps=5, callbacks=[cb], logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    broadcasts = []
    original = trainer.strategy.broadcast
    monkeypatch.setattr(trainer.strategy, "broadcast", lambda obj, src=0: broadcasts.append(obj) or original(obj, src))
    trainer.fit(module, datamodule=dm)
    assert [h["step"] for h in cb.history] == [2, 4, 5]  # every 2 steps, then the end of fit
    ours = [b for b in broadcasts if isinstance(b, dict) and "mean" in b]  # Lightning broadcasts the log dir too
    assert [b["step"] for b in ours] == [2, 4, 5]
    for h in cb.history:
        assert 0.0 <= h["mean"] <= 1.0 and len(h["accuracies"]) == 2
    assert float(trainer.callback_metrics["distill/eval_acc"]) == pytest.approx(cb.history[1]["mean"])
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "distill/eval_acc" in metrics and "distill/eval_acc_std" in metrics
    # the evaluation is the protocol's: the same call gives the same number
    direct = evaluate_synthetic(module.synthetic_set(), dm16, num_students=2, epochs=2, net=tiny(), lr=0.05,
                                device="cpu")
    assert direct.mean == pytest.approx(cb.history[-1]["mean"])
    state = cb.state_dict()
    restored = SyntheticEvalCallback(every_n_steps=2)
    restored.load_state_dict(state)
    assert restored.history == cb.history and restored._last_step == 5


def test_callback_protocol_from_yaml_and_deprecated_keywords():
    """LightningCLI's parser builds the callback's StudentProtocol from YAML and rejects a wrong type."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SyntheticEvalCallback, "cb")
    cfg = parser.parse_args(["--cb.every_n_steps=10", "--cb.protocol", "{epochs: 4, lr: 0.05, cutmix: true}"])
    cb = parser.instantiate(cfg).cb
    assert cb.every_n_steps == 10 and cb.protocol == StudentProtocol(epochs=4, lr=0.05, cutmix=True)
    with pytest.raises(Exception, match="batch_size"):
        parser.parse_args(["--cb.protocol", "{batch_size: big}"])
    assert SyntheticEvalCallback().protocol == StudentProtocol(epochs=100)  # the callback's default
    with pytest.warns(DeprecationWarning, match="protocol=StudentProtocol"):
        old = SyntheticEvalCallback(every_n_steps=100, num_students=2, epochs=50, dsa=True)
    assert old.protocol == StudentProtocol(epochs=50, dsa=True) and old.epochs == 50


def test_callback_bad_arguments_and_module():
    with pytest.raises(ValueError, match="every_n_steps"):
        SyntheticEvalCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="num_students"):
        SyntheticEvalCallback(num_students=0)
    with pytest.raises(TypeError, match=r"SyntheticEvalCallback: unknown argument\(s\) \['learning_rate'\]"):
        SyntheticEvalCallback(learning_rate=0.1)
    with pytest.raises(TypeError, match="unknown argument"):
        SyntheticEvalCallback(synset=None)
    with pytest.raises(TypeError, match="`protocol` must be a StudentProtocol"):
        SyntheticEvalCallback(2, 2, 50)  # the former third positional argument, epochs
    with pytest.raises(TypeError, match="`net`"):
        SyntheticEvalCallback(net="ConvNet")
    with pytest.raises(ValueError, match="protocol.lr has 2 values but num_students=3"):
        SyntheticEvalCallback(num_students=3, protocol=StudentProtocol(lr=[0.1, 0.2]))

    class NoSet(L.LightningModule):
        pass

    class FakeTrainer:
        is_global_zero = True
        global_step = 2

    with pytest.raises(TypeError, match="synthetic_set"):
        SyntheticEvalCallback()._evaluate(FakeTrainer(), NoSet())


def test_result_to_dict_is_json():
    r = EvaluationResult(accuracies=[0.5], mean=0.5, std=0.0, lrs=[0.01], protocol={"a": 1}, seconds=1.0,
                         students=[nn.Linear(1, 1)])
    d = r.to_dict()
    assert "students" not in d and json.loads(json.dumps(d))["accuracies"] == [0.5]


@pytest.mark.gpu
def test_vectorized_equals_sequential_on_cuda(dm16):
    synset = small_set(dm16, ipc=3)
    common = dict(net=tiny(width=16), num_students=3, epochs=3, lr=[0.01, 0.05, 0.1], batch_size=8, seed=3,
                  device="cuda", dsa=DSA(), cutmix=CutMix(), return_students=True)
    seq = evaluate_synthetic(synset, dm16, vectorize=False, **common)
    for mode, impl in ((None, "stacked"), ("vmap", "vmap")):  # None: auto, vectorised on CUDA
        vec = evaluate_synthetic(synset, dm16, vectorize=mode, **common)
        assert vec.protocol["vectorized_impl"] == impl and vec.protocol["device"].startswith("cuda")
        for a, b in zip(vec.students, seq.students):
            assert state_close(a, b, atol=1e-4, rtol=1e-3)  # cuDNN picks other kernels for grouped convs
        assert max(abs(u - v) for u, v in zip(vec.accuracies, seq.accuracies)) <= 3 / 359
