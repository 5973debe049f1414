"""Insert the SSIA branch into the *training* graph.

One ``call_module`` node, ``fxattn_ssia(tap_0, ..., tap_n)``, placed just before the output:
it computes the loss from the stage outputs and stores it on the module for
:func:`fxattn.ssia_loss`. The graph's output is untouched, so the transformed model returns
exactly what the original returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx

from ..analysis import Tap
from .insert_dia import FXATTN_META

SSIA_ROOT = "fxattn_ssia"


@dataclass(frozen=True)
class SSIAInsertReport:
    taps: tuple[str, ...]
    inserted_nodes: int


def insert_ssia(
    graph: fx.Graph, taps: list[Tap], replaced: dict[str, str] | None = None
) -> tuple[fx.Graph, SSIAInsertReport]:
    """Return a copy of ``graph`` whose forward also runs ``fxattn_ssia`` on the taps.

    ``replaced`` maps a tap that DIA re-routed (stage-output sites) to the node carrying the
    attended value, so SSIA sees the same features as the rest of the network.
    """
    replaced = replaced or {}
    new_graph = copy.deepcopy(graph)
    nodes = {node.name: node for node in new_graph.nodes}
    features = tuple(nodes[replaced.get(tap.node, tap.node)] for tap in taps)
    output = next(iter(new_graph.find_nodes(op="output")))
    with new_graph.inserting_before(output):
        call = new_graph.call_module(SSIA_ROOT, features)
    call.meta[FXATTN_META] = "ssia"
    new_graph.lint()
    return new_graph, SSIAInsertReport(taps=tuple(n.name for n in features), inserted_nodes=1)
