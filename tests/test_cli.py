"""The command line end to end: inspect, transform (save / load), export, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxattn
from fxattn.cli import main
from fxattn.serialization import load


def test_inspect_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "2,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "8 DIA sites in 4 groups" in out and "layer4.1" in out and "878,560" in out
    assert main(["inspect", "timm:resnet18", "--input-shape", "2,3,64,64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["sites"]) == 8 and plan["dia_parameters"] == 878_560


def test_transform_saves_a_file_that_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "r18.fxattn"
    argv = ["transform", "torchvision:resnet18", "--input-shape", "2,3,64,64",
            "--model-kwargs", '{"num_classes": 10}', "-o", str(out)]
    assert main(argv) == 0
    net = load(out)
    assert isinstance(net, fxattn.AttentionGraphModule)
    saved = torch.load(out, weights_only=True)
    for key, value in saved["state_dict"].items():
        assert torch.equal(net.state_dict()[key], value), key

    lean_path = tmp_path / "r18-lean.fxattn"
    assert main([*argv[:-1], str(lean_path), "--strip"]) == 0
    lean = load(lean_path)
    assert isinstance(lean, torch.fx.GraphModule) and not lean.training
    lean_state = torch.load(lean_path, weights_only=True)["state_dict"]
    assert set(lean.state_dict()) == set(lean_state)
    assert not any(k.startswith("fxattn_ssia") for k in lean_state)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(lean(x), load(lean_path)(x))  # loading is deterministic


def test_export_from_spec_and_from_saved_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path = tmp_path / "m.onnx"
    report = tmp_path / "report.json"
    assert main(["export", "torchvision:resnet18", "--input-shape", "2,3,32,32", "-o",
                 str(onnx_path), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["verified"] and data["max_abs_error"] <= 1e-4 and onnx_path.exists()
    saved = tmp_path / "m.fxattn"
    assert main(["transform", "torchvision:resnet18", "--input-shape", "2,3,32,32", "--no-ssia",
                 "-o", str(saved)]) == 0
    assert main(["export", str(saved), "-o", str(tmp_path / "saved.onnx")]) == 0
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out


def test_export_with_int4_dia_weights_and_without_the_rewrites(tmp_path: Path) -> None:
    import onnx

    argv = ["export", "torchvision:resnet18", "--input-shape", "2,3,32,32", "--no-ssia",
            "--exporter", "torchscript"]
    assert main([*argv, "-o", str(tmp_path / "int4.onnx"), "--dia-weights", "int4",
                 "--json", str(tmp_path / "int4.json")]) == 0
    products = [n for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node
                if n.op_type == "MatMulNBits"]
    assert products and all("fxattn_dia" in n.input[1] for n in products)
    report = json.loads((tmp_path / "int4.json").read_text())
    assert report["verified"] and any("exact DIA rewrites" in n for n in report["notes"])
    assert main([*argv, "-o", str(tmp_path / "plain.onnx"), "--no-optimize",
                 "--json", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["verified"] and not any("exact DIA rewrites" in n for n in plain["notes"])
    assert main([*argv, "-o", str(tmp_path / "bad.onnx"), "--dia-weights", "int3"]) != 0
    assert not (tmp_path / "bad.onnx").exists()


def test_demo_runs_the_whole_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--size", "64"]) == 0
    out = capsys.readouterr().out
    for stage in ("transform", "train", "strip", "export", "compile", "latency"):
        assert stage in out
    words = " ".join(out.split())  # rich wraps long lines
    assert "8 of 8 DIA multiplies fused" in words or "0 of 8" in words  # 0: no blocked layout
    assert (tmp_path / "resnet18_lean.onnx").exists()
    assert (tmp_path / "resnet18_lean.b1.onnx").exists()
    assert (tmp_path / "demo.png").stat().st_size > 1000  # latency bars + attention heatmaps
