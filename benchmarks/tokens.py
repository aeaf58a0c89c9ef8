"""Token-compression benchmarks: DART's speed-up in a Llama decoder, and accuracy of selectors on digits.

    python -m benchmarks.tokens                      # both parts, CPU sizes
    python -m benchmarks.tokens --quick              # < 1 min smoke run
    python -m benchmarks.tokens --part speed --device cuda --preset 7b   # GPU: LLaVA-1.5-7B-shaped decoder
    python -m benchmarks.tokens --part speed --arch llava                # LLaVA-1.5-shaped model, CPU sizes
    python -m benchmarks.tokens --part speed --arch llava --device cuda --preset 7b

1. speed: a random-init Llama-architecture decoder built from a config (no download), a LLaVA-1.5-like prompt
   (35 prefix + 576 image + 25 question tokens), DART from layer 2 with max_kept=64 (keeps 4 + 8 * 8 = 68
   image tokens, 88.2% pruned) vs the same model without pruning. Prefill = one forward over the prompt with
   the KV cache and ``logits_to_keep=1`` (what ``generate`` does first); total = ``generate`` with 32 new
   tokens (greedy, no early stop). Alternatives are timed ABAB-interleaved (the machine may be shared),
   medians reported. The selection cost (DART's pivots and similarities) is inside the timed region.
   ``--arch llava``: the same on a LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` (random init): a CLIP
   ViT-L/14-336-shaped vision tower (576 image tokens, layer -2 features), the MLP projector and the language
   model of ``--preset`` (``cpu``: the reduced 0.24B decoder above, since Vicuna-7B does not run on 2 CPU
   cores in useful time; ``7b``: Vicuna-7B's shape). DART finds the image tokens itself (the config's image
   token, read from the outer model's ``input_ids``); the vision tower runs in both arms and is timed.
2. quality: ``TinyVLM`` (16x16 digits as 256 pixel tokens in a 4-layer Llama decoder, answer = class token)
   trained here without pruning, then evaluated on the held-out test split with DART / Random / FastV /
   Pool pruning at layer K at ~89% and ~78% pruning (the same kept count for every selector; DART's count
   sets it), eager attention for all (FastV needs attention maps). Random: mean over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks import harness

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


# LLaVA-1.5's vision tower: CLIP ViT-L/14 at 336 px (24 layers, hidden 1024), 576 patch tokens, features of the
# second-to-last layer, a 2-layer GELU MLP projector (transformers' LlavaConfig defaults).
CLIP_L_336 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
CLIP_QUICK = dict(CLIP_L_336, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=168)  # fmt: skip


def _machine(device: torch.device) -> dict:
    """:func:`benchmarks.harness.environment` on ``device``."""
    return harness.environment(str(device))


def _write_json(path: str, payload: dict) -> None:
    harness.write_json(path, payload, indent=1)
    print(f"raw results: {path}")


def _build_speed_model(args, sizes, dtype, device, n_img):
    """(model, inputs, image token count, model description) for ``--arch``; random init from configs."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    img_id = sizes["vocab_size"] - 1
    text_cfg = dict(sizes, max_position_embeddings=4096)
    prev = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if args.arch == "llama":
                model = LlamaForCausalLM(LlamaConfig(**text_cfg, attn_implementation=args.attn)).eval()
            else:
                vision = CLIP_QUICK if args.quick else CLIP_L_336
                cfg = LlavaConfig(
                    text_config=dict(model_type="llama", **text_cfg),
                    vision_config=vision,
                    image_token_index=img_id,
                    vision_feature_layer=-2,
                    vision_feature_select_strategy="default",
                    attn_implementation=args.attn,
                )
                model = LlavaForConditionalGeneration(cfg).eval()
                n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prefix, question = 35, args.text_tokens - 35
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [
            torch.randint(1, img_id, (prefix,), generator=g),
            torch.full((n_img,), img_id),
            torch.randint(1, img_id, (question,), generator=g),
        ]
    ).repeat(args.batch, 1)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if args.arch == "llava":
        side = model.config.vision_config.image_size
        pix = torch.randn(args.batch, 3, side, side, generator=g)
        inputs["pixel_values"] = pix.to(device=device, dtype=dtype)
    return model, inputs, n_img, img_id


def bench_speed(args) -> dict:
    from lightning_eff.tokens import DART, DecoderTokenPruner, dart_num_kept, find_decoder
    from lightning_eff.tokens.metrics import config_dims, decoder_flops

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    preset = "quick" if args.quick and args.preset == "cpu" else args.preset
    sizes = PRESETS[preset]
    n_img = 144 if args.quick else args.image_tokens
    max_kept = 16 if args.quick else args.max_kept
    k = args.layer
    model, inputs, n_img, img_id = _build_speed_model(args, sizes, dtype, device, n_img)
    seq = inputs["input_ids"].shape[1]
    kept = dart_num_kept(max_kept)
    seq_pruned = seq - n_img + kept
    prefix, question = 35, seq - 35 - n_img
    n_layers = sizes["num_hidden_layers"]
    dims = config_dims(find_decoder(model).config)
    flops_ratio = decoder_flops([seq] * n_layers, **dims) / decoder_flops(
        [seq] * k + [seq_pruned] * (n_layers - k), **dims
    )
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    lm_params = sum(p.numel() for p in find_decoder(model).parameters()) / 1e9
    what = "Llama-shaped decoder" if args.arch == "llama" else "LLaVA-1.5-shaped LlavaForConditionalGeneration"
    print(f"== speed ({args.arch}): DART vs no pruning, same model, same prompt ==")
    print(
        f"device={device} ({torch.get_num_threads()} CPU threads) dtype={args.dtype} attn={args.attn} "
        f"preset={preset}: {what}, {n_params:.2f}B params ({lm_params:.2f}B in the language model: hidden "
        f"{sizes['hidden_size']}, {n_layers} layers, MLP {sizes['intermediate_size']}), random init"
    )
    if args.arch == "llava":
        v = model.config.vision_config
        print(
            f"vision tower: CLIP-shaped, {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.image_size} px / "
            f"patch {v.patch_size} -> {n_img} image tokens (features of layer -2, 2-layer MLP projector); "
            f"it runs in both arms (timed)"
        )
        if preset != "7b":
            print("NOTE: the language model is reduced (not Vicuna-7B) so that it runs on a CPU; see --preset 7b.")
    print(
        f"prompt: batch {args.batch} x {seq} tokens = {prefix} prefix + {n_img} image + {question} question; "
        f"DART K={k}, max_kept={max_kept} -> keeps {kept} image tokens ({100 * (1 - kept / n_img):.1f}% pruned), "
        f"{seq_pruned} tokens after layer {k}"
    )
    print(
        f"protocol: {args.warmup} warm-up + {args.repeats} ABAB-interleaved repeats; prefill = forward(use_cache, "
        f"logits_to_keep=1){' incl. the vision tower' if args.arch == 'llava' else ''}; total = "
        f"generate({args.new_tokens} new tokens, greedy); medians"
    )
    pruner = DecoderTokenPruner(DART(num_kept=max_kept), layer=k, image_token_id=img_id)

    def prefill():
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)

    def generate():
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )
        assert out.shape[1] == seq + args.new_tokens

    def run(pruned: bool, fn) -> float:
        if pruned:
            pruner.attach(model)
        try:
            return harness.timed(fn, device)[0] * 1e3  # ms
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
    assert pruner.records and pruner.records[-1].span_kept == kept, "DART did not prune the image span"
    print("\n| measure | no pruning (ms) | DART (ms) | speed-up |")
    print("|---|---:|---:|---:|")
    rows = {}
    for m in ("prefill", "total"):
        base, dart = statistics.median(times[(m, False)]), statistics.median(times[(m, True)])
        rows[m] = {"no_pruning_ms": base, "dart_ms": dart, "speedup": base / dart,
                   "no_pruning_all_ms": times[(m, False)], "dart_all_ms": times[(m, True)]}  # fmt: skip
        print(f"| {m} | {base:.1f} | {dart:.1f} | {base / dart:.2f}x |")
    print(f"| estimated language-model prefill FLOPs | | | {flops_ratio:.2f}x |")
    print(
        "targets (issue): prefill >= 2.5x, total >= 1.8x; paper (LLaVA-1.5-7B, GPU): 2.99x prefill, 1.99x total"
    )
    result = {
        "benchmark": "tokens.speed",
        "command": "python -m benchmarks.tokens " + " ".join(sys.argv[1:]),
        "arch": args.arch,
        "preset": preset,
        "model": what,
        "params_b": n_params,
        "language_model_params_b": lm_params,
        "language_model": sizes,
        "vision_tower": None if args.arch == "llama" else model.config.vision_config.to_dict(),
        "dtype": args.dtype,
        "attn": args.attn,
        "batch": args.batch,
        "prompt": {"prefix": prefix, "image": n_img, "question": question, "total": seq},
        "dart": {"layer": k, "max_kept": max_kept, "kept_image_tokens": kept, "tokens_after_k": seq_pruned},
        "protocol": {"warmup": args.warmup, "repeats": args.repeats, "new_tokens": args.new_tokens,
                     "order": "ABAB-interleaved, medians"},  # fmt: skip
        "results": rows,
        "estimated_lm_prefill_flops_ratio": flops_ratio,
        "machine": _machine(device),
    }
    out = args.out or f"benchmarks/results/tokens_speed_{args.arch}_{device.type}{'_' + preset if preset != 'cpu' else ''}.json"
    _write_json(out, result)
    return result


def bench_quality(args) -> dict:
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
    trainer_kw = harness.trainer_kwargs(accel)
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
            rows.append(("Random", kl, kept, statistics.mean(accs), f"+- {sd:.3f} over {len(accs)} seeds: {accs}"))
            rows.append(("FastV (last token)", kl, kept, test_acc(cb(FastV(num_kept=kept))), ""))
            rows.append(("Pool (2-D avg)", kl, kept, test_acc(cb(Pool(num_kept=kept))), ""))
    print("\n| selector | K | image tokens kept | pruned | test acc | |")
    print("|---|---:|---:|---:|---:|---|")
    for name, kl, kept, acc, note in rows:
        print(f"| {name} | {kl} | {kept} / {n_img} | {100 * (1 - kept / n_img):.1f}% | {acc:.3f} | {note} |")
    result = {
        "benchmark": "tokens.quality",
        "command": "python -m benchmarks.tokens " + " ".join(sys.argv[1:]),
        "protocol": {
            "model": "TinyVLM: 4 Llama layers, hidden 64, eager attention",
            "data": f"DigitsDataModule {image_size}x{image_size}; trained on its train split without pruning; "
            "accuracy on its test split (359 images)",
            "image_tokens": n_img,
            "epochs": epochs,
            "lr": args.lr,
            "seed": 0,
            "dart_pivots": [p_img, p_txt],
            "layers": layers,
            "budgets": "pruning 88.9% and 77.8% of the image tokens -> DART's M; every selector keeps DART's count",
            "random_seeds": args.random_seeds,
        },
        "rows": [
            {"selector": name, "layer": kl, "kept": kept, "image_tokens": n_img, "test_acc": acc, "note": note}
            for name, kl, kept, acc, note in rows
        ],
        "machine": _machine(torch.device(args.device)),
    }
    _write_json(args.out or f"benchmarks/results/tokens_quality_{'quick' if quick else 'cpu'}.json", result)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, < 1 min")
    p.add_argument("--preset", choices=("cpu", "7b"), default="cpu", help="decoder size for the speed part")
    p.add_argument(
        "--arch",
        choices=("llama", "llava"),
        default="llama",
        help="speed part: a Llama decoder alone, or a LLaVA-1.5-shaped LlavaForConditionalGeneration (CLIP tower)",
    )
    p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/tokens_<part>_...json)")
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
