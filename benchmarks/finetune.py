"""Fine-tuning trained models with fxattn: does ``DIA(init="identity")`` keep what was learned?

The models people bring to fxattn are mostly trained. This benchmark pretrains the plain
baseline of each task once per seed, then fine-tunes a copy of it for a short budget in seven
arms (issue 30):

* ``baseline``          the pretrained model, trained on (no fxattn);
* ``dia-paper``         ``DIA()``: the paper's cell, branches scaled by ``h`` in (0, 1) at once;
* ``dia-identity``      ``DIA(init="identity")``: the same cell behind a per-channel gate at 0;
* ``se-paper``          ``DIA(module="se", share="none")``: an SE module per residual block;
* ``se-identity``       the same with ``init="identity"``;
* ``ssia``              SSIA only (a training loss; the deployed graph is the baseline's);
* ``dia-identity+ssia`` both.

Tasks: the two of ``benchmarks/evidence.py`` (cluttered digits, 2-D; MNIST-1D, 1-D; data and
networks from ``benchmarks/common/evidence_tasks.py``) and the digits ResNet-20 of
``benchmarks/accuracy.py`` (scikit-learn's digits at 16x16, 2-pixel random shifts).

Protocol (fixed before measuring, no tuning on the results): pretraining is SGD + Nesterov
(momentum 0.9, weight decay 5e-4), cosine schedule, the task's learning rate of
``benchmarks/evidence.py`` / ``accuracy.py``, a shortened epoch budget (``Recipe``). Fine-tuning
starts a fresh optimizer of the same kind with :func:`fxattn.param_groups`: the pretrained
weights at ``lr`` 0.01, fxattn's new parameters at ``new_lr`` 0.1, a cosine schedule over the
fine-tuning budget, the same batches in every arm (seeded by the seed), the DIA / SE modules
initialised alike in every arm that has them. Test accuracy at step 0 (right after
``fxattn.transform``), after each epoch, and at the end; 10 seeds; for each arm the paired (by
seed) difference to the continued baseline with a two-sided 95% t-interval and a paired t-test,
Holm-corrected over the six arms of a task (significant: Holm p < 0.05).

Each (task, seed) is one job (pretrain, then every arm), cached as JSON under ``--cache``, so an
interrupted run resumes; jobs run on ``--workers`` single-threaded processes with deterministic
algorithms.

    python benchmarks/finetune.py                       # full run: 27 min measured on 2
                                                        # cores shared at load average 5-8
    python benchmarks/finetune.py --quick --out /tmp/ft  # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common

from accuracy import Config as DigitsConfig  # noqa: E402
from accuracy import load_data as digits_data  # noqa: E402
from accuracy import random_shift  # noqa: E402
from evidence import holm, paired  # noqa: E402

import fxattn  # noqa: E402
from benchmarks.common.evidence_tasks import TASKS as EVIDENCE_TASKS  # noqa: E402
from benchmarks.common.resnet20 import ResNet20  # noqa: E402
from benchmarks.common.results_io import command_line, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Split = tuple[torch.Tensor, torch.Tensor]

# The budgets are short on purpose: 10 seeds x 3 tasks x (pretraining + 7 fine-tuning arms)
# fit in ~20 minutes on a shared 2-core machine (one seed of a 3-epoch fine-tuning, 8-10
# pretraining epochs took ~130 CPU-seconds for the three tasks; these take ~70%).

#: arm -> the ``fxattn.transform`` options (``None``: the pretrained model itself, no fxattn)
ARMS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "dia-paper": {"dia": {}, "ssia": False},
    "dia-identity": {"dia": {"init": "identity"}, "ssia": False},
    "se-paper": {"dia": {"module": "se", "share": "none"}, "ssia": False},
    "se-identity": {"dia": {"module": "se", "share": "none", "init": "identity"}, "ssia": False},
    "ssia": {"dia": False, "ssia": {}},
    "dia-identity+ssia": {"dia": {"init": "identity"}, "ssia": {}},
}


@dataclass(frozen=True)
class Recipe:
    """One task's pretraining and fine-tuning budget (stored with every result)."""

    name: str
    title: str
    pretrain_epochs: int
    pretrain_lr: float
    finetune_epochs: int
    lr: float = 0.01          # fine-tuning: the pretrained weights
    new_lr: float = 0.1       # fine-tuning: fxattn's new parameters (param_groups)
    batch: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift: int = 0            # random-shift augmentation (pixels), the ResNet-20 task's
    subset: int = 0           # > 0: only this many train / test samples (--quick)


RECIPES = {
    "cluttered": Recipe("cluttered", "Cluttered digits (32x32, 2-D residual CNN)",
                        pretrain_epochs=8, pretrain_lr=0.3, finetune_epochs=2),
    "mnist1d": Recipe("mnist1d", "MNIST-1D (length 40, 1-D residual CNN)",
                      pretrain_epochs=10, pretrain_lr=0.3, finetune_epochs=2),
    "resnet20": Recipe("resnet20", "Digits ResNet-20 (16x16, scikit-learn digits)",
                       pretrain_epochs=6, pretrain_lr=0.05, finetune_epochs=2, shift=2),
}


def quick(recipe: Recipe) -> Recipe:
    """The smoke-run version of a recipe: a slice of the data, one epoch each."""
    return replace(recipe, pretrain_epochs=1, finetune_epochs=1, subset=96)


# --------------------------------------------------------------------------- data and models


@lru_cache(maxsize=3)
def _full_data(name: str) -> tuple[Split, Split]:
    if name == "resnet20":
        train_x, train_y, test_x, test_y = digits_data(DigitsConfig())
        return (train_x, train_y), (test_x, test_y)
    data = EVIDENCE_TASKS[name].data()
    return data["train"], data["test"]


def task_data(recipe: Recipe) -> tuple[Split, Split]:
    """``(train, test)``; the generators are deterministic, so every process gets the same."""
    train, test = _full_data(recipe.name)
    if recipe.subset:
        train = (train[0][:recipe.subset], train[1][:recipe.subset])
        test = (test[0][:recipe.subset], test[1][:recipe.subset])
    return train, test


def base_model(recipe: Recipe) -> nn.Module:
    if recipe.name == "resnet20":
        return ResNet20(num_classes=10, in_channels=1)
    return EVIDENCE_TASKS[recipe.name].model()


# --------------------------------------------------------------------------- training


@torch.no_grad()
def logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([net(chunk) for chunk in images.split(256)])


def accuracy(out: torch.Tensor, labels: torch.Tensor) -> float:
    return float((out.argmax(1) == labels).float().mean())


def train(net: nn.Module, groups: list[dict[str, Any]], recipe: Recipe, epochs: int,
          generator: torch.Generator, *, ssia: bool,
          after_epoch: Callable[[], None] = lambda: None) -> list[float]:
    """SGD + Nesterov over ``groups`` with a cosine schedule over ``epochs``; the task loss
    (+ ``fxattn.ssia_loss`` when ``ssia``). Returns the mean task loss per epoch.

    ``generator`` draws the batch order and the shifts, so arms given generators with the same
    seed see the same batches.
    """
    (train_x, train_y), _ = task_data(recipe)
    optimizer = torch.optim.SGD(groups, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=True)
    steps = epochs * -(-len(train_x) // recipe.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for _ in range(epochs):
        net.train()
        total = 0.0
        for index in torch.randperm(len(train_x), generator=generator).split(recipe.batch):
            images = random_shift(train_x[index], recipe.shift, generator)
            optimizer.zero_grad(set_to_none=True)
            task = F.cross_entropy(net(images), train_y[index])
            loss = task + fxattn.ssia_loss(net) if ssia else task
            loss.backward()
            optimizer.step()
            schedule.step()
            total += task.item() * len(index)
        losses.append(total / len(train_x))
        after_epoch()
    return losses


def pretrain(recipe: Recipe, seed: int) -> nn.Module:
    """The baseline, trained from scratch (weights and batches seeded by ``seed``)."""
    torch.manual_seed(seed)
    model = base_model(recipe)
    groups = [{"params": list(model.parameters()), "lr": recipe.pretrain_lr}]
    train(model, groups, recipe, recipe.pretrain_epochs, torch.Generator().manual_seed(seed),
          ssia=False)
    return model.eval()


def prepare_arm(pretrained: nn.Module, arm: str, recipe: Recipe, seed: int,
                example: torch.Tensor) -> tuple[nn.Module, list[dict[str, Any]], bool]:
    """The arm's model (a copy), its optimizer groups and whether it has an SSIA loss."""
    options = ARMS[arm]
    if options is None:
        model = copy.deepcopy(pretrained)
        return model, [{"params": list(model.parameters()), "lr": recipe.lr}], False
    dia = fxattn.DIA(**options["dia"]) if options["dia"] is not False else False
    ssia = fxattn.SSIA(**options["ssia"]) if options["ssia"] is not False else False
    torch.manual_seed(10_000 + seed)  # the new modules: the same initial values in every arm
    net = fxattn.transform(pretrained, example, dia=dia, ssia=ssia)
    return net, fxattn.param_groups(net, lr=recipe.lr, new_lr=recipe.new_lr), ssia is not False


def run_seed(recipe: Recipe, seed: int, arms: list[str]) -> dict[str, Any]:
    """Pretrain once, then fine-tune every arm from it; per arm the test-accuracy curve
    (step 0, then after each epoch) and how far step 0's logits are from the pretrained's."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    (train_x, _), (test_x, test_y) = task_data(recipe)
    pretrained = pretrain(recipe, seed)
    reference = logits(pretrained, test_x)
    record: dict[str, Any] = {"task": recipe.name, "seed": seed, "recipe": asdict(recipe),
                              "pretrained_test_acc": accuracy(reference, test_y),
                              "pretrain_seconds": round(time.perf_counter() - start, 1),
                              "arms": {}}
    for arm in arms:
        arm_start = time.perf_counter()
        net, groups, ssia = prepare_arm(pretrained, arm, recipe, seed, train_x[:2])
        step0 = logits(net, test_x)
        curve = [accuracy(step0, test_y)]
        losses = train(net, groups, recipe, recipe.finetune_epochs,
                       torch.Generator().manual_seed(1_000 + seed), ssia=ssia,
                       after_epoch=lambda net=net, curve=curve: curve.append(
                           accuracy(logits(net, test_x), test_y)))
        record["arms"][arm] = {
            "test_acc": [round(a, 6) for a in curve],
            "step0_max_abs_logit_change": float((step0 - reference).abs().max()),
            "train_loss": [round(v, 6) for v in losses],
            "new_parameters": sum(p.numel() for g in groups if g.get("name") == "fxattn"
                                  for p in g["params"]),
            "seconds": round(time.perf_counter() - arm_start, 1),
        }
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


# --------------------------------------------------------------------------- jobs


def fingerprint(recipe: Recipe, arms: list[str]) -> str:
    """What a cached job's numbers depend on: the recipe, the arms and this file's code."""
    text = json.dumps([asdict(recipe), {a: ARMS[a] for a in arms}], sort_keys=True)
    code = Path(__file__).read_text()
    return hashlib.sha256((text + code).encode()).hexdigest()[:16]


def _job(recipe: Recipe, seed: int, arms: list[str], path: Path) -> str:
    record = run_seed(recipe, seed, arms)
    record["fingerprint"] = fingerprint(recipe, arms)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # a job counts as done only once complete
    ends = ", ".join(f"{a} {r['test_acc'][0] * 100:.1f}->{r['test_acc'][-1] * 100:.1f}"
                     for a, r in record["arms"].items())
    return f"{recipe.name} seed {seed} ({record['seconds']} s): {ends}"


def run_jobs(recipes: list[Recipe], seeds: list[int], arms: list[str], cache: Path,
             workers: int) -> dict[tuple[str, int], dict[str, Any]]:
    """Every (task, seed) record, running the ones not cached (seed-major: an interrupted run
    leaves complete seeds behind)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {(r.name, s): cache / f"{r.name}_s{s}.json" for s in seeds for r in recipes}
    by_name = {r.name: r for r in recipes}

    def cached(key: tuple[str, int]) -> dict[str, Any] | None:
        path = paths[key]
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return record if record.get("fingerprint") == fingerprint(by_name[key[0]], arms) else None

    todo = [key for key in paths if cached(key) is None]
    if todo:
        print(f"{len(todo)} (task, seed) jobs to run on {workers} worker(s)", flush=True)
    start = time.perf_counter()
    jobs = [(by_name[name], seed, arms, paths[name, seed]) for name, seed in todo]
    if workers <= 1:
        for done, job in enumerate(jobs, 1):
            print(f"[{time.perf_counter() - start:5.0f} s {done}/{len(jobs)}] {_job(*job)}",
                  flush=True)
    elif jobs:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_job, *job) for job in jobs]
            for done, future in enumerate(as_completed(futures), 1):
                print(f"[{time.perf_counter() - start:5.0f} s {done}/{len(jobs)}] "
                      f"{future.result()}", flush=True)
    return {key: json.loads(path.read_text()) for key, path in paths.items()}


# --------------------------------------------------------------------------- statistics


def summarise(recipe: Recipe, records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per arm: mean curves and, at step 0 and at the end, the paired difference to the
    continued baseline (95% t-interval, paired t-test, Holm over the arms at the end)."""
    records = sorted(records, key=lambda r: r["seed"])
    curves = {arm: np.array([r["arms"][arm]["test_acc"] for r in records]) for arm in arms}
    base = curves["baseline"]
    out: dict[str, Any] = {
        "recipe": asdict(recipe), "seeds": [r["seed"] for r in records],
        "pretrained_test_acc": [r["pretrained_test_acc"] for r in records],
        "seconds": [r["seconds"] for r in records], "arms": {}}
    for arm in arms:
        acc = curves[arm]
        entry: dict[str, Any] = {
            "test_acc": acc.tolist(),  # seeds x (step 0, epoch 1, ...)
            "mean": acc.mean(0).tolist(),
            "std": acc.std(0, ddof=1).tolist() if len(acc) > 1 else [0.0] * acc.shape[1],
            "step0_max_abs_logit_change": max(r["arms"][arm]["step0_max_abs_logit_change"]
                                              for r in records),
            "new_parameters": records[0]["arms"][arm]["new_parameters"],
        }
        if arm != "baseline":
            entry["vs_baseline_step0"] = paired(acc[:, 0], base[:, 0])
            entry["vs_baseline_end"] = paired(acc[:, -1], base[:, -1])
        out["arms"][arm] = entry
    adjusted = holm({arm: e["vs_baseline_end"]["p"] for arm, e in out["arms"].items()
                     if "vs_baseline_end" in e})
    for arm, p in adjusted.items():
        verdict = out["arms"][arm]["vs_baseline_end"]
        verdict["p_holm"] = p
        verdict["significant"] = bool(p < 0.05)
    return out


def _pp(x: float) -> str:
    return f"{x * 100:+.2f}"


def _ci(v: dict[str, Any]) -> str:
    if v["n"] < 2:
        return f"{_pp(v['mean'])} (one seed: no CI)"
    if v["ci95"][0] == v["ci95"][1] == v["mean"]:
        return f"{_pp(v['mean'])} (identical in every seed)"
    return f"{_pp(v['mean'])} [{_pp(v['ci95'][0])}, {_pp(v['ci95'][1])}]"


def verdict(summary: dict[str, Any]) -> str:
    """One plain sentence: which end-of-budget differences are significant."""
    arms = summary["arms"]
    worse = [a for a, e in arms.items() if e.get("vs_baseline_end", {}).get("significant")
             and e["vs_baseline_end"]["mean"] < 0]
    better = [a for a, e in arms.items() if e.get("vs_baseline_end", {}).get("significant")
              and e["vs_baseline_end"]["mean"] > 0]
    rest = [a for a, e in arms.items() if "vs_baseline_end" in e and a not in worse + better]

    def names(xs: list[str]) -> str:
        return ", ".join(f"`{a}`" for a in xs) or "none"

    return (f"- **{summary['recipe']['title']}**: at the end, significantly worse than the "
            f"continued baseline: {names(worse)}; significantly better: {names(better)}; not "
            f"significantly different: {names(rest)}.")


def task_markdown(summary: dict[str, Any]) -> list[str]:
    r, arms = summary["recipe"], summary["arms"]
    epochs = r["finetune_epochs"]
    pre = np.array(summary["pretrained_test_acc"]) * 100
    lines = [
        f"#### {r['title']}", "",
        f"Pretrained {r['pretrain_epochs']} epochs at lr {r['pretrain_lr']:g}: test accuracy "
        f"{pre.mean():.2f} ± {pre.std(ddof=1) if len(pre) > 1 else 0:.2f}% "
        f"({len(pre)} seeds). Fine-tuned {epochs} epochs, lr {r['lr']:g} (pretrained weights) / "
        f"{r['new_lr']:g} (new parameters, `fxattn.param_groups`), cosine.", "",
        "| arm | step 0 | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1))
        + " | Δ step 0 vs baseline (pp) [95% CI] | Δ end vs baseline (pp) [95% CI] | Holm p "
        "| significant | max logit change at step 0 |",
        "|---|" + "---|" * (epochs + 6),
    ]
    for arm, e in arms.items():
        accs = " | ".join(f"{m * 100:.2f} ± {s * 100:.2f}" for m, s in zip(e["mean"], e["std"],
                                                                           strict=True))
        if "vs_baseline_end" in e:
            end = e["vs_baseline_end"]
            tail = (f"{_ci(e['vs_baseline_step0'])} | {_ci(end)} | {end['p_holm']:.3g} | "
                    + ("**yes**" if end["significant"] else "no"))
        else:
            tail = "- | - | - | -"
        lines.append(f"| {arm} | {accs} | {tail} | {e['step0_max_abs_logit_change']:.3g} |")
    return [*lines, ""]


def plot(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """Mean test accuracy over the fine-tuning budget per arm, with each arm's 95% t-band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    figure, axes = plt.subplots(1, len(summaries), figsize=(5.2 * len(summaries), 4.2),
                                squeeze=False)
    for ax, summary in zip(axes[0], summaries.values(), strict=True):
        for i, (arm, e) in enumerate(summary["arms"].items()):
            acc = np.array(e["test_acc"]) * 100
            x = np.arange(acc.shape[1])
            mean = acc.mean(0)
            style = "--" if arm.endswith("paper") else "-"
            ax.plot(x, mean, style, marker="o", ms=3, label=arm, color=f"C{i}")
            if len(acc) > 1:
                half = stats.t.ppf(0.975, len(acc) - 1) * acc.std(0, ddof=1) / np.sqrt(len(acc))
                ax.fill_between(x, mean - half, mean + half, alpha=0.15, color=f"C{i}")
        ax.set(title=summary["recipe"]["title"], xlabel="fine-tuning epoch (0: right after "
               "transform)", ylabel="test accuracy (%)")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    """Where and when: CPU model, cores, load average, git commit (results name them)."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {"when_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=2, help="processes (1 thread each)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 96 samples, 1 pretraining + 1 fine-tuning epoch")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--cache", type=Path, default=None,
                        help="per-(task, seed) records (default out/finetune-cache, or "
                        "<out>/cache with --quick)")
    args = parser.parse_args(argv)
    if "baseline" not in args.arms:
        parser.error("--arms must include baseline (every arm is compared with it)")
    arms = [a for a in ARMS if a in args.arms]
    cache = args.cache or (args.out / "cache" if args.quick else Path("out/finetune-cache"))
    machine = machine_info()
    start = time.perf_counter()
    recipes = [quick(RECIPES[t]) if args.quick else RECIPES[t] for t in args.tasks]
    records = run_jobs(recipes, args.seeds, arms, cache, args.workers)
    summaries = {r.name: summarise(r, [records[r.name, s] for s in args.seeds], arms)
                 for r in recipes}
    machine["loadavg_end"] = list(os.getloadavg())
    machine["wall_seconds"] = round(time.perf_counter() - start, 1)
    command = command_line("finetune.py", argv)
    dirty = " (with uncommitted changes)" if machine["git_dirty"] else ""
    head = [
        "# Fine-tuning trained models: identity vs paper initialisation", "",
        f"Generated by `{command}` on {machine['when_utc']} at commit "
        f"`{machine['git_commit'][:12]}`{dirty}; {machine['cpu']}, {machine['cores']} cores, "
        "load average "
        f"{machine['loadavg_start'][0]:.1f} at start and {machine['loadavg_end'][0]:.1f} at end "
        f"(shared machine; runs are single-threaded and deterministic, so load changes only "
        f"their time); {machine['wall_seconds'] / 60:.1f} min wall.", "",
        "Test accuracy (%), mean ± std over seeds, at step 0 (right after `fxattn.transform` "
        "of the pretrained baseline) and after each fine-tuning epoch. Δ: paired by seed "
        "against the continued baseline, two-sided 95% t-interval; significant: paired t-test, "
        "Holm-corrected over the arms of a task, p < 0.05.", "",
        "#### Verdict", "", *[verdict(s) for s in summaries.values()], ""]
    body = [line for s in summaries.values() for line in task_markdown(s)]
    results = {"command": command, "machine": machine, "seeds": args.seeds, "arms": ARMS,
               "tasks": summaries}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(summaries, args.out / "finetune.png")
    text = "\n".join([*head, *body, "![test accuracy curves](finetune.png)", ""])
    write_results(args.out, "finetune", results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
