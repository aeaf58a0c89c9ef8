"""benchmarks/explain.py helpers: the shared per-image cache of exact values, KernelSHAP batched over images."""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from lightning_eff.explain import exact_shapley, kernel_shap


def _bench():
    return importlib.import_module("benchmarks.explain")


class FakeSurrogate(nn.Module):
    """A game per image: v(m) = softmax over 3 classes of (m * x) @ W + pairwise term (not additive)."""

    num_players = 5

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = nn.Linear(5, 3)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.randn(3, 5, generator=g))
        self.masked_chunk_size = 7
        self.calls = 0

    def surrogate_values(self, x, masks):  # x [B, 5], masks [B, S, 5] -> [B, S, 3]
        self.calls += 1
        z = masks.float() * x.unsqueeze(1)
        logits = z @ self.backbone.weight.T + (z[..., :1] * z[..., 1:2])
        return logits.softmax(-1)

    def value_function(self, x):
        return lambda m: self.surrogate_values(x, m.unsqueeze(0))[0]


def test_exact_values_are_cached_per_image_and_shared(tmp_path):
    bench = _bench()
    model = FakeSurrogate()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    logs = []
    got = bench.exact_values(model, x, "val", 8, tmp_path, logs.append)
    ref = torch.stack([exact_shapley(model.value_function(x[i : i + 1]), 5) for i in range(4)])
    torch.testing.assert_close(got, ref.float())
    assert len(logs) == 4
    calls = model.calls
    again = bench.exact_values(model, x, "val", 8, tmp_path, logs.append)  # all cached: no evaluation
    assert model.calls == calls and torch.equal(again, got)
    other = bench.exact_values(FakeSurrogate(seed=3), x, "val", 8, tmp_path, logs.append)  # other weights
    assert not torch.allclose(other, got)
    assert len(list(tmp_path.iterdir())) == 2  # one folder per surrogate fingerprint


def test_exact_values_claims(tmp_path):
    bench = _bench()
    model = FakeSurrogate()
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    folder = tmp_path / f"test_{bench.surrogate_fingerprint(model)}"
    folder.mkdir()
    (folder / "0.lock").write_text(str(os.getpid()))  # image 0 held by a live process
    assert bench.exact_values(model, x, "test", 8, tmp_path, print, wait=False) is None
    assert (folder / "1.pt").is_file() and not (folder / "0.pt").exists()  # image 1 computed meanwhile
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (folder / "0.lock").write_text(str(dead))
    got = bench.exact_values(model, x, "test", 8, tmp_path, print, wait=False)  # stale claim dropped
    torch.testing.assert_close(got[0], exact_shapley(model.value_function(x[:1]), 5).float())


def test_kernel_shap_batched_equals_per_image(tmp_path):
    bench = _bench()
    model = FakeSurrogate()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    model.num_players = 5
    batched = bench.kernel_shap_batched(model, x, 12, torch.device("cpu"))
    assert model.masked_chunk_size == 7  # restored after the single-chunk pass
    for i in range(6):
        one = kernel_shap(
            model.value_function(x[i : i + 1]), 5, 12, generator=torch.Generator().manual_seed(i)
        )
        torch.testing.assert_close(batched[i].float(), one.float())
