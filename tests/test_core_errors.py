"""The failures issue 2 names: each is an FxAttnError subclass with an actionable message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from models import DataDependent, PlainMLP

import fxattn
from fxattn.cli import main
from fxattn.export import export_onnx


def test_untraceable_model_names_the_module_line_and_the_remedy() -> None:
    with pytest.raises(fxattn.TraceError) as info:
        fxattn.transform(DataDependent(), torch.randn(2, 3, 16, 16))
    message = str(info.value)
    assert "'gate' (Gate)" in message
    assert "if x.sum() > 0" in message
    assert "leaf" in message and "concrete_args" in message


def test_untraceable_module_works_as_a_leaf() -> None:
    net = fxattn.transform(DataDependent(), torch.randn(2, 3, 16, 16), dia=False, ssia=False,
                           leaf_modules=["gate"])
    assert any(n.target == "gate" for n in net.graph.nodes)


def test_model_without_sites_suggests_site_selection() -> None:
    with pytest.raises(fxattn.AnalysisError, match="include"):
        fxattn.transform(PlainMLP(), torch.randn(2, 16), ssia=False)


def test_include_matching_nothing_is_reported() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(fxattn.AnalysisError, match="no DIA site"):
        fxattn.transform(model, torch.randn(2, 3, 32, 32), dia=fxattn.DIA(include="nothing"))


@pytest.mark.parametrize(
    "bad",
    [torch.randn(2, 3, 32), torch.randn(2, 5, 32, 32), "image.png", torch.zeros(0, 3, 32, 32)],
    ids=["wrong-rank", "wrong-channels", "not-a-tensor", "empty-batch"],
)
def test_bad_example_inputs(bad: object) -> None:
    with pytest.raises(fxattn.InputError) as info:
        fxattn.transform(torchvision.models.resnet18(), bad)
    assert "example" in str(info.value) or "input" in str(info.value)


def test_unwritable_export_path_leaves_no_file(tmp_path: Path) -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(fxattn.ExportError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "model.onnx", x)
    with pytest.raises(fxattn.ExportError, match="directory"):
        export_onnx(model, tmp_path, x)
    assert os.listdir(tmp_path) == []


def test_failed_verification_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fxattn.export.portable as onnx_export

    def disagree(*args: object, **kwargs: object) -> None:
        raise fxattn.VerificationError("output 0 at batch 2 has max abs error 1.0")

    monkeypatch.setattr(onnx_export, "verify_onnx", disagree)
    with pytest.raises(fxattn.VerificationError):
        export_onnx(torchvision.models.resnet18().eval(), tmp_path / "m.onnx",
                    torch.randn(2, 3, 32, 32))
    assert os.listdir(tmp_path) == []


def test_cli_unknown_model_spec_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet5O"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxattn: error:")
    assert "resnet50" in err  # suggests the closest names
    assert main(["inspect", "nosuchsource:model"]) == 2
