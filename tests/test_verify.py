"""Export verification judges the error against the output's scale (``fxattn.export.verify``).

Both sides of the rule: real models whose outputs are far from order 1 pass with the defaults
(third-party models included), and genuine mismatches fail - a weight changed by a relative
1e-3 after export, a forward that draws fresh noise, an error as large as a small output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from models import CifarResNet
from onnx import numpy_helper
from torch import nn

import fxattn
from fxattn.capture import ExampleInputs
from fxattn.config import DEFAULT_ATOL, DEFAULT_RTOL, Tolerance
from fxattn.export import export_onnx
from fxattn.export.lowp import LOWP_ATOL, LOWP_RTOL, tolerance
from fxattn.export.verify import element_ratios, verify_onnx

X = torch.randn(2, 3, 16, 16)


class Scaled(nn.Module):
    """``inner``'s outputs times ``factor``: the same computation at another scale."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner = inner
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.factor


class Cancellation(nn.Module):
    """Outputs that are the near-cancellation of terms ~1e3: ill-conditioned by design.

    ``a(x) - b(x)`` with ``b``'s weights ``a``'s times ``1 + 1e-6``: the exact result is ~1e-3,
    and float32 rounding of the ~1e3 terms moves it by ~1e-4, in PyTorch as much as in
    onnxruntime.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(256, 16)
        self.b = nn.Linear(256, 16)
        with torch.no_grad():
            self.a.weight.mul_(1e3)
            self.b.weight.copy_(self.a.weight * (1 + 1e-6))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) - self.b(x)


class CastingCancellation(Cancellation):
    """The same, with the explicit float32 casts of an RMSNorm (``x.float()``, a softmax's
    ``dtype=torch.float32``) that a captured graph spells out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(1, dtype=torch.float32)  # a float32 constant made in the forward
        return (self.a(x.float()) - self.b(x.to(torch.float32))) * scale


def small_lean() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return fxattn.strip_ssia(fxattn.transform(CifarResNet(depth=11, num_classes=10).eval(), X))


def _perturb(path: Path, which: str, relative: float = 1e-3) -> Path:
    """Scale one weight initializer of the ONNX file by ``1 + relative`` (first/middle/last)."""
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    weights = [name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
               for name in node.input[1:2] if name in initializers
               and len(initializers[name].dims) >= 2]
    name = {"first": weights[0], "middle": weights[len(weights) // 2], "last": weights[-1]}[which]
    tensor = initializers[name]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * (1 + relative), name))
    out = path.with_name(f"perturbed-{which}.onnx")
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.fx.GraphModule, Path]:
    lean = small_lean()
    path = tmp_path_factory.mktemp("verify") / "lean.onnx"
    export_onnx(lean, path, X)
    return lean, path


# --------------------------------------------------------------------------- the rule itself


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    want=arrays(np.float64, (3, 5), elements=finite),
    noise=arrays(np.float64, (3, 5), elements=st.floats(-1e-2, 1e-2)),
    atol=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]),
    rtol=st.sampled_from([0.0, 1e-5, 1e-4, 1e-2]),
)
def test_elementwise_rule_is_numpy_allclose(want: np.ndarray, noise: np.ndarray, atol: float,
                                            rtol: float) -> None:
    """``ratio <= 1`` everywhere exactly when ``numpy.allclose`` (and torch.testing) accept."""
    if atol == 0 and rtol == 0:
        return
    got = want * (1 + noise) + noise
    ratio = element_ratios(got, want, atol, rtol)
    expected = np.isclose(got, want, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(ratio <= 1.0, expected)


def test_nan_inf_and_integer_outputs_compare_exactly() -> None:
    want = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert (element_ratios(want.copy(), want, 1e-5, 1e-4) == 0).all()
    wrong = np.array([0.0, -np.inf, np.inf, 1.0], np.float32)
    assert list(element_ratios(wrong, want, 1e-5, 1e-4)) == [np.inf, np.inf, np.inf, 0.0]
    labels = np.array([3, 1, 2])
    assert list(element_ratios(np.array([3, 1, 0]), labels, 1.0, 1.0)) == [0.0, 0.0, np.inf]


def test_tolerance_validates_and_loosens() -> None:
    assert (Tolerance().atol, Tolerance().rtol) == (DEFAULT_ATOL, DEFAULT_RTOL)
    for bad in ({"atol": -1.0}, {"rtol": float("nan")}, {"atol": 0.0, "rtol": 0.0}):
        with pytest.raises(fxattn.ConfigError):
            Tolerance(**bad)
    int4 = tolerance("int4", Tolerance())
    assert (int4.atol, int4.rtol, int4.float64_check) == (LOWP_ATOL["int4"], LOWP_RTOL["int4"],
                                                         False)
    assert tolerance("fp32", Tolerance(atol=1e-3)) == Tolerance(atol=1e-3)


# --------------------------------------------------------------------------- passes where it should


def test_outputs_scaled_by_1e4_pass_with_the_defaults(tmp_path: Path) -> None:
    lean = small_lean()
    scaled = Scaled(lean, 1e4).eval()
    report = export_onnx(scaled, tmp_path / "scaled.onnx", X)
    assert report.verified and report.verification.passed and report.atol == DEFAULT_ATOL
    # the relative error is the unscaled model's, within float noise: rtol is scale-free
    plain = export_onnx(lean, tmp_path / "plain.onnx", X)
    assert report.max_rel_error < 1e-5 and plain.max_rel_error < 1e-5
    # atol is not: an output near 0 loses its cover at 1e4 and may need the float64 rule
    # (measured on an AVX-512 Xeon: 1.36x the elementwise bound, within the float64 one)
    check = report.verification
    assert check.margin < 1.0 or (check.rule == "float64" and check.float64_margin <= 1.0)


def test_ill_conditioned_outputs_pass_by_the_float64_rule(tmp_path: Path) -> None:
    model = Cancellation().eval()
    x = torch.randn(2, 256)
    report = export_onnx(model, tmp_path / "cancel.onnx", x)
    check = report.verification
    assert check.rule == "float64" and check.margin > 1.0 and check.float64_margin <= 1.0
    assert check.float64_noise > 1e-6  # PyTorch's own float32 error is that large
    assert "ill-conditioned" in str(report)
    with pytest.raises(fxattn.VerificationError, match="disagree"):
        export_onnx(model, tmp_path / "strict.onnx", x, float64_check=False)


def test_the_float64_run_widens_the_casts_a_graph_spells_out(tmp_path: Path) -> None:
    """Without widening, ``x.float()`` meets float64 weights and the float64 check cannot run
    at all (the model then fails); with it the reference is float64 throughout."""
    model = CastingCancellation().eval()
    report = export_onnx(model, tmp_path / "cast.onnx", torch.randn(2, 256))
    check = report.verification
    assert check.rule == "float64" and check.margin > 1.0 and check.float64_margin <= 1.0
    assert not any("no float64 check" in note for note in check.notes)
    assert torch.get_default_dtype() == torch.float32  # restored after the float64 run


def test_report_names_the_worst_element(exported: tuple[torch.fx.GraphModule, Path]) -> None:
    lean, path = exported
    check = verify_onnx(str(path), lean, ExampleInputs.from_user(X))
    worst = check.worst
    assert check.passed and check.rule == "allclose" and worst is not None
    assert worst.batch in (2, 3) and len(worst.index) == 2 and worst.output == 0
    assert worst.abs_error == pytest.approx(abs(worst.onnxruntime - worst.pytorch), rel=1e-6)
    assert worst.ratio == pytest.approx(
        worst.abs_error / (DEFAULT_ATOL + DEFAULT_RTOL * abs(worst.pytorch)), rel=1e-6)
    assert check.margin == worst.ratio < 0.1  # measured 5e-3: the default leaves room


# --------------------------------------------------------------------------- fails where it should


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_weight_changed_by_a_relative_1e3_is_caught(
    exported: tuple[torch.fx.GraphModule, Path], which: str
) -> None:
    lean, path = exported
    perturbed = _perturb(path, which)
    with pytest.raises(fxattn.VerificationError, match="not rounding") as info:
        verify_onnx(str(perturbed), lean, ExampleInputs.from_user(X))
    assert "element (" in str(info.value)


def test_a_scaled_model_with_a_changed_weight_is_still_caught(tmp_path: Path) -> None:
    """The float64 rule forgives rounding, not a mismatch: at scale 1e4 too."""
    scaled = Scaled(small_lean(), 1e4).eval()
    path = tmp_path / "scaled.onnx"
    export_onnx(scaled, path, X)
    report = verify_onnx(str(_perturb(path, "first")), scaled, ExampleInputs.from_user(X),
                         raise_on_failure=False)
    assert not report.passed and report.float64_margin > 1.0


def test_small_outputs_with_an_error_of_their_size_fail(tmp_path: Path) -> None:
    """Outputs ~1e-3 with an error ~1e-3 (a bias off by 1 before the 1e-3 scale) fail, where
    the old fixed bound (1e-4 ... 1e-3 absolute) could not tell."""
    torch.manual_seed(0)
    model = Scaled(nn.Linear(8, 4), 1e-3).eval()
    x = torch.randn(2, 8)
    path = tmp_path / "small.onnx"
    export_onnx(model, path, x)
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if len(t.dims) == 1)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, bias.name))
    onnx.save(proto, str(path))
    with pytest.raises(fxattn.VerificationError, match="disagree"):
        verify_onnx(str(path), model, ExampleInputs.from_user(x))


# --------------------------------------------------------------------------- third-party models


# ultralytics YOLOv8n (boxes in pixels) passes at the defaults in tests/test_zoo_beyond.py.


def test_pytorchcv_resnet50_and_diaresnet50_pass_with_the_defaults(tmp_path: Path) -> None:
    """Their random initialisation gives logits ~1e3 (the fixed 1e-4 bound failed them)."""
    pytorchcv = pytest.importorskip("pytorchcv.model_provider")
    x = torch.randn(2, 3, 224, 224)
    torch.manual_seed(0)
    resnet = pytorchcv.get_model("resnet50", pretrained=False)
    lean = fxattn.strip_ssia(fxattn.transform(resnet, x, dia=False, ssia=True))
    # the verification rule is the subject here, not the exporter: the faster TorchScript one
    report = export_onnx(lean, tmp_path / "resnet50.onnx", x, exporter="torchscript")
    assert report.verification.passed and report.verification.margin <= 1e3
    torch.manual_seed(0)
    dia = pytorchcv.get_model("diaresnet50", pretrained=False).eval()
    report = export_onnx(dia, tmp_path / "diaresnet50.onnx", x, exporter="torchscript")
    assert report.verification.passed


