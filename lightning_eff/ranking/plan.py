"""The plan of one :meth:`DDRanking.rank <lightning_eff.ranking.DDRanking.rank>` call: which trainings the
protocol needs (:class:`_Job`, one per cell: run x lr grid of one training kind on one set), how they are
grouped into calls of :func:`~lightning_eff.distill.evaluate_synthetic_sets` and spread over DDP ranks, and
how their accuracies become a :class:`~lightning_eff.ranking.results.RankingReport`.

The protocol itself (what each kind of training is, and why) is described in
:mod:`lightning_eff.ranking.evaluator`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_eff.distill.evaluation import evaluate_synthetic_sets
from lightning_eff.distill.synthetic import SyntheticSet
from lightning_eff.ranking import functional as F
from lightning_eff.ranking.cache import PROTOCOL_VERSION, _describe_net, _hash_json, _state_fingerprint
from lightning_eff.ranking.results import RankingReport, RankingResult
from lightning_eff.utils.seeding import derive_seed


# ---------------------------------------------------------------------------------------------
# distributed helper
# ---------------------------------------------------------------------------------------------
class _Dist:
    """``torch.distributed`` when initialised (Lightning's DDP, torchrun), else a single process."""

    def __init__(self) -> None:
        import torch.distributed as td

        self.td = td
        self.on = td.is_available() and td.is_initialized()
        self.rank = td.get_rank() if self.on else 0
        self.world = td.get_world_size() if self.on else 1

    def broadcast(self, obj: Any) -> Any:
        if not self.on or self.world == 1:
            return obj
        box = [obj]
        self.td.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.on or self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.td.all_gather_object(out, obj)
        return out


# ---------------------------------------------------------------------------------------------
# the jobs of one ranking
# ---------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One cell of the protocol: the lr grid of one run of one training kind on one set."""

    key: str
    kind: str  # full | syn_hard | syn | syn_noaug | rdm | rdm_noaug
    run: int
    lrs: list[float]
    make_set: Callable[[], SyntheticSet]
    options: dict[str, Any]
    seed: int
    cost: float
    cache: dict[str, Any] | None = None  # description hashed into the cache key (shared jobs only)
    cache_key: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.cache is not None:
            self.cache_key = f"{self.kind}-{_hash_json(self.cache)}"


def _options_key(options: dict[str, Any]) -> tuple:
    """Hashable identity of a job's training options (objects by identity: the same net, teacher, DSA)."""
    plain = (str, int, float, bool, type(None))
    return tuple(sorted((k, v if isinstance(v, plain) else ("id", id(v))) for k, v in options.items()))


def _privileged_key(options: dict[str, Any], synset: SyntheticSet) -> str | None:
    """What a set's privileged information adds to its training (``None``: nothing); sets differing here train apart."""
    if synset.privileged is None or options.get("privileged_weight") == 0:
        return None
    return json.dumps(synset.metadata.get("privileged") or {}, sort_keys=True, default=str)


def _assign(jobs: list[_Job], world: int) -> list[list[_Job]]:
    """Greedy longest-processing-time assignment of jobs to ranks (deterministic)."""
    loads = [0.0] * world
    out: list[list[_Job]] = [[] for _ in range(world)]
    for job in sorted(jobs, key=lambda j: (-j.cost, j.key)):
        r = min(range(world), key=lambda i: (loads[i], i))
        out[r].append(job)
        loads[r] += job.cost
    return out


class _Context:
    """Everything one :meth:`DDRanking.rank` call needs to plan, run and assemble its trainings."""

    def __init__(self, owner: Any, dm, template: nn.Module, teacher: nn.Module | None, data_fp, device):
        self.o = owner
        self.dm = dm
        self.template = template
        self.teacher = teacher
        self.data_fp = data_fp
        self.device = device
        self.net_desc = _describe_net(template)
        self.teacher_fp = (
            None
            if teacher is None
            else {"net": _describe_net(teacher), "weights": _state_fingerprint(teacher)}
        )
        self._subsets: dict[tuple, SyntheticSet] = {}
        self._full: SyntheticSet | None = None

    # ------------------------------------------------------------------ data
    def full_set(self) -> SyntheticSet:
        if self._full is None:
            images, labels = [], []
            for c in range(self.dm.num_classes):
                x = self.dm.class_images(c)
                images.append(x)
                labels.append(torch.full((x.shape[0],), c, dtype=torch.long))
            self._full = SyntheticSet(
                torch.cat(images),
                torch.cat(labels),
                metadata={
                    "method": "full_data",
                    "num_classes": self.dm.num_classes,
                    "dataset": type(self.dm).__name__,
                },
            )
        return self._full

    def random_subset(self, counts: tuple[int, ...], run: int) -> SyntheticSet:
        key = (counts, run)
        if key not in self._subsets:
            seed = derive_seed(self.o.seed, "subset", run)
            if len(set(counts)) == 1:
                subset = SyntheticSet.random_subset(self.dm, counts[0], seed=seed)
            else:
                gen = torch.Generator().manual_seed(seed)
                images, labels = [], []
                for c, n in enumerate(counts):
                    images.append(self.dm.class_images(c, n, generator=gen))
                    labels.append(torch.full((n,), c, dtype=torch.long))
                subset = SyntheticSet(
                    torch.cat(images),
                    torch.cat(labels),
                    metadata={
                        "method": "random_real",
                        "num_classes": self.dm.num_classes,
                        "seed": seed,
                    },
                )
            if self.o.soft_label_mode == "S":
                subset = self._with_teacher_labels(subset)
            self._subsets[key] = subset
        return self._subsets[key]

    def _with_teacher_labels(self, subset: SyntheticSet) -> SyntheticSet:
        teacher = self.teacher
        was_training = teacher.training
        teacher.to(self.device).eval()
        try:
            with torch.no_grad():
                logits = torch.cat(
                    [teacher(x.to(self.device)).float().cpu() for x in subset.images.split(512)]
                )
        finally:
            teacher.train(was_training)
        meta = dict(subset.metadata, soft_label_kind="logits", soft_labels_from="teacher")
        return SyntheticSet(subset.images, subset.labels, soft_labels=logits, metadata=meta)

    # ------------------------------------------------------------------ plan
    def _aug(self, on: bool) -> dict[str, Any]:
        aug = self.o.augmentation if on else "none"
        return {
            "dsa": self.o.dsa if "dsa" in aug else None,
            "cutmix": self.o.cutmix if "cutmix" in aug else None,
        }

    def _aug_desc(self, on: bool) -> dict[str, Any]:
        a = self._aug(on)
        return {k: (v.config() if v is not None else None) for k, v in a.items()}

    def _labels(self, soft: bool) -> dict[str, Any]:
        o = self.o
        sp = o.student_protocol  # the students' settings
        if not soft or o.soft_label_mode is None:
            return {"use_soft_labels": False}
        out: dict[str, Any] = {
            "use_soft_labels": o.soft_label_mode,
            "soft_loss": sp.soft_loss,
            "temperature": sp.temperature,
        }
        if o.soft_label_mode == "M":
            out["teacher"] = self.teacher
        return out

    def _common(self, epochs: int, batch_size: int) -> dict[str, Any]:
        o = self.o
        sp = o.student_protocol  # the students' settings
        return {
            "net": self.template,
            "epochs": epochs,
            "momentum": sp.momentum,
            "weight_decay": sp.weight_decay,
            "batch_size": batch_size,
            "eval_every": sp.eval_every,
            "device": self.device,
            "vectorize": sp.vectorize,
        }

    def plan(self, named: dict[str, SyntheticSet]) -> list[_Job]:
        o = self.o
        sp = o.student_protocol  # the students' settings
        soft = o.soft_label_mode is not None
        need_lrs, need_ars = "lrs" in o.metrics, "ars" in o.metrics
        jobs: list[_Job] = []
        base = {"v": PROTOCOL_VERSION, "data": self.data_fp, "net": self.net_desc}
        students_desc = {
            "epochs": sp.epochs,
            "momentum": sp.momentum,
            "weight_decay": sp.weight_decay,
            "batch_size": sp.batch_size,
            "eval_every": sp.eval_every,
        }

        if need_lrs and o.full_data_acc is None:
            seed = derive_seed(o.seed, "full")
            # ddranking 0.2.0 augments the full data only in the soft-label setting with use_aug_for_hard
            # (soft_label.py l. 312; hard_label.py l. 273 never does)
            full_aug = soft and o.augment_hard
            n_full = o.num_eval if o.full_per_run else o.full_students
            options = {
                **self._common(o.full_epochs, o.full_batch_size),
                "use_soft_labels": False,
                **self._aug(full_aug),
                "privileged_weight": 0.0,
            }
            desc = {
                **base,
                "kind": "full",
                "epochs": o.full_epochs,
                "lr": o.full_lr,
                "batch_size": o.full_batch_size,
                "momentum": sp.momentum,
                "weight_decay": sp.weight_decay,
                "eval_every": sp.eval_every,
                "students": n_full,
                "seed": seed,
            }
            if full_aug:  # (absent otherwise, so earlier cache files stay valid)
                desc["aug"] = self._aug_desc(True)
            n = sum(len(self.dm.class_indices(c)) for c in range(self.dm.num_classes))
            jobs.append(
                _Job(
                    "full",
                    "full",
                    0,
                    [o.full_lr] * n_full,
                    self.full_set,
                    options,
                    seed,
                    cost=n_full * o.full_epochs * n,
                    cache=desc,
                )
            )

        # the random-real cells, shared by every set with the same per-class counts
        counts_seen: list[tuple[int, ...]] = []
        for s in named.values():
            counts = tuple(torch.bincount(s.labels, minlength=self.dm.num_classes).tolist())
            if counts not in counts_seen:
                counts_seen.append(counts)
        rdm_kinds = []
        if need_lrs or need_ars:
            rdm_kinds.append(("rdm", True))  # IOR's random side = ARS's with-augmentation random side
        if need_ars:
            rdm_kinds.append(("rdm_noaug", False))
        for counts in counts_seen:
            ctag = _hash_json(counts)[:8]
            for kind, aug in rdm_kinds:
                for run in range(o.num_eval):
                    seed = derive_seed(o.seed, kind, run, ctag)
                    labels = self._labels(soft)
                    options = {
                        **self._common(sp.epochs, sp.batch_size),
                        **labels,
                        **self._aug(aug),
                        "privileged_weight": 0.0,
                    }
                    desc = {
                        **base,
                        "kind": kind,
                        "counts": list(counts),
                        "subset_seed": derive_seed(o.seed, "subset", run),
                        "seed": seed,
                        "lrs": o.lrs,
                        "labels": {k: v for k, v in labels.items() if k != "teacher"},
                        "teacher": self.teacher_fp if labels.get("use_soft_labels") else None,
                        "aug": self._aug_desc(aug),
                        **students_desc,
                    }
                    jobs.append(
                        _Job(
                            f"{kind}|{ctag}|{run}",
                            kind,
                            run,
                            list(o.lrs),
                            (lambda c=counts, r=run: self.random_subset(c, r)),
                            options,
                            seed,
                            cost=len(o.lrs) * sp.epochs * sum(counts),
                            cache=desc,
                        )
                    )

        # the synthetic sets' own cells
        for name, s in named.items():
            syn_lrs = list(o.lrs) if o.syn_lr is None else [float(s.lr) if o.syn_lr == "synset" else o.syn_lr]
            kinds: list[tuple[str, bool, bool, list[float]]] = []  # (kind, soft labels, augmented, lrs)
            if soft:
                if need_lrs:
                    kinds.append(("syn_hard", False, o.augment_hard, list(o.lrs)))
                kinds.append(("syn", True, True, syn_lrs))
            else:  # hard-label setting: the HLR run is the IOR run (augmented, like LabelRobustScoreHard)
                kinds.append(("syn", False, True, syn_lrs))
            if need_ars:
                kinds.append(("syn_noaug", soft, False, syn_lrs))
            for kind, use_soft, aug, lrs in kinds:
                options = {
                    **self._common(sp.epochs, sp.batch_size),
                    **self._labels(use_soft),
                    **self._aug(aug),
                    "privileged_weight": sp.privileged_weight,
                }
                for run in range(o.num_eval):
                    jobs.append(
                        _Job(
                            f"{kind}|set:{name}|{run}",
                            kind,
                            run,
                            lrs,
                            (lambda s=s: s),
                            options,
                            derive_seed(o.seed, kind, run),
                            cost=len(lrs) * sp.epochs * len(s),
                        )
                    )
        return jobs

    # ------------------------------------------------------------------ run
    def execute(
        self, jobs: list[_Job], progress: bool, on_done: Callable[[_Job, dict[str, Any]], None] | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """Train this rank's jobs: the jobs with the same training options and set size in one call.

        A call of :func:`evaluate_synthetic_sets` trains the students of all its jobs together (the sets of a
        ranking, their random-real baselines and all runs, when their options agree); each job's students
        are seeded by the job alone, so the grouping never changes a result (and a cached job's accuracies
        are the ones a call of its own would give). The shared (cached) cells are grouped apart from the
        sets' own cells and trained first, so an interrupted ranking keeps them.
        """
        from tqdm.auto import tqdm

        groups: dict[tuple, list[list[tuple[_Job, SyntheticSet]]]] = {}
        # the shared (cached) trainings first: an interrupted ranking keeps them
        for job in sorted(jobs, key=lambda j: j.cache_key is None):
            synset = job.make_set()
            shared = job.cache_key is not None  # shared cells train apart from the sets' own, so they are stored first
            key = (shared, _options_key(job.options), _privileged_key(job.options, synset), len(synset), len(job.lrs))
            calls = groups.setdefault(key, [[]])
            if calls[-1] and sum(len(j.lrs) for j, _ in calls[-1]) + len(job.lrs) > self.o.max_students_per_call:
                calls.append([])  # this call is full: whole cells go to the next one
            calls[-1].append((job, synset))
        results: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {}
        total = sum(len(j.lrs) for j in jobs)
        with tqdm(total=total, desc="DD-Ranking", unit="student", disable=not progress or total == 0) as bar:
            for members in (call for calls in groups.values() for call in calls):
                kinds = sorted({j.kind for j, _ in members})
                bar.set_postfix_str(f"{'+'.join(kinds)} ({len(members)} cells)")
                t0 = time.perf_counter()
                out = evaluate_synthetic_sets(
                    [synset for _, synset in members],
                    self.dm,
                    num_students=len(members[0][0].lrs),
                    lr=[j.lrs for j, _ in members],
                    seed=[j.seed for j, _ in members],
                    progress=False,
                    **members[0][0].options,
                )
                elapsed = time.perf_counter() - t0
                for (j, _), res in zip(members, out):
                    seconds[j.kind] = seconds.get(j.kind, 0.0) + elapsed / len(members)
                    best = res.best_accuracies if res.best_accuracies is not None else res.accuracies
                    results[j.key] = {
                        "best": [float(v) for v in best],
                        "final": [float(v) for v in res.accuracies],
                        "lrs": list(j.lrs),
                    }
                    if on_done is not None:
                        on_done(j, results[j.key])
                bar.update(sum(len(j.lrs) for j, _ in members))
        return results, seconds

    # ------------------------------------------------------------------ results
    def assemble(
        self, named: dict[str, SyntheticSet], res: dict[str, dict[str, Any]], reused: set[str]
    ) -> RankingReport:
        o = self.o
        soft = o.soft_label_mode is not None
        need_lrs, need_ars = "lrs" in o.metrics, "ars" in o.metrics

        def best(key: str) -> tuple[float, float]:
            r = res[key]
            i = max(range(len(r["best"])), key=lambda k: (r["best"][k], -k))
            return r["best"][i], r["lrs"][i]

        full_info: dict[str, Any] = {}
        full_acc = None
        if need_lrs:
            if o.full_data_acc is not None:
                full_acc = o.full_data_acc
                full_info = {"accuracy": full_acc, "accuracies": [full_acc], "given": True, "cached": False}
            else:
                accs = res["full"]["best"]
                full_acc = sum(accs) / len(accs)
                full_info = {
                    "accuracy": full_acc,
                    "accuracies": accs,
                    "given": False,
                    "cached": "full" in reused,
                    "per_run": o.full_per_run,
                }
        results = []
        for name, s in named.items():
            counts = tuple(torch.bincount(s.labels, minlength=self.dm.num_classes).tolist())
            ctag = _hash_json(counts)[:8]
            runs = []
            for run in range(o.num_eval):
                row: dict[str, Any] = {"run": run}
                syn_acc, syn_lr = best(f"syn|set:{name}|{run}")
                rdm_acc, rdm_lr = best(f"rdm|{ctag}|{run}")
                if need_lrs:
                    hard_acc, hard_lr = best(f"syn_hard|set:{name}|{run}") if soft else (syn_acc, syn_lr)
                    run_full = res["full"]["best"][run] if o.full_per_run and o.full_data_acc is None else full_acc
                    row.update(full_acc=run_full, syn_hard_acc=hard_acc, syn_hard_lr=hard_lr)
                row.update(syn_acc=syn_acc, syn_lr=syn_lr, rdm_acc=rdm_acc, rdm_lr=rdm_lr)
                if need_ars:
                    sn, sn_lr = best(f"syn_noaug|set:{name}|{run}")
                    rn, rn_lr = best(f"rdm_noaug|{ctag}|{run}")
                    row.update(syn_noaug_acc=sn, syn_noaug_lr=sn_lr, rdm_noaug_acc=rn, rdm_noaug_lr=rn_lr)
                if need_lrs:
                    row["hlr"] = F.hard_label_recovery(row["full_acc"], row["syn_hard_acc"])
                    row["ior"] = F.improvement_over_random(syn_acc, rdm_acc)
                    row["lrs"] = F.label_robust_score(row["hlr"], row["ior"], o.lrs_weight)
                    row["lrs_ddranking"] = F.label_robust_score(
                        100 * row["hlr"], 100 * row["ior"], o.lrs_weight, percent=True
                    )
                if need_ars:
                    row["with_aug"] = syn_acc - rdm_acc
                    row["without_aug"] = row["syn_noaug_acc"] - row["rdm_noaug_acc"]
                    row["ars"] = F.augmentation_robust_score(
                        syn_acc, rdm_acc, row["syn_noaug_acc"], row["rdm_noaug_acc"], o.ars_weight
                    )
                    row["ars_ddranking"] = F.augmentation_robust_score(
                        100 * syn_acc,
                        100 * rdm_acc,
                        100 * row["syn_noaug_acc"],
                        100 * row["rdm_noaug_acc"],
                        o.ars_weight,
                        percent=True,
                    )
                runs.append(row)
            metrics = {}
            names = (["hlr", "ior", "lrs", "lrs_ddranking"] if need_lrs else []) + (
                ["ars", "with_aug", "without_aug", "ars_ddranking"] if need_ars else []
            )
            for m in names:
                values = torch.tensor([r[m] for r in runs], dtype=torch.float64)
                metrics[m] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(unbiased=False)) if len(runs) > 1 else 0.0,
                }
            meta = {
                "method": s.metadata.get("method"),
                "ipc": s.ipc,
                "images": len(s),
                "class_counts": list(counts),
                "dataset": s.metadata.get("dataset"),
                "soft_labels": s.soft_labels is not None,
                "privileged": s.privileged is not None,
                "learned_lr": s.lr,
            }
            results.append(RankingResult(name, metrics, runs, meta))
        protocol = {
            **o.protocol(),
            "student": self.net_desc,
            "teacher": self.teacher_fp,
            "dataset": self.data_fp,
            "device": str(self.device),
        }
        return RankingReport(results, protocol, full_info)
