"""Train a model with DIA + SSIA, checkpoint and resume, then strip SSIA and export ONNX.

The loop is an ordinary PyTorch loop; fxattn adds two lines (``fxattn.transform`` before it,
``+ fxattn.ssia_loss(net)`` in it) and two after it (``fxattn.strip_ssia`` and
``fxattn.export_onnx``). Everything else (optimizer, LR schedule, data loading, checkpoints)
is what the loop already had.

Generated data by default (a learnable toy task: the label is the image row band that is
brightest), or a real dataset laid out for ``torchvision.datasets.ImageFolder``::

    python examples/train.py                                  # tiny model, generated data
    python examples/train.py --model torchvision:resnet18 --data ~/data/imagenette/train \\
        --image-size 160 --epochs 10 --batch-size 64
    python examples/train.py --resume                         # continue from OUT/last.fxattn

Outputs under ``--out``: ``last.fxattn`` (weights + optimizer + schedule + RNG, loads with
``weights_only=True``), ``lean.fxattn`` (the stripped model) and ``model.onnx`` (verified
in onnxruntime).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxattn
from fxattn.capture.specs import build_model

console = Console(highlight=False)


class TinyResNet(nn.Module):
    """Three residual stages (16/32/64 channels): enough for DIA sites and SSIA taps, fast."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, channels = [], width
        for i in range(3):
            out = width * 2**i
            stages.append(BasicBlock(channels, out, stride=1 if i == 0 else 2))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def generated_dataset(size: int, image_size: int, num_classes: int, seed: int) -> TensorDataset:
    """A learnable toy task: label ``k`` brightens the ``k``-th horizontal band of the image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (size,), generator=g)
    images = 0.5 * torch.randn(size, 3, image_size, image_size, generator=g)
    band = max(1, image_size // num_classes)
    for i, label in enumerate(labels.tolist()):
        row = label * image_size // num_classes
        images[i, :, row : row + band, :] += 2.0
    return TensorDataset(images, labels)


def image_folder(root: str, image_size: int, train: bool) -> Dataset:
    from torchvision.transforms import v2

    normalize = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ops = ([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
           if train else [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    pipeline = v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), normalize])
    return torchvision.datasets.ImageFolder(root, transform=pipeline)


def make_model(spec: str, num_classes: int) -> nn.Module:
    if spec == "tiny":
        return TinyResNet(num_classes)
    return build_model(spec, {"num_classes": num_classes}).model


def batches(loader: DataLoader, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i, item in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield item


def evaluate(net: nn.Module, loader: DataLoader, device: torch.device, limit: int | None) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches(loader, limit):
            pred = net(x.to(device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    net.train()
    return correct / max(total, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny",
                   help="tiny, torchvision:NAME or timm:NAME (random weights)")
    p.add_argument("--data", help="ImageFolder root with one folder per class (default: "
                   "generated data); a sibling 'val' folder is used for evaluation if present")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, help="cap on batches per epoch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ssia-weight", type=float, default=1.0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.fxattn")
    p.add_argument("--stop-after", type=int, help="stop after this many epochs in this run "
                   "(simulates a pre-emption; continue with --resume)")
    p.add_argument("--no-export", action="store_true", help="skip the final ONNX export")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)

    if args.data:
        train_set = image_folder(args.data, args.image_size, train=True)
        val_root = Path(args.data).parent / "val"
        val_set = image_folder(str(val_root) if val_root.is_dir() else args.data,
                               args.image_size, train=False)
        num_classes = len(train_set.classes)  # type: ignore[attr-defined]
    else:
        num_classes = args.num_classes
        train_set = generated_dataset(2048, args.image_size, num_classes, args.seed)
        val_set = generated_dataset(256, args.image_size, num_classes, args.seed + 1)

    example = torch.randn(2, 3, args.image_size, args.image_size)
    model = make_model(args.model, num_classes)
    net = fxattn.transform(model, example, ssia=fxattn.SSIA(weight=args.ssia_weight)).to(device)
    console.print(f"{args.model}: {len(net.plan.sites)} DIA sites, {len(net.plan.taps)} SSIA "
                  f"taps, {sum(p.numel() for p in net.parameters()):,} parameters")

    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                                nesterov=True)
    steps = args.steps_per_epoch or math.ceil(len(train_set) / args.batch_size)  # type: ignore[arg-type]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr,
                                                    total_steps=max(args.epochs * steps, 1))
    checkpoint = args.out / "last.fxattn"
    start_epoch = 0
    if args.resume and checkpoint.exists():
        ckpt = fxattn.load_checkpoint(checkpoint, net, optimizer, scheduler)
        start_epoch = (ckpt.step or 0) + 1
        console.print(f"resuming at epoch {start_epoch + 1} from {checkpoint}")

    criterion = nn.CrossEntropyLoss()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp
                else contextlib.nullcontext())
    columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f} ssia {task.fields[ssia]:.4f}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.no_progress) as progress:
        last = args.epochs if args.stop_after is None else min(args.epochs,
                                                                start_epoch + args.stop_after)
        for epoch in range(start_epoch, last):
            # Shuffle order is a function of the epoch, so a resumed run sees the same batches.
            loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True,
                                num_workers=args.workers,
                                generator=torch.Generator().manual_seed(args.seed + epoch))
            task = progress.add_task("train", total=steps, epoch=epoch + 1, loss=0.0, ssia=0.0)
            net.train()
            total = 0.0
            count = 0
            for x, y in batches(loader, steps):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast:
                    logits = net(x)
                    task_loss = criterion(logits, y)
                ssia = fxattn.ssia_loss(net)  # computed in fp32 even under autocast
                loss = task_loss + ssia
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, count = total + loss.item(), count + 1
                progress.update(task, advance=1, loss=total / count, ssia=ssia.item())
            accuracy = evaluate(net, DataLoader(val_set, args.batch_size), device, steps)
            console.print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / max(count, 1):.4f}"
                          f", val accuracy {accuracy:.3f}")
            fxattn.save(net, checkpoint, example, optimizer=optimizer, scheduler=scheduler,
                        step=epoch, rng=True, extra={"val_accuracy": accuracy,
                                                     "model": args.model})

    if last < args.epochs:
        console.print(f"stopped after epoch {last}; continue with --resume")
        return
    lean = fxattn.strip_ssia(net).cpu()
    fxattn.save(lean, args.out / "lean.fxattn", example)
    console.print(f"stripped: {sum(p.numel() for p in lean.parameters()):,} parameters")
    if not args.no_export:
        report = fxattn.export_onnx(lean, args.out / "model.onnx", example)
        console.print(str(report))
        console.print(f"onnxruntime parity: max abs error {report.max_abs_error:.2e}")


if __name__ == "__main__":
    main()
