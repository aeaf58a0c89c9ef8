"""An independent FLOPs count for the token tests: what ``torch.utils.flop_counter`` measures in the decoder
layers while the model actually runs (matmuls, SDPA), not the library's own ``decoder_flops`` formula."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def measured_layer_flops(model: torch.nn.Module, decoder: torch.nn.Module, run) -> int:
    """FLOPs spent inside ``decoder.layers`` while ``run()`` executes (``model`` is the outermost module called)."""
    names = {m: n for n, m in model.named_modules()}
    prefix = names[decoder]
    # torch's CPU SDPA kernel has no FLOP formula registered: count with eager attention (plain matmuls, the
    # same arithmetic: QK^T and AV over the full square)
    cfg = decoder.config
    impl = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        with FlopCounterMode(display=False) as fc:
            run()
    finally:
        cfg._attn_implementation = impl
    counts = fc.get_flop_counts()
    total = 0
    for i in range(len(decoder.layers)):
        suffix = f"{prefix}.layers.{i}" if prefix else f"layers.{i}"
        keys = [k for k in counts if k.endswith("." + suffix)]
        assert len(keys) == 1, (suffix, keys)
        total += sum(counts[keys[0]].values())
    return int(total)
