"""Token-compression benchmarks: DART's speed-up in a Llama decoder, and accuracy of selectors on digits.

    python benchmarks/tokens.py                      # both parts, CPU sizes
    python benchmarks/tokens.py --quick              # < 1 min smoke run
    python benchmarks/tokens.py --part speed --device cuda --preset 7b   # GPU: LLaVA-1.5-7B-shaped decoder

1. speed: a random-init Llama-architecture decoder built from a config (no download), a LLaVA-1.5-like prompt
   (35 prefix + 576 image + 25 question tokens), DART from layer 2 with max_kept=64 (keeps 4 + 8 * 8 = 68
   image tokens, 88.2% pruned) vs the same model without pruning. Prefill = one forward over the prompt with
   the KV cache and ``logits_to_keep=1`` (what ``generate`` does first); total = ``generate`` with 32 new
   tokens (greedy, no early stop). Alternatives are timed ABAB-interleaved (the machine may be shared),
   medians reported. The selection cost (DART's pivots and similarities) is inside the timed region.
2. quality: ``TinyVLM`` (16x16 digits as 256 pixel tokens in a 4-layer Llama decoder, answer = class token)
   trained here without pruning, then evaluated on the held-out test split with DART / Random / FastV /
   Pool pruning at layer K at ~89% and ~78% pruning (the same kept count for every selector; DART's count
   sets it), eager attention for all (FastV needs attention maps). Random: mean over seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python benchmarks/tokens.py` puts benchmarks/ first on sys.path, where benchmarks/select.py would shadow the
# standard library's `select` module (imported by subprocess, hence by torch): use the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

PRESETS = {
    # ~0.24B parameters; 16 layers so that the layers after K=2 dominate as in a 7B model
    "cpu": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    ),
    # LLaVA-1.5-7B's language model (Vicuna-7B = Llama-2-7B shape)
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "quick": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench_speed(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_eff.tokens import DART, DecoderTokenPruner, dart_num_kept
    from lightning_eff.tokens.metrics import config_dims, decoder_flops

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    preset = "quick" if args.quick and args.preset == "cpu" else args.preset
    sizes = PRESETS[preset]
    n_img = 144 if args.quick else args.image_tokens
    max_kept = 16 if args.quick else args.max_kept
    prefix, question, k = 35, args.text_tokens - 35, args.layer
    cfg = LlamaConfig(**sizes, max_position_embeddings=4096, attn_implementation=args.attn)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    lm.generation_config.eos_token_id = None
    lm.generation_config.pad_token_id = 0
    img_id = sizes["vocab_size"] - 1
    g = torch.Generator().manual_seed(0)
    ids = (
        torch.cat(
            [
                torch.randint(1, img_id, (prefix,), generator=g),
                torch.full((n_img,), img_id),
                torch.randint(1, img_id, (question,), generator=g),
            ]
        )
        .repeat(args.batch, 1)
        .to(device)
    )
    mask = torch.ones_like(ids)
    kept = dart_num_kept(max_kept)
    seq, seq_pruned = ids.shape[1], ids.shape[1] - n_img + kept
    n_layers = sizes["num_hidden_layers"]
    dims = config_dims(cfg)
    flops_ratio = decoder_flops([seq] * n_layers, **dims) / decoder_flops(
        [seq] * k + [seq_pruned] * (n_layers - k), **dims
    )
    n_params = sum(p.numel() for p in lm.parameters()) / 1e9
    print("== speed: DART vs no pruning, same model, same prompt ==")
    print(
        f"device={device} ({torch.get_num_threads()} CPU threads) dtype={args.dtype} attn={args.attn} preset={preset} ({n_params:.2f}B params: "
        f"hidden {sizes['hidden_size']}, {n_layers} layers, MLP {sizes['intermediate_size']})"
    )
    print(
        f"prompt: batch {args.batch} x {seq} tokens = {prefix} prefix + {n_img} image + {question} question; "
        f"DART K={k}, max_kept={max_kept} -> keeps {kept} image tokens ({100 * (1 - kept / n_img):.1f}% pruned), "
        f"{seq_pruned} tokens after layer {k}"
    )
    print(
        f"protocol: {args.warmup} warm-up + {args.repeats} ABAB-interleaved repeats; prefill = forward(use_cache, "
        f"logits_to_keep=1); total = generate({args.new_tokens} new tokens, greedy); medians"
    )
    pruner = DecoderTokenPruner(DART(num_kept=max_kept), layer=k, image_token_id=img_id)

    def prefill():
        with torch.no_grad():
            lm(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def generate():
        with torch.no_grad():
            out = lm.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
            )
        assert out.shape[1] == seq + args.new_tokens

    def run(pruned: bool, fn) -> float:
        if pruned:
            pruner.attach(lm)
        try:
            return _timed(fn, device)
        finally:
            if pruned:
                pruner.detach()

    times = {(m, p): [] for m in ("prefill", "total") for p in (False, True)}
    for _ in range(args.warmup):
        for p in (False, True):
            run(p, prefill)
            run(p, generate)
    for r in range(args.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        for p in order:
            times[("prefill", p)].append(run(p, prefill))
        for p in order:
            times[("total", p)].append(run(p, generate))
    print("\n| measure | no pruning (ms) | DART (ms) | speed-up |")
    print("|---|---:|---:|---:|")
    for m in ("prefill", "total"):
        base, dart = statistics.median(times[(m, False)]), statistics.median(times[(m, True)])
        print(f"| {m} | {base:.1f} | {dart:.1f} | {base / dart:.2f}x |")
    print(f"| estimated prefill FLOPs | | | {flops_ratio:.2f}x |")
    print(
        "targets (issue): prefill >= 2.5x, total >= 1.8x; paper (LLaVA-1.5-7B, GPU): 2.99x prefill, 1.99x total"
    )


def bench_quality(args) -> None:
    import logging

    import lightning as L

    from lightning_eff.data import DigitsDataModule
    from lightning_eff.tokens import DART, FastV, Pool, Random, TinyVLM, TokenCompression, dart_num_kept

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    quick = args.quick
    image_size = 8 if quick else args.image_size
    p_img, p_txt = (int(v) for v in args.pivots.split(","))
    epochs = 2 if quick else args.epochs
    accel = "gpu" if args.device.startswith("cuda") else "cpu"
    layers = [int(v) for v in str(args.quality_layer).split(",")]
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(image_size=image_size, batch_size=64)
    model = TinyVLM(image_size=image_size, patch_size=1, attn_implementation="eager", lr=args.lr)
    n_img = model.num_image_tokens
    print("\n== quality: TinyVLM on digits, test accuracy under pruning at layer K ==")
    print(f"DART pivots: {p_img} image + {p_txt} text")
    print(
        f"{image_size}x{image_size} digits -> {n_img} image tokens + 13 text tokens; decoder: 4 Llama layers, "
        f"hidden 64; trained {epochs} epochs without pruning (AdamW lr {args.lr}, seed 0), eager attention; "
        f"test split of DigitsDataModule (359 images); selectors at the same kept count (DART's); K in {layers}"
    )
    trainer_kw = dict(
        accelerator=accel,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    fit_kw = dict(limit_train_batches=10) if quick else {}
    t0 = time.perf_counter()
    L.Trainer(max_epochs=epochs, **trainer_kw, **fit_kw).fit(model, dm)
    print(f"training took {time.perf_counter() - t0:.0f} s")

    def test_acc(callbacks) -> float:
        out = L.Trainer(callbacks=callbacks, **trainer_kw).test(model, dm, verbose=False)
        return float(out[0]["test/acc"])

    rows = [("none", "-", n_img, test_acc([]), "")]
    for kl in layers:
        for ratio in (0.889, 0.778):
            m = max(1, round((1 - ratio) * n_img))
            kept = dart_num_kept(m, p_img, p_txt)

            def cb(sel, kl=kl):
                return [TokenCompression(sel, layer=kl)]

            dart = DART(num_kept=m, num_image_pivots=p_img, num_text_pivots=p_txt)
            rows.append((f"DART (M={m}, pivots {p_img}+{p_txt})", kl, kept, test_acc(cb(dart)), ""))
            accs = [test_acc(cb(Random(num_kept=kept, seed=s))) for s in range(args.random_seeds)]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append(("Random", kl, kept, statistics.mean(accs), f"+- {sd:.3f} over {len(accs)} seeds"))
            rows.append(("FastV (last token)", kl, kept, test_acc(cb(FastV(num_kept=kept))), ""))
            rows.append(("Pool (2-D avg)", kl, kept, test_acc(cb(Pool(num_kept=kept))), ""))
    print("\n| selector | K | image tokens kept | pruned | test acc | |")
    print("|---|---:|---:|---:|---:|---|")
    for name, kl, kept, acc, note in rows:
        print(f"| {name} | {kl} | {kept} / {n_img} | {100 * (1 - kept / n_img):.1f}% | {acc:.3f} | {note} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, < 1 min")
    p.add_argument("--preset", choices=("cpu", "7b"), default="cpu", help="decoder size for the speed part")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=60, help="prefix (35) + question tokens")
    p.add_argument("--max-kept", type=int, default=64, help="DART's max_kept M")
    p.add_argument("--layer", type=int, default=2, help="K for the speed part")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--quality-layer", default="1,2", help="K (comma-separated) for the quality part")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument(
        "--image-size", type=int, choices=(8, 16, 32), default=16, help="digits side = image tokens^0.5"
    )
    p.add_argument("--pivots", default="4,4", help="DART's p_img,p_txt for the quality part")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.random_seeds, args.pivots = min(args.repeats, 3), 1, 2, "2,2"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    if args.part in ("speed", "all"):
        bench_speed(args)
    if args.part in ("quality", "all"):
        bench_quality(args)


if __name__ == "__main__":
    main()
