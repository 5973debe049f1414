"""Short runs inside frameworks: does the attached SSIA loss fall, and is the task loss no worse?

For Hugging Face ``Trainer`` (a ResNet from a config), Lightning (torchvision ResNet-18) and
ultralytics' ``DetectionTrainer`` (YOLOv8n from its yaml on generated boxes, ``--epochs``
epochs of 4 steps; its loss items are per epoch), train the same seeded model on the same
generated data twice: ``SSIA(attach=True)`` (the loop never mentions SSIA) and ``ssia=False``.
Record the SSIA loss and the task loss of the first and last steps (mean of ``--window``
steps; ultralytics: first and last epoch) and the final held-out task loss, for each of
``--seeds`` seeds (the seed sets the model's initialisation, DIA's weights and the data
order), and the held-out difference attach - off paired by seed with its 95% confidence
interval (Student's t).

    python benchmarks/frameworks.py --steps 40 --seeds 5
    python benchmarks/frameworks.py --frameworks ultralytics --epochs 10 --seeds 5

Results go to ``frameworks[_weight<w>][_<frameworks>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_frameworks import (  # noqa: E402 - the tests' generated data and settings
    HF_BATCH,
    _hf_args,
    _image_batches,
    _Images,
    _lightning_trainer,
    _loader,
    _square_validation,
    _yolo_dataset,
)

import fxattn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


WEIGHT = [1.0]  # SSIA's weight, set by --weight


def _ssia(attach: bool) -> fxattn.SSIA | bool:
    return fxattn.SSIA(attach=True, weight=WEIGHT[0]) if attach else False


def _held_out(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              hf: bool) -> float:
    net.eval()
    losses = []
    with torch.no_grad():
        for x, y in batches:
            out = net(pixel_values=x, labels=y).logits if hf else net(x)
            losses.append(float(nn.functional.cross_entropy(out, y)))
    return statistics.fmean(losses)


def run_hf(steps: int, attach: bool, seed: int = 0) -> dict[str, Any]:
    import transformers

    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=3)
    torch.manual_seed(seed)
    model = transformers.ResNetForImageClassification(config)
    torch.manual_seed(seed)
    example = {"pixel_values": torch.randn(HF_BATCH, 3, 32, 32),
               "labels": torch.zeros(HF_BATCH, dtype=torch.long)}
    net = fxattn.transform(model, example, ssia=_ssia(attach))
    task, ssia = [], []

    def record(module: nn.Module, _: Any, out: Any) -> None:
        if module.training:
            task.append(float(out.loss))
            if attach:
                ssia.append(float(fxattn.ssia_loss(module)))

    net.register_forward_hook(record)
    with tempfile.TemporaryDirectory() as tmp:
        args = _hf_args(Path(tmp), 1, steps, train_sampling_strategy="random")
        args.seed = args.data_seed = seed
        transformers.Trainer(model=net, args=args, train_dataset=_Images(HF_BATCH * 16)).train()
    return {"task": task, "ssia": ssia, "held_out": _held_out(net, _image_batches(40)[32:], True)}


def run_lightning(steps: int, attach: bool, seed: int = 0) -> dict[str, Any]:
    import lightning
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.manual_seed(seed)
    net = fxattn.transform(model, torch.randn(4, 3, 32, 32), ssia=_ssia(attach))

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.task, self.ssia = net, [], []

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)  # never mentions SSIA
            self.task.append(float(loss))
            if attach:
                self.ssia.append(float(fxattn.ssia_loss(self.net)))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Classifier()
    batches = _image_batches(40)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(seed)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _lightning_trainer(Path(tmp), max_steps=steps, enable_checkpointing=False)
        trainer.fit(module, train_dataloaders=_loader([batches[i] for i in order]))
    return {"task": module.task, "ssia": module.ssia,
            "held_out": _held_out(net, batches[32:], False)}


def run_ultralytics(epochs: int, attach: bool, seed: int = 0) -> dict[str, Any]:
    """YOLOv8n (random weights) trained by ultralytics' own ``DetectionTrainer`` for ``epochs``
    epochs on generated boxes; the task loss is box + cls + dfl (ultralytics' loss items, the
    epoch means of its ``results.csv``), the held-out one the same sum on its validation split
    (the EMA model, as ultralytics validates)."""
    import csv

    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel

    task_keys = ("box_loss", "cls_loss", "dfl_loss")
    with tempfile.TemporaryDirectory() as tmp:
        data = _yolo_dataset(Path(tmp) / "data", train=32, val=16, seed=1)
        torch.manual_seed(seed)
        model = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
        torch.manual_seed(seed)
        net = fxattn.transform(model, torch.randn(2, 3, 64, 64), ssia=_ssia(attach))
        trainer = DetectionTrainer(overrides=dict(
            model="yolov8n.yaml", data=str(data), imgsz=64, epochs=epochs, batch=8, workers=0,
            device="cpu", amp=False, plots=False, project=str(Path(tmp) / "runs"), name="r",
            exist_ok=True, pretrained=False, verbose=False, seed=seed, deterministic=True,
            warmup_epochs=0, nbs=8))  # nbs = batch: one optimizer step per batch (else 8 per step)
        trainer.model = net
        trainer.add_callback("on_pretrain_routine_end", _square_validation)
        if attach:
            fxattn.log_ssia(trainer)
        trainer.train()
        with (Path(trainer.save_dir) / "results.csv").open() as f:
            rows = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {"task": [sum(row[f"train/{k}"] for k in task_keys) for row in rows],
            "ssia": [row["train/ssia_loss"] for row in rows] if attach else [],
            "held_out": sum(rows[-1][f"val/{k}"] for k in task_keys)}


RUNNERS = {"hf_trainer": run_hf, "lightning": run_lightning, "ultralytics": run_ultralytics}
#: the frameworks of the plain ``frameworks[_weight<w>]`` result files
DEFAULT_FRAMEWORKS = ("hf_trainer", "lightning")


def _summary(run: dict[str, Any], window: int) -> dict[str, Any]:
    def ends(values: list[float]) -> list[float] | None:
        if not values:
            return None
        return [statistics.fmean(values[:window]), statistics.fmean(values[-window:])]

    return {"task_first_last": ends(run["task"]), "ssia_first_last": ends(run["ssia"]),
            "held_out_task": run["held_out"], "steps": len(run["task"])}


def _paired_ci(differences: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences and its 95% confidence interval (Student's t)."""
    from scipy import stats

    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / (
        len(differences) ** 0.5)
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--weight", type=float, default=1.0, help="SSIA's loss weight")
    parser.add_argument("--frameworks", nargs="+", default=list(DEFAULT_FRAMEWORKS),
                        choices=list(RUNNERS))
    parser.add_argument("--epochs", type=int, default=10, help="ultralytics: epochs of 4 "
                        "steps (its loss items are logged per epoch)")
    args = parser.parse_args()
    WEIGHT[0] = args.weight
    stem = ("frameworks" if args.weight == 1.0 else f"frameworks_weight{args.weight:g}") + (
        "" if tuple(args.frameworks) == DEFAULT_FRAMEWORKS else "_" + "_".join(args.frameworks))
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    results: dict[str, Any] = {"steps": args.steps, "seeds": args.seeds, "weight": args.weight,
                               "load_before": load_before}
    for name in args.frameworks:
        length, window = ((args.epochs, 1) if name == "ultralytics" else
                          (args.steps, args.window))
        results[name] = {label: [] for label in ("attach", "ssia_off")}
        for seed in range(args.seeds):
            for label, attach in (("attach", True), ("ssia_off", False)):
                results[name][label].append(
                    _summary(RUNNERS[name](length, attach, seed), window))
    results["load_after"] = os.getloadavg()
    lengths = ", ".join(
        f"{name} {args.epochs} epochs of 4 steps" if name == "ultralytics" else
        f"{name} {args.steps} steps" for name in args.frameworks)
    lines = [f"# SSIA(attach=True, weight={args.weight:g}) in frameworks: {lengths}, "
             f"{args.seeds} seeds", "", f"Command: `python benchmarks/frameworks.py --steps "
             f"{args.steps} --seeds {args.seeds} --weight {args.weight:g} --frameworks "
             f"{' '.join(args.frameworks)}" + (f" --epochs {args.epochs}" if "ultralytics" in
                                               args.frameworks else "") + "`; load average "
             f"before {load_before[0]:.2f}, after "
             f"{results['load_after'][0]:.2f}. Means over seeds; the difference is attach - "
             "off, paired by seed, with its 95% confidence interval.", "",
             "| framework | arm | task loss first -> last | SSIA first -> last | "
             "held-out task loss (mean +- sd) |", "|---|---|---|---|---|"]
    for name in args.frameworks:
        for label, rows in results[name].items():
            def mean_pair(key: str, rows: list[dict[str, Any]] = rows) -> str:
                pairs = [row[key] for row in rows if row[key] is not None]
                if not pairs:
                    return "-"
                return " -> ".join(f"{statistics.fmean(p[i] for p in pairs):.4f}"
                                   for i in (0, 1))
            held = [row["held_out_task"] for row in rows]
            spread = statistics.stdev(held) if len(held) > 1 else 0.0
            lines.append(f"| {name} | {label} | {mean_pair('task_first_last')} | "
                         f"{mean_pair('ssia_first_last')} | "
                         f"{statistics.fmean(held):.4f} +- {spread:.4f} |")
        differences = [a["held_out_task"] - b["held_out_task"] for a, b in
                       zip(results[name]["attach"], results[name]["ssia_off"], strict=True)]
        mean, low, high = _paired_ci(differences)
        results[name]["held_out_difference"] = {"mean": mean, "ci95": [low, high]}
        verdict = ("no significant difference" if low <= 0 <= high else
                   "attach worse" if low > 0 else "attach better")
        lines.append(f"| {name} | attach - off | | | {mean:+.4f} [{low:+.4f}, {high:+.4f}]: "
                     f"{verdict} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
