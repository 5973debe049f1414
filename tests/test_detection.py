"""A torchvision detector through its own training signature: scope, training, strip, export.

One small detector (Faster R-CNN, MobileNetV3-320 FPN, random weights, 3 classes) serves every
test: fxattn cannot capture it whole (Python loops over images and targets, data-dependent
post-processing), so it transforms the backbone + FPN in a copy and leaves the rest as is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import torchvision
from conftest import assert_state_equal, state_snapshot
from torch import nn
from torch.utils._pytree import tree_leaves

import fxattn
from fxattn.export.detection import MatchRule, match_detections, random_detection_batch
from fxattn.export.lowp import LOWP_ATOL
from fxattn.export.optimize import in_dia
from fxattn.scope import ScopePlan

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"


def detector() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(NAME, weights=None, weights_backbone=None, num_classes=3)


@pytest.fixture(scope="module")
def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    return random_detection_batch(2, sizes=((96, 80), (80, 96)), num_classes=3)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return detector()


@pytest.fixture(scope="module")
def net(model: nn.Module, batch: tuple) -> nn.Module:
    snapshot = state_snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxattn.transform(model, batch)
    assert_state_equal(model, snapshot)  # the user's detector is never modified
    assert all(not isinstance(m, fxattn.AttentionGraphModule) for m in model.modules())
    return result


def test_automatic_scope_transforms_the_backbone_in_a_copy(model: nn.Module, net: nn.Module
                                                          ) -> None:
    assert type(net) is type(model) and net is not model
    assert isinstance(net.backbone, fxattn.AttentionGraphModule)
    plan = net.fxattn_scope.plan
    assert plan.paths == ["backbone"] and not plan.explicit
    assert "Proxy object cannot be iterated" in plan.whole_model
    skipped = dict(plan.skipped)
    assert "roi_heads" in skipped and "cannot be captured" in skipped["roi_heads"]
    assert len(plan.sites) == 10 and len(plan.active_pairs) == 4
    # everything outside the part is the detector's own code and weights
    assert net.roi_heads is not model.roi_heads
    for key, value in model.roi_heads.state_dict().items():
        assert torch.equal(net.roi_heads.state_dict()[key], value)
    dia = sum(p.numel() for n, p in net.named_parameters() if ".fxattn_dia." in n)
    assert dia == plan.dia_parameters
    assert sum(p.numel() for p in net.parameters()) == (
        sum(p.numel() for p in model.parameters()) + dia)


def test_training_step_with_the_detectors_own_loss(net: nn.Module, batch: tuple) -> None:
    images, targets = batch
    net.train()
    losses = net(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    ssia = fxattn.ssia_loss(net)
    assert ssia.requires_grad and torch.isfinite(ssia) and ssia > 0
    loss = sum(losses.values()) + ssia
    net.zero_grad()
    loss.backward()
    dia_grads = [p.grad for n, p in net.named_parameters() if ".fxattn_dia." in n]
    assert dia_grads and all(g is not None for g in dia_grads)
    assert sum(float(g.abs().sum()) for g in dia_grads) > 0
    assert net.roi_heads.box_predictor.cls_score.weight.grad is not None


def test_eval_returns_what_the_detector_returns(model: nn.Module, net: nn.Module, batch: tuple
                                               ) -> None:
    images, _ = batch
    net.eval()
    with torch.no_grad():
        got, want = net(images), model.eval()(images)
    assert [sorted(d) for d in got] == [sorted(d) for d in want]
    assert all(g["boxes"].shape[1] == 4 for g in got)
    with pytest.raises(fxattn.SSIALossUnavailableError):
        fxattn.ssia_loss(net)  # eval forwards run no SSIA branch


def test_without_dia_detections_are_bitwise_the_originals(batch: tuple) -> None:
    images, targets = batch
    model = detector()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = fxattn.transform(model, batch, dia=False, scope="backbone")
    assert net.fxattn_scope.plan.explicit and net.fxattn_scope.plan.paths == ["backbone"]
    net.eval(), model.eval()
    with torch.no_grad():
        got, want = net(images), model(images)
    assert [list(d) for d in got] == [list(d) for d in want]
    for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
        assert torch.equal(a, b)
    net.train(), model.train()
    torch.manual_seed(1)
    got = net(images, targets)
    torch.manual_seed(1)
    want = model(images, targets)
    for key in want:  # training: same losses (SSIA only adds its own term)
        assert torch.equal(got[key], want[key]), key


def test_explicit_scope_of_a_smaller_part(model: nn.Module, batch: tuple) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = fxattn.inspect(model, batch, scope=["backbone.body"])
    assert isinstance(plan, ScopePlan) and plan.paths == ["backbone.body"]
    assert len(plan.sites) == 10  # the FPN holds no residual site: same sites as backbone
    text = str(plan)
    assert "explicit scope" in text and "transformed 'backbone.body'" in text


def test_the_plan_says_which_part_and_why(net: nn.Module) -> None:
    plan = net.fxattn_scope.plan  # what fxattn.inspect(model, batch) returns
    text = str(plan)
    assert "automatic scope" in text and "transformed 'backbone' (BackboneWithFPN)" in text
    assert "left 'roi_heads' as is" in text and "--- part 'backbone' ---" in text
    assert plan.to_dict()["parts"][0]["path"] == "backbone"


def test_strip_returns_the_lean_detector(net: nn.Module, batch: tuple) -> None:
    images, _ = batch
    lean = fxattn.strip_ssia(net)
    assert type(lean) is type(net) and not lean.training and lean.fxattn_scope.stripped
    assert isinstance(lean.backbone, torch.fx.GraphModule)
    assert not any("fxattn_ssia" in n for n, _ in lean.named_modules())
    assert isinstance(net.backbone, fxattn.AttentionGraphModule)  # net untouched
    net.eval()
    with torch.no_grad():
        for a, b in zip(tree_leaves(lean(images)), tree_leaves(net(images)), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(fxattn.NotTransformedError, match="already stripped"):
        fxattn.strip_ssia(lean)
    with pytest.raises(fxattn.AlreadyTransformedError):
        fxattn.transform(lean, batch)


def test_save_and_load_round_trip(net: nn.Module, batch: tuple, tmp_path: Path) -> None:
    images, _ = batch
    path = fxattn.save(net, tmp_path / "det.fxattn", batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = fxattn.load(path, model=detector())
    assert loaded.fxattn_scope.plan.paths == ["backbone"]
    assert_state_equal(loaded, state_snapshot(net))
    net.eval(), loaded.eval()
    with torch.no_grad():
        for a, b in zip(tree_leaves(loaded(images)), tree_leaves(net(images)), strict=True):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def exported(model: nn.Module, net: nn.Module, batch: tuple,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Any, Path]:
    images, _ = batch
    lean = fxattn.strip_ssia(net)
    # the weights and batch-norm statistics as transformed (the training test's forward
    # updated the statistics from 2 tiny images; see the report on that case)
    missing, unexpected = lean.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".fxattn_dia." in key for key in missing)
    path = tmp_path_factory.mktemp("det") / "det.onnx"
    return lean, fxattn.export_onnx(lean, path, (images,)), path


def test_whole_lean_detector_exports_with_matching_detections(exported: tuple) -> None:
    _, report, _ = exported
    assert report.whole_model and report.exporter == "torchscript" and report.verified
    assert report.image_sizes[0] != report.image_sizes[1]  # two sets of sizes
    assert report.match.compared > 0 and report.match.matched > 0
    assert report.match.matched + report.match.borderline >= report.match.compared
    assert report.match.max_box_error <= 1e-2
    assert Path(report.path).exists() and "matched" in str(report)
    # the transformed backbone + FPN, verified elementwise on its own
    assert list(report.part_checks) == ["backbone"]
    assert report.part_checks["backbone"].verification.passed
    assert "verified elementwise" in str(report)
    # the exact DIA rewrites ran on the whole detector too (its post-processing's If branches
    # read outer tensors; the zero state is a Constant there), and the detections matched after
    rewrites = next(n for n in report.notes if n.startswith("exact DIA rewrites"))
    assert "blocked_pool 10" in rewrites and "fold_initial_state" in rewrites
    model = onnx.load(report.path)
    assert sum(n.op_type == "GlobalAveragePool" and in_dia(n) for n in model.graph.node) == 10
    assert not [n for n in model.graph.node
                if n.op_type == "Constant" and "/g0/hidden_path" in n.name]


def test_detector_with_int4_dia_matrices(net: nn.Module, batch: tuple, tmp_path: Path) -> None:
    """``dia_weights`` reaches the whole-detector export: DIA's matrices (and only they) become
    MatMulNBits, detections are matched before, the parts verified with int4's tolerance."""
    images, _ = batch
    lean = fxattn.strip_ssia(net)
    report = fxattn.export_onnx(lean, tmp_path / "det.onnx", (images,), dia_weights="int4")
    assert report.whole_model and report.verified and report.match.matched > 0
    assert any("stored as int4 MatMulNBits" in n for n in report.notes)
    part = report.part_checks["backbone"]
    assert part.verification.passed and part.verification.tolerance.atol == LOWP_ATOL["int4"]
    products = [n for n in onnx.load(report.path).graph.node if n.op_type == "MatMulNBits"]
    assert products and all("fxattn_dia" in n.input[1] for n in products)
    with pytest.raises(fxattn.FxAttnError, match="dia_weights='int3' is not one of"):
        fxattn.export_onnx(lean, tmp_path / "bad.onnx", (images,), dia_weights="int3")
    assert not (tmp_path / "bad.onnx").exists()


def test_matching_rule_allows_ties_and_the_cut_only() -> None:
    boxes = torch.tensor([[0., 0., 10., 10.], [5., 5., 20., 20.], [1., 1., 4., 4.]])
    want = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.9, 0.0502]),
             "labels": torch.tensor([1, 1, 2])}]
    # tie at 0.9 in the other order, and the borderline detection missing: a match
    got = [{"boxes": boxes[[1, 0]] + 1e-4, "scores": torch.tensor([0.9, 0.9]),
            "labels": torch.tensor([1, 1])}]
    report = match_detections(want, got, MatchRule(score_threshold=0.05))
    assert report.ok and report.matched == 2 and report.borderline == 1
    # NMS kept the other of two overlapping boxes of equal score: a tie, not a mismatch
    tied = [{"boxes": torch.cat([boxes[:1], boxes[1:2] + 1.0]), "scores": torch.tensor([0.9, 0.9]),
             "labels": torch.tensor([1, 1])}]
    report = match_detections(want, tied, MatchRule(score_threshold=0.05))
    assert report.ok and report.matched == 1 and report.ties == 1
    got[0]["boxes"] = got[0]["boxes"] + torch.tensor([0.0, 0.0, 0.5, 0.0])
    report = match_detections(want, got, MatchRule(score_threshold=0.05, tie_iou=0.99))
    assert not report.ok and "no match" in report.problems[0]
    got[0]["labels"] = torch.tensor([2, 2])  # a wrong label is never a tie
    report = match_detections(want, got, MatchRule(score_threshold=0.05))
    assert not report.ok and len(report.problems) == 4


class _DtypeDetector(nn.Module):
    """Stands in for an ill-conditioned detector: float32 and float64 runs keep different
    boxes for detection 1 (a top-k or NMS decision that rounding flips)."""

    BOXES = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.], [40., 40., 50., 50.]])

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        boxes = self.BOXES.clone().to(images[0].dtype)
        if images[0].dtype == torch.float32:
            boxes[1] += 5.0  # float32 rounding chose another proposal
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7], dtype=boxes.dtype),
                 "labels": torch.tensor([1, 1, 1])} for _ in images]


def test_float64_rule_forgives_rounding_flips_not_mismatches() -> None:
    from fxattn.export.detector import float64_detections

    module, images = _DtypeDetector(), [torch.rand(3, 8, 8)]
    expected = module(images)
    truth = module([i.double() for i in images])
    rule = MatchRule(tie_iou=0.99)
    for actual, passes in ((truth, True), (expected, True), ([{
            **truth[0], "boxes": truth[0]["boxes"] * 1.01}], False)):
        report = match_detections(expected, actual, rule)
        if report.ok:  # onnxruntime agrees with PyTorch's float32: nothing to judge
            assert actual is expected
            continue
        float64_detections(module, [(images, expected, actual, "")], rule, report)
        # PyTorch's own float32 has 2 problems against float64 (detection 1 and its twin)
        assert report.float64_own_problems == 2
        assert report.ok is passes, report.problems


def test_with_batch_cycles_sample_lists(batch: tuple) -> None:
    from fxattn.capture import ExampleInputs

    inputs = ExampleInputs.from_user(batch)
    assert inputs.batch_size == 2
    bigger = inputs.with_batch(3, torch.Generator().manual_seed(0))
    images, targets = bigger.args
    assert [tuple(i.shape) for i in images] == [(3, 96, 80), (3, 80, 96), (3, 96, 80)]
    assert targets[2] is batch[1][0]  # each fresh image keeps its example's target
    assert not torch.equal(images[0], batch[0][0])


def test_sample_lists_of_different_lengths_are_refused(model: nn.Module, batch: tuple) -> None:
    images, targets = batch
    with pytest.raises(fxattn.InputError, match="lists of 1 and 2 samples"):
        fxattn.inspect(model, (images, targets[:1]))


class _BranchOnValue(nn.Module):
    """Untraceable whole (a Python branch on a tensor's value); one residual block inside."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        if float(features.max()) > 1e9:  # neither torch.fx nor torch.export captures this
            return features.flatten(1)
        return self.head(features.mean((2, 3)))


def test_scoped_part_without_an_ssia_pair_says_what_it_found() -> None:
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(fxattn.AnalysisError) as info:
            fxattn.transform(_BranchOnValue(), x)
        message = str(info.value)
        assert "no scoped part of _BranchOnValue has an SSIA pair" in message
        assert "'body'" in message and "at least two stage outputs" in message
        assert "has 1 on its main path" in message and "ssia=False" in message
        net = fxattn.transform(_BranchOnValue(), x, ssia=False)  # DIA alone works
    assert isinstance(net.body, fxattn.AttentionGraphModule)


class _VGGBranchOnValue(_BranchOnValue):
    """The same untraceable whole around a backbone without residual additions (SSD's VGG)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 2)


def test_automatic_scope_finds_a_backbone_without_residual_additions() -> None:
    """No submodule holds a residual add: the search takes the largest part with stage
    outputs (DIA multiplies them), as for torchvision's ssd300_vgg16."""
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = fxattn.transform(_VGGBranchOnValue(), x)
    plan = net.fxattn_scope.plan
    assert plan.paths == ["body"] and "stage outputs" in plan.parts[0].reason
    assert all(site.kind == "stage_output" for site in plan.sites)
    out = net(x)
    loss = out.square().mean() + fxattn.ssia_loss(net)
    loss.backward()
    assert out.shape == (2, 2) and torch.isfinite(loss)
