"""The compiler's DIA equals a hand-written DIA-ResNet (``tests/reference_dia.py``).

For basic and bottleneck blocks in the CIFAR (3 stages) and ImageNet (4 stages) layouts: the
*plain* ResNet goes through ``fxattn.transform(..., ssia=False)``, the reference's weights are
loaded through the key mapping (strictly: every key on both sides), and outputs, every
parameter gradient and the updated BN running statistics agree within 1e-5 in fp32, in train
and in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock as PlainBasicBlock
from torchvision.models.resnet import Bottleneck as PlainBottleneck
from torchvision.models.resnet import ResNet

import fxattn
from tests.reference_dia import (
    BasicBlock,
    Bottleneck,
    DIAResNet,
    LSTMCell,
    PlainCifarResNet,
    randomize,
    reference_to_fxattn_key,
    to_fxattn_state_dict,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}

# (id, reference block, plain block, blocks per stage, layout, input side)
CASES = [
    ("basic-imagenet", BasicBlock, PlainBasicBlock, [2, 2, 2, 2], "imagenet", 64),
    ("bottleneck-imagenet", Bottleneck, PlainBottleneck, [2, 2, 2, 2], "imagenet", 64),
    ("basic-cifar", BasicBlock, PlainBasicBlock, [3, 3, 3], "cifar", 16),
    ("bottleneck-cifar", Bottleneck, PlainBottleneck, [3, 3, 3], "cifar", 16),
]


def plain_model(plain_block: type[nn.Module], layers: list[int], layout: str) -> nn.Module:
    if layout == "imagenet":
        return ResNet(plain_block, layers, num_classes=10)  # type: ignore[arg-type]
    return PlainCifarResNet(plain_block, layers, num_classes=10)  # type: ignore[arg-type]


def build_pair(case: tuple) -> tuple[DIAResNet, fxattn.AttentionGraphModule, torch.Tensor]:
    _, block, plain_block, layers, layout, side = case
    torch.manual_seed(0)
    reference = DIAResNet(block, layers, layout=layout, num_classes=10)
    randomize(reference)
    x = torch.randn(4, 3, side, side)
    net = fxattn.transform(plain_model(plain_block, layers, layout), x, ssia=False)
    net.load_state_dict(to_fxattn_state_dict(reference), strict=True)
    return reference, net, x


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plan_matches_the_reference_structure(case: tuple) -> None:
    _, block, _, layers, layout, _ = case
    reference, net, _ = build_pair(case)
    plan = net.plan
    widths = [64, 128, 256, 512] if layout == "imagenet" else [16, 32, 64]
    channels = [w * block.expansion for w in widths]
    assert [len(g) for g in plan.groups] == layers
    assert [m.channels for m in plan.dia_modules] == channels
    assert [m.name for m in plan.dia_modules] == [f"g{k}" for k in range(len(layers))]
    # One shared cell per stage with exactly the reference's parameters.
    dia = sum(p.numel() for n, p in net.named_parameters() if n.startswith("fxattn_dia."))
    ref = sum(p.numel() for n, p in reference.named_parameters() if ".lstm." in n)
    assert dia == ref == plan.dia_parameters


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_match_the_reference(case: tuple, mode: str) -> None:
    reference, net, x = build_pair(case)
    reference.train(mode == "train")
    net.train(mode == "train")
    weight = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(1))

    out_ref = reference(x)
    out_net = net(x)
    torch.testing.assert_close(out_net, out_ref, **TOL)
    (out_ref * weight).sum().backward()
    (out_net * weight).sum().backward()

    net_params = dict(net.named_parameters())
    ref_params = dict(reference.named_parameters())
    assert {reference_to_fxattn_key(k) for k in ref_params} == set(net_params)
    for key, param in ref_params.items():
        assert param.grad is not None, key
        mapped = net_params[reference_to_fxattn_key(key)]
        torch.testing.assert_close(mapped.grad, param.grad, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    # Every shared cell receives gradient from each of its sites (its hidden path too,
    # which only the second and later blocks of a stage reach).
    for key, param in ref_params.items():
        if ".lstm.w_hh." in key and key.endswith("2.weight"):
            assert param.grad.abs().sum() > 0, key

    # Train-mode forwards update BN running statistics identically.
    net_buffers = dict(net.named_buffers())
    for key, buffer in reference.named_buffers():
        torch.testing.assert_close(net_buffers[reference_to_fxattn_key(key)], buffer, **TOL)


def test_the_reference_is_not_the_plain_network() -> None:
    """DIA changes the output: the comparison above is not between two plain ResNets."""
    reference, net, x = build_pair(CASES[0])
    reference.eval()
    plain = ResNet(PlainBasicBlock, [2, 2, 2, 2], num_classes=10).eval()
    plain.load_state_dict(
        {k: v for k, v in net.state_dict().items() if not k.startswith("fxattn_dia.")}
    )
    with torch.no_grad():
        assert (reference(x) - plain(x)).abs().max() > 1e-3


def test_strip_keeps_the_reference_numerics() -> None:
    """The lean (stripped, eval) graph still computes the reference DIA-ResNet."""
    reference, net, x = build_pair(CASES[1])
    lean = fxattn.strip_ssia(net)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), reference.eval()(x), **TOL)


def test_channels_last_cell_on_grids_and_tokens() -> None:
    """A channels-last group (Swin: attention added on (B, H, W, C), MLP on (B, H*W, C)) shares
    one cell with ``channel_dim=-1``: on both ranks it equals the reference cell applied to the
    mean over every non-channel axis, with the state carried from the grid to the tokens."""
    from fxattn.modules.dia import DIALSTMCell

    torch.manual_seed(0)
    reference = LSTMCell(32, 32)
    cell = DIALSTMCell(32, channel_dim=-1)
    cell.load_state_dict({
        reference_to_fxattn_key(f"layer1.lstm.{k}").removeprefix("fxattn_dia.g0."): v
        for k, v in reference.state_dict().items()
    })
    grid, tokens = torch.randn(2, 4, 4, 32), torch.randn(2, 16, 32)
    zeros = torch.zeros(2, 32)
    h1, c1 = reference(grid.mean((1, 2)), (zeros, zeros))
    h2, _ = reference(tokens.mean(1), (h1, c1))
    out1, h, c = cell(grid)
    out2, _, _ = cell(tokens, h, c)
    torch.testing.assert_close(out1, grid * h1[:, None, None, :], **TOL)
    torch.testing.assert_close(out2, tokens * h2[:, None, :], **TOL)
