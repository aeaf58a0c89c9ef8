"""DD-Ranking on the bundled digits at IPC 10: the sets of random-real, DM, gradient matching, trajectory
matching and NCFM (those that exist), ranked in the hard- and the soft-label setting; wall time of the
protocol with the students trained together (``vectorize=True``) against the same students trained one
after the other (``vectorize=False``), interleaved A B A B.

    python -m benchmarks.ranking                 # CPU run (reduced protocol, about 10-15 min on 2 cores)
    python -m benchmarks.ranking --quick         # smoke run (< 1 min)
    python -m benchmarks.ranking --device cuda --size 16 --width 128 --depth 3 --runs 5 --epochs 300 \\
        --eval-every 20 --distill-steps 1000 --repeats 3     # the paper's protocol on a GPU

Each method distils its set first (timed separately, not part of the ranking time). The soft-label
setting is mode M (a teacher labels every augmented batch, SCE, T = 1) with CutMix; the hard-label
setting uses DSA. Both compute HLR, IOR, LRS and ARS. The random-real and full-data trainings are shared
by all sets of a setting (the evaluator plans them once); the trainings the official ``ddranking`` 0.2.0
would run for the same sets (one evaluator per metric and set, full data retrained each run with
``eval_full_data=True``) are *counted* from its loops, not run: the package cannot run the soft-label LRS or
ARS on a local folder; ``benchmarks/ranking_official.py`` runs it where it can (hard-label LRS) and measures
both wall times. The two modes must give the same accuracies (the
distillation core checks vectorised == sequential to 2e-5); the largest difference is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from benchmarks import harness

METHODS = ("random_real", "dm", "gm", "mtt", "ncfm")


def build_method(name: str, net, ipc: int, args):
    from lightning_eff.distill import DSA, DistributionMatching, GradientMatching, TrajectoryMatching

    if name == "dm":
        return DistributionMatching(net, ipc=ipc, batch_real=128, dsa=DSA(), seed=0)
    if name == "gm":
        return GradientMatching(net, ipc=ipc, batch_real=64, outer_loop=5, inner_loop=2, dsa=DSA(), seed=0)
    if name == "mtt":
        return TrajectoryMatching(
            net,
            ipc=ipc,
            num_experts=2,
            expert_train_epochs=6,
            syn_steps=10,
            expert_epochs=2,
            max_start_epoch=4,
            dsa=DSA(),
            seed=0,
            image_optimizer=lambda p: torch.optim.SGD(p, lr=100.0, momentum=0.5),
        )
    if name == "ncfm":
        from lightning_eff.distill.ncfm import NCFM

        return NCFM(
            net,
            ipc=ipc,
            factor=1,
            batch_real=128,
            num_freqs=256,
            num_feature_nets=2,
            pretrain_epochs=3,
            seed=0,
            save_dir=tempfile.mkdtemp(),
        )
    raise ValueError(name)


def distil(name: str, dm, args) -> tuple[object, float]:
    """The set of ``name`` (``None`` with the reason when the method is not available) and the seconds it took."""

    from lightning_eff.distill import SyntheticSet
    from lightning_eff.models import ConvNet

    t0 = time.perf_counter()
    if name == "random_real":
        return SyntheticSet.random_subset(dm, args.ipc, seed=1000), time.perf_counter() - t0
    net = ConvNet(1, 10, width=args.distill_width, depth=args.depth, image_size=args.size)
    try:
        module = build_method(name, net, args.ipc, args)
    except ImportError as err:
        return f"not available ({err})", 0.0
    trainer = harness.quiet_trainer(args.device, max_steps=args.distill_steps, default_root_dir=tempfile.mkdtemp())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    return module.synthetic_set(), time.perf_counter() - t0


def train_teacher(dm, args):
    """A ConvNet trained on the whole training split with the distillation core's engine (hard labels)."""
    from lightning_eff.distill import SyntheticSet, evaluate_synthetic
    from lightning_eff.models import ConvNet

    images, labels = [], []
    for c in range(dm.num_classes):
        x = dm.class_images(c)
        images.append(x)
        labels.append(torch.full((len(x),), c))
    full = SyntheticSet(torch.cat(images), torch.cat(labels), metadata={"num_classes": dm.num_classes})
    res = evaluate_synthetic(
        full,
        dm,
        net=ConvNet(1, 10, width=args.width, depth=args.depth, image_size=args.size),
        num_students=1,
        epochs=args.teacher_epochs,
        lr=0.01,
        batch_size=128,
        seed=123,
        device=args.device,
        return_students=True,
    )
    return res.students[0].cpu(), res.accuracies[0]


def step_scaling(args, counts=(1, 5, 25, 50)) -> list[dict]:
    """Seconds per student and training step: one student with ``torch.optim.SGD`` vs ``S`` stacked students.

    The benchmark's student and batch (the whole IPC set, as in the ranking), plain cross-entropy, medians of
    5 timings of 10 steps. Shows where the vectorised protocol can and cannot gain on this device.
    """
    import torch.nn.functional as F
    from torch.func import stack_module_state

    from lightning_eff.distill.evaluate import stacked_convnet_forward
    from lightning_eff.models import ConvNet

    b = 10 * args.ipc

    def make():
        return ConvNet(1, 10, width=args.width, depth=args.depth, image_size=args.size).to(args.device)

    def timed(step) -> float:
        for _ in range(3):
            step()
        out = []
        for _ in range(5):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) / 10)
        return statistics.median(out)

    net = make()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(b, 1, args.size, args.size, device=args.device)
    y = torch.randint(0, 10, (b,), device=args.device)

    def one():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    single = timed(one)
    rows = []
    for s in counts:
        nets = [make() for _ in range(s)]
        params, _ = stack_module_state(nets)
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        plist = list(params.values())
        xs = torch.randn(s, b, 1, args.size, args.size, device=args.device)
        ys = torch.randint(0, 10, (s, b), device=args.device)

        def stacked(nets=nets, params=params, plist=plist, xs=xs, ys=ys, s=s):
            logits, _ = stacked_convnet_forward(nets[0], params, xs, s)
            loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum") / b
            grads = torch.autograd.grad(loss, plist)
            with torch.no_grad():
                torch._foreach_add_(plist, grads, alpha=-0.01)

        per = timed(stacked) / s
        rows.append({"students": s, "ms_per_student_step": 1e3 * per, "sequential_ms": 1e3 * single,
                     "speedup": single / per})
    return rows


def official_trainings(n_sets: int, runs: int, grid: int, soft: bool) -> int:
    """Student trainings ddranking 0.2.0's loops would run for LRS + ARS of ``n_sets`` sets (eval_full_data=True):
    per run, ``hard_label.py`` / ``soft_label.py`` l. 339-377 / 512-558 and ``aug_robust.py`` l. 532-574. Counted,
    not measured."""
    lrs = runs * (
        (grid + 1 + grid + grid) if soft else (grid + 1 + grid)
    )  # syn hard, full, (syn soft,) random
    ars = runs * 4 * grid  # syn / random, with / without augmentation
    return n_sets * (lrs + ars)


def ranking_kwargs(args, soft: bool, teacher, vectorize: bool | None = None) -> dict:
    from lightning_eff.distill import StudentProtocol
    from lightning_eff.models import ConvNet

    grid = [0.001, 0.005, 0.01, 0.05, 0.1][: max(1, min(5, args.grid))]
    return dict(
        net=ConvNet(1, 10, width=args.width, depth=args.depth, image_size=args.size),
        protocol=StudentProtocol(
            epochs=args.epochs,
            lr=grid,
            eval_every=args.eval_every,
            batch_size=256,
            use_soft_labels="M" if soft else False,
            soft_loss="sce",
            dsa=None if soft else True,
            cutmix=True if soft else None,
            vectorize=vectorize,
        ),
        num_eval=args.runs,
        teacher=teacher if soft else None,
        metrics=["lrs", "ars"],
        full_epochs=args.full_epochs,
        full_lr=0.01,
        full_batch_size=256,
        seed=0,
        device=args.device,
        use_cache=False,
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=8, choices=(8, 16, 32), help="digits image side")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--width", type=int, default=32, help="student ConvNet width")
    parser.add_argument("--depth", type=int, default=2, help="student (and distillation) ConvNet depth")
    parser.add_argument("--distill-width", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2, help="num_eval")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--grid", type=int, default=5, help="first N of the lr grid 0.001, 0.005, 0.01, 0.05, 0.1"
    )
    parser.add_argument("--full-epochs", type=int, default=30)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default="hard,soft")
    parser.add_argument("--repeats", type=int, default=2, help="timed A B pairs per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-scaling", action="store_true", help="skip the per-step scaling table")
    parser.add_argument("--out", default="outputs/benchmarks/ranking.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.epochs, args.eval_every, args.grid, args.full_epochs = 1, 6, 3, 2, 3
        args.teacher_epochs, args.distill_steps, args.repeats, args.width = 5, 5, 1, 16
        args.methods = "random_real,dm,gm"
    torch.set_num_threads(args.threads)
    from lightning_eff.data import DigitsDataModule
    from lightning_eff.ranking import DDRanking

    dm = DigitsDataModule(image_size=args.size, channels=1, batch_size=256)
    dm.setup("fit")
    env = harness.environment(args.device)
    print(
        "# DD-Ranking on digits: students trained together (vectorize=True) vs one after the other (vectorize=False)"
    )
    print(harness.environment_line(env))
    print(
        f"protocol: digits {args.size}px, IPC {args.ipc}, {args.runs} runs, lr grid of {args.grid}, {args.epochs} epochs, "
        f"best checkpoint every {args.eval_every}, SGD momentum 0.9 wd 5e-4 batch 256, lr x0.1 at half; student "
        f"ConvNet width {args.width} depth {args.depth} (instance norm); full data {args.full_epochs} epochs lr 0.01; "
        f"hard setting: DSA; soft setting: mode M, SCE T=1, CutMix, teacher ConvNet trained {args.teacher_epochs} "
        f"epochs on the full split; metrics LRS + ARS; timed A B pairs: {args.repeats}"
    )

    sets, distill_info = {}, {}
    for name in args.methods.split(","):
        synset, secs = distil(name, dm, args)
        if isinstance(synset, str):
            print(f"  {name}: skipped, {synset}")
            distill_info[name] = {"skipped": synset}
            continue
        sets[name] = synset
        distill_info[name] = {"seconds": secs, "images": len(synset)}
        print(f"  distilled {name}: {len(synset)} images in {secs:.1f} s", flush=True)
    teacher, teacher_acc = (None, None)
    if "soft" in args.settings:
        teacher, teacher_acc = train_teacher(dm, args)
        print(f"  teacher: test accuracy {teacher_acc:.4f}", flush=True)

    summary, raw = [], {}
    for setting in args.settings.split(","):
        soft = setting == "soft"
        times = {"vectorized": [], "sequential": []}
        reports = {}
        for _ in range(args.repeats):
            for mode, vec in (("vectorized", True), ("sequential", False)):
                ranking = DDRanking(**ranking_kwargs(args, soft, teacher, vectorize=vec))
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = ranking.rank(sets, dm)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
                reports[mode] = report
                print(
                    f"  {setting}: {mode} {times[mode][-1]:.1f} s ({report.stats['trainings']} trainings)",
                    flush=True,
                )
        vec, seq = reports["vectorized"], reports["sequential"]
        diff = 0.0
        for a, b in zip(vec.results, seq.results):
            for ra, rb in zip(a.runs, b.runs):
                diff = max(
                    [diff] + [abs(ra[k] - rb[k]) for k in ra if k.endswith("_acc") and ra[k] is not None]
                )
        order_v = [r.name for r in sorted(vec.results, key=lambda r: -r.mean("lrs"))]
        order_s = [r.name for r in sorted(seq.results, key=lambda r: -r.mean("lrs"))]
        med = {m: statistics.median(t) for m, t in times.items()}
        ours = vec.stats["trainings"]
        official = official_trainings(len(sets), args.runs, args.grid, soft)
        print(f"\n## {setting}-label setting ({'mode M, CutMix' if soft else 'DSA'})\n")
        print(vec.table())
        print(
            f"\nranking by LRS: {' > '.join(order_v)} (sequential: {' > '.join(order_s)}); "
            f"largest accuracy difference vectorised vs sequential: {diff:.4f}"
        )
        summary.append(
            f"| {setting} | {len(sets)} | {ours} | {official} ({official / ours:.2f}x) | "
            f"{med['sequential']:.1f} | {med['vectorized']:.1f} | {med['sequential'] / med['vectorized']:.2f}x |"
            f" {diff:.4f} |"
        )
        raw[setting] = {
            "seconds": times,
            "report": vec.to_dict(),
            "sequential_report": seq.to_dict(),
            "trainings": ours,
            "official_trainings": official,
            "max_acc_diff": diff,
        }
    print("\n## wall time of the ranking (medians)\n")
    print(
        "| setting | sets | trainings | package's trainings, counted (ratio) | sequential s | vectorised s | speed-up | max acc diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(summary))
    scaling = None
    if not args.no_scaling:
        scaling = step_scaling(args)
        print(
            f"\n## one training step per student (batch {10 * args.ipc}, plain CE; medians): S students stacked vs "
            f"one student with torch.optim.SGD\n"
        )
        print("| stacked students S | ms per student-step | sequential ms | speed-up |")
        print("| --- | --- | --- | --- |")
        for r in scaling:
            print(f"| {r['students']} | {r['ms_per_student_step']:.2f} | {r['sequential_ms']:.2f} | {r['speedup']:.2f}x |")
    out = harness.write_json(
        args.out,
        {"args": vars(args), "environment": env, "distill": distill_info, "teacher_acc": teacher_acc,
         "settings": raw, "step_scaling": scaling},
        indent=1,
        default=str,
    )
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
