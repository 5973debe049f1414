"""DistributedDataParallel over a transformed module: 2 CPU processes, gloo, loopback only.

Each rank trains on its own data shard with ``criterion(ddp(x), y) + fxattn.ssia_loss(ddp)``;
DDP averages the gradients, so after the steps every parameter must be bitwise identical
across ranks (checked by gathering them), while the per-rank losses differ (the shards differ).
BatchNorm statistics follow DDP's usual rule (rank 0's buffers are broadcast at each forward).
DDP runs with ``find_unused_parameters=False``: a parameter that took no part in the backward
would make it fail, which also covers the training-only SSIA parameters of the ``channel`` map.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from training_helpers import batch, transformed

import fxattn

WORLD = 2
STEPS = 3
MAPS = ("spatial", "channel")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(rank: int, map_: str) -> dict[str, object]:
    # Different seeds per rank: DDP's broadcast at construction must make them equal.
    net = transformed(seed=rank, ssia=fxattn.SSIA(map=map_))
    ddp = DistributedDataParallel(net, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    losses, ssia = [], []
    for step in range(STEPS):
        x, y = batch(step * WORLD + rank)  # this rank's shard
        loss = criterion(ddp(x), y) + fxattn.ssia_loss(ddp)
        ssia.append(fxattn.ssia_loss(ddp).item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    # BatchNorm running stats are per rank after the last training forward (each rank saw
    # its own shard); DDP broadcasts rank 0's buffers at the start of every forward, so an
    # eval-mode forward (which updates no statistics) makes them equal again.
    ddp.eval()
    ddp(batch(0)[0])
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    gathered: list[dict[str, torch.Tensor] | None] = [None] * WORLD
    dist.all_gather_object(gathered, state)
    return {"states": gathered, "params": params, "losses": losses, "ssia": ssia}


def _train_fsdp2(rank: int) -> dict[str, object]:
    """FSDP2 (``fully_shard``): parameters sharded as DTensors over a CPU device mesh.

    The graph calls leaf modules directly (its container modules such as ``layer1`` never
    run), so the sharding units are the called leaves plus the root, never the containers.
    ``fully_shard`` does not broadcast: every rank builds the same initial weights.
    """
    net = transformed(seed=0)
    mesh = init_device_mesh("cpu", (WORLD,))
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fully_shard(module, mesh=mesh)
    model = fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    losses = []
    for step in range(STEPS):
        x, y = batch(step * WORLD + rank)
        loss = criterion(model(x), y) + fxattn.ssia_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in model.state_dict().items()}
    params = {k: v.detach().clone() for k, v in full.items() if k in dict(net.named_parameters())}
    model.eval()  # the graph swap works under fully_shard, and so does the way back
    with torch.no_grad():
        model(batch(0)[0])
    model.train()
    model(batch(0)[0])
    return {"params": params, "losses": losses, "ssia_again": fxattn.ssia_loss(model).item()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for map_ in MAPS:  # one process group for both cases: spawning is the slow part
            torch.save(_train(rank, map_), f"{out}.{map_}.rank{rank}")
        torch.save(_train_fsdp2(rank), f"{out}.fsdp2.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("ddp") / "ddp")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("map_", MAPS)
def test_ddp_two_ranks_gloo(results: str, map_: str) -> None:
    ranks = [torch.load(f"{results}.{map_}.rank{r}", weights_only=True) for r in range(WORLD)]
    states = ranks[0]["states"]
    assert len(states) == WORLD and list(states[0]) == list(states[1])
    for rank, record in enumerate(ranks):  # parameters as they were right after training
        for key, value in record["params"].items():
            assert torch.equal(value, states[1 - rank][key]), (rank, key)
    assert any(k.startswith("fxattn_dia.") for k in states[0])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    reference = transformed(seed=0, ssia=fxattn.SSIA(map=map_)).state_dict()
    moved = [k for k in reference if not torch.equal(reference[k], states[0][k])]
    assert len(moved) > len(reference) // 2  # the steps did update the (synchronised) weights
    for record in ranks:
        assert len(record["losses"]) == STEPS
        assert all(v > 0 and v == v for v in record["ssia"])  # finite, positive, per rank
    assert ranks[0]["ssia"] != ranks[1]["ssia"]  # computed from each rank's own batch


def test_fsdp2_two_ranks_gloo_matches_ddp(results: str) -> None:
    ranks = [torch.load(f"{results}.fsdp2.rank{r}", weights_only=True) for r in range(WORLD)]
    ddp = torch.load(f"{results}.spatial.rank0", weights_only=True)
    assert list(ranks[0]["params"]) == list(ddp["params"])
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
        # the same gradients, averaged by reduce-scatter instead of all-reduce
        torch.testing.assert_close(value, ddp["params"][key], rtol=1e-5, atol=1e-6, msg=key)
    for rank, record in enumerate(ranks):
        own = torch.load(f"{results}.spatial.rank{rank}", weights_only=True)["losses"]
        assert record["losses"] == pytest.approx(own, rel=1e-5)
        assert record["ssia_again"] > 0
