"""The graph edits of ``benchmarks/dia_int4_ablation.py`` take away what they say and leave
a model onnxruntime runs (on a small compiled CIFAR ResNet with int4 DIA matrices)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from models import cifar_dia_lean

import fxattn
from fxattn.export.runtime import ort_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dia_int4_ablation  # noqa: E402


def test_standin_and_no_cell_take_away_the_products_and_the_cell(tmp_path: Path) -> None:
    lean = cifar_dia_lean()
    x = torch.randn(2, 3, 32, 32)
    fxattn.export_onnx(lean, tmp_path / "int4.onnx", x, dia_weights="int4",
                       exporter="torchscript")
    fxattn.compile_ort_cpu(tmp_path / "int4.onnx", tmp_path / "int4.b1.onnx", batch_size=1)
    compiled = onnx.load(str(tmp_path / "int4.b1.onnx"))
    ops = Counter(n.op_type for n in compiled.graph.node)
    assert ops["MatMulNBits"] > 0 and ops["GlobalAveragePool"] > 0

    feed = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    outputs = {}
    for name, edit in (("standin", dia_int4_ablation.standin),
                       ("nocell", dia_int4_ablation.no_cell)):
        edited = edit(compiled)
        counts = Counter(n.op_type for n in edited.graph.node)
        assert counts["MatMulNBits"] == 0
        if name == "nocell":  # the cell and its pools are gone (the head's pool stays), the
            # scaled convolutions stay
            assert ops["GlobalAveragePool"] == 7 and counts["GlobalAveragePool"] == 1
            assert counts["Sigmoid"] == 0
            assert sum(n.name.endswith("/ReshapeW") for n in edited.graph.node) == \
                sum(n.name.endswith("/ReshapeW") for n in compiled.graph.node) > 0
        else:  # only the products are replaced
            assert counts["Sigmoid"] == ops["Sigmoid"]
        path = tmp_path / f"{name}.onnx"
        onnx.save(edited, str(path))
        session = ort_session(str(path))
        outputs[name] = session.run(None, {session.get_inputs()[0].name: feed})[0]
    assert {o.shape for o in outputs.values()} == {(1, 10)}
