from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


def pytest_configure(config: object) -> None:
    torch.manual_seed(0)
    # Under pytest-xdist (the README's test command runs one worker per core), each worker
    # gets its share of the cores: torch's default of one thread per core in every worker
    # would oversubscribe the machine.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True, scope="module")
def _seeded_module() -> None:
    """Module fixtures and tests start from one random state, whichever files ran before in
    their worker (xdist spreads the files over workers in no fixed order)."""
    _seed()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    _seed()


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key
