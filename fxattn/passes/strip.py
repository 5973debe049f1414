"""The second pass: drop everything SSIA, keep DIA, return a lean ``torch.fx.GraphModule``.

The lean module is built from the *evaluation* graph, which never held an SSIA node; building
a fresh GraphModule from it copies only the modules that graph uses, so the SSIA module and any
training-only parameters (the ``channel`` map's projections) are gone. With ``dia=False`` the
result is node for node the original model's evaluation graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx

from ..analysis.graph import count_parameters
from ..modules.graph_module import AttentionGraphModule
from ..names import FXATTN_META, SSIA_ROOT


@dataclass(frozen=True)
class StripReport:
    removed_nodes: int  # SSIA nodes of the training graph that the lean graph does not have
    removed_parameters: int
    parameters: int
    dia_nodes: int


def strip_pass(net: AttentionGraphModule) -> tuple[fx.GraphModule, StripReport]:
    graph = copy.deepcopy(net.eval_graph)
    for node in list(graph.nodes):  # defensive: an eval graph never holds SSIA nodes
        if node.meta.get(FXATTN_META) == "ssia" or str(node.target).startswith(SSIA_ROOT):
            graph.erase_node(node)
    lean = copy.deepcopy(fx.GraphModule(net, graph, class_name=type(net).__name__))
    lean.eval()
    removed = sum(1 for n in net.train_graph.nodes if n.meta.get(FXATTN_META) == "ssia")
    ssia = getattr(net, SSIA_ROOT, None)
    report = StripReport(
        removed_nodes=removed,
        removed_parameters=count_parameters(ssia) if ssia is not None else 0,
        parameters=count_parameters(lean),
        dia_nodes=sum(1 for n in graph.nodes if n.meta.get(FXATTN_META) == "dia"),
    )
    lean.meta["fxattn_strip"] = report
    lean.meta["fxattn_info"] = net.fxattn_info
    return lean, report
