"""Train a torchvision detector with DIA + SSIA on generated images with boxes, then export it.

fxattn cannot capture a detector as one graph (it loops over images in Python and
post-processes with data-dependent shapes), so ``fxattn.transform`` transforms the parts that
hold the residual sites - the backbone + FPN - in a copy of the detector, and says so. The
training loop is the detector's own: its loss dict, plus ``fxattn.ssia_loss(net)``::

    net = fxattn.transform(detector, (images, targets))
    loss = sum(net(images, targets).values()) + fxattn.ssia_loss(net)

After training, ``fxattn.strip_ssia`` returns the lean detector (the same class, its backbone
a lean ``torch.fx.GraphModule``) and ``fxattn.export_onnx`` writes the *whole* detector -
resizing, backbone, RPN, RoI heads, NMS - as ONNX, verified in onnxruntime by matching the
detections on images of two sizes.

    python examples/train_detector.py                       # ~1 min on a CPU
    python examples/train_detector.py --steps 200 --model fasterrcnn_resnet50_fpn

Outputs under ``--out``: ``lean.fxattn`` (the stripped detector, loads with ``fxattn.load``)
and ``detector.onnx``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torchvision

import fxattn
from fxattn.export.detection import detection_targets_for, random_detection_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn",
                        help="a torchvision.models.detection model name")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("runs/detector"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=UserWarning)  # torchvision's tracer warnings

    # random weights, 4 classes (background + 3), small images: a CPU-sized run
    detector = torchvision.models.get_model(args.model, weights=None, weights_backbone=None,
                                            num_classes=4)
    extra = detection_targets_for(detector)  # masks / keypoints for Mask / Keypoint R-CNN
    sizes = ((128, 112), (112, 128))
    generator = torch.Generator().manual_seed(0)
    example = random_detection_batch(args.batch_size, sizes, 4, generator=generator, **extra)

    start = time.perf_counter()
    net = fxattn.transform(detector, example)
    print(str(net.fxattn_scope.plan).split("\n\n")[0])  # which parts, and why
    print(f"transform: {time.perf_counter() - start:.1f} s")

    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    net.train()
    for step in range(args.steps):
        images, targets = random_detection_batch(args.batch_size, sizes, 4, generator=generator,
                                                 **extra)
        losses = net(images, targets)  # the detector's own loss dict
        ssia = fxattn.ssia_loss(net)
        loss = sum(losses.values()) + ssia
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        optimizer.step()
        parts = ", ".join(f"{k} {float(v):.3f}" for k, v in losses.items())
        print(f"step {step + 1}/{args.steps}: loss {float(loss):.3f} ({parts}, "
              f"ssia {float(ssia):.3f})")

    lean = fxattn.strip_ssia(net)  # the detector's class; its backbone a lean GraphModule
    args.out.mkdir(parents=True, exist_ok=True)
    fxattn.save(lean, args.out / "lean.fxattn", example)
    images, _ = random_detection_batch(2, sizes, 4, generator=generator)
    with torch.no_grad():
        detections = lean(images)
    print(f"lean detector: {[len(d['boxes']) for d in detections]} detections per image")
    report = fxattn.export_onnx(lean, args.out / "detector.onnx", (images,))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
