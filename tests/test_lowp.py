"""Parity and structure of every low-precision / folding option of ``fxattn.export.lowp``.

Each optimisation is checked on a small CIFAR ResNet (2 bottlenecks per stage, 32x32 input):
the rewritten ONNX graph has exactly the expected nodes, only DIA's matrices change, and
onnxruntime's output stays within the mode's documented tolerance of PyTorch's fp32 output.
They run on graphs already rewritten by ``fxattn.export.optimize`` (export_onnx's default).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from models import CifarResNet, TokenResidual

import fxattn
from fxattn.errors import ExportError
from fxattn.export import export_onnx
from fxattn.export.dia_name_scope import dia_matrix_names
from fxattn.export.lowp import LOWP_ATOL, apply_dia_weights, gemm_to_matmul
from fxattn.export.optimize import OnnxOptimize
from fxattn.export.runtime import ort_session
from fxattn.export.state_fold import fold_initial_state

GROUPS = 3  # three stages of 64, 128, 256 channels
SITES = 6  # two blocks per stage
DIA_LINEARS = 4 * SITES  # input and hidden path, two Linear each, at every site


@pytest.fixture(scope="module")
def lean() -> torch.nn.Module:
    torch.manual_seed(0)
    model = CifarResNet(depth=20, num_classes=10).eval()
    net = fxattn.transform(model, torch.randn(2, 3, 32, 32), dia=True, ssia=False)
    return fxattn.strip_ssia(net)


@pytest.fixture(scope="module")
def fp32_onnx(lean: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lowp") / "fp32.onnx"
    # lowp runs on top of the exact rewrites of fxattn.export.optimize (the default); the state
    # fold is left to the tests below, which check what it removes, and the matrices stay
    # shared (test_onnx_optimize quantises the per-site ones of compose_first_layer)
    export_onnx(lean, path, torch.randn(2, 3, 32, 32),
                optimize=OnnxOptimize(fold_initial_state=False, compose_first_layer=False))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort_session(str(path), threads=1)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _inputs(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _torch(lean: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return lean(torch.from_numpy(x)).numpy()


def _dia_gemms(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node
               if n.op_type == "Gemm" and n.input[1].startswith("fxattn_dia."))


def test_exported_dia_linears_are_gemms_on_shared_weights(fp32_onnx: Path) -> None:
    model = onnx.load(str(fp32_onnx))
    assert _dia_gemms(model) == DIA_LINEARS
    assert len(dia_matrix_names(model)) == 4 * GROUPS  # shared: one set of matrices per group


def test_gemm_to_matmul_is_exact(fp32_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fp32_onnx))
    assert gemm_to_matmul(model) == DIA_LINEARS
    onnx.checker.check_model(model)
    assert _dia_gemms(model) == 0
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Gemm"] == 1  # the classifier stays a Gemm: only DIA is touched
    assert ops["MatMul"] == DIA_LINEARS
    # one transposed copy per shared matrix, the originals are gone
    names = dia_matrix_names(model)
    assert len(names) == 4 * GROUPS and all(name.endswith(".T") for name in names)
    path = tmp_path / "matmul.onnx"
    onnx.save(model, str(path))
    x = _inputs()
    np.testing.assert_allclose(_run(path, x), _run(fp32_onnx, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_nbits_quantises_only_dia_and_keeps_parity(
    mode: str, lean: torch.nn.Module, fp32_onnx: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"{mode}.onnx"
    shutil.copy(fp32_onnx, path)
    note = apply_dia_weights(path, mode)
    assert mode in note
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == DIA_LINEARS
    assert ops["Gemm"] == 1 and ops["MatMul"] == 0
    bits = {onnx.helper.get_attribute_value(a) for n in model.graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {8 if mode == "int8" else 4}
    names = [init.name for init in model.graph.initializer]
    assert len(names) == len(set(names))  # shared weights quantised once, no duplicates
    # no fp32 DIA matrix is left: only the packed integers and their per-block scales
    assert [n for n in dia_matrix_names(model) if not n.endswith("_scales")] == []
    packed = [n for n in names if n.endswith(f"_Q{8 if mode == 'int8' else 4}")]
    assert len(packed) == 4 * GROUPS
    assert path.stat().st_size < fp32_onnx.stat().st_size
    x = _inputs()
    error = np.abs(_run(path, x) - _torch(lean, x)).max()
    assert 0 < error <= LOWP_ATOL[mode]


def test_fp16_stores_half_matrices_with_one_cast_each(
    lean: torch.nn.Module, fp32_onnx: Path, tmp_path: Path
) -> None:
    path = tmp_path / "fp16.onnx"
    shutil.copy(fp32_onnx, path)
    apply_dia_weights(path, "fp16")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == 4 * GROUPS
    assert Counter(n.op_type for n in model.graph.node)["Cast"] == 4 * GROUPS
    x = _inputs()
    assert np.abs(_run(path, x) - _torch(lean, x)).max() <= LOWP_ATOL["fp16"]


def test_fold_initial_state_removes_first_site_hidden_path(
    lean: torch.nn.Module, fp32_onnx: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(fp32_onnx))
    removed = fold_initial_state(model)
    # per group: hidden Gemm, ReLU, Gemm, f*c Mul and the c add fold away
    assert removed == 5 * GROUPS
    assert _dia_gemms(model) == DIA_LINEARS - 2 * GROUPS
    assert not any(n.op_type in ("Expand", "Shape") for n in model.graph.node)
    path = tmp_path / "fold.onnx"
    onnx.save(model, str(path))
    x = _inputs()
    np.testing.assert_allclose(_run(path, x), _torch(lean, x), rtol=0, atol=1e-5)


def test_export_onnx_dia_weights_verifies_with_the_mode_tolerance(
    lean: torch.nn.Module, tmp_path: Path
) -> None:
    report = export_onnx(lean, tmp_path / "q.onnx", torch.randn(2, 3, 32, 32), dia_weights="int4",
                         optimize=OnnxOptimize(blocked_scale=True))
    assert report.verified and report.atol == LOWP_ATOL["int4"]
    # on top of export_onnx's exact rewrites: the folded first sites' hidden paths are gone
    assert report.op_counts["MatMulNBits"] == DIA_LINEARS - 2 * GROUPS
    assert report.op_counts["Resize"] == SITES  # blocked_scale composes with the quantiser
    assert any(note.startswith("exact DIA rewrites") for note in report.notes)
    assert 0 < report.max_abs_error <= LOWP_ATOL["int4"]
    assert any("int4" in note for note in report.notes)


def test_dia_weights_with_the_torchscript_exporter(lean: torch.nn.Module, tmp_path: Path) -> None:
    """TorchScript names the DIA weights ``inner.fxattn_dia.*`` (the export wrapper's path);
    its export gets the exact rewrites too (the zero state folded: no hidden path at the first
    site of a group), as a dynamo export does."""
    report = export_onnx(lean, tmp_path / "ts.onnx", torch.randn(2, 3, 32, 32),
                         exporter="torchscript", dia_weights="int8")
    assert report.exporter == "torchscript" and report.verified
    assert report.op_counts["MatMulNBits"] == DIA_LINEARS - 2 * GROUPS
    assert 0 < report.max_abs_error <= LOWP_ATOL["int8"]


def test_bad_mode_and_model_without_dia_are_clear_errors(tmp_path: Path) -> None:
    model = CifarResNet(depth=11, num_classes=10).eval()
    with pytest.raises(ExportError, match="dia_weights='int3'"):
        export_onnx(model, tmp_path / "a.onnx", torch.randn(2, 3, 32, 32), dia_weights="int3")
    assert not (tmp_path / "a.onnx").exists()
    with pytest.raises(ExportError, match="no DIA matrices"):
        export_onnx(model, tmp_path / "b.onnx", torch.randn(2, 3, 32, 32), dia_weights="int8")
    assert not (tmp_path / "b.onnx").exists()


def test_blocks_fit_each_matrix_up_to_the_default(fp32_onnx: Path, tmp_path: Path) -> None:
    """Blocks of 128 rows by default (onnxruntime's quantiser's own), smaller where a matrix
    has fewer rows (a column is padded to whole blocks): every matrix is stored without
    padding here, and the same rows share one scale as with blocks of 32 or more."""
    from fxattn.export.lowp import DEFAULT_BLOCK_SIZE, fitted_block

    assert DEFAULT_BLOCK_SIZE == 128
    assert [fitted_block(rows, 4, 128) for rows in (8, 16, 32, 64, 128, 512)] == \
        [16, 16, 32, 64, 128, 128]
    assert fitted_block(512, 4, 32) == 32  # never above the block size asked for
    path = tmp_path / "int4.onnx"
    shutil.copy(fp32_onnx, path)
    apply_dia_weights(path, "int4")
    model = onnx.load(str(path))
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(attrs) == DIA_LINEARS
    assert {(a["K"], a["block_size"]) for a in attrs} == {
        (k, min(k, 128)) for k in (64, 128, 256, 16, 32)}  # C and C/4 of each group


@pytest.mark.parametrize("block_size", [0, 24, 8, True])
def test_block_size_must_be_a_power_of_two_of_at_least_16(block_size: int, fp32_onnx: Path,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    shutil.copy(fp32_onnx, path)
    before = path.read_bytes()
    with pytest.raises(ExportError, match="power of two"):
        apply_dia_weights(path, "int4", block_size=block_size)
    assert path.read_bytes() == before


def test_nbits_leaves_the_models_own_matmuls_alone(tmp_path: Path) -> None:
    """A token model's own linear layers export as ``MatMul`` with constant weights, which
    onnxruntime's quantiser takes by default: only DIA's are quantised."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    lean = fxattn.strip_ssia(fxattn.transform(TokenResidual(width=64).eval(), x, ssia=False))
    path = tmp_path / "tokens.onnx"
    export_onnx(lean, path, x, verify=False)
    own = sum(1 for n in onnx.load(str(path)).graph.node
              if n.op_type == "MatMul" and not n.input[1].startswith("fxattn_"))
    assert own >= 4  # the embedding and the three blocks
    apply_dia_weights(path, "int4")
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MatMul"] == own
    assert ops["MatMulNBits"] == 4 * 3 - 2  # both paths at each site, less the first's hidden
    # a MatMul without a name (the quantiser excludes by name) is left alone too
    unnamed = tmp_path / "unnamed.onnx"
    export_onnx(lean, unnamed, x, verify=False)
    model = onnx.load(str(unnamed))
    for node in model.graph.node:
        if node.op_type == "MatMul" and not node.input[1].startswith("fxattn_"):
            node.name = ""
    onnx.save(model, str(unnamed))
    apply_dia_weights(unnamed, "int4")
    ops = Counter(n.op_type for n in onnx.load(str(unnamed)).graph.node)
    assert ops["MatMul"] == own and ops["MatMulNBits"] == 4 * 3 - 2
