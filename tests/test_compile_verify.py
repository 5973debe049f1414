"""The compile's verification: no worse than the float32 computation it replaces (issue 32).

``compile_ort_cpu`` used to check the compiled file against the portable one with the bare
``atol + rtol * |ref|`` rule and refused third-party models whose near-cancelling logits carry
float32 rounding errors of the size of the terms that cancel (pytorchcv ResNet-50, random
weights, 224x224: a logit of 0.0438 off by 2.9e-6). Now it judges such elements against the
portable file's own float32 error - measured with the PyTorch module in float64 when it is
given (rule ``float64``), else the spread of the portable file run with and without
onnxruntime's graph optimisations (rule ``spread``) - and still refuses a compiled file with
one weight off by a relative 1e-3 or a DIA multiply dropped, naming the worst element.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import fxattn
from fxattn.cli import main
from fxattn.config import Tolerance
from fxattn.deploy import NODE_PREFIX, nchwc_block_size, verify_compiled
from fxattn.errors import ConfigError, VerificationError
from fxattn.export.agreement import element_ratios, judge, judge_conditioned

BATCHES = (1, 4, 8)


def _lean(model: torch.nn.Module, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    x = torch.randn(1, 3, size, size)
    return fxattn.strip_ssia(fxattn.transform(model.eval(), x, ssia=False)), x


@pytest.fixture(scope="module")
def pytorchcv_resnet50(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The issue's case: pytorchcv ResNet-50, random weights (seeded), 224x224, exported as a
    new user would (the default exporter)."""
    pytorchcv = pytest.importorskip("pytorchcv.model_provider")
    torch.manual_seed(0)
    lean, x = _lean(pytorchcv.get_model("resnet50", pretrained=False), 224)
    path = tmp_path_factory.mktemp("pcv") / "resnet50.onnx"
    fxattn.export_onnx(lean, path, x)
    return lean, path


# --------------------------------------------------------------------------- the rule itself


def test_the_conditioned_rule_forgives_rounding_not_a_mismatch() -> None:
    """An element off by 1.6x the allclose bound passes when the reference itself is that far
    off float64; an error 100x the reference's own fails both ways."""
    tol = Tolerance()
    exact = np.array([[10.0, 0.0438341, -3.0]])
    reference = (exact + [[0.0, 5e-6, 0.0]]).astype(np.float32)  # the portable file's rounding
    candidate = (exact + [[0.0, 1.5e-6, 0.0]]).astype(np.float32)
    result = judge(8, [candidate], [reference], ["logits"], tol, ("compiled", "portable"))
    assert not result.passed and result.margin > 1 and result.worst.index == (0, 1)
    assert judge_conditioned(result, [candidate], [reference], ["logits"], tol,
                             exact=[exact]).passed
    assert result.rule == "float64" and result.noise == pytest.approx(5e-6, rel=0.1)
    second = (exact - [[0.0, 1e-6, 0.0]]).astype(np.float32)  # another reduction order
    result = judge(8, [candidate], [reference], ["logits"], tol)
    assert judge_conditioned(result, [candidate], [reference], ["logits"], tol,
                             second=[second]).passed and result.rule == "spread"
    wrong = (exact + [[0.0, 1e-3, 0.0]]).astype(np.float32)
    for kind in ({"exact": [exact]}, {"second": [second]}):
        result = judge(8, [wrong], [reference], ["logits"], tol, ("compiled", "portable"))
        assert not judge_conditioned(result, [wrong], [reference], ["logits"], tol, **kind).passed
        assert result.worst.index == (0, 1) and result.ratio > 10
        assert "compiled 0.04483" in result.worst.describe()
    assert element_ratios(candidate, reference, 1e-6, 1e-5).max() > 1  # the old rule refused


# --------------------------------------------------------------------------- third-party models


@pytest.mark.slow
def test_pytorchcv_resnet50_compiles_at_batch_1_4_8(
        pytorchcv_resnet50: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """The issue's case, accepted with and without the module; on this CPU the old rule
    (allclose alone) refused at least one of the batches."""
    lean, path = pytorchcv_resnet50
    margins = []
    for batch in BATCHES:
        module = lean if batch == 8 else None
        report = fxattn.compile_ort_cpu(path, tmp_path / f"b{batch}.onnx", batch, module=module)
        check = report.verification
        assert check.passed and check.ratio <= 1 and report.rule == check.rule
        if check.margin > 1:  # what the old rule refused
            assert report.rule == ("float64" if module is not None else "spread")
            assert check.noise > 0 and f"(rule {report.rule})" in str(report)
        margins.append(check.margin)
    if nchwc_block_size() == 16:  # measured on AVX-512 (the machine): 1.01, 1.21, 1.42
        assert max(margins) > 1, margins


def _compiled_b1(portable: Path, folder: Path) -> Path:
    compiled = folder / "b1.onnx"
    fxattn.compile_ort_cpu(portable, compiled, 1, verify=False)
    return compiled


def _tampered(compiled: Path, how: str) -> Path:
    """``compiled`` with one weight scaled by ``1 + 1e-3`` or its first DIA multiply dropped
    (the fused convolution's weight ``h`` replaced by ones)."""
    model = onnx.load(str(compiled))
    inits = {t.name: t for t in model.graph.initializer}
    if how == "weight":
        name = next(n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")
                    and len(n.input) > 1 and n.input[1] in inits)
        tensor = inits[name]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * (1 + 1e-3), name))
    else:
        node = next(n for n in model.graph.node
                    if n.name.startswith(NODE_PREFIX) and n.name.endswith("/ReshapeW"))
        at = list(model.graph.node).index(node)
        model.graph.initializer.append(numpy_helper.from_array(np.float32(1.0), "tamper.one"))
        model.graph.node.insert(at, helper.make_node("Shape", [node.input[0]], ["tamper.shape"]))
        model.graph.node.insert(at + 1, helper.make_node("Expand", ["tamper.one", "tamper.shape"],
                                                         ["tamper.ones"]))
        node.input[0] = "tamper.ones"
    out = compiled.with_name(f"{how}.onnx")
    onnx.save(model, str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["weight", "dia-dropped"])
def test_genuine_errors_are_still_refused(how: str, tmp_path: Path,
                                          pytorchcv_resnet50: tuple[torch.nn.Module, Path]) -> None:
    """On the ill-conditioned model itself, by both conditioned rules."""
    if how == "dia-dropped" and not nchwc_block_size():
        pytest.skip("no blocked layout on this CPU: nothing fused to drop")
    lean, path = pytorchcv_resnet50
    tampered = _tampered(_compiled_b1(path, tmp_path), how)
    for module, rule in ((lean, "float64"), (None, "spread")):
        with pytest.raises(VerificationError, match=f"times what the {rule} rule allows") as info:
            verify_compiled(path, tampered, 1, module=module)
        assert "element (" in str(info.value) and "compiled " in str(info.value)


@pytest.mark.slow
def test_a_module_that_is_not_the_files_is_refused(
        pytorchcv_resnet50: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """A wrong module cannot excuse a compile: it must compute what the portable file does."""
    _, path = pytorchcv_resnet50
    compiled = _compiled_b1(path, tmp_path)
    torch.manual_seed(1)
    pytorchcv = pytest.importorskip("pytorchcv.model_provider")
    other = pytorchcv.get_model("resnet50", pretrained=False).eval()
    with pytest.raises(ConfigError, match="does not compute what"):
        verify_compiled(path, _tampered(compiled, "weight"), 1, module=other)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm:resnet50d", "torchvision:resnext50_32x4d"])
def test_third_party_resnets_compile_at_batch_1_4_8(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(name[5:], pretrained=False)
    else:
        import torchvision

        model = torchvision.models.get_model(name[12:], weights=None)
    lean, x = _lean(model, 64)
    path = tmp_path / "lean.onnx"
    fxattn.export_onnx(lean, path, x, exporter="torchscript")  # the faster exporter
    for batch in BATCHES:
        report = fxattn.compile_ort_cpu(path, tmp_path / f"b{batch}.onnx", batch,
                                        module=lean if batch == 4 else None)
        assert report.verification.passed and report.fused == report.dia_multiplies > 0 \
            or not nchwc_block_size()


def test_cli_compile_takes_the_reference_model(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    saved, portable = tmp_path / "lean.fxattn", tmp_path / "lean.onnx"
    assert main(["transform", "torchvision:resnet18", "--no-ssia", "--strip", "--input-shape",
                 "1,3,64,64", "-o", str(saved)]) == 0
    assert main(["export", str(saved), "-o", str(portable), "--exporter", "torchscript"]) == 0
    report = tmp_path / "report.json"
    assert main(["compile", str(portable), "-o", str(tmp_path / "b2.onnx"), "--batch", "2",
                 "--reference", str(saved), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["rule"] in ("allclose", "float64") and data["verification"]["passed"]
    assert "(rule " in capsys.readouterr().out
    assert main(["compile", str(portable), "-o", str(tmp_path / "b1.onnx"), "--batch", "1",
                 "--reference", str(tmp_path / "missing.fxattn")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference" in err[0]
