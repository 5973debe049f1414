"""Core guarantees of the pipeline (transform / strip / export) on torchvision and timm models."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import timm
import torch
import torchvision
from conftest import assert_state_equal, state_snapshot
from models import CifarResNet, ConstantResolution, PinnedBatch, TwoViews

import fxattn
from fxattn.capture import ExampleInputs, trace_dual
from fxattn.export import export_onnx
from fxattn.names import DIA_ROOT, SSIA_ROOT


def _node_signature(graph: torch.fx.Graph) -> list[tuple[str, str, str, str]]:
    return [(n.op, n.name, str(n.target), str(n.args)) for n in graph.nodes]


IDENTITY_MODELS = {
    "torchvision:resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "timm:convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), 64),
    "timm:vit_tiny_patch16_224": (
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64), 64),
}


@pytest.mark.parametrize("name", list(IDENTITY_MODELS))
def test_ssia_only_strips_back_to_the_original_eval_graph(name: str, tmp_path: Path) -> None:
    factory, size = IDENTITY_MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, size, size)
    net = fxattn.transform(model, x, dia=False, ssia=True)
    lean = fxattn.strip_ssia(net)

    reference = trace_dual(model, ExampleInputs.from_user(x)).eval.graph
    assert _node_signature(lean.graph) == _node_signature(reference)
    with torch.no_grad():
        assert torch.equal(lean(x), model(x))  # bitwise

    original = export_onnx(model, tmp_path / "original.onnx", x)
    stripped = export_onnx(lean, tmp_path / "lean.onnx", x)
    original_ops = [n.op_type for n in onnx.load(original.path).graph.node]
    stripped_ops = [n.op_type for n in onnx.load(stripped.path).graph.node]
    assert stripped_ops == original_ops
    assert set(lean.state_dict()) <= set(model.state_dict())


def test_cifar_resnet164_dia_adds_exactly_218848_parameters() -> None:
    model = CifarResNet(depth=164, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == 1_727_284
    x = torch.randn(2, 3, 32, 32)
    net = fxattn.transform(model, x, dia=fxattn.DIA(reduction=4), ssia=False)
    plan = net.plan
    assert [m.channels for m in plan.dia_modules] == [64, 128, 256]
    assert [len(m.sites) for m in plan.dia_modules] == [18, 18, 18]
    assert plan.dia_parameters == 218_848
    assert sum(p.numel() for p in net.parameters()) == 1_946_132
    assert sum(p.numel() for p in fxattn.strip_ssia(net).parameters()) == 1_946_132


def test_transform_and_training_leave_the_input_model_unchanged() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    snapshot = state_snapshot(model)
    structure = [(n, type(m)) for n, m in model.named_modules()]
    x = torch.randn(2, 3, 64, 64)
    net = fxattn.transform(model, x)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        (net(x).sum() + fxattn.ssia_loss(net)).backward()
        optimizer.step()
    fxattn.strip_ssia(net)
    assert_state_equal(model, snapshot)
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert model.training and all(m.training for m in model.modules())
    assert not any(p.grad is not None for p in model.parameters())


def test_original_weights_load_into_transformed_and_stripped_modules() -> None:
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    net = fxattn.transform(model, x, ssia=fxattn.SSIA(map="channel"))
    lean = fxattn.strip_ssia(net)
    for module, extra_roots in ((net, (DIA_ROOT, SSIA_ROOT)), (lean, (DIA_ROOT,))):
        result = module.load_state_dict(model.state_dict(), strict=False)
        assert result.unexpected_keys == []
        assert result.missing_keys
        assert all(k.split(".")[0] in extra_roots for k in result.missing_keys)
    assert any(k.startswith(SSIA_ROOT) for k in net.state_dict())  # channel-map projections
    assert not any(k.startswith(SSIA_ROOT) for k in lean.state_dict())
    model.eval()
    lean.load_state_dict(model.state_dict(), strict=False)
    assert torch.equal(net.conv1.weight, model.conv1.weight)


def test_eval_mode_runs_no_ssia_and_forward_is_drop_in() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    net = fxattn.transform(model, x)
    calls: list[int] = []
    getattr(net, SSIA_ROOT).register_forward_hook(lambda *_: calls.append(1))
    net.train()
    net(x)
    assert calls == [1]
    net.eval()
    out = net(x)
    assert calls == [1]
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    with pytest.raises(fxattn.SSIALossUnavailableError):
        fxattn.ssia_loss(net)


class TupleDictModel(torch.nn.Module):
    """Returns a dict holding a tuple: the transformed forward must return the same structure."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torchvision.models.resnet18(num_classes=4)

    def forward(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        logits = self.body(x)
        return {"out": (logits, logits.softmax(-1))}


def test_output_structure_is_preserved() -> None:
    model = TupleDictModel().eval()
    x = torch.randn(2, 3, 64, 64)
    net = fxattn.transform(model, x, dia=False).eval()
    out = net(x)
    assert isinstance(out, dict) and isinstance(out["out"], tuple)
    assert torch.equal(out["out"][0], model(x)["out"][0])


def test_share_modes_and_se_change_the_module_layout() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    stage = fxattn.inspect(model, x, dia=fxattn.DIA(share="stage"), ssia=False)
    per_site = fxattn.inspect(model, x, dia=fxattn.DIA(share="none"), ssia=False)
    se = fxattn.inspect(model, x, dia=fxattn.DIA(module="se", reduction=8), ssia=False)
    assert len(stage.dia_modules) == 4 and len(per_site.dia_modules) == 8
    c = 64
    assert se.dia_modules[0].parameters == c * (c // 8) + c // 8 + (c // 8) * c + c
    net = fxattn.transform(model, x, dia=fxattn.DIA(module="se", reduction=8), ssia=False)
    assert sum(p.numel() for n, p in net.named_parameters() if n.startswith(DIA_ROOT)) == (
        se.dia_parameters
    )


@pytest.mark.parametrize("as_keyword", [False, True])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_export_a_lean_graph_module_with_a_dynamic_batch(
    exporter: str, as_keyword: bool, tmp_path: Path
) -> None:
    """The lean model is an fx.GraphModule; the TorchScript exporter (the fallback) must not
    mistake its ``graph`` for a TorchScript graph when it validates the dynamic batch axis, and
    takes keyword inputs (``{"x": ...}``, as Hugging Face models are called) as well."""
    x = torch.randn(2, 3, 32, 32)
    inputs = {"x": x} if as_keyword else x
    lean = fxattn.strip_ssia(fxattn.transform(CifarResNet(depth=11), inputs))
    report = export_onnx(lean, tmp_path / "m.onnx", inputs, exporter=exporter)
    assert report.exporter == exporter and report.batch_sizes == (2, 3)
    assert report.max_abs_error <= 1e-4


@pytest.mark.parametrize("batch", [1, 2])
def test_a_batch_torch_export_pins_is_exported_static_and_verified_at_that_batch(
    batch: int, tmp_path: Path
) -> None:
    """torch.onnx silently exports a static batch when torch.export pins it (RAFT's
    ``chunk``): the report says so and verifies at the user's batch, instead of onnxruntime
    refusing the second batch size with 'invalid dimensions'."""
    inputs = {"image1": torch.randn(batch, 3, 16, 16), "image2": torch.randn(batch, 3, 16, 16)}
    net = fxattn.transform(TwoViews(), inputs, ssia=False)
    assert net.plan.tracer == "torch.export" and net.plan.fixed_batch is None
    for other in (1, 3):  # the PyTorch model keeps a dynamic batch
        assert net(torch.randn(other, 3, 16, 16), torch.randn(other, 3, 16, 16)).shape[0] == other
    report = export_onnx(fxattn.strip_ssia(net), tmp_path / "m.onnx", inputs)
    assert report.static_batch == batch and report.batch_sizes == (batch, batch)
    assert any(note.startswith(f"static batch {batch}:") for note in report.notes)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.type.tensor_type.shape.dim[0].dim_value for i in graph.input] == [batch, batch]
    assert report.verification is not None and report.verification.passed


@pytest.mark.parametrize("batch", [1, 2])
def test_a_batch_pinned_at_capture_is_in_the_plan_and_the_export(
    batch: int, tmp_path: Path
) -> None:
    """A model whose code pins the batch: the plan says so, the transformed model still runs
    at the user's batch (a batch of 1 is not traded for the capture's batch of 2), and the
    ONNX model is exported and verified at that batch."""
    x = torch.randn(batch, 3, 16, 16)
    net = fxattn.transform(PinnedBatch(batch), x)
    assert net.plan.fixed_batch == batch
    assert any(f"fixed the batch at {batch}" in note for note in net.plan.notes)
    assert net(x).shape == (batch, 8)
    report = export_onnx(fxattn.strip_ssia(net), tmp_path / "m.onnx", x)
    assert report.static_batch == batch and report.verification.passed


def test_a_tap_the_model_overwrites_in_place_trains_like_an_out_of_place_one() -> None:
    """SSIA's map of a tap that ``ReLU(inplace=True)`` then overwrites reads a clone (else the
    backward fails: 'modified by an inplace operation'); loss and gradients equal those of the
    same model with ``inplace=False``, and the lean graph has no clone."""
    x = torch.randn(2, 3, 8, 8)
    weights = ConstantResolution().state_dict()
    grads = []
    for inplace in (True, False):
        model = ConstantResolution(inplace)
        model.load_state_dict(weights)
        torch.manual_seed(0)  # the same DIA weights in both
        net = fxattn.transform(model, x)
        (net(x).sum() + fxattn.ssia_loss(net)).backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
        clones = [n for n in net.train_graph.nodes if n.target == "clone"]
        assert len(clones) == (len(net.plan.taps) if inplace else 0)
        assert not any(n.target == "clone" for n in fxattn.strip_ssia(net).graph.nodes)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
