"""DIA lands in the right places on every common backbone family (real zoo models, random
weights, small inputs).

For each model the plan is checked against what the architecture has, read from the model
itself (which blocks have a residual connection, their channel counts, the stage resolutions),
and the transformed graph is checked to apply DIA on the *branch*: the DIA call takes the
branch operand, its attended output feeds the add, and the add's other operand is still the
shortcut. One model per family also runs the whole pipeline: transform -> one training step
-> strip -> ONNX export -> onnxruntime parity (``tests/pipeline.py``; the families that
``test_zoo_subset.py`` runs, ConvNeXt among them, are not repeated here).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import cache
from itertools import groupby
from pathlib import Path

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from pipeline import whole_pipeline
from torch import nn
from torchvision.models import convnext as tv_convnext
from torchvision.models import efficientnet as tv_efficientnet
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import mobilenetv3 as tv_mobilenetv3
from torchvision.models import regnet as tv_regnet
from torchvision.models import resnet as tv_resnet
from torchvision.models import swin_transformer as tv_swin

import fxattn
from fxattn.names import DIA_ROOT


def tv(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def tm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    """A timm model. ResNet-like timm models zero the last norm of every residual branch
    (``zero_init_last``), which makes every branch, and so every DIA gradient, exactly zero
    before the first step; pretrained weights never look like that, so those switch it off."""
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def vgg11_gap() -> nn.Module:
    """torchvision's VGG-11 trunk with a global-average-pool head (as on CIFAR): the 102 M
    parameter fully connected head is irrelevant to where DIA goes and would make the ONNX
    file 500 MB."""
    model = torchvision.models.vgg11(weights=None)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, 10)
    return model


# name -> (factory, input side)
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "tv:resnet18": (tv("resnet18"), 64),
    "tv:resnet50": (tv("resnet50"), 64),
    "tv:resnext50_32x4d": (tv("resnext50_32x4d"), 64),
    "tv:wide_resnet50_2": (tv("wide_resnet50_2"), 64),
    "timm:resnetv2_18": (tm("resnetv2_18", zero_init_last=False), 64),
    "tv:regnet_y_400mf": (tv("regnet_y_400mf"), 64),
    "timm:regnetx_002": (tm("regnetx_002", zero_init_last=False), 64),
    "tv:mobilenet_v2": (tv("mobilenet_v2"), 64),
    "tv:mobilenet_v3_small": (tv("mobilenet_v3_small"), 64),
    "timm:mobilenetv3_small_100": (tm("mobilenetv3_small_100"), 64),
    "tv:efficientnet_b0": (tv("efficientnet_b0"), 64),
    "timm:efficientnet_b0": (tm("efficientnet_b0"), 64),
    "tv:convnext_tiny": (tv("convnext_tiny"), 32),
    "timm:convnext_atto": (tm("convnext_atto", drop_path_rate=0.1, ls_init_value=0.5), 32),
    "timm:vit_tiny_patch16_224": (tm("vit_tiny_patch16_224", img_size=64), 64),
    "timm:deit_tiny_patch16_224": (tm("deit_tiny_patch16_224", img_size=64), 64),
    "tv:swin_t": (tv("swin_t"), 64),
    "timm:swin_tiny_patch4_window7_224": (
        tm("swin_tiny_patch4_window7_224", img_size=64, window_size=4), 64),
    "tv:vgg11_gap": (vgg11_gap, 32),
    "tv:densenet121": (tv("densenet121"), 64),
}


@cache
def built(name: str) -> tuple[nn.Module, fxattn.AttentionGraphModule, torch.Tensor]:
    """The model, its transform (DIA + SSIA) and the example batch; built once per session."""
    factory, side = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, side, side)
    return model, fxattn.transform(model, x), x


def modules_of(model: nn.Module, cls: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def runs(values: list[int]) -> list[tuple[int, int]]:
    """Run-length encoding: consecutive equal channel counts are one group."""
    return [(value, len(list(items))) for value, items in groupby(values)]


def plan_groups(net: fxattn.AttentionGraphModule) -> list[tuple[int, int]]:
    return [(group[0].channels, len(group)) for group in net.plan.groups]


def tap_grids(net: fxattn.AttentionGraphModule) -> list[tuple[int, ...]]:
    return [tuple(s for d, s in enumerate(t.shape) if d not in (0, t.channel_dim))
            for t in net.plan.taps]


def dia_calls(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes
            if n.op == "call_module" and str(n.target).startswith(f"{DIA_ROOT}.")]


def attended_value(call: fx.Node) -> fx.Node:
    """The attention-weighted tensor a DIA call produces (element 0 of the LSTM cell's tuple)."""
    items = [u for u in call.users if u.target is operator.getitem and u.args[1] == 0]
    return items[0] if items else call


def assert_dia_on_branches(net: fxattn.AttentionGraphModule) -> None:
    """In both graphs, for every site in order: the DIA call takes the branch, its attended
    value feeds the add (and nothing else), the add's other operand is the shortcut, and the
    branch is used by nothing but DIA. Node names are checked in the training graph, whose
    plan ``net.plan`` is (drop path makes the evaluation graph's names differ)."""
    plan = net.plan
    for graph, named in ((net.train_graph, True), (net.eval_graph, False)):
        nodes = {n.name: n for n in graph.nodes}
        calls = dia_calls(graph)
        assert len(calls) == len(plan.sites)
        for site, call in zip(plan.sites, calls, strict=True):
            assert call.target == f"{DIA_ROOT}.{site.module}"
            branch, attended = call.args[0], attended_value(call)
            assert set(branch.users) == {call}, site
            if named:
                assert branch is nodes[site.branch], site
            if site.kind != "residual":
                continue
            (add,) = attended.users
            others = [a for a in add.args if isinstance(a, fx.Node) and a is not attended]
            assert len(others) == 1, site
            assert add.target in (operator.add, operator.iadd, torch.add) or add.target in (
                "add", "add_", "__add__", "__iadd__"), site
            if named:
                assert add is nodes[site.node] and others[0] is nodes[site.shortcut], site


def assert_state_threading(net: fxattn.AttentionGraphModule) -> None:
    """The LSTM state is reset at every group's first site and passed to its next sites."""
    calls = dia_calls(net.eval_graph)
    first = {g[0].index for g in net.plan.groups}
    for site, call in zip(net.plan.sites, calls, strict=True):
        assert len(call.args) == (1 if site.index in first else 3), site


# --------------------------------------------------------------------------- per family


def test_resnet_basic_and_bottleneck() -> None:
    for name, block, last in [("tv:resnet18", tv_resnet.BasicBlock, "bn2"),
                              ("tv:resnet50", tv_resnet.Bottleneck, "bn3"),
                              ("tv:resnext50_32x4d", tv_resnet.Bottleneck, "bn3"),
                              ("tv:wide_resnet50_2", tv_resnet.Bottleneck, "bn3")]:
        model, net, _ = built(name)
        blocks = modules_of(model, block)
        plan = net.plan
        assert [s.module_path for s in plan.sites] == [n for n, _ in blocks], name
        assert all(s.layout == "NCHW" and s.kind == "residual" for s in plan.sites)
        # the branch ends in the block's last BN; the shortcut is the projection or the input
        for site, (path, module) in zip(plan.sites, blocks, strict=True):
            assert site.branch == f"{path}.{last}".replace(".", "_"), site
            if module.downsample is not None:
                assert site.shortcut == f"{path}.downsample.1".replace(".", "_"), site
        out = [getattr(m, last).num_features for _, m in blocks]
        assert plan_groups(net) == runs(out)
        assert len(plan_groups(net)) == 4
        # stem (after the stride-2 conv) + 4 stages at 64x64 input
        assert tap_grids(net) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
        assert_dia_on_branches(net)
        assert_state_threading(net)


def test_preactivation_resnet() -> None:
    """timm ResNet-V2 (pre-activation): the add has no activation after it, the branch ends in
    a conv (through drop path); the next block's pre-norm is where each stage's output is
    normalised, so it is that stage's last feature map."""
    model, net, _ = built("timm:resnetv2_18")
    blocks = modules_of(model, timm.models.resnetv2.PreActBasic)
    plan = net.plan
    assert [s.module_path for s in plan.sites] == [n for n, _ in blocks]
    assert plan_groups(net) == [(64, 2), (128, 2), (256, 2), (512, 2)]
    assert tap_grids(net) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert_dia_on_branches(net)
    assert_state_threading(net)


def test_regnet_torchvision_and_timm() -> None:
    model, net, _ = built("tv:regnet_y_400mf")
    blocks = modules_of(model, tv_regnet.ResBottleneckBlock)
    assert [s.module_path for s in net.plan.sites] == [n for n, _ in blocks]
    assert plan_groups(net) == runs([m.f.c.out_channels for _, m in blocks])
    assert plan_groups(net) == [(48, 1), (104, 3), (208, 6), (440, 6)]
    assert_dia_on_branches(net)

    model, net, _ = built("timm:regnetx_002")
    blocks = modules_of(model, timm.models.regnet.Bottleneck)
    assert [s.module_path for s in net.plan.sites] == [n for n, _ in blocks]
    assert plan_groups(net) == [(24, 1), (56, 1), (152, 4), (368, 7)]
    assert tap_grids(net) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert_dia_on_branches(net)
    assert_state_threading(net)


def residual_inverted_blocks(model: nn.Module) -> list[tuple[str, int]]:
    """(path, output channels) of the inverted-residual blocks that have a skip connection."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (tv_mobilenetv2.InvertedResidual, tv_mobilenetv3.InvertedResidual,
                               tv_efficientnet.MBConv)) and module.use_res_connect:
            found.append((name, module.out_channels))
        elif isinstance(module, (timm.models._efficientnet_blocks.InvertedResidual,
                                 timm.models._efficientnet_blocks.DepthwiseSeparableConv)) \
                and module.has_skip:
            output_norm = module.bn3 if hasattr(module, "bn3") else module.bn2
            found.append((name, output_norm.num_features))
    return found


@pytest.mark.parametrize("name", ["tv:mobilenet_v2", "tv:mobilenet_v3_small",
                                  "timm:mobilenetv3_small_100", "tv:efficientnet_b0",
                                  "timm:efficientnet_b0"])
def test_inverted_residuals(name: str) -> None:
    """Only the blocks with a skip connection are sites; groups follow the channel counts."""
    model, net, _ = built(name)
    expected = residual_inverted_blocks(model)
    blocks_with_skip = {path for path, _ in expected}
    all_blocks = [n for n, m in model.named_modules()
                  if type(m).__name__ in {"InvertedResidual", "MBConv", "DepthwiseSeparableConv"}]
    assert len(blocks_with_skip) < len(all_blocks)  # some blocks have no residual
    assert [s.module_path for s in net.plan.sites] == [p for p, _ in expected]
    assert plan_groups(net) == runs([c for _, c in expected])
    assert all(s.layout == "NCHW" for s in net.plan.sites)
    assert tap_grids(net) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert_dia_on_branches(net)
    assert_state_threading(net)


@pytest.mark.parametrize(("name", "block"), [("tv:convnext_tiny", tv_convnext.CNBlock),
                                             ("timm:convnext_atto",
                                              timm.models.convnext.ConvNeXtBlock)])
def test_convnext(name: str, block: type[nn.Module]) -> None:
    """The block runs channels-last inside (permute -> LayerNorm -> MLP -> permute back) with a
    layer scale and drop path on the branch; the add itself is on NCHW: the channel axis is
    tracked back through both permutes (torchvision's are modules, timm's are methods)."""
    model, net, _ = built(name)
    blocks = modules_of(model, block)
    plan = net.plan
    assert [s.module_path for s in plan.sites] == [n for n, _ in blocks]
    assert all(s.layout == "NCHW" and s.channel_dim == 1 for s in plan.sites)
    widths = [96, 192, 384, 768] if name.startswith("tv") else [40, 80, 160, 320]
    depths = [3, 3, 9, 3] if name.startswith("tv") else [2, 2, 6, 2]
    assert plan_groups(net) == list(zip(widths, depths, strict=True))
    # 32x32 input: stages at 8, 4, 2 and 1 pixels; a 1x1 map is no attention map
    assert [t.shape[1] for t in plan.taps] == widths[:3]
    assert tap_grids(net) == [(8, 8), (4, 4), (2, 2)]
    assert_dia_on_branches(net)
    assert_state_threading(net)


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224"])
def test_vit_and_deit_tokens(name: str) -> None:
    """Attention and MLP sub-layers are both sites, on (B, N, C) tokens, in one group."""
    model, net, _ = built(name)
    blocks = modules_of(model, timm.models.vision_transformer.Block)
    plan = net.plan
    assert len(plan.sites) == 2 * len(blocks) == 24
    assert [s.module_path for s in plan.sites] == [n for n, _ in blocks for _ in range(2)]
    assert all(s.layout == "NLC" and s.channel_dim == 2 for s in plan.sites)
    assert plan_groups(net) == [(192, 24)]
    # attention sub-layer first, MLP second, in every block
    assert [s.branch.rsplit("_", 1)[-1] for s in plan.sites] == ["path1", "path2"] * 12
    # constant resolution: 4 evenly spaced taps on 4x4 patches plus the class token
    assert len(plan.taps) == 4 and all(t.grid == (4, 4) and t.skip_tokens == 1
                                       for t in plan.taps)
    # taps fall on block outputs (the MLP add), never between the two sub-layers
    assert [t.module_path for t in plan.taps] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert [t.node for t in plan.taps] == [plan.sites[i].node for i in (5, 11, 17, 23)]
    x = built(name)[2]
    six = fxattn.inspect(model, x, dia=False, ssia=fxattn.SSIA(token_taps=6))
    assert [t.module_path for t in six.taps] == [f"blocks.{i}" for i in (1, 3, 5, 7, 9, 11)]
    assert_dia_on_branches(net)
    assert_state_threading(net)


@pytest.mark.parametrize(("name", "block"), [
    ("tv:swin_t", tv_swin.SwinTransformerBlock),
    ("timm:swin_tiny_patch4_window7_224", timm.models.swin_transformer.SwinTransformerBlock),
])
def test_swin_channels_last_grids(name: str, block: type[nn.Module]) -> None:
    """Swin adds on (B, H, W, C) grids (timm's MLP add on (B, H*W, C) tokens): channels last,
    two sites per block, one group per stage."""
    model, net, _ = built(name)
    blocks = modules_of(model, block)
    plan = net.plan
    assert len(plan.sites) == 2 * len(blocks) == 24
    assert [s.module_path for s in plan.sites] == [n for n, _ in blocks for _ in range(2)]
    assert all(s.channel_dim == s.ndim - 1 for s in plan.sites)
    assert plan.sites[0].layout == "NHWC"
    assert plan_groups(net) == [(96, 4), (192, 4), (384, 12), (768, 4)]
    assert all(m.channel_dim == -1 for m in plan.dia_modules)
    assert tap_grids(net) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert_dia_on_branches(net)
    assert_state_threading(net)


def test_vgg_stage_outputs() -> None:
    """No residual add: DIA multiplies each stage's last feature map (before its max pool)."""
    model, net, _ = built("tv:vgg11_gap")
    plan = net.plan
    pools = [int(n) for n, _ in modules_of(model.features, nn.MaxPool2d)]
    # the ReLU just before each of the 5 max pools (32x32 input: stages at 32, 16, 8, 4, 2)
    assert [s.node for s in plan.sites] == [f"features_{p - 1}" for p in pools]
    assert tap_grids(net) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(s.kind == "stage_output" and s.shortcut is None for s in plan.sites)
    assert plan_groups(net) == [(64, 1), (128, 1), (256, 1), (512, 2)]
    assert any("no residual additions" in note for note in plan.notes)
    assert_dia_on_branches(net)


def test_densenet_stage_outputs() -> None:
    """DenseNet concatenates instead of adding: DIA on the stem output, on each transition's
    conv (the last map before its pool) and on the final ReLU (``F.relu`` in ``forward``)."""
    model, net, _ = built("tv:densenet121")
    plan = net.plan
    assert [s.module_path for s in plan.sites] == [
        "features.relu0", "features.transition1.conv", "features.transition2.conv",
        "features.transition3.conv", ""]
    assert plan.sites[-1].node == "relu"
    assert all(s.kind == "stage_output" for s in plan.sites)
    assert plan_groups(net) == [(64, 1), (128, 1), (256, 1), (512, 1), (1024, 1)]
    assert tap_grids(net) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert_dia_on_branches(net)


def test_explicit_site_selection() -> None:
    """include / exclude regexes on module paths select among residual sites and, without
    residual adds, among the stage outputs."""
    model, _, x = built("tv:resnet18")
    plan = fxattn.inspect(model, x, dia=fxattn.DIA(include=[r"^layer[34]\."],
                                                   exclude=[r"layer4\.1"]), ssia=False)
    assert [s.module_path for s in plan.sites] == ["layer3.0", "layer3.1", "layer4.0"]
    assert [(m.channels, len(m.sites)) for m in plan.dia_modules] == [(256, 2), (512, 1)]

    model, _, x = built("tv:vgg11_gap")
    net = fxattn.transform(model, x, dia=fxattn.DIA(include=[r"^features\.(9|14)$"]),
                           ssia=False)
    assert [s.module_path for s in net.plan.sites] == ["features.9", "features.14"]
    assert_dia_on_branches(net)


# --------------------------------------------------------------------------- the pipeline

# The whole pipeline on the families tests/test_zoo_subset.py does not run (there: ResNet-18,
# SE-ResNet-50, MobileNetV3, GoogLeNet, ConvNeXt-atto, ViT): name -> input side.
PIPELINE = {
    "timm:resnetv2_18": 32,
    "timm:regnetx_002": 64,
    "timm:efficientnet_b0": 64,
    "tv:swin_t": 32,
    "tv:vgg11_gap": 32,
    "tv:densenet121": 64,
}


@pytest.mark.parametrize("name", PIPELINE)
def test_pipeline(name: str, tmp_path: Path) -> None:
    """transform -> one SGD step (DIA learns) -> strip -> ONNX export -> onnxruntime parity."""
    factory, _ = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, PIPELINE[name], PIPELINE[name])
    y = torch.randint(0, 10, (2,))
    whole_pipeline(factory(), x, tmp_path,
                   task_loss=lambda out: nn.functional.cross_entropy(out, y))
