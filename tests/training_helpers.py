"""Shared pieces of the training-integration tests: a tiny model, seeded batches, a loop.

Batches are a pure function of the step number, so an interrupted run and an uninterrupted one
see the same data; the loop adds noise from the *global* RNG so that a resume is identical only
if the RNG state travels with the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from models import CifarResNet
from torch import nn

import fxattn

NUM_CLASSES = 10
SIZE = 16


def tiny_model(seed: int = 0) -> CifarResNet:
    """CIFAR ResNet-11: one bottleneck per stage, three SSIA taps (32, 16, 8 positions)."""
    torch.manual_seed(seed)
    return CifarResNet(depth=11, num_classes=NUM_CLASSES)


def example(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123))


def batch(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable batch: the label is the brightest of ``NUM_CLASSES`` image regions."""
    g = torch.Generator().manual_seed(1000 + step)
    y = torch.randint(0, NUM_CLASSES, (size,), generator=g)
    x = 0.5 * torch.randn(size, 3, SIZE, SIZE, generator=g)
    rows = (y * SIZE) // NUM_CLASSES
    for i, row in enumerate(rows.tolist()):
        x[i, :, row : row + 2, :] += 2.0
    return x, y


def transformed(seed: int = 0, **options: Any) -> fxattn.AttentionGraphModule:
    model = tiny_model(seed)
    torch.manual_seed(seed)  # DIA modules draw their initial weights from the global RNG
    return fxattn.transform(model, example(), **options)


def train_steps(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    scheduler: Any = None,
    noise: float = 0.0,
) -> list[float]:
    """The documented loop: task loss + ``fxattn.ssia_loss(net)``; returns each step's loss."""
    criterion = nn.CrossEntropyLoss()
    losses = []
    net.train()
    for step in steps:
        x, y = batch(step)
        if noise:
            x = x + noise * torch.randn_like(x)  # global RNG: must be restored on resume
        loss = criterion(net(x), y) + fxattn.ssia_loss(net)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses
