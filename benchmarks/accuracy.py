"""Does the free attention help? ResNet-20 on scikit-learn's handwritten digits, five arms.

Arms (identical data split, seeds, schedule and base-model initialisation per seed; only the
``fxattn.transform`` options differ):

* ``baseline``      ``dia=False, ssia=False`` (the plain ResNet-20 through the same pipeline)
* ``dia``           DIA-LSTM shared per stage (the default ``fxattn.DIA()``)
* ``ssia``          SSIA only (training-time loss; the deployed model is the baseline's graph)
* ``dia+ssia``      both (fxattn's default)
* ``se-per-block``  ``DIA(module="se", share="none")``: one independent SE module per block.
  Not one of the four methods: it is there for the DIA paper's diagnostic, which asks how
  correlated independent per-block attention is (and it is a useful SE-ResNet reference).

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 grey images, shipped inside scikit-learn),
bilinearly upsampled to 16x16, one fixed stratified split (2/3 train, 1/3 test, seed 0),
random 2-pixel shifts as augmentation. SGD + Nesterov, cosine schedule, final-epoch test
accuracy (no selection on the test set).

After training: each arm's seed-0 model is stripped (``fxattn.strip_ssia``), exported to ONNX
(verified in onnxruntime) and timed in onnxruntime (1 thread, batch 1, interleaved runs); the
attention-correlation diagnostic (``fxattn.attention_correlation``) runs on the whole test set
for every trained DIA model.

Resumable: each (arm, seed) run writes ``benchmarks/results/accuracy_runs/<arm>_s<seed>.json``
and a checkpoint in ``--cache`` (default ``out/accuracy-cache``, git-ignored); a rerun trains
only what is missing, then rebuilds the tables and figures.

    python benchmarks/accuracy.py                 # ~20 min on 2 CPU cores
    python benchmarks/accuracy.py --seeds 0 --epochs 2 --out /tmp/smoke   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common

import fxattn  # noqa: E402
from benchmarks.common.resnet20 import ResNet20  # noqa: E402
from fxattn.analysis.graph import count_parameters  # noqa: E402
from fxattn.bench import interleaved  # noqa: E402
from fxattn.capture import ExampleInputs  # noqa: E402
from fxattn.export import export_onnx  # noqa: E402
from fxattn.export.runtime import ort_feed, ort_session  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS: dict[str, dict[str, Any]] = {
    "baseline": {"dia": False, "ssia": False},
    "dia": {"dia": {}, "ssia": False},
    "ssia": {"dia": False, "ssia": {}},
    "dia+ssia": {"dia": {}, "ssia": {}},
    "se-per-block": {"dia": {"module": "se", "share": "none"}, "ssia": False},
}
METHOD_ARMS = ("baseline", "dia", "ssia", "dia+ssia")


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; stored in each run's JSON so a stale run is redone."""

    epochs: int = 40
    batch: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    size: int = 16
    shift: int = 2
    test_fraction: float = 1 / 3
    split_seed: int = 0


# --------------------------------------------------------------------------- data


def load_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed stratified split of the digits, upsampled and normalised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(cfg.size, cfg.size), mode="bilinear",
                           align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.test_fraction, stratify=digits.target,
        random_state=cfg.split_seed,
    )
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, labels[train_idx], (test_x - mean) / std, labels[test_idx]


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate every image by up to ``shift`` pixels (zero padding), like CIFAR crops."""
    if shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


# --------------------------------------------------------------------------- one run


def build(arm: str, seed: int, example: torch.Tensor) -> fxattn.AttentionGraphModule:
    """The arm's network; the base ResNet-20 weights depend on the seed only, not the arm."""
    torch.manual_seed(seed)
    model = ResNet20(num_classes=10, in_channels=example.shape[1])
    options = ARMS[arm]
    dia = fxattn.DIA(**options["dia"]) if options["dia"] is not False else False
    ssia = fxattn.SSIA(**options["ssia"]) if options["ssia"] is not False else False
    torch.manual_seed(10_000 + seed)  # attention modules: same init in every arm that has them
    return fxattn.transform(model, example, dia=dia, ssia=ssia)


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    predictions = torch.cat([net(chunk).argmax(1) for chunk in images.split(256)])
    return float((predictions == labels).float().mean())


def fit(net: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, *, epochs: int,
        batch: int, lr: float, momentum: float, weight_decay: float,
        generator: torch.Generator,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        evaluate: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Train ``net`` in place: SGD + Nesterov, cosine schedule, task loss + ``ssia_loss``.

    ``generator`` draws the batch order (and the augmentation), so two arms trained with the
    same seed see the same batches. ``evaluate`` (e.g. held-out accuracy) runs after every
    epoch. Returns the per-epoch curves (``train_loss``, ``ssia_loss``, ``eval_acc``).
    """
    steps_per_epoch = -(-len(train_x) // batch)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    curves: dict[str, list[float]] = {"train_loss": [], "ssia_loss": [], "eval_acc": []}
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=generator)
        task_sum = ssia_sum = 0.0
        for index in order.split(batch):
            images = train_x[index]
            if augment is not None:
                images = augment(images, generator)
            optimizer.zero_grad(set_to_none=True)
            task = F.cross_entropy(net(images), train_y[index])
            aux = fxattn.ssia_loss(net)
            (task + aux).backward()
            optimizer.step()
            schedule.step()
            task_sum += task.item() * len(index)
            ssia_sum += aux.item() * len(index)
        curves["train_loss"].append(task_sum / len(train_x))
        curves["ssia_loss"].append(ssia_sum / len(train_x))
        if evaluate is not None:
            curves["eval_acc"].append(evaluate())
    return curves


def train_run(arm: str, seed: int, cfg: Config, cache: Path) -> dict[str, Any]:
    """Train one (arm, seed); save the checkpoint and return the run record."""
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = load_data(cfg)
    net = build(arm, seed, train_x[:2])
    start = time.perf_counter()
    curves = fit(net, train_x, train_y, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr,
                 momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                 generator=torch.Generator().manual_seed(seed),
                 augment=lambda images, rng: random_shift(images, cfg.shift, rng),
                 evaluate=lambda: accuracy(net, test_x, test_y))
    curves["test_acc"] = curves.pop("eval_acc")
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), cache / f"{arm}_s{seed}.pt")
    lean = fxattn.strip_ssia(net)
    return {
        "arm": arm,
        "seed": seed,
        "config": asdict(cfg),
        "options": ARMS[arm],
        "test_acc": curves["test_acc"][-1],
        "train_seconds": round(seconds, 1),
        "parameters": count_parameters(lean),
        "training_parameters": count_parameters(net),
        "curves": {k: [round(v, 6) for v in vs] for k, vs in curves.items()},
        "torch": torch.__version__,
    }


def _run_path(runs: Path, arm: str, seed: int) -> Path:
    return runs / f"{arm.replace('+', '_')}_s{seed}.json"


def _is_done(runs: Path, cache: Path, arm: str, seed: int, cfg: Config) -> bool:
    path = _run_path(runs, arm, seed)
    if not path.exists() or not (cache / f"{arm}_s{seed}.pt").exists():
        return False
    return json.loads(path.read_text()).get("config") == asdict(cfg)


def _job(arm: str, seed: int, cfg: Config, runs: Path, cache: Path) -> str:
    record = train_run(arm, seed, cfg, cache)
    path = _run_path(runs, arm, seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # a run counts as done only once complete
    return f"{arm} seed {seed}: test acc {record['test_acc']:.4f} ({record['train_seconds']} s)"


# --------------------------------------------------------------------------- after training


def load_trained(arm: str, seed: int, cfg: Config, cache: Path,
                 example: torch.Tensor) -> fxattn.AttentionGraphModule:
    net = build(arm, seed, example)
    net.load_state_dict(torch.load(cache / f"{arm}_s{seed}.pt", weights_only=True))
    return net.eval()


def measure_latency(
    arms: list[str], seed: int, cfg: Config, cache: Path, runs: int
) -> dict[str, Any]:
    """Export each arm's seed-0 lean model to ONNX (verified) and time them interleaved."""
    torch.set_num_threads(1)
    example = torch.randn(2, 1, cfg.size, cfg.size)
    sessions, exports = {}, {}
    for arm in arms:
        lean = fxattn.strip_ssia(load_trained(arm, seed, cfg, cache, example))
        path = cache / f"{arm.replace('+', '_')}_lean.onnx"
        report = export_onnx(lean, path, example)
        exports[arm] = {"nodes": report.nodes, "max_abs_error": report.max_abs_error,
                        "file_bytes": report.file_bytes}
        sessions[arm] = ort_session(str(path), threads=1)
    one = ExampleInputs.from_user(torch.randn(1, 1, cfg.size, cfg.size))
    feeds = {arm: ort_feed(s, one) for arm, s in sessions.items()}
    stats = interleaved({arm: (lambda s=s, f=feeds[arm]: s.run(None, f))
                         for arm, s in sessions.items()}, runs=runs, warmup=20)
    return {arm: {**exports[arm], "p50_ms": stats[arm].p50_ms, "p90_ms": stats[arm].p90_ms}
            for arm in arms}


def measure_correlation(arms: list[str], seeds: list[int], cfg: Config,
                        cache: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attention-correlation diagnostic of every trained DIA model on the test set."""
    _, _, test_x, _ = load_data(cfg)
    table: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    for arm in arms:
        if ARMS[arm]["dia"] is False:
            continue
        per_seed = []
        for seed in seeds:
            report = fxattn.attention_correlation(load_trained(arm, seed, cfg, cache,
                                                               test_x[:2]), test_x)
            per_seed.append(report.to_dict())
            if seed == seeds[0]:
                reports[arm] = report
        stage_means = np.array([[s["mean_off_diagonal"] for s in r["stages"]]
                                for r in per_seed], dtype=float)
        table[arm] = {
            "per_seed": per_seed,
            "stage_mean_r": stage_means.mean(0).round(4).tolist(),
            "stage_std_r": stage_means.std(0).round(4).tolist(),
            "mean_r": round(float(np.nanmean(stage_means)), 4),
        }
    return table, reports


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def write_results(records: list[dict[str, Any]], latency: dict[str, Any],
                  correlation: dict[str, Any], reports: dict[str, Any], cfg: Config,
                  out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fxattn.diagnostics import plot_correlation

    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in records)]
    summary: dict[str, Any] = {}
    for arm in arms:
        rs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        mean, std = _mean_std([r["test_acc"] for r in rs])
        summary[arm] = {
            "seeds": [r["seed"] for r in rs],
            "test_acc": [r["test_acc"] for r in rs],
            "test_acc_mean": mean,
            "test_acc_std": std,
            "parameters": rs[0]["parameters"],
            "training_parameters": rs[0]["training_parameters"],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "latency": latency.get(arm),
            "correlation_mean_r": correlation.get(arm, {}).get("mean_r"),
        }
    base = summary.get("baseline")
    lines = [
        "# ResNet-20 on scikit-learn digits: baseline vs DIA vs SSIA vs DIA+SSIA",
        "",
        f"{len(records)} runs; {cfg.epochs} epochs, batch {cfg.batch}, SGD lr {cfg.lr} "
        f"cosine, {cfg.size}x{cfg.size} inputs, fixed split (train {_count_train(cfg)} / "
        f"test {1797 - _count_train(cfg)}). Test accuracy is the final epoch's, "
        "mean ± sample std over seeds. Latency: onnxruntime, 1 thread, batch 1, median of "
        "interleaved runs of each arm's seed-0 lean ONNX export (verified against PyTorch).",
        "",
        "| arm | test accuracy (%) | Δ vs baseline (pp) | per-seed | params (deployed) | "
        "ORT latency p50 (ms) | attention r (stage mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        delta = (s["test_acc_mean"] - base["test_acc_mean"]) * 100 if base else float("nan")
        latency_ms = f"{s['latency']['p50_ms']:.3f}" if s["latency"] else "-"
        r = s["correlation_mean_r"]
        lines.append(
            f"| {arm} | {s['test_acc_mean'] * 100:.2f} ± {s['test_acc_std'] * 100:.2f} | "
            f"{delta:+.2f} | {', '.join(f'{a * 100:.1f}' for a in s['test_acc'])} | "
            f"{s['parameters']:,} | {latency_ms} | {'-' if r is None else f'{r:.3f}'} |"
        )
    lines += ["", "Attention correlation per stage (mean Pearson r between the blocks of a "
              "stage, test set, mean ± std over seeds):", ""]
    for arm, c in correlation.items():
        stages = ", ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in
                           zip(c["stage_mean_r"], c["stage_std_r"], strict=True))
        lines.append(f"- `{arm}`: {stages}")
    lines += ["", "![learning curves](accuracy.png)", "",
              "![attention correlation](accuracy_correlation.png)", ""]
    text = "\n".join(lines)

    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(
        {"config": asdict(cfg), "summary": summary, "correlation": correlation,
         "runs": records}, indent=1))

    figure, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        rs = [r for r in records if r["arm"] == arm]
        acc = np.array([r["curves"]["test_acc"] for r in rs]) * 100
        loss = np.array([r["curves"]["train_loss"] for r in rs])
        epochs = np.arange(1, acc.shape[1] + 1)
        line, = ax_acc.plot(epochs, acc.mean(0), label=arm)
        ax_acc.fill_between(epochs, acc.min(0), acc.max(0), alpha=0.15, color=line.get_color())
        ax_loss.plot(epochs, loss.mean(0), label=arm, color=line.get_color())
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(80, 100),
               title="test accuracy (mean, band = min..max over seeds)")
    ax_loss.set(xlabel="epoch", ylabel="train cross-entropy", yscale="log",
                title="training loss (task part, mean over seeds)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    plt.close(figure)

    if reports:
        stages = max(len(r.stages) for r in reports.values())
        figure, grid = plt.subplots(len(reports), stages, figsize=(3.4 * stages,
                                                                   3.2 * len(reports)),
                                    squeeze=False)
        # room for each panel's tick labels; set before the colour bars take their space
        figure.subplots_adjust(wspace=0.5, hspace=0.45, top=0.9)
        for row, (arm, report) in zip(grid, reports.items(), strict=True):
            plot_correlation(report, axes=list(row))
            row[0].set_ylabel(f"{arm}\n(mean r {report.mean_pearson:.2f})", fontsize=9)
        figure.suptitle("Attention correlation between blocks of a stage, trained seed-0 "
                        "models, test set", fontsize=10)
        figure.savefig(out / "accuracy_correlation.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
    (out / "accuracy.md").write_text(text)
    return text


def _count_train(cfg: Config) -> int:
    return 1797 - int(np.ceil(1797 * cfg.test_fraction))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--workers", type=int, default=2, help="training processes (1 thread "
                        "each)")
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--cache", type=Path, default=Path("out/accuracy-cache"),
                        help="checkpoints and ONNX files (not committed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config(epochs=args.epochs)
    runs = args.out / "accuracy_runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [(arm, seed) for seed in args.seeds for arm in args.arms
            if not _is_done(runs, args.cache, arm, seed, cfg)]
    print(f"{len(todo)} of {len(args.arms) * len(args.seeds)} runs to train", flush=True)
    start = time.perf_counter()
    if todo:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_job, arm, seed, cfg, runs, args.cache) for arm, seed in todo]
            for future in as_completed(futures):
                print(f"[{time.perf_counter() - start:6.0f} s] {future.result()}", flush=True)
    records = [json.loads(_run_path(runs, arm, seed).read_text())
               for arm in args.arms for seed in args.seeds]
    latency = measure_latency(args.arms, args.seeds[0], cfg, args.cache,
                              args.latency_runs)
    correlation, reports = measure_correlation(args.arms, args.seeds, cfg, args.cache)
    print(write_results(records, latency, correlation, reports, cfg, args.out))
    print(f"done in {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
