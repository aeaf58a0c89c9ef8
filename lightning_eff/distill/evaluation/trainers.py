"""Student trainers: all students together (stacked parameters, one batched step) or one after the other.

:class:`_VectorizedTrainer` stacks the students' parameters (``torch.func.stack_module_state``) and trains them
with one step per batch: a plain ``ConvNet`` through :func:`stacked_convnet_forward` (students' channels side by
side: grouped convs, fused group norms, one ``baddbmm``), any other network through
``torch.func.vmap(functional_call)``; a hand-written SGD with a per-student learning-rate tensor does what
``torch.optim.SGD`` does per student (``d = g + wd p``, ``b = mu b + d``, ``p -= lr b``, fused ``_foreach`` ops).
:class:`_SequentialTrainer` is the reference: one student after the other with ``torch.optim.SGD`` (and the
only one for BatchNorm students). Both read the same random streams (:class:`~.batches._Batches`), so they train
the same students (the tests check it to 2e-5).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.distill.evaluation.losses import soft_label_terms
from lightning_eff.models.privileged import FeatureTap, privileged_terms

__all__ = ["stacked_convnet_forward"]

_EVAL_CHUNK = 512  # test images per forward pass


def _reinitialized(template: nn.Module, seed: int) -> nn.Module:
    """A student: :func:`~lightning_eff.distill.base.reinitialized` on the CPU, in training mode."""
    from lightning_eff.distill.base import reinitialized

    return reinitialized(template, seed).train()


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())



class _Trainer:
    def __init__(
        self, template, seeds, lrs, momentum, weight_decay, batches, epochs, milestone, device,
        teacher, soft_loss, temperature, priv, test, eval_every, progress, impl,
    ):
        self.template, self.seeds, self.lrs = template, seeds, lrs
        self.momentum, self.weight_decay = momentum, weight_decay
        self.batches, self.epochs, self.milestone = batches, epochs, milestone
        self.device, self.teacher, self.soft_loss, self.temperature = device, teacher, soft_loss, temperature
        self.priv, self.test, self.eval_every, self.progress, self.impl = priv, test, eval_every, progress, impl
        self.num_students = len(lrs)
        self.generators = [torch.Generator().manual_seed(int(s[1])) for s in seeds]

    def losses(self, logits: Tensor, targets: Tensor, feats: Tensor | None, priv: Tensor | None) -> Tensor:
        """Per-student training loss ``[S]`` from ``[S, b, ...]`` outputs and targets (batch means)."""
        if self.soft_loss == "hard":  # cross-entropy with one-hot (or CutMix-mixed) targets
            terms = soft_label_terms(logits, targets, "sce", 1.0)
        else:
            terms = soft_label_terms(logits, targets, self.soft_loss, self.temperature)
        if self.priv is not None:
            weight, kind, pooling, _ = self.priv
            terms = terms + weight * privileged_terms(feats, priv, kind, pooling)
        return terms.mean(-1)

    def lr_factor(self, epoch: int) -> float:
        return 0.1 if epoch >= self.milestone else 1.0

    def checkpoint(self, epoch: int) -> bool:
        return self.eval_every is not None and (epoch + 1) % self.eval_every == 0

    def bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="evaluate_synthetic", disable=not self.progress, leave=False)


_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.Identity, nn.AvgPool2d, nn.MaxPool2d)


def _stackable_convnet(net: nn.Module) -> bool:
    """Whether ``net`` is a plain :class:`~lightning_eff.models.ConvNet` the stacked forward can run."""
    from lightning_eff.models import ConvNet

    return type(net) is ConvNet and all(
        isinstance(m, (nn.Conv2d, nn.GroupNorm, *_ELEMENTWISE)) for m in net.encoder
    ) and all(m.groups == 1 for m in net.encoder if isinstance(m, nn.Conv2d))


def stacked_convnet_forward(net: nn.Module, params: dict[str, Tensor], x: Tensor, num_students: int):
    """All students of a ConvNet at once: ``x`` ``[S, b, C, H, W]`` (or ``[b, C, H, W]`` shared) -> logits, E(x).

    The students' channels sit side by side (``[b, S * C, H, W]``): each conv is one grouped conv
    (``groups = S``), instance/layer norm one fused ``group_norm`` with ``S x`` the groups, pooling and
    activations act per channel, and the classifier is one ``baddbmm``. This is what
    ``vmap(functional_call)`` computes, without its per-op batching rules (GroupNorm with batched
    affine parameters decomposes into several elementwise passes) and layout copies.

    Returns:
        ``(logits [S, b, K], features [S, b, C', h, w])``.
    """
    s = num_students
    if x.ndim == 4:  # shared input (the test split): every student sees the same images
        b = x.shape[0]
        h = x.repeat(1, s, 1, 1)
    else:
        b = x.shape[1]
        h = x.transpose(0, 1).reshape(b, s * x.shape[2], *x.shape[3:])
    for i, m in enumerate(net.encoder):
        if isinstance(m, nn.Conv2d):
            w = params[f"encoder.{i}.weight"]
            bias = params.get(f"encoder.{i}.bias")
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1), m.stride,
                         m.padding, m.dilation, groups=s)
        elif isinstance(m, nn.GroupNorm):
            w, bias = params.get(f"encoder.{i}.weight"), params.get(f"encoder.{i}.bias")
            h = F.group_norm(h, s * m.num_groups, None if w is None else w.reshape(-1),
                             None if bias is None else bias.reshape(-1), m.eps)
        else:
            h = m(h)
    feats = h.view(b, s, -1, *h.shape[-2:]).transpose(0, 1)
    flat = feats.reshape(s, b, -1)
    weight, bias = params["classifier.weight"], params["classifier.bias"]
    return torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)), feats


class _VectorizedTrainer(_Trainer):
    """All students at once: stacked parameters, one batched step, per-student-lr SGD."""

    def run(self) -> list[dict[str, Any]]:
        from torch.func import functional_call, stack_module_state, vmap

        nets = [_reinitialized(self.template, int(s[0])).to(self.device) for s in self.seeds]
        params, buffers = stack_module_state(nets)
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        buffers = {k: v.detach() for k, v in buffers.items()}
        base = copy.deepcopy(nets[0]).to("meta")
        del nets
        stacked = self.impl == "stacked"
        if stacked:
            def forward(x: Tensor):
                return stacked_convnet_forward(base, params, x, self.num_students)
        else:
            tap = FeatureTap(base, self.priv[3] if self.priv is not None else None)

            def student(p, b, x):
                tap.active = self.priv is not None
                logits = functional_call(base, (p, b), (x,))
                tap.active = False
                feats = tap.take()
                return (logits, feats) if feats is not None else (logits,)

            batched = vmap(student, in_dims=(0, 0, 0), randomness="different")
            shared = vmap(student, in_dims=(0, 0, None), randomness="different")

            def forward(x: Tensor):
                out = (shared if x.ndim == 4 else batched)(params, buffers, x)
                return out[0], (out[1] if len(out) > 1 else None)

        def test_accuracies() -> list[float]:
            base.eval()
            x_test, y_test = self.test
            correct = torch.zeros(self.num_students, dtype=torch.long, device=self.device)
            with torch.no_grad():
                for xb, yb in zip(x_test.split(_EVAL_CHUNK), y_test.split(_EVAL_CHUNK)):
                    correct += (forward(xb)[0].argmax(-1) == yb).sum(1)
            base.train()
            return (correct.double() / len(y_test)).tolist()

        self._state = (params, buffers)
        history = []
        plist = list(params.values())
        bufs: list[Tensor] | None = None
        with self.bar(self.epochs) as bar:
            for epoch, batches in enumerate(self.batches.epochs(self.epochs, self.generators)):
                # per-student lr broadcast to each parameter's shape, so the update is one fused foreach op
                lr = torch.tensor([v * self.lr_factor(epoch) for v in self.lrs], device=self.device)
                lr_full = [lr.view(-1, *([1] * (p.ndim - 1))).expand_as(p).contiguous() for p in plist]
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                for idx, dsa_params, draws in batches:
                    x, targets, priv = self.batches.make(idx, dsa_params, draws, self.teacher)
                    logits, feats = forward(x)
                    losses = self.losses(logits, targets, feats, priv)
                    finite &= torch.isfinite(losses).all()
                    grads = torch.autograd.grad(losses.sum(), plist)
                    with torch.no_grad():  # torch.optim.SGD (dampening 0, no Nesterov), per-student lr
                        d = list(grads) if self.weight_decay == 0 else torch._foreach_add(grads, plist,
                                                                                          alpha=self.weight_decay)
                        if self.momentum != 0:
                            if bufs is None:
                                bufs = [t.clone() for t in d]
                            else:
                                torch._foreach_mul_(bufs, self.momentum)
                                torch._foreach_add_(bufs, d)
                            d = bufs
                        torch._foreach_addcmul_(plist, lr_full, d, value=-1.0)
                if not bool(finite):
                    raise FloatingPointError(f"evaluate_synthetic: non-finite training loss in epoch {epoch}.")
                if self.checkpoint(epoch):
                    history.append({"epoch": epoch + 1, "accuracies": test_accuracies()})
                bar.update(1)
        if not history or history[-1]["epoch"] != self.epochs:
            history.append({"epoch": self.epochs, "accuracies": test_accuracies()})
        return history

    def students(self) -> list[nn.Module]:
        params, buffers = self._state
        nets = []
        for s, seeds in enumerate(self.seeds):
            net = _reinitialized(self.template, int(seeds[0])).to(self.device)
            net.load_state_dict({k: v[s].detach() for k, v in {**params, **buffers}.items()})
            nets.append(net.eval())
        return nets


class _SequentialTrainer(_Trainer):
    """One student after the other with ``torch.optim.SGD`` (the reference; BatchNorm students)."""

    def students(self) -> list[nn.Module]:
        return list(self._nets)

    def run(self) -> list[dict[str, Any]]:
        self._nets: list[nn.Module] = []
        per_student: list[list[tuple[int, float]]] = []
        with self.bar(self.epochs * self.num_students) as bar:
            for s in range(self.num_students):
                net = _reinitialized(self.template, int(self.seeds[s][0])).to(self.device)
                tap = FeatureTap(net, self.priv[3] if self.priv is not None else None)
                opt = torch.optim.SGD(
                    net.parameters(), lr=self.lrs[s], momentum=self.momentum, weight_decay=self.weight_decay
                )
                checkpoints = []
                for epoch, batches in enumerate(self.batches.epochs(self.epochs, [self.generators[s]])):
                    for group in opt.param_groups:
                        group["lr"] = self.lrs[s] * self.lr_factor(epoch)
                    finite = torch.ones((), dtype=torch.bool, device=self.device)
                    for idx, dsa_params, draws in batches:
                        x, targets, priv = self.batches.make(idx, dsa_params, draws, self.teacher, [s])
                        tap.active = self.priv is not None
                        logits = net(x[0])
                        tap.active = False
                        feats = tap.take()
                        loss = self.losses(logits[None], targets, None if feats is None else feats[None], priv)[0]
                        finite &= torch.isfinite(loss.detach())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    if not bool(finite):
                        raise FloatingPointError(
                            f"evaluate_synthetic: non-finite training loss (student {s}, epoch {epoch})."
                        )
                    if self.checkpoint(epoch):
                        checkpoints.append((epoch + 1, self._accuracy(net)))
                    bar.update(1)
                if not checkpoints or checkpoints[-1][0] != self.epochs:
                    checkpoints.append((self.epochs, self._accuracy(net)))
                per_student.append(checkpoints)
                tap.remove()
                self._nets.append(net.eval())
        return [
            {"epoch": per_student[0][i][0], "accuracies": [p[i][1] for p in per_student]}
            for i in range(len(per_student[0]))
        ]

    def _accuracy(self, net: nn.Module) -> float:
        x_test, y_test = self.test
        net.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in zip(x_test.split(_EVAL_CHUNK), y_test.split(_EVAL_CHUNK)):
                correct += int((net(xb).argmax(-1) == yb).sum())
        net.train()
        return correct / len(y_test)

