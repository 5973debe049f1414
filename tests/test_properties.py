"""Property-based tests: random small residual networks x random configs.

A hypothesis strategy draws the *architecture* of a small residual network (CNN or token
model: stages, widths, blocks per stage, block kind, downsampling or not, an activation after
the residual add or not) together with DIA / SSIA options. Because the generator knows where
its residual additions are and how wide they are, the expected DIA sites, groups and parameter
count are computed here from the architecture alone (SPEC section 4), independently of
fxattn's analysis, and compared with what fxattn built.

Invariants checked on every generated case:

* the input model is unchanged (parameters, buffers, modules, training flags);
* ``dia=False``: the stripped module *is* the original eval graph (node for node against
  ``trace_dual(copy, inputs).eval.graph``) and its outputs are bitwise equal;
* the DIA parameter count matches the SPEC formula, per sharing mode;
* eval mode runs no SSIA node;
* (separate, fewer examples: ONNX export is ~1-2 s) onnxruntime agrees with PyTorch.

Size budget: ~200 transform cases plus a dozen ONNX exports, about a minute on 2 cores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_state_equal, state_snapshot
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import fxattn
from fxattn.capture import ExampleInputs, trace_dual
from fxattn.export import export_onnx
from fxattn.names import DIA_ROOT, SSIA_ROOT

# --------------------------------------------------------------------------- architectures

CNN_KINDS = ("basic", "bottleneck", "single")
TOKEN_KINDS = ("mlp", "linear", "nonorm")


@dataclass(frozen=True)
class Stage:
    width: int
    blocks: int
    downsample: bool  # halve the resolution (CNN: stride 2; tokens: merge token pairs)


@dataclass(frozen=True)
class Arch:
    """A small residual network, fully described (so expectations can be derived from it)."""

    family: str  # "cnn" | "tokens"
    kind: str  # block kind, see CNN_KINDS / TOKEN_KINDS
    stages: tuple[Stage, ...]
    act_after_add: bool
    seed: int

    @property
    def site_widths(self) -> list[int]:
        """Channel count of every residual addition, in forward order."""
        return [stage.width for stage in self.stages for _ in range(stage.blocks)]

    def example(self, batch: int = 2) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (batch, 3, 16, 16) if self.family == "cnn" else (batch, 16, 6)
        return torch.randn(shape, generator=generator)


class ConvBlock(nn.Module):
    """``act(shortcut(x) + branch(x))``; the projection shortcut is one 1x1 conv (fewer
    parametrised modules than any branch, so the branch operand is unambiguous)."""

    def __init__(self, cin: int, cout: int, stride: int, kind: str, act: bool) -> None:
        super().__init__()
        if kind == "basic":
            self.branch = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout))
        elif kind == "bottleneck":
            mid = max(cout // 2, 1)
            self.branch = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.branch = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout))
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act(shortcut + self.branch(x))


class TokenBlock(nn.Module):
    """Pre-norm residual MLP on tokens ``(B, N, C)``: ``act(x + mlp(norm(x)))``."""

    def __init__(self, width: int, kind: str, act: bool) -> None:
        super().__init__()
        if kind == "mlp":
            self.branch = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width),
                                        nn.GELU(), nn.Linear(2 * width, width))
        elif kind == "linear":
            self.branch = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
        else:
            self.branch = nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                        nn.Linear(width, width))
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.branch(x))


class MergeTokens(nn.Module):
    """Swin-style patch merging: pairs of neighbouring tokens -> one token of another width."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return self.proj(x.reshape(b, n // 2, 2 * c))


def build(arch: Arch) -> nn.Module:
    torch.manual_seed(arch.seed)
    layers: list[nn.Module] = []
    if arch.family == "cnn":
        width = arch.stages[0].width
        layers += [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU()]
        for stage in arch.stages:
            for b in range(stage.blocks):
                stride = 2 if stage.downsample and b == 0 else 1
                layers.append(ConvBlock(width, stage.width, stride, arch.kind,
                                        arch.act_after_add))
                width = stage.width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5)]
        return nn.Sequential(*layers)
    width = arch.stages[0].width
    layers.append(nn.Linear(6, width))
    for stage in arch.stages:
        if stage.downsample:
            layers.append(MergeTokens(width, stage.width))
        elif stage.width != width:
            layers.append(nn.Linear(width, stage.width))
        width = stage.width
        layers += [TokenBlock(width, arch.kind, arch.act_after_add) for _ in range(stage.blocks)]
    return TokenNet(nn.Sequential(*layers), nn.Linear(width, 5))


class TokenNet(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(1))


@st.composite
def architectures(draw: st.DrawFn) -> Arch:
    family = draw(st.sampled_from(("cnn", "tokens")))
    kinds = CNN_KINDS if family == "cnn" else TOKEN_KINDS
    n_stages = draw(st.integers(1, 3))
    stages = []
    for i in range(n_stages):
        stages.append(Stage(
            width=draw(st.sampled_from((4, 6, 8, 12))),
            blocks=draw(st.integers(1, 3)),
            downsample=i > 0 and draw(st.booleans()),
        ))
    return Arch(family, draw(st.sampled_from(kinds)), tuple(stages), draw(st.booleans()),
                draw(st.integers(0, 2**16)))


@st.composite
def dia_configs(draw: st.DrawFn, widths: list[int]) -> fxattn.DIA:
    return fxattn.DIA(
        module=draw(st.sampled_from(("lstm", "se"))),
        reduction=draw(st.integers(1, min(widths))),
        share=draw(st.sampled_from(("stage", "channels", "none"))),
    )


def ssia_configs() -> st.SearchStrategy[fxattn.SSIA]:
    return st.builds(
        fxattn.SSIA,
        weight=st.floats(0.0, 10.0, allow_nan=False),
        p=st.sampled_from((1.0, 2.0, 3.0)),
        map=st.sampled_from(("spatial", "channel")),
        pairs=st.sampled_from(("next", "deepest")),
    )


# --------------------------------------------------------------------------- expectations


def dia_formula(kind: str, channels: int, reduction: int) -> int:
    """SPEC section 4, written out again here (not imported from fxattn)."""
    hidden = channels // reduction
    if kind == "lstm":
        return 2 * (channels * hidden + hidden + hidden * 4 * channels + 4 * channels)
    return channels * hidden + hidden + hidden * channels + channels


def expected_dia_parameters(widths: list[int], dia: fxattn.DIA) -> int:
    """Modules per sharing mode: runs of equal width ("stage"), distinct widths, or sites."""
    if dia.share == "none":
        modules = widths
    elif dia.share == "channels":
        modules = sorted(set(widths))
    else:
        modules = [w for i, w in enumerate(widths) if i == 0 or widths[i - 1] != w]
    return sum(dia_formula(dia.module, w, dia.reduction) for w in modules)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_fingerprint(model: nn.Module) -> tuple[object, ...]:
    """Everything about the input model fxattn promises not to touch, besides its state."""
    return (
        [(name, type(m), m.training) for name, m in model.named_modules()],
        [(name, p.requires_grad, p.grad is None) for name, p in model.named_parameters()],
    )


def transform_or_analysis_error(
    call: Callable[[], fxattn.AttentionGraphModule],
) -> fxattn.AttentionGraphModule | None:
    """The transform, or ``None`` when fxattn refused with an AnalysisError (a documented
    result: e.g. SSIA on a network with a single stage has no pair of taps)."""
    try:
        return call()
    except fxattn.AnalysisError:
        return None


# Shrinking a failure of a model-building test can take minutes: keep the report of the
# first failing example (hypothesis still prints it in full) and stop there.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
# 40 examples per property keep each near 20 s in CI; raise max_examples here for a deeper
# local search.
PROPERTY = settings(max_examples=40, deadline=None, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- properties


@PROPERTY
@given(data=st.data(), arch=architectures())
def test_dia_plan_parameters_and_input_model(data: st.DataObject, arch: Arch) -> None:
    """DIA + SSIA: sites and parameters as derived from the architecture; model untouched;
    training graph runs SSIA, eval graph never does; the lean module drops every SSIA part."""
    model = build(arch)
    model.train(data.draw(st.booleans(), label="train mode"))
    snapshot, fingerprint = state_snapshot(model), model_fingerprint(model)
    widths = arch.site_widths
    dia = data.draw(dia_configs(widths), label="dia")
    ssia = data.draw(st.one_of(st.just(False), ssia_configs()), label="ssia")
    x = arch.example()

    net = transform_or_analysis_error(lambda: fxattn.transform(model, x, dia=dia, ssia=ssia))
    assert_state_equal(model, snapshot)
    assert model_fingerprint(model) == fingerprint
    if net is None:  # only SSIA may be refused: the DIA sites always exist here
        assert ssia is not False
        # a CNN that downsamples has two resolutions, hence two stage outputs to pair
        assert not (arch.family == "cnn" and any(s.downsample for s in arch.stages))
        net = fxattn.transform(model, x, dia=dia, ssia=False)
        ssia = False
    plan = net.plan

    assert [site.channels for site in plan.sites] == widths
    assert plan.dia_parameters == expected_dia_parameters(widths, dia)
    extra = parameter_count(net) - parameter_count(model)
    assert extra == plan.dia_parameters + plan.ssia_parameters
    assert net.training == model.training

    lean = fxattn.strip_ssia(net)
    assert parameter_count(lean) == parameter_count(model) + plan.dia_parameters
    assert not any(key.startswith(SSIA_ROOT) for key in lean.state_dict())
    dia_calls = [n for n in lean.graph.nodes if str(n.target).startswith(DIA_ROOT)]
    assert len(dia_calls) == len(widths)

    if ssia is not False:
        calls: list[int] = []
        getattr(net, SSIA_ROOT).register_forward_hook(lambda *_: calls.append(1))
        net.train()
        out = net(x)
        assert calls == [1]
        loss = fxattn.ssia_loss(net)
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() >= 0
        net.eval()
        with torch.no_grad():  # the training step moved batch-norm statistics: strip again
            assert torch.equal(net(x), fxattn.strip_ssia(net)(x))
        assert calls == [1]
        assert out.shape == lean(x).shape
        with pytest.raises(fxattn.SSIALossUnavailableError):
            fxattn.ssia_loss(net)
    assert not any(SSIA_ROOT in str(n.target) for n in net.eval_graph.nodes)
    assert_state_equal(model, snapshot)
    assert model_fingerprint(model) == fingerprint


@PROPERTY
@given(data=st.data(), arch=architectures())
def test_without_dia_strip_is_the_original_eval_graph(data: st.DataObject, arch: Arch) -> None:
    """``dia=False``: whatever SSIA did to the training graph, the lean module is the original
    eval graph, node for node, with bitwise-equal outputs; the model is untouched."""
    model = build(arch)
    snapshot, fingerprint = state_snapshot(model), model_fingerprint(model)
    ssia = data.draw(st.one_of(st.just(False), ssia_configs()), label="ssia")
    x = arch.example()

    net = transform_or_analysis_error(lambda: fxattn.transform(model, x, dia=False, ssia=ssia))
    if net is None:
        net = fxattn.transform(model, x, dia=False, ssia=False)
    lean = fxattn.strip_ssia(net)
    assert_state_equal(model, snapshot)
    assert model_fingerprint(model) == fingerprint

    reference = trace_dual(copy.deepcopy(model), ExampleInputs.from_user(x)).eval.graph
    signature = [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs))
                 for n in reference.nodes]
    assert [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs))
            for n in lean.graph.nodes] == signature
    expected = copy.deepcopy(model).eval()
    batch = arch.example(batch=3)
    with torch.no_grad():
        assert torch.equal(lean(batch), expected(batch))
    assert parameter_count(lean) == parameter_count(model)


@settings(max_examples=8, deadline=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), arch=architectures())
def test_onnxruntime_parity(
    data: st.DataObject, arch: Arch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The lean module of a random network exports with either exporter (and the exact DIA
    rewrites) and matches onnxruntime at batch 2 and 3."""
    model = build(arch).eval()
    dia = data.draw(dia_configs(arch.site_widths), label="dia")
    exporter = data.draw(st.sampled_from(["dynamo", "torchscript"]), label="exporter")
    x = arch.example()
    lean = fxattn.strip_ssia(fxattn.transform(model, x, dia=dia, ssia=False))
    path: Path = tmp_path_factory.mktemp("onnx") / "lean.onnx"
    report = export_onnx(lean, path, x, batch_sizes=(2, 3), atol=1e-4, exporter=exporter)
    assert report.verified and report.max_abs_error <= 1e-4
    assert report.parameters == parameter_count(model) + expected_dia_parameters(
        arch.site_widths, dia)
