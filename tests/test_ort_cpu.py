"""``fxattn.compile_ort_cpu``: DIA's multiply fused into onnxruntime's blocked convolutions.

Parity with PyTorch at the compiled batch sizes, with and without folding ``h`` into the
weights, the structure onnxruntime runs (every DIA block stays in the blocked layout), no change
at all to a model without DIA, the partial cases (a multiply with no residual ReLU, channels
that do not fill the block, a 3x3 convolution and a bias folded), and bad input.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import torchvision
from models import CifarResNet, SplitResidual, cifar_dia_lean

import fxattn
from fxattn.cli import main
from fxattn.deploy import METADATA_KEY, NCHWC, fix_batch, nchwc_block_size, ort_optimize
from fxattn.errors import ConfigError, ExportError, VerificationError
from fxattn.export.runtime import ort_session

SITES = 6  # CifarResNet depth 20: two bottlenecks in each of three stages (64, 128, 256 ch.)
FOLDED = 4  # of them, h folded into the weights before them: the first two stages
# measured: worst |ort - torch| 3e-7 on logits of magnitude ~0.3, as for the portable export
ATOL, RTOL = 1e-5, 1e-4
BLOCKED = nchwc_block_size() > 0  # onnxruntime blocks convolutions on x86 with AVX2 or AVX-512


@pytest.fixture(scope="module")
def lean() -> torch.nn.Module:
    """The CIFAR lean model with batch norms that are not the identity, so that onnxruntime's
    folded convolutions have biases (which the weight fold scales too)."""
    return cifar_dia_lean(random_norms=True)


@pytest.fixture(scope="module")
def lean_onnx(lean: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ortcpu") / "lean.onnx"
    fxattn.export_onnx(lean, path, torch.randn(2, 3, 32, 32))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort_session(str(path), threads=1)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _onnxruntime_graph(source: Path, batch: int, folder: Path) -> onnx.ModelProto:
    """onnxruntime's own optimised graph of ``source`` at a fixed batch (no fxattn rewrite)."""
    model = onnx.load(str(source))
    fix_batch(model, batch)
    static, optimized = folder / "static.onnx", folder / "ort.onnx"
    onnx.save(model, str(static))
    ort_optimize(static, optimized)
    return onnx.load(str(optimized))


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain.split('.')[-1]}:{n.op_type}" for n in model.graph.node)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "no-fold"])
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_model_matches_pytorch(batch: int, fold: bool, lean: torch.nn.Module,
                                        lean_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "lean.ort-cpu.onnx"
    report = fxattn.compile_ort_cpu(lean_onnx, out, batch_size=batch, fold_weights=fold)
    assert report.dia_multiplies == SITES
    assert report.fused == (SITES if BLOCKED else 0)
    # 32x32 and 16x16 stages: 16 and 32 input channels per filter, fewer than their 1024 and
    # 256 pixels; the 8x8 stage's pool reads its activation, which is written anyway
    assert report.folded == (FOLDED if BLOCKED and fold else 0)
    assert report.max_abs_error is not None and report.max_abs_error <= 1e-5
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = lean(torch.from_numpy(x))
    torch.testing.assert_close(torch.from_numpy(_run(out, x)), want, atol=ATOL, rtol=RTOL)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(meta[METADATA_KEY])["batch_size"] == batch
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no staging folder left


def test_torchscript_exports_get_the_same_rewrites_and_compile(lean: torch.nn.Module,
                                                               lean_onnx: Path,
                                                               tmp_path: Path) -> None:
    """The TorchScript exporter's node names lose DIA's container (``/inner/g1_1/Mul_7``) and
    it writes few shapes; the export records DIA's scopes, the shapes are inferred, and the
    file gets the same exact rewrites and compiles with every multiply fused, as a dynamo
    export does."""
    from fxattn.export.dia_name_scope import NAME_SCOPE_KEY, in_dia

    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "ts.onnx"
    report = fxattn.export_onnx(lean, path, x, exporter="torchscript")
    assert report.exporter == "torchscript" and report.verified
    dynamo = fxattn.export_onnx(lean, tmp_path / "dynamo.onnx", x)
    rewrites = [[n for n in r.notes if n.startswith("exact DIA rewrites")]
                for r in (report, dynamo)]
    assert rewrites[0] == rewrites[1] and rewrites[0]  # the same rewrites, as often
    graph = onnx.load(str(path)).graph
    marked = [n for n in graph.node if any(p.key == NAME_SCOPE_KEY for p in n.metadata_props)]
    assert marked and all(in_dia(n) for n in marked)
    assert not any(in_dia(n) for n in graph.node if n.op_type == "Conv" and "fxattn" not in n.name)
    compiled = fxattn.compile_ort_cpu(path, tmp_path / "ts.b1.onnx", batch_size=1)
    assert compiled.dia_multiplies == SITES and compiled.fused == (SITES if BLOCKED else 0)
    x1 = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = lean(torch.from_numpy(x1))
    torch.testing.assert_close(torch.from_numpy(_run(tmp_path / "ts.b1.onnx", x1)), want,
                               atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not BLOCKED, reason="onnxruntime has no blocked layout on this CPU")
@pytest.mark.parametrize("batch", [1, 2])
def test_every_dia_block_stays_blocked(batch: int, lean_onnx: Path, tmp_path: Path) -> None:
    """onnxruntime's own graph leaves the blocked layout at every DIA block (reorders, and a
    separate Mul, Add and Relu); the compiled one runs each as one blocked depthwise conv."""
    theirs = _ops(_onnxruntime_graph(lean_onnx, batch, tmp_path))
    out = tmp_path / "lean.ort-cpu.onnx"
    fxattn.compile_ort_cpu(lean_onnx, out, batch_size=batch, fold_weights=False,
                           drop_copies=False)
    compiled = onnx.load(str(out))
    ours = _ops(compiled)
    assert theirs["nchwc:ReorderInput"] >= SITES - 3 and ours["nchwc:ReorderInput"] == 0
    assert ours[":Relu"] == theirs[":Relu"] - SITES
    assert ours["nchwc:Conv"] == theirs["nchwc:Conv"] + SITES
    # the only reorders left carry the pooled (B, C, 1, 1) vector of each site and the head's
    # input; onnxruntime's own graph also reorders every branch output and some shortcuts
    assert ours["nchwc:ReorderOutput"] == SITES + 1
    assert theirs["nchwc:ReorderOutput"] >= 2 * SITES + 1
    depthwise = _rewritten_convs(compiled, "Conv")
    assert sorted(_group(n) for n in depthwise) == sorted(
        batch * c for c in (64, 64, 128, 128, 256, 256))
    assert all(len(n.input) == 4 and n.input[3] for n in depthwise)  # the residual is fused


@pytest.mark.skipif(not BLOCKED, reason="onnxruntime has no blocked layout on this CPU")
@pytest.mark.parametrize("batch", [1, 2])
def test_folded_sites_run_the_scaled_convolution_in_place_of_the_original(
        batch: int, lean_onnx: Path, tmp_path: Path) -> None:
    """Where ``h`` is folded, the convolution that made the activation is gone: one blocked
    convolution (one group per image) with the scaled weights and bias sums the residual, and a
    depthwise pass over the weights (viewed as a ``(1, B*O, 1, I)`` image) scales them."""
    theirs = _ops(_onnxruntime_graph(lean_onnx, batch, tmp_path))
    out = tmp_path / "lean.ort-cpu.onnx"
    report = fxattn.compile_ort_cpu(lean_onnx, out, batch_size=batch)
    compiled = onnx.load(str(out))
    ours = _ops(compiled)
    assert report.folded == FOLDED and ours["nchwc:ReorderInput"] == 0
    # each site adds one convolution: a depthwise one, or the weights' scaling (the scaled
    # convolution replaces onnxruntime's)
    assert ours["nchwc:Conv"] == theirs["nchwc:Conv"] + SITES
    fused = _rewritten_convs(compiled, "Conv") + _rewritten_convs(compiled, "ScaledConv")
    scalings = _rewritten_convs(compiled, "ScaleWeights")
    assert sorted(_group(n) for n in fused) == sorted(
        [batch] * FOLDED + [batch * 256] * (SITES - FOLDED))
    assert sorted(_group(n) for n in scalings) == sorted(batch * c for c in (64, 64, 128, 128))
    assert all(len(n.input) == 4 and n.input[3] for n in fused)  # the residual is fused
    folded = [n for n in fused if _group(n) == batch]
    assert all(n.input[2] for n in folded)  # the batch norm's bias, scaled by h
    initializers = {init.name for init in compiled.graph.initializer}
    assert not any(n.input[1] in initializers for n in folded)  # the weights are computed


@pytest.mark.skipif(not BLOCKED, reason="onnxruntime has no blocked layout on this CPU")
@pytest.mark.parametrize("batch", [1, 2])
def test_layout_copies_of_dia_vectors_are_dropped_bit_exactly(batch: int, lean_onnx: Path,
                                                              tmp_path: Path) -> None:
    """The reorder of each pooled vector (a 1x1 blocked image with full blocks has the bytes of
    its NCHW form) and the unsqueeze of each h go; the outputs are bit for bit the same."""
    kept, dropped = tmp_path / "kept.onnx", tmp_path / "dropped.onnx"
    assert fxattn.compile_ort_cpu(lean_onnx, kept, batch, drop_copies=False).copies_dropped == 0
    report = fxattn.compile_ort_cpu(lean_onnx, dropped, batch)
    assert report.copies_dropped == 2 * SITES  # 64, 128 and 256 channels fill 8 or 16 blocks
    before, after = _ops(onnx.load(str(kept))), _ops(onnx.load(str(dropped)))
    assert before["nchwc:ReorderOutput"] == SITES + 1 and after["nchwc:ReorderOutput"] == 1
    assert after[":Unsqueeze"] == before[":Unsqueeze"] - SITES
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(_run(dropped, x), _run(kept, x))


def _rewritten_convs(model: onnx.ModelProto, step: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == NCHWC and n.op_type == "Conv"
            and n.name.startswith("fxattn_ort_cpu.") and n.name.endswith(f"/{step}")]


def _group(node: onnx.NodeProto) -> int:
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "group")


@pytest.mark.parametrize("kind", ["original", "ssia-only"])
def test_model_without_dia_is_onnxruntimes_own_graph(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CifarResNet(depth=20, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    if kind == "ssia-only":
        model = fxattn.strip_ssia(fxattn.transform(model, x, dia=False))
    portable = tmp_path / "portable.onnx"
    fxattn.export_onnx(model, portable, x)
    out = tmp_path / "compiled.onnx"
    report = fxattn.compile_ort_cpu(portable, out, batch_size=1)
    assert report.dia_multiplies == 0 and report.fused == 0 and not report.skipped
    theirs = _onnxruntime_graph(portable, 1, tmp_path)
    compiled = onnx.load(str(out))
    assert [(n.op_type, n.domain, list(n.input), list(n.output)) for n in compiled.graph.node] \
        == [(n.op_type, n.domain, list(n.input), list(n.output)) for n in theirs.graph.node]


@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_y_400mf"])
def test_adds_without_relu_unfilled_blocks_and_squeeze_excitation(name: str,
                                                                  tmp_path: Path) -> None:
    """MobileNetV2: residual adds with no ReLU after them, sites with no residual, 24-channel
    stages that do not fill a 16-channel block (their scales padded with zeros). RegNetY: a
    squeeze-excitation inside the branch (a channel multiply that is not DIA's), 104- and
    440-channel stages. Exported with TorchScript, whose node names lose DIA's scope (the
    export records it)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    lean = fxattn.strip_ssia(fxattn.transform(model, x, ssia=False))
    portable = tmp_path / f"{name}.onnx"
    fxattn.export_onnx(lean, portable, x, exporter="torchscript")
    out = tmp_path / f"{name}.ort-cpu.onnx"
    report = fxattn.compile_ort_cpu(portable, out, batch_size=2)
    assert report.dia_multiplies > 0
    assert report.fused == (report.dia_multiplies if BLOCKED else 0), report.skipped
    compiled = onnx.load(str(out))
    steps = Counter(n.name.rsplit("/", 1)[-1].rstrip("0123456789") for n in compiled.graph.node
                    if n.name.startswith("fxattn_ort_cpu."))
    if BLOCKED:
        assert steps["PadScale"] > 0  # 24 (MobileNetV2), 104 and 440 (RegNetY) channels
    sample = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = lean(torch.from_numpy(sample))
    torch.testing.assert_close(torch.from_numpy(_run(out, sample)), want, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not BLOCKED, reason="onnxruntime has no blocked layout on this CPU")
def test_a_shortcut_onnxruntime_cannot_block_is_left_alone(tmp_path: Path) -> None:
    """A 14-channel shortcut in NCHW (Res2Net's splits): onnxruntime's ReorderInput takes whole
    groups of 4 channels, so the site stays as onnxruntime made it (fusing it made a model that
    failed to run), and the compiled model still matches."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    lean = fxattn.strip_ssia(fxattn.transform(SplitResidual().eval(), x, ssia=False))
    fxattn.export_onnx(lean, tmp_path / "split.onnx", x)
    report = fxattn.compile_ort_cpu(tmp_path / "split.onnx", tmp_path / "split.b1.onnx",
                                    batch_size=1)
    assert report.dia_multiplies == 1 and report.fused == 0
    (why,) = report.skipped.values()
    assert "has 14 channels; onnxruntime blocks only multiples of 4" in why
    sample = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = lean(torch.from_numpy(sample))
    torch.testing.assert_close(torch.from_numpy(_run(tmp_path / "split.b1.onnx", sample)), want,
                               atol=ATOL, rtol=RTOL)


def test_a_compiled_model_that_fails_to_run_is_a_verification_error(
    lean_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime refusing to run the compiled graph is fxattn's VerificationError, one line,
    and nothing is written."""
    from fxattn.deploy import verify

    real = verify.ort_session

    class Failing:
        def __init__(self, session: object) -> None:
            self.session = session

        def run(self, *args: object) -> object:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : ReorderInput\nsecond line")

    monkeypatch.setattr(verify, "ort_session", lambda path, **kw: real(path, **kw)
                        if Path(path) == lean_onnx else Failing(real(path, **kw)))
    with pytest.raises(VerificationError, match="fails to run in onnxruntime .*ReorderInput\\)"):
        fxattn.compile_ort_cpu(lean_onnx, tmp_path / "out.onnx", batch_size=1)
    assert list(tmp_path.iterdir()) == []


def test_a_multiply_after_squeeze_excitation_is_left_alone(tmp_path: Path) -> None:
    """timm's SE-ResNet: DIA's multiply reads the squeeze-excitation's product, which onnxruntime
    computes in NCHW (DIA's pool reads it too): left as onnxruntime made it, and said why."""
    torch.manual_seed(0)
    model = timm.create_model("seresnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    lean = fxattn.strip_ssia(fxattn.transform(model, x, ssia=False))
    portable = tmp_path / "se.onnx"
    fxattn.export_onnx(lean, portable, x)
    report = fxattn.compile_ort_cpu(portable, tmp_path / "se.b1.onnx", batch_size=1)
    assert report.dia_multiplies == 8 and report.fused == 0
    if BLOCKED:
        assert set(report.skipped.values()) == {
            "its activation is not in the blocked layout (it comes from a Mul in NCHW)"}


def test_bad_input_is_refused_and_nothing_is_written(lean_onnx: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    with pytest.raises(ExportError, match="is not a file; export the model first"):
        fxattn.compile_ort_cpu(tmp_path / "missing.onnx", out, batch_size=1)
    for batch in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
            fxattn.compile_ort_cpu(lean_onnx, out, batch_size=batch)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="would overwrite the portable model"):
        fxattn.compile_ort_cpu(lean_onnx, lean_onnx, batch_size=1)
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        fxattn.compile_ort_cpu(not_onnx, out, batch_size=1)
    fixed = tmp_path / "fixed.onnx"
    fxattn.compile_ort_cpu(lean_onnx, fixed, batch_size=2, verify=False)
    with pytest.raises(ConfigError, match="fixed batch of 2, not 4"):
        fxattn.compile_ort_cpu(fixed, out, batch_size=4)

    def differs(*args: object, **kwargs: object) -> float:
        raise VerificationError("the compiled model differs from the portable one")

    monkeypatch.setattr("fxattn.deploy.compile.verify_compiled", differs)
    with pytest.raises(VerificationError):
        fxattn.compile_ort_cpu(lean_onnx, out, batch_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["notes.onnx", *(p.name for p in tmp_path.glob("fixed.onnx*"))])


def test_cli_compile(lean_onnx: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "lean.b1.onnx", tmp_path / "report.json"
    assert main(["compile", str(lean_onnx), "-o", str(out), "--batch", "1", "--json",
                 str(report)]) == 0
    assert "DIA multiplies fused into blocked convolutions" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["batch_size"] == 1 and data["dia_multiplies"] == SITES and out.exists()
    assert data["folded"] == (FOLDED if BLOCKED else 0)
    assert main(["compile", str(lean_onnx), "-o", str(out), "--batch", "1", "--json",
                 str(report), "--no-fold-weights"]) == 0
    assert json.loads(report.read_text())["folded"] == 0
    assert main(["compile", str(tmp_path / "nope.onnx"), "-o", str(out), "--batch", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxattn: error:") and "export the model" in err[0]
    assert main(["compile", str(lean_onnx), "-o", str(out), "--batch", "0"]) == 2
