"""utils.optim.optimizer_config and utils.loaders.make_loader (issue 21: one copy each, shared by the modules and
DataModules that used to write them out)."""

from __future__ import annotations

import functools

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.utils.data import TensorDataset

from lightning_eff.utils.loaders import make_loader
from lightning_eff.utils.optim import optimizer_config


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_optimizer_config_without_scheduler_is_the_bare_optimizer():
    params = _params()
    opt = optimizer_config(functools.partial(torch.optim.SGD, lr=0.5), params)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["params"][0] is params[0] and opt.param_groups[0]["lr"] == 0.5


def test_optimizer_config_plateau_gets_the_monitor_other_schedulers_do_not():
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    out = optimizer_config(
        sgd, _params(), functools.partial(ReduceLROnPlateau, patience=1), monitor="x/val_kl"
    )
    assert set(out) == {"optimizer", "lr_scheduler"}
    assert isinstance(out["lr_scheduler"]["scheduler"], ReduceLROnPlateau)
    assert out["lr_scheduler"]["scheduler"].optimizer is out["optimizer"]
    assert out["lr_scheduler"]["monitor"] == "x/val_kl"
    out = optimizer_config(sgd, _params(), functools.partial(StepLR, step_size=2))
    assert isinstance(out["lr_scheduler"]["scheduler"], StepLR) and "monitor" not in out["lr_scheduler"]


def test_make_loader_batches_shuffles_collates_and_keeps_workers():
    data = TensorDataset(torch.arange(10))
    plain = make_loader(data, batch_size=4, shuffle=False, num_workers=0)
    assert [b[0].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert not plain.persistent_workers
    torch.manual_seed(0)
    shuffled = sorted(int(v) for b in make_loader(data, 3, shuffle=True, num_workers=0) for v in b[0])
    assert shuffled == list(range(10))
    summed = make_loader(data, 5, False, 0, collate_fn=lambda items: sum(int(x[0]) for x in items))
    assert list(summed) == [10, 35]
    assert make_loader(data, 5, False, num_workers=1).persistent_workers
