"""``DIA(init="identity")``: a transformed model computes exactly what the original computes.

For trained weights (issue 30): on models outside the project's usual lists (timm, torchvision,
Hugging Face, a detector's backbone alone and scoped in a detector-like wrapper, a video model,
ViT tokens, Swin V2's channels-last grids, channels-last memory) the outputs equal the
original's (``torch.testing.assert_close`` defaults) in train and eval mode right after
``transform``, after ``strip_ssia``, and in onnxruntime; one optimizer step on a task loss moves
every DIA module. Also: ``init="paper"`` keeps today's state_dict keys, the plan and CLI say
which init is used, save / load round-trip, and :func:`fxattn.param_groups`.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pipeline import call, floats
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import BasicBlock

import fxattn
from fxattn.cli import main
from fxattn.diagnostics import capture_attention
from fxattn.export.lowp import LOWP_ATOL, LOWP_RTOL
from fxattn.modules.dia import DIALSTMCell, SharedSE
from fxattn.names import DIA_ROOT

Case = tuple[nn.Module, Any]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """These models are small: one thread is as fast alone and far faster on a shared machine
    (the file took 35 s with one thread, 100 s with two, on 2 cores at load 3.5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _as_if_trained(model: nn.Module) -> nn.Module:
    """Norm layers as training leaves them, not as initialised: timm zero-initialises the last
    BatchNorm of each residual branch (``zero_init_last``), which would make every branch, and
    with it the gates' first gradient, zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.1, 0.1),
                                        ("running_mean", -0.1, 0.1), ("running_var", 0.5, 1.5)):
                    tensor = getattr(module, name, None)
                    if isinstance(tensor, torch.Tensor):
                        tensor.copy_(torch.empty_like(tensor).uniform_(low, high,
                                                                       generator=generator))
    return model


class _TinyResNet(nn.Module):
    """Two stages of two basic blocks (8 then 16 channels): several sites per group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2, downsample=down),
                                    BasicBlock(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    return _as_if_trained(_TinyResNet()), torch.randn(4, 3, 16, 16)


def _timm() -> Case:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    return model, torch.randn(2, 3, 32, 32)


def _torchvision_channels_last() -> Case:
    model = torchvision.models.mnasnet0_5(num_classes=5).to(memory_format=torch.channels_last)
    return model, torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)


def _hf_vit() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=3,
                                    hidden_dropout_prob=0.1)  # train mode: dropout RNG too
    model = transformers.ViTForImageClassification(config)
    return model, {"pixel_values": torch.randn(2, 3, 32, 32)}


def _swin_v2() -> Case:
    """A tiny torchvision Swin V2: residual adds on ``(B, H, W, C)`` channels-last grids."""
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                            window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=5,
                            block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    return model, torch.randn(2, 3, 32, 32)


def _video() -> Case:
    return torchvision.models.video.mc3_18(num_classes=4), torch.randn(2, 3, 2, 16, 16)


def _fpn_backbone() -> Case:
    """A detector's backbone (ResNet-18 + FPN) on its own: a dict of feature maps out."""
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return backbone, torch.randn(2, 3, 64, 64)


class _Detector(nn.Module):
    """Detector-shaped: a backbone that traces, a head with Python on the data around it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                            trainable_layers=5)
        self.head = nn.Conv2d(256, 4, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x)
        return [self.head(f).flatten(1).amax(1) for f in features.values() if f.shape[-1] > 2]


# (id, builder, DIA options, ssia, ONNX exporter to check in onnxruntime or None). ONNX
# export takes 4-12 s a model here, so three cases check it, with both exporters.
CASES: list[tuple[str, Callable[[], Case], dict[str, Any], bool, str | None]] = [
    ("timm-resnet10t", _timm, {}, True, "auto"),
    ("torchvision-mnasnet-channels-last", _torchvision_channels_last, {"module": "se"}, True,
     "torchscript"),
    ("hf-vit-tokens", _hf_vit, {}, True, "auto"),
    ("swin-v2-channels-last-grids", _swin_v2, {"share": "none"}, True, None),
    ("video-mc3", _video, {"module": "se", "share": "channels"}, True, None),
    ("fpn-backbone", _fpn_backbone, {}, False, None),
]


def _assert_same(got: Any, expected: Any) -> None:
    got, expected = floats(got), floats(expected)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def _forward(module: nn.Module, inputs: Any, *, train: bool, seed: int = 1) -> Any:
    module.train(train)
    torch.manual_seed(seed)  # the same dropout masks for the original and the transformed
    with torch.no_grad():
        return call(module, inputs)


def _onnx_outputs(path: Path, inputs: Any) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    feed = {i.name: v.contiguous().numpy() for i, v in zip(session.get_inputs(), values,
                                                           strict=True)}
    return session.run(None, feed)


def _gates(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.gate.detach().clone() for name, m in net.named_modules()
            if isinstance(m, (DIALSTMCell, SharedSE))}


@pytest.mark.parametrize(("case", "make", "options", "ssia", "onnx"), CASES,
                         ids=[c[0] for c in CASES])
def test_identity_init_computes_the_original(
    case: str, make: Callable[[], Case], options: dict[str, Any], ssia: bool,
    onnx: str | None, tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model, inputs = make()
    _as_if_trained(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = fxattn.transform(model, inputs, dia=fxattn.DIA(init="identity", **options),
                               ssia=ssia)
    assert net.plan.sites and net.plan.dia.init == "identity"
    reference = copy.deepcopy(model)  # train-mode forwards move batch-norm statistics alike
    _assert_same(_forward(net, inputs, train=False), _forward(reference, inputs, train=False))
    _assert_same(_forward(net, inputs, train=True), _forward(reference, inputs, train=True))
    lean = fxattn.strip_ssia(net)
    expected = _forward(reference, inputs, train=False)
    _assert_same(_forward(lean, inputs, train=False), expected)
    if onnx is not None:
        report = fxattn.export_onnx(lean, tmp_path / "lean.onnx", inputs, batch_sizes=(2, 3),
                                    exporter=onnx)
        assert report.verified
        got = [torch.from_numpy(a) for a in _onnx_outputs(tmp_path / "lean.onnx", inputs)]
        _assert_same(got, expected)

    # one optimizer step on a task loss: every DIA module's gate moves off zero
    before = _gates(net)
    net.train()
    out = call(net, inputs)
    loss = sum(t.float().pow(2).mean() for t in floats(out)) + fxattn.ssia_loss(net)
    opt = torch.optim.SGD(fxattn.param_groups(net, lr=1e-3, new_lr=1e-1))
    loss.backward()
    opt.step()
    after = _gates(net)
    assert len(before) == len(net.plan.dia_modules)
    for name, gate in before.items():
        assert torch.all(gate == 0) and not torch.equal(after[name], gate), name


def test_identity_model_exports_low_precision_and_compiles_for_ort_cpu(tmp_path: Path) -> None:
    model, x = _tiny()
    net = fxattn.transform(model.eval(), x, dia=fxattn.DIA(init="identity"), ssia=False)
    with torch.no_grad():
        for gate in _gates(net):
            net.get_submodule(gate).gate.uniform_(0.2, 0.8)  # opened, as after fine-tuning
    lean = fxattn.strip_ssia(net)
    report = fxattn.export_onnx(lean, tmp_path / "lean.onnx", x, dia_weights="int8")
    assert report.verified
    compiled = fxattn.compile_ort_cpu(tmp_path / "lean.onnx", tmp_path / "lean.b4.onnx",
                                      batch_size=4)
    assert compiled.dia_multiplies == len(net.plan.sites)
    (got,) = _onnx_outputs(tmp_path / "lean.b4.onnx", x)
    # int8 DIA matrices quantise at run time: fxattn's low-precision tolerance
    torch.testing.assert_close(torch.from_numpy(got), _forward(lean, x, train=False),
                               atol=LOWP_ATOL["int8"], rtol=LOWP_RTOL["int8"])


@pytest.mark.parametrize("module", ["lstm", "se"])
@pytest.mark.parametrize("share", ["stage", "channels", "none"])
def test_identity_every_module_and_share_mode_then_learns(module: str, share: str) -> None:
    model, x = _tiny()
    labels = torch.tensor([0, 1, 2, 3])
    net = fxattn.transform(model, x, dia=fxattn.DIA(module=module, share=share, init="identity"))
    for train in (False, True):
        _assert_same(_forward(net, x, train=train), _forward(copy.deepcopy(model), x, train=train))
    opt = torch.optim.Adam(fxattn.param_groups(net, lr=1e-4, new_lr=1e-2))
    dia_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(DIA_ROOT)}
    for _ in range(2):  # step 1 opens the gates; from step 2 the cell's MLPs learn too
        opt.zero_grad()
        loss = F.cross_entropy(net(x), labels) + fxattn.ssia_loss(net)
        loss.backward()
        opt.step()
    moved = {k for k, v in net.state_dict().items() if k in dia_before
             and not torch.equal(v, dia_before[k])}
    # every module's gate and the output layer of its MLP (the hidden path's first layer reads
    # h_0 = 0 at a group's first site, so it has no gradient there, as in the paper's cell)
    last = "input_path.2.bias" if module == "lstm" else "fc.2.bias"
    for spec in net.plan.dia_modules:
        assert {f"{DIA_ROOT}.{spec.name}.gate", f"{DIA_ROOT}.{spec.name}.{last}"} <= moved
    # once open, the gates make DIA change the output
    net.eval()
    with torch.no_grad():
        assert not torch.equal(net(x), model.eval()(x))


def test_scoped_detector_backbone_identity_and_param_groups() -> None:
    torch.manual_seed(0)
    model, x = _as_if_trained(_Detector()), torch.randn(2, 3, 64, 64)
    net = fxattn.transform(model, x, dia=fxattn.DIA(init="identity"), ssia=False,
                           scope="backbone")
    assert isinstance(net.backbone, fxattn.AttentionGraphModule)
    for train in (False, True):
        _assert_same(_forward(net, x, train=train), _forward(copy.deepcopy(model), x, train=train))
    _assert_same(_forward(fxattn.strip_ssia(net), x, train=False),
                 _forward(copy.deepcopy(model), x, train=False))
    groups = fxattn.param_groups(net, lr=0.01, new_lr=0.1, weight_decay=1e-4,
                                 new_weight_decay=0.0)
    new = {id(p) for p in net.backbone.get_submodule(DIA_ROOT).parameters()}
    assert [g["name"] for g in groups] == ["model", "fxattn"]
    assert {id(p) for p in groups[1]["params"]} == new
    assert len(groups[0]["params"]) + len(new) == len(list(net.parameters()))
    assert (groups[0]["lr"], groups[1]["lr"]) == (0.01, 0.1)
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (1e-4, 0.0)


def test_paper_init_is_unchanged_and_identity_adds_only_the_gates() -> None:
    model, x = _tiny()
    assert fxattn.DIA().init == "paper" and fxattn.DIA().to_dict()["init"] == "paper"
    paper = fxattn.transform(model, x, ssia=False)
    identity = fxattn.transform(model, x, dia={"init": "identity"}, ssia=False)
    paper_keys, identity_keys = set(paper.state_dict()), set(identity.state_dict())
    assert not any(k.endswith(".gate") for k in paper_keys)
    gates = identity_keys - paper_keys
    assert paper_keys <= identity_keys and gates == {
        f"{DIA_ROOT}.{m.name}.gate" for m in paper.plan.dia_modules}
    assert identity.plan.dia_parameters == paper.plan.dia_parameters + sum(
        m.channels for m in paper.plan.dia_modules)
    assert identity.plan.dia_parameters == sum(
        p.numel() for p in identity.get_submodule(DIA_ROOT).parameters())
    # the paper's cell is not the identity: it scales the branches by h in (0, 1)
    with torch.no_grad():
        assert not torch.allclose(paper.eval()(x), model.eval()(x))
    text = str(fxattn.inspect(model, x, dia={"init": "identity"}))
    assert "init=identity" in text and "DIA init: identity" in text
    assert fxattn.inspect(model, x).to_dict()["dia"]["init"] == "paper"


def test_bad_init_is_a_config_error() -> None:
    with pytest.raises(fxattn.ConfigError, match="DIA init='zero'"):
        fxattn.DIA(init="zero")
    with pytest.raises(fxattn.ConfigError, match="unknown dia option"):
        fxattn.transform(_TinyResNet(), torch.randn(2, 3, 16, 16),
                         dia={"initialisation": "x"})


def test_identity_model_saves_and_loads(tmp_path: Path) -> None:
    model, x = _tiny()
    net = fxattn.transform(model, x, dia=fxattn.DIA(init="identity"))
    with torch.no_grad():
        for gate in _gates(net):
            net.get_submodule(gate).gate.uniform_(0.2, 0.8)  # as after training
    for kind, module in (("transformed", net), ("stripped", fxattn.strip_ssia(net))):
        path = fxattn.save(module, tmp_path / f"{kind}.fxattn", x)
        loaded = fxattn.load(path, model=_TinyResNet())
        assert loaded.fxattn_info.dia["init"] == "identity" if kind == "transformed" else True
        _assert_same(_forward(loaded, x, train=False), _forward(module, x, train=False))


def test_param_groups_errors_and_wrappers() -> None:
    model, x = _tiny()
    with pytest.raises(fxattn.NotTransformedError, match="fxattn.transform"):
        fxattn.param_groups(model, lr=0.1, new_lr=1.0)
    with pytest.raises(fxattn.NotTransformedError):
        fxattn.param_groups("net", lr=0.1, new_lr=1.0)  # type: ignore[arg-type]
    net = fxattn.transform(model, x, dia=fxattn.DIA(init="identity"),
                           ssia=fxattn.SSIA(map="channel"))
    for bad in ({"lr": 0.0, "new_lr": 1.0}, {"lr": 0.1, "new_lr": -1.0},
                {"lr": float("nan"), "new_lr": 1.0}, {"lr": True, "new_lr": 1.0},
                {"lr": 0.1, "new_lr": 1.0, "weight_decay": -1e-4}):
        with pytest.raises(fxattn.ConfigError):
            fxattn.param_groups(net, **bad)
    wrapped = torch.nn.DataParallel(net)
    (own, new) = fxattn.param_groups(wrapped, lr=0.1, new_lr=1.0)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in new["params"]} == {"fxattn_dia", "fxattn_ssia"}
    assert not any(names[id(p)].startswith("fxattn") for p in own["params"])
    assert "weight_decay" not in own  # the optimizer's default
    # a replaced head joins the new group
    head = {id(p) for p in net.head.parameters()}
    own2, new2 = fxattn.param_groups(net, lr=0.1, new_lr=1.0, new_modules=["head"])
    assert head <= {id(p) for p in new2["params"]} and not head & {id(p) for p in own2["params"]}
    assert len(own2["params"]) + len(new2["params"]) == len(list(net.parameters()))
    for bad in ("nohead", ["head", 3], 3):
        with pytest.raises(fxattn.ConfigError, match="new_modules"):
            fxattn.param_groups(net, lr=0.1, new_lr=1.0, new_modules=bad)
    # a frozen backbone: its parameters are left out, as Hugging Face's Trainer does
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("fxattn"))
    groups = fxattn.param_groups(net, lr=0.1, new_lr=1.0)
    assert [g["name"] for g in groups] == ["fxattn"]
    # the groups work with any torch optimizer
    torch.optim.AdamW(groups, weight_decay=0.0).step()


def test_param_groups_with_a_hugging_face_trainer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=3)
    model = transformers.ResNetForImageClassification(config)
    example = {"pixel_values": torch.randn(4, 3, 32, 32),
               "labels": torch.zeros(4, dtype=torch.long)}
    net = fxattn.transform(model, example, dia=fxattn.DIA(init="identity"),
                           ssia=fxattn.SSIA(attach=True))
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": torch.tensor(i % 3)}
            for i in range(8)]
    opt = torch.optim.SGD(fxattn.param_groups(net, lr=1e-3, new_lr=1e-1))
    args = transformers.TrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, max_steps=2, lr_scheduler_type="constant",
        report_to=[], use_cpu=True, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=net, args=args, train_dataset=data,
                                   optimizers=(opt, None))
    before = _gates(net)
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-1]
    assert all(not torch.equal(g, _gates(net)[n]) for n, g in before.items())


def test_cli_dia_init(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["inspect", "torchvision:resnet18", "--input-shape", "2,3,32,32", "--json"]
    assert main([*argv, "--dia-init", "identity"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dia"]["init"] == "identity"
    assert plan["dia_parameters"] == 878_560 + 64 + 128 + 256 + 512
    assert main([*argv, "--dia-init", "zero"]) == 2  # a usage error
    assert "invalid choice: 'zero'" in capsys.readouterr().err



def test_param_groups_in_lightning_configure_optimizers(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    model, x = _tiny()
    net = fxattn.transform(model, x, dia=fxattn.DIA(init="identity"))

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            images, labels = batch
            return F.cross_entropy(self.net(images), labels) + fxattn.ssia_loss(self.net)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # the LightningModule itself works too: fxattn's parameters are found by path
            return torch.optim.SGD(fxattn.param_groups(self, lr=1e-3, new_lr=1e-1))

    module = Classifier()
    data = torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 2, 3]))
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1,
                                enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, default_root_dir=str(tmp_path))
    before = _gates(net)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [1e-3, 1e-1]
    assert all(not torch.equal(g, _gates(net)[n]) for n, g in before.items())


def test_identity_attention_diagnostic_is_one_at_insertion() -> None:
    model, x = _tiny()
    net = fxattn.transform(model, x, dia=fxattn.DIA(share="none", init="identity"), ssia=False)
    for attention in capture_attention(net, x).values():
        np.testing.assert_array_equal(attention, np.ones_like(attention))
