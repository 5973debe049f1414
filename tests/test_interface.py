"""The transformed module keeps the original model's interface, deep-copies and pickles.

Frameworks call a model's own methods and attributes (ultralytics: ``loss``, ``stride``,
``set_head_attr``, ``fuse``; Hugging Face: ``config``, ``save_pretrained``), hand it a batch
dict, deep-copy it for EMA and pickle it into checkpoints.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from models import CifarResNet
from torch import nn
from training_helpers import batch, example

import fxattn


class Detector(CifarResNet):
    """A CIFAR ResNet with the habits of an ultralytics model."""

    kind = "detector"  # a class attribute

    def __init__(self) -> None:
        super().__init__(depth=11, num_classes=10)
        self.stride = torch.tensor([8.0, 16.0])  # a plain instance attribute
        self.fused = False

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, dict):  # the trainer's call: net(batch)
            return self.loss(x)
        return self.predict(x, *args, **kwargs)

    def predict(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        return super().forward(x)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(self.forward(batch["img"]), batch["cls"])

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) * 2

    def fuse(self) -> Detector:
        self.fused = True
        return self


def _net(**options: Any) -> fxattn.AttentionGraphModule:
    torch.manual_seed(0)
    model = Detector()
    torch.manual_seed(0)
    return fxattn.transform(model, example(), **options)


def test_methods_and_attributes_resolve_as_on_the_original() -> None:
    net = _net()
    x, y = batch(0)
    assert isinstance(net, Detector) and type(net).__name__ == "FxAttnDetector"
    assert net.kind == "detector" and torch.equal(net.stride, torch.tensor([8.0, 16.0]))
    out = net(x)
    torch.testing.assert_close(net.scaled(x), out * 2, rtol=0, atol=0)  # self(x): our graph
    dia_free = Detector()
    dia_free.load_state_dict(net.state_dict(), strict=False)
    assert not torch.allclose(dia_free(x), out)  # so the method did not run the original
    net.names = {0: "a"}  # frameworks set attributes; they stay on the module
    assert copy.deepcopy(net).names == {0: "a"}


def test_container_input_runs_the_original_dispatch() -> None:
    net = _net(ssia=fxattn.SSIA(attach=True))
    x, y = batch(0)
    loss = net({"img": x, "cls": y})  # forward(dict) -> self.loss -> self.forward(tensor)
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(loss, nn.functional.cross_entropy(net(x), y))
    assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith("fxattn_"))
    net.eval()
    with torch.no_grad():
        # augment=False only reaches predict through **kwargs: the traced default, dropped
        torch.testing.assert_close(net(x, augment=False), net(x), rtol=0, atol=0)


def test_fuse_leaves_the_graph_modules_alone() -> None:
    net = _net()
    assert net.fuse() is net and not net.fused
    assert net(batch(0)[0]).shape == (8, 10)


def _outputs(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    net.train()
    train = net(x)
    ssia = fxattn.ssia_loss(net)
    net.eval()
    with torch.no_grad():
        return torch.stack([train.detach().sum(), ssia.detach()]), net(x)


def test_deepcopy_and_pickle_round_trip() -> None:
    net = _net(ssia=fxattn.SSIA(attach=True))
    net.names = {0: "a"}
    x, _ = batch(1)
    buffer = io.BytesIO()
    torch.save(net, buffer)  # what a trainer checkpoint does
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(net)
    want = _outputs(net, x)
    for other in (loaded, copied):
        assert type(other).__name__ == "FxAttnDetector" and other.names == {0: "a"}
        assert list(other.state_dict()) == list(net.state_dict())
        for got, ref in zip(_outputs(other, x), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        lean = fxattn.strip_ssia(other)  # graphs re-traced from their code, as fx unpickles
        with torch.no_grad():
            torch.testing.assert_close(lean(x), fxattn.strip_ssia(net)(x), rtol=0, atol=0)
        assert lean.meta["fxattn_strip"].dia_nodes == fxattn.strip_ssia(net).meta[
            "fxattn_strip"].dia_nodes


class Loops(CifarResNet):
    def forward(self, x: Any) -> Any:
        if isinstance(x, dict):
            return self(x)  # never reaches the traced structure
        return super().forward(x)


def test_original_dispatch_that_never_reaches_the_graph_is_refused() -> None:
    torch.manual_seed(0)
    net = fxattn.transform(Loops(depth=11, num_classes=10), example())
    with pytest.raises(fxattn.InputError, match="traced with"):
        net({"img": batch(0)[0]})
    assert net(batch(0)[0]).shape == (8, 10)  # the guard was reset
