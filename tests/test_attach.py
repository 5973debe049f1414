"""``SSIA(attach=True)``: the SSIA term rides on the output, so an unchanged loop trains it.

Each case compares one optimizer step of a module transformed with ``attach=True`` and a loss
that never mentions SSIA against one step of the same module (same seeds, so the same DIA
weights) transformed with ``attach=False`` and the explicit ``+ fxattn.ssia_loss(net)``.
Measured differences are 0 in fp32 eager (the same ops in the same order), so the tolerance is
fp32 rounding (rtol 1e-6, atol 1e-7); compiled and bf16 runs use wider, stated bounds.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from training_helpers import batch, example, tiny_model, transformed

import fxattn

CRITERION = nn.CrossEntropyLoss()
EXACT = {"rtol": 1e-6, "atol": 1e-7}


def _params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _assert_params_close(got: nn.Module, want: nn.Module, **tol: float) -> None:
    a, b = _params(got), _params(want)
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **(tol or EXACT))


def _one_step(
    net: nn.Module,
    task: Callable[[Any, torch.Tensor], torch.Tensor],
    explicit: bool,
    accumulate: int = 1,
) -> nn.Module:
    """One SGD step over ``accumulate`` micro-batches, the loss divided by ``accumulate``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for micro in range(accumulate):
        x, y = batch(micro)
        loss = task(net(x), y)
        if explicit:
            loss = loss + fxattn.ssia_loss(net)
        (loss / accumulate).backward()
    opt.step()
    return net


def _pair(**ssia: Any) -> tuple[nn.Module, nn.Module]:
    attached = transformed(seed=0, ssia=fxattn.SSIA(attach=True, **ssia))
    explicit = transformed(seed=0, ssia=fxattn.SSIA(**ssia))
    return attached, explicit


def test_tensor_output_step_matches_explicit_loss() -> None:
    attached, explicit = _pair()
    _assert_params_close(_one_step(attached, CRITERION, False),
                         _one_step(explicit, CRITERION, True))
    value = fxattn.ssia_loss(attached)
    assert not value.requires_grad and value.item() > 0  # detached: for logging only


def test_adding_ssia_loss_in_attach_mode_does_not_double_the_gradient() -> None:
    attached, explicit = _pair()
    _assert_params_close(_one_step(attached, CRITERION, True), _one_step(explicit, CRITERION, True))


def test_attach_option_validated_and_recorded() -> None:
    with pytest.raises(fxattn.ConfigError, match="attach"):
        fxattn.SSIA(attach="yes")  # type: ignore[arg-type]
    assert fxattn.SSIA(attach=True).to_dict()["attach"] is True


# --------------------------------------------------------------------------- output structures


class Pair(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    tag: str = "x"


class Wrapped(nn.Module):
    """The tiny ResNet returning its logits inside a container of the given kind."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = tiny_model(0)

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.body(x)
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "namedtuple":
            return Pair(logits, logits * 2)
        if self.kind == "dict":
            return OrderedDict(logits=logits, aux=logits.detach())
        return Out(logits)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, dict):
        return out["logits"]
    return out.logits


@pytest.mark.parametrize("kind", ["tuple", "namedtuple", "dict", "dataclass"])
def test_container_outputs(kind: str) -> None:
    nets = []
    for attach in (True, False):
        torch.manual_seed(0)
        nets.append(fxattn.transform(Wrapped(kind), example(),
                                     ssia=fxattn.SSIA(attach=attach)))
    attached, explicit = nets
    with torch.no_grad():
        out = attached(batch(0)[0])
        assert type(out) is type(explicit(batch(0)[0]))  # the same structure comes back
    if kind == "dataclass":
        assert out.tag == "x"
    task = lambda out, y: CRITERION(_logits(out), y)  # noqa: E731
    attached.zero_grad()
    _assert_params_close(_one_step(attached, task, False), _one_step(explicit, task, True))


class WithLoss(nn.Module):
    """A model that computes its own loss (like a Hugging Face model given ``labels``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_model(0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}


def _with_loss(attach: bool) -> nn.Module:
    torch.manual_seed(0)
    return fxattn.transform(WithLoss(), (example(), batch(0)[1][:4]),
                            ssia=fxattn.SSIA(attach=attach))


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
def test_own_scalar_loss_carries_accumulation_and_loss_scaling(
    accumulate: int, loss_scale: float
) -> None:
    """Dividing the model's loss by N and multiplying it by S scales the SSIA term alike."""
    nets = {attach: _with_loss(attach) for attach in (True, False)}
    for attach, net in nets.items():
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for micro in range(accumulate):
            x, y = batch(micro)
            loss = net(x, y)["loss"]
            if not attach:
                loss = loss + fxattn.ssia_loss(net)
            (loss * loss_scale / accumulate).backward()
        for p in net.parameters():
            p.grad /= loss_scale  # what GradScaler.unscale_ does
        opt.step()
    _assert_params_close(nets[True], nets[False], rtol=1e-6, atol=1e-6)


def test_grad_scaler_with_own_loss() -> None:
    nets = {attach: _with_loss(attach) for attach in (True, False)}
    for attach, net in nets.items():
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        x, y = batch(0)
        loss = net(x, y)["loss"]
        if not attach:
            loss = loss + fxattn.ssia_loss(net)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    _assert_params_close(nets[True], nets[False], rtol=1e-6, atol=1e-6)


def test_logits_output_with_accumulation_uses_set_ssia_scale() -> None:
    attached, explicit = _pair()
    fxattn.set_ssia_scale(attached, 1 / 2)  # the loop divides by its 2 accumulation steps
    _assert_params_close(_one_step(attached, CRITERION, False, accumulate=2),
                         _one_step(explicit, CRITERION, True, accumulate=2))
    with pytest.raises(fxattn.NotTransformedError, match="attach=True"):
        fxattn.set_ssia_scale(explicit, 0.5)


def test_warns_once_when_the_attached_gradient_never_arrives() -> None:
    net = transformed(ssia=fxattn.SSIA(attach=True))
    x, _ = batch(0)
    net(x)  # a training forward whose output no backward uses
    with pytest.warns(RuntimeWarning, match="got no gradient"):
        net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x)  # once only
        CRITERION(net(x), batch(0)[1]).backward()
        with torch.no_grad():
            net(x)  # nothing attached without grad


# --------------------------------------------------------------------------- precision, compile


def test_bf16_autocast_matches_explicit() -> None:
    attached, explicit = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _one_step(attached, CRITERION, False)
        _one_step(explicit, CRITERION, True)
    _assert_params_close(attached, explicit)  # bf16, but the same ops in the same order


def test_torch_compile_matches_explicit() -> None:
    torch._dynamo.reset()
    attached, explicit = _pair()
    compiled = torch.compile(attached, backend="aot_eager")
    _one_step(compiled, CRITERION, False)
    _one_step(explicit, CRITERION, True)
    # AOT autograd reorders fp32 reductions: measured max difference ~1e-8
    _assert_params_close(attached, explicit, rtol=1e-5, atol=1e-6)
    assert fxattn.ssia_loss(compiled).item() == pytest.approx(
        fxattn.ssia_loss(explicit).item(), rel=1e-5)


# --------------------------------------------------------------------------- eval, strip, export


def test_eval_and_strip_attach_nothing(tmp_path: Any) -> None:
    attached, explicit = _pair()
    x, _ = batch(0)
    attached.eval()
    explicit.eval()
    with torch.no_grad():
        assert torch.equal(attached(x), explicit(x))
    assert attached.eval_graph.python_code("self").src == explicit.eval_graph.python_code(
        "self").src
    lean_a, lean_e = fxattn.strip_ssia(attached), fxattn.strip_ssia(explicit)
    assert lean_a.code == lean_e.code
    assert not any("attach" in str(n.target) for n in lean_a.graph.nodes)
    paths = [tmp_path / "a.onnx", tmp_path / "e.onnx"]
    for lean, path in zip((lean_a, lean_e), paths, strict=True):
        fxattn.export_onnx(lean, path, example())
    import onnx

    graphs = [onnx.load(str(p)).graph for p in paths]
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    for a, b in zip(graphs[0].initializer, graphs[1].initializer, strict=True):
        assert a.name == b.name and a.raw_data == b.raw_data


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {}
        for attach in (True, False):
            ddp = DistributedDataParallel(transformed(seed=0, ssia=fxattn.SSIA(attach=attach)))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            x, y = batch(rank)  # each rank its own shard
            loss = CRITERION(ddp(x), y)
            if not attach:
                loss = loss + fxattn.ssia_loss(ddp)
            loss.backward()
            opt.step()
            result[attach] = _params(ddp.module)
        torch.save(result, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_attach_matches_explicit(tmp_path: Any) -> None:
    """Per rank, once per forward, reduced by DDP's own all-reduce: same step as explicit."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    for key, value in ranks[0][True].items():
        torch.testing.assert_close(value, ranks[0][False][key], msg=key, **EXACT)
        assert torch.equal(value, ranks[1][True][key]), key  # ranks stay in sync


class _Criterion:
    """An ultralytics-style criterion: (loss to backpropagate, dict of detached items)."""

    hyp = {"box": 7.5}

    def __call__(self, preds: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict]:
        loss = preds.square().mean()
        return loss, {"box_loss": loss.detach()}


def test_ultralytics_loss_items_gain_the_ssia_value_and_copy_with_the_module() -> None:
    import copy
    import pickle

    from fxattn.ssia_logging import SSIALossItems

    net = transformed(ssia=fxattn.SSIA(attach=True))
    net.criterion = SSIALossItems(_Criterion(), net)
    x = example()
    net.train()
    loss, items = net.criterion(net(x), {})
    assert set(items) == {"box_loss", "ssia_loss"}
    assert items["ssia_loss"].item() == pytest.approx(fxattn.ssia_loss(net).item())
    assert loss.requires_grad and net.criterion.hyp == {"box": 7.5}  # the criterion's own
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):  # EMA, checkpoints
        assert copied.criterion.net is copied and copied.criterion.hyp == {"box": 7.5}
    net.eval()
    with torch.no_grad():
        assert set(net.criterion(net(x), {})[1]) == {"box_loss"}  # SSIA does not run in eval
