"""StudentProtocol: defaults of the official protocol, one validation, plain (YAML / JSON) values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lightning_eff.distill import DSA, CutMix, StudentProtocol


def test_defaults_are_the_distillation_protocol():
    # Zhao et al. (ICLR 2021) / DatasetCondensation's evaluate_synset: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256
    p = StudentProtocol()
    assert (p.epochs, p.lr, p.momentum, p.weight_decay, p.batch_size) == (300, 0.01, 0.9, 5e-4, 256)
    assert p.dsa is None and p.cutmix is None and p.use_soft_labels is False and p.soft_label_mode is None
    assert (p.soft_loss, p.temperature, p.eval_every, p.vectorize, p.privileged_weight) == ("sce", 1.0, None, None, None)


def test_frozen_hashable_and_equal_by_value():
    a, b = StudentProtocol(epochs=5, lr=[0.1, 0.2], dsa=True), StudentProtocol(epochs=5, lr=(0.1, 0.2), dsa=DSA())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != a.replace(epochs=6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.epochs = 3  # type: ignore[misc]


def test_pickle_and_deepcopy_keep_the_protocol():
    import copy
    import pickle

    p = StudentProtocol(epochs=3, lr=[0.1, 0.2], dsa=True, cutmix=True, use_soft_labels="M")
    assert pickle.loads(pickle.dumps(p)) == p and copy.deepcopy(p) == p


def test_normalised_values():
    p = StudentProtocol(lr=[1, 0.5], dsa="crop_flip", cutmix={"beta": 2.0}, use_soft_labels=True, momentum=0)
    assert p.lr == (1.0, 0.5) and all(type(v) is float for v in p.lr)
    assert p.dsa == DSA(strategy="crop_flip").config() and p.build_dsa().ops == ("crop", "flip")
    assert p.cutmix == {"beta": 2.0, "prob": 1.0} and isinstance(p.build_cutmix(), CutMix)
    assert p.use_soft_labels == "S" and p.soft_label_mode == "S" and type(p.momentum) is float
    assert StudentProtocol(dsa={"strategy": "flip", "flip": 0.3, "mode": "multiple"}).build_dsa().flip == 0.3
    assert StudentProtocol(cutmix=True).cutmix == CutMix().config()
    assert StudentProtocol(dsa=False, cutmix=False).build_dsa() is None
    assert StudentProtocol(lr="synset").lr == "synset" and StudentProtocol(lr=[0, 0.1]).lr == (0.0, 0.1)
    assert StudentProtocol(use_soft_labels="M").soft_label_mode == "M"


def test_to_dict_is_json_and_round_trips():
    p = StudentProtocol(epochs=7, lr=[0.01, 0.02], dsa=True, cutmix=True, use_soft_labels="M", soft_loss="kl",
                        temperature=4.0, eval_every=2, vectorize="vmap", privileged_weight=0.5)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["lr"] == [0.01, 0.02] and d["dsa"]["strategy"] == "color_crop_cutout_flip_scale_rotate"
    assert StudentProtocol(**d) == p
    assert StudentProtocol.field_names()[:5] == ("epochs", "lr", "momentum", "weight_decay", "batch_size")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epochs": 0}, ValueError, "StudentProtocol: `epochs` must be an int >= 1"),
        ({"epochs": 2.0}, TypeError, "`epochs` must be an int"),
        ({"epochs": True}, TypeError, "`epochs`"),
        ({"lr": -0.1}, ValueError, "`lr` must be in"),
        ({"lr": [0.1, -1.0]}, ValueError, "`lr`"),
        ({"lr": []}, ValueError, "`lr` must not be an empty"),
        ({"lr": "auto"}, ValueError, "'synset'"),
        ({"momentum": 1.0}, ValueError, "`momentum` must be in \\[0.0, 1.0\\)"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, TypeError, "temperature"),
        ({"soft_loss": "mse"}, ValueError, "soft_loss"),
        ({"use_soft_labels": "X"}, ValueError, "use_soft_labels"),
        ({"eval_every": 0}, ValueError, "eval_every"),
        ({"vectorize": "yes"}, ValueError, "vectorize"),
        ({"privileged_weight": -1.0}, ValueError, "privileged_weight"),
        ({"dsa": 3}, TypeError, "`dsa`"),
        ({"dsa": "zoom"}, ValueError, "unknown operation"),
        ({"dsa": {"strategy": "flip", "zoom": 1}}, TypeError, "`dsa` has an unknown DSA argument"),
        ({"cutmix": "yes"}, TypeError, "`cutmix`"),
        ({"cutmix": {"beta": 0.0}}, ValueError, "beta"),
    ],
)
def test_invalid_values_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        StudentProtocol(**kwargs)


def test_replace_rejects_unknown_fields():
    with pytest.raises(TypeError, match="unknown field.*'epoch'"):
        StudentProtocol().replace(epoch=3)


def test_yaml_is_type_checked_by_jsonargparse():
    """LightningCLI parses ``init_args.protocol: {...}`` into a StudentProtocol and rejects wrong types."""
    from jsonargparse import ArgumentParser

    class Holder:
        def __init__(self, protocol: StudentProtocol | None = None) -> None:
            self.protocol = protocol

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Holder, "holder")
    cfg = parser.parse_args(["--holder.protocol", "{epochs: 5, lr: [0.1, 0.2], dsa: color_crop, cutmix: true}"])
    p = parser.instantiate(cfg).holder.protocol
    assert p == StudentProtocol(epochs=5, lr=(0.1, 0.2), dsa="color_crop", cutmix=True)
    cfg = parser.parse_args(["--holder.protocol.epochs=7", "--holder.protocol.use_soft_labels=M"])
    assert parser.instantiate(cfg).holder.protocol == StudentProtocol(epochs=7, use_soft_labels="M")
    with pytest.raises(Exception, match="epochs"):
        parser.parse_args(["--holder.protocol", "{epochs: many}"])
