"""Folding DIA's zero initial state: the first site's hidden path becomes a constant.

The compiler option the SPEC names: at the first site of a group ``h = c = 0``, so the hidden
path there is the constant ``Wh2 ReLU(bh1) + bh2`` and ``f * c`` vanishes.
:func:`fold_initial_state` propagates the known zeros through the graph and folds what becomes
constant; it runs first among the exact rewrites (:mod:`fxattn.export.optimize`) and, for
low-precision files, in :func:`fxattn.export.lowp.apply_dia_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ExportError
from .onnx_graph import (
    node_attr,
    node_reads,
    remove_dead_nodes,
    remove_unused_initializers,
    subgraphs,
)


def fold_initial_state(
    model: Any, check: bool = True, seeds: Callable[[Any], bool] | None = None
) -> int:
    """Fold DIA's zero initial state: the first site's hidden path becomes a constant.

    A tensor is *known zero* when it comes from ``Expand`` of a zero scalar or ``ConstantOfShape``
    with value 0 (how ``torch.zeros_like`` exports), or from a ``Constant`` of zeros (how the
    TorchScript exporter writes it where the batch is fixed, as in a detector). Zeros propagate
    through ``Mul`` (anything times zero), ``Add`` (zero plus x is x), ``Relu``; a
    ``Gemm``/``MatMul`` of a zero or constant row with constant weights becomes a constant row
    ``(1, N)`` that broadcasts over the batch in the ``Add`` that follows. Returns the number of
    nodes removed. ``check=False`` leaves ``onnx.checker`` to the caller (it serialises the
    whole model); ``seeds`` limits the zeros folded to those made by nodes it accepts
    (``fxattn.export.optimize`` passes DIA's own, so zeros elsewhere in a model, whose
    broadcasts the fold does not track, stay as they are).
    """
    import onnx
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    consts: dict[str, np.ndarray] = {n: numpy_helper.to_array(t) for n, t in inits.items()}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node_attr(node, "value", None))
    zeros: set[str] = set()
    rows: dict[str, np.ndarray] = {}  # batch-independent rows (1, N)
    alias: dict[str, str] = {}
    removed = 0
    new_nodes = []

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    # tensors an If/Loop branch reads by name: their nodes stay (a branch is not rewired)
    pinned = {name for node in model.graph.node for graph in subgraphs(node)
              for inner in graph.node for name in node_reads(inner)}
    for node in model.graph.node:
        node.input[:] = [resolve(i) for i in node.input]
        ins = list(node.input)
        op = node.op_type
        out = node.output[0] if node.output else ""
        if out in pinned:
            new_nodes.append(node)
            continue
        seed = seeds is None or seeds(node)
        if op == "Expand" and seed and ins[0] in consts and not np.any(consts[ins[0]]):
            zeros.add(out)
        elif op == "Constant" and seed and out in consts and consts[out].size \
                and not np.any(consts[out]):
            zeros.add(out)  # a zero state the exporter folded (fixed batch: TorchScript)
        elif op == "ConstantOfShape" and seed and not np.any(
            numpy_helper.to_array(node_attr(node, "value", None)) if node_attr(node, "value", None)
            is not None else 0.0
        ):
            zeros.add(out)
        elif op in ("Gemm", "MatMul") and (ins[0] in zeros or ins[0] in rows) and ins[1] in consts:
            a = rows.get(ins[0])
            weight = consts[ins[1]]
            if op == "Gemm" and node_attr(node, "transB", 0):
                weight = weight.T
            value = np.zeros((1, weight.shape[0]), np.float32) if a is None else a
            value = value @ weight
            if op == "Gemm" and len(ins) > 2 and ins[2]:
                value = value + consts[ins[2]]
            rows[out] = value.astype(np.float32)
            removed += 1
            continue
        elif op == "Relu" and ins[0] in rows:
            rows[out] = np.maximum(rows[ins[0]], 0)
            removed += 1
            continue
        elif op == "Relu" and ins[0] in zeros:
            zeros.add(out)
            removed += 1
            continue
        elif op == "Mul" and any(i in zeros for i in ins):
            zeros.add(out)
            removed += 1
            continue
        elif op == "Add" and len(ins) == 2 and any(i in zeros for i in ins):
            other = ins[1] if ins[0] in zeros else ins[0]
            if other in zeros:
                zeros.add(out)
            else:
                alias[out] = other
            removed += 1
            continue
        new_nodes.append(node)
    # materialise constant rows that are still used
    used = {i for node in new_nodes for i in node_reads(node)}
    for name, value in rows.items():
        if name in used:
            model.graph.initializer.append(numpy_helper.from_array(value, name))
    for out in model.graph.output:
        if out.name in alias or out.name in zeros or out.name in rows:
            raise ExportError(f"cannot fold the initial state: graph output {out.name} is constant")
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_dead_nodes(model)
    remove_unused_initializers(model)
    if check:
        onnx.checker.check_model(model)
    return removed
