"""Names an ONNX ``If`` branch reads from the enclosing graph count as read
(``fxattn.export.onnx_graph``).

A detector's post-processing holds ``If`` nodes whose branches read outer tensors by name; a
pass that looked only at ``node.input`` dropped their producers (the exact DIA rewrites of a
whole Faster R-CNN failed the checker: "Nodes in a graph must be topologically sorted").
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from fxattn.export.onnx_graph import (
    graph_reads,
    has_control_flow,
    node_reads,
    readers,
    remove_dead_nodes,
)
from fxattn.export.state_fold import fold_initial_state


def branch_model() -> onnx.ModelProto:
    """``y = If(flag, then: Identity(r), else: Neg(r))`` with ``r = Relu(x)`` read only by the
    branches, and a dead ``Sigmoid``."""
    then = helper.make_graph([helper.make_node("Identity", ["r"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["r"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Sigmoid", ["x"], ["dead"], name="dead"),
         helper.make_node("If", ["flag"], ["y"], name="if", then_branch=then, else_branch=other)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_branch_reads_its_outer_names() -> None:
    model = branch_model()
    node = {n.name: n for n in model.graph.node}["if"]
    assert node_reads(node) == ["flag", "r", "r"]  # the condition, then each branch's read
    assert {"flag", "r", "x", "y"} <= graph_reads(model.graph)
    assert [n.name for n in readers(model.graph)["r"]] == ["if", "if"]


def test_dead_node_removal_keeps_what_only_a_branch_reads() -> None:
    model = branch_model()
    remove_dead_nodes(model)
    assert [n.name for n in model.graph.node] == ["relu", "if"]  # the Sigmoid alone is dead
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x, "flag": np.array(False)})[0],
                                  [-0.0, -2.0])


def test_the_state_fold_keeps_a_tensor_a_branch_reads() -> None:
    """A zero tensor read by a branch keeps its producer (the branch is not rewired)."""
    model = branch_model()
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [2], [0.0, 0.0])
    graph = model.graph
    graph.node.insert(0, helper.make_node("Constant", [], ["z"], value=zero, name="zeros"))
    graph.node[1].CopyFrom(helper.make_node("Mul", ["x", "z"], ["r"], name="relu"))
    fold_initial_state(model)
    assert [n.name for n in model.graph.node] == ["zeros", "relu", "if"]
    onnx.checker.check_model(model, full_check=True)


def test_control_flow_is_found() -> None:
    assert has_control_flow(branch_model().graph)
    plain = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert not has_control_flow(plain)
