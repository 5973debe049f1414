"""SSIA(attach=True) inside frameworks that own the loss: Hugging Face Trainer, Lightning.

Each framework takes one optimizer step on a transformed model whose loss never mentions SSIA;
the parameters must equal one step of a plain loop with the explicit ``+ fxattn.ssia_loss``,
on the same data and seeds (seeded before each transform: DIA weights come from the global
RNG), with and without gradient accumulation of 2. Measured differences: 0 (Lightning) and
below 1e-7 (Trainer, whose clipping-free SGD step still sums the loss differently), so the
tolerance is rtol 1e-5 / atol 1e-6. Then the trained model checkpoints, resumes, and its lean
model exports to ONNX verified in onnxruntime. Tiny models, random weights, generated data.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxattn

TOL = {"rtol": 1e-5, "atol": 1e-6}
LR = 0.1


def _assert_same_parameters(got: nn.Module, want: nn.Module) -> None:
    a, b = dict(got.named_parameters()), dict(want.named_parameters())
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key].detach(), b[key].detach(), msg=key, **TOL)


# --------------------------------------------------------------------------- Hugging Face


transformers = pytest.importorskip("transformers")

HF_BATCH = 4


def _hf_resnet(attach: bool) -> nn.Module:
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config)
    torch.manual_seed(0)
    example = {"pixel_values": torch.randn(HF_BATCH, 3, 32, 32),
               "labels": torch.zeros(HF_BATCH, dtype=torch.long)}
    # labels among the example inputs: the loss is computed inside the graph, and the
    # attached SSIA term rides on outputs.loss (its gradient then carries the Trainer's scaling)
    return fxattn.transform(model, example, ssia=fxattn.SSIA(attach=attach))


class _Generated(torch.utils.data.Dataset):
    """``size`` samples, sample ``i`` drawn from a generator seeded with ``i``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


class _Images(_Generated):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, 3, (), generator=g)
        image = 0.5 * torch.randn(3, 32, 32, generator=g)
        image[int(label), :8] += 2.0  # learnable: the bright band's channel is the label
        return {"pixel_values": image, "labels": label}


def _hf_args(out: Path, accumulate: int, steps: int, **extra: Any) -> Any:
    extra = {"save_strategy": "no", "train_sampling_strategy": "sequential", **extra}
    return transformers.TrainingArguments(
        str(out), per_device_train_batch_size=HF_BATCH, gradient_accumulation_steps=accumulate,
        max_steps=steps, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0, report_to=[], use_cpu=True,
        dataloader_num_workers=0, logging_steps=1, disable_tqdm=True, seed=0, **extra)


def _explicit_hf_step(reference: nn.Module, data: Any, accumulate: int
                      ) -> tuple[nn.Module, list[float]]:
    """One SGD step of a plain loop on the Trainer's micro-batches, SSIA added by hand; the
    module and the SSIA value of each micro-batch."""
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    values = []
    for micro in range(accumulate):
        items = [data[i] for i in range(micro * HF_BATCH, (micro + 1) * HF_BATCH)]
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
        outputs = reference(**batch)
        ssia = fxattn.ssia_loss(reference)
        values.append(float(ssia))
        ((outputs.loss + ssia) / accumulate).backward()
    opt.step()
    return reference, values


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_trainer_step_matches_explicit_loss(tmp_path: Path, accumulate: int) -> None:
    net = _hf_resnet(attach=True)
    trainer = transformers.Trainer(model=net, args=_hf_args(tmp_path, accumulate, 1),
                                   train_dataset=_Images(HF_BATCH * accumulate))
    trainer.train()
    reference, _ = _explicit_hf_step(_hf_resnet(attach=False), _Images(HF_BATCH * accumulate),
                                     accumulate)
    _assert_same_parameters(net, reference)


def test_hf_trainer_save_resume_and_export(tmp_path: Path) -> None:
    def trainer_for(net: nn.Module, steps: int) -> Any:
        args = _hf_args(tmp_path / "run", 1, steps, save_strategy="steps", save_steps=2)
        return transformers.Trainer(model=net, args=args, train_dataset=_Images(16))

    trainer = trainer_for(_hf_resnet(attach=True), 4)
    fxattn.log_ssia(trainer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 4 and all(log["ssia_loss"] > 0 for log in logs)
    trainer.save_model(str(tmp_path / "final"))  # save_pretrained of the original class
    assert (tmp_path / "final" / "config.json").exists()

    resumed = trainer_for(_hf_resnet(attach=True), 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _assert_same_parameters(resumed.model, trainer.model)  # steps 3-4 replayed exactly

    net = resumed.model.eval()
    x = torch.randn(2, 3, 32, 32)
    lean = fxattn.strip_ssia(net)
    report = fxattn.export_onnx(lean, tmp_path / "resnet.onnx",
                                {"pixel_values": x, "labels": torch.zeros(2, dtype=torch.long)})
    assert report.verified


def _hf_bert(attach: bool) -> nn.Module:
    """A tiny BERT classifier (dropout off: the Trainer and the plain loop draw differently)."""
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    torch.manual_seed(0)
    example = {"input_ids": torch.randint(0, 50, (HF_BATCH, 10)),
               "attention_mask": torch.ones(HF_BATCH, 10, dtype=torch.long),
               "labels": torch.zeros(HF_BATCH, dtype=torch.long)}
    return fxattn.transform(model, example, ssia=fxattn.SSIA(attach=attach))


class _Sentences(_Generated):
    """Token ids whose label is the first token modulo 3, padded at random lengths."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, 50, (10,), generator=g)
        mask = torch.ones(10, dtype=torch.long)
        mask[int(torch.randint(6, 11, (), generator=g)):] = 0
        return {"input_ids": ids * mask, "attention_mask": mask, "labels": ids[0] % 3}


def test_hf_trainer_trains_a_text_model_with_accumulation(tmp_path: Path) -> None:
    accumulate = 2
    net = _hf_bert(attach=True)
    assert net.plan.tracer == "torch.export" and net.plan.active_pairs
    trainer = transformers.Trainer(model=net, args=_hf_args(tmp_path, accumulate, 1),
                                   train_dataset=_Sentences(HF_BATCH * accumulate))
    logged = fxattn.log_ssia(trainer)
    assert trainer.callback_handler.callbacks[0] is logged  # before every reporter
    trainer.train()
    data = _Sentences(HF_BATCH * accumulate)
    reference, values = _explicit_hf_step(_hf_bert(attach=False), data, accumulate)
    _assert_same_parameters(net, reference)
    # the step's log carries the mean SSIA value of its two micro-batches
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["ssia_loss"] == pytest.approx(sum(values) / accumulate, rel=1e-5)

    lean = fxattn.strip_ssia(net.eval())
    report = fxattn.export_onnx(lean, tmp_path / "bert.onnx", {
        k: v[:2] for k, v in next(iter(torch.utils.data.DataLoader(data, batch_size=2))).items()
    })
    assert report.verified


# --------------------------------------------------------------------------- Lightning


def _tv_resnet(attach: bool) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.manual_seed(0)
    return fxattn.transform(model, torch.randn(4, 3, 32, 32), ssia=fxattn.SSIA(attach=attach))


def _lightning_module(net: nn.Module) -> Any:
    lightning = pytest.importorskip("lightning")

    class Classifier(lightning.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def on_train_start(self) -> None:
            # logits leave the model, so fxattn cannot see Lightning divide the loss by the
            # accumulation steps: tell it (not needed without accumulation)
            fxattn.set_ssia_scale(self.net, 1 / self.trainer.accumulate_grad_batches)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)  # no SSIA term, no SSIA log

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Classifier(net)


def _image_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = _Images(4 * count)
    out = []
    for b in range(count):
        items = [data[i] for i in range(4 * b, 4 * b + 4)]
        out.append((torch.stack([i["pixel_values"] for i in items]),
                    torch.stack([i["labels"] for i in items])))
    return out


def _loader(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    x, y = (torch.cat(parts) for parts in zip(*batches, strict=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _lightning_trainer(tmp_path: Path, **options: Any) -> Any:
    lightning = pytest.importorskip("lightning")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    return lightning.Trainer(accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path), **options)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_step_matches_explicit_loss(tmp_path: Path, accumulate: int) -> None:
    batches = _image_batches(accumulate)
    module = _lightning_module(_tv_resnet(attach=True))
    trainer = _lightning_trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate,
                                 enable_checkpointing=False)
    fxattn.log_ssia(trainer)  # pl_module.log("ssia_loss", ...) after every training batch
    trainer.fit(module, train_dataloaders=_loader(batches))

    reference = _tv_resnet(attach=False)
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    for x, y in batches:
        loss = nn.functional.cross_entropy(reference(x), y) + fxattn.ssia_loss(reference)
        (loss / accumulate).backward()
    opt.step()
    _assert_same_parameters(module.net, reference)
    # the last batch's value reached Lightning's metrics like the module's own self.log
    assert trainer.callback_metrics["ssia_loss"].item() == pytest.approx(
        float(fxattn.ssia_loss(reference)), rel=1e-5)


def test_lightning_checkpoint_resume_and_export(tmp_path: Path) -> None:
    # epochs of 2 steps; resume at the epoch boundary (Lightning restarts an epoch it resumes
    # in the middle of, unless the dataloader is resumable)
    loader = _loader(_image_batches(2))
    full = _lightning_module(_tv_resnet(attach=True))
    _lightning_trainer(tmp_path / "a", max_epochs=2).fit(full, train_dataloaders=loader)

    first = _lightning_module(_tv_resnet(attach=True))
    trainer = _lightning_trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, train_dataloaders=loader)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(str(ckpt))
    resumed = _lightning_module(_tv_resnet(attach=True))
    _lightning_trainer(tmp_path / "c", max_epochs=2).fit(
        resumed, train_dataloaders=loader, ckpt_path=str(ckpt))
    _assert_same_parameters(resumed.net, full.net)

    lean = fxattn.strip_ssia(resumed.net)
    report = fxattn.export_onnx(lean, tmp_path / "resnet18.onnx", torch.randn(2, 3, 32, 32))
    assert report.verified


# --------------------------------------------------------------------------- ultralytics


def _yolo_dataset(root: Path, train: int = 8, val: int = 4, seed: int = 0) -> Path:
    """A few 64x64 images with one bright box each, in YOLO layout, and the dataset yaml."""
    np = pytest.importorskip("numpy")
    yaml = pytest.importorskip("yaml")
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            image = (rng.random((64, 64, 3)) * 60).astype(np.uint8)
            x0, y0 = (int(v) for v in rng.integers(4, 30, 2))
            w, h = (int(v) for v in rng.integers(12, 30, 2))
            image[y0:y0 + h, x0:x0 + w] = 220
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(
                f"0 {(x0 + w / 2) / 64} {(y0 + h / 2) / 64} {w / 64} {h / 64}\n")
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(root), "train": "images/train",
                                    "val": "images/val", "names": {0: "box"}}))
    return path


def _square_validation(trainer: Any) -> None:
    """Validate on 64x64 letterboxed batches, the size the graphs were traced at.

    ultralytics' in-training validation uses rectangular batches padded by half a stride
    (96x96 here). YOLOv8 is captured with torch.export, whose graphs are specialised to the
    traced image size (DIA and SSIA are not the cause), so it must see the traced size.
    """
    from ultralytics.data import build_dataloader, build_yolo_dataset

    dataset = build_yolo_dataset(trainer.args, trainer.data["val"], 4, trainer.data,
                                 mode="val", rect=False, stride=32)
    trainer.test_loader = build_dataloader(dataset, 4, 0, shuffle=False, rank=-1)
    trainer.validator.dataloader = trainer.test_loader


def test_ultralytics_detection_trainer(tmp_path: Path) -> None:
    pytest.importorskip("ultralytics")
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel

    data = _yolo_dataset(tmp_path / "data")
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    torch.manual_seed(0)
    net = fxattn.transform(model, torch.randn(2, 3, 64, 64), ssia=fxattn.SSIA(attach=True))
    assert net.stride.tolist() == [8.0, 16.0, 32.0] and hasattr(net, "set_head_attr")

    trainer = DetectionTrainer(overrides=dict(
        model="yolov8n.yaml", data=str(data), imgsz=64, epochs=1, batch=4, workers=0,
        device="cpu", amp=False, plots=False, project=str(tmp_path / "runs"), name="t",
        exist_ok=True, pretrained=False, verbose=False, seed=0, deterministic=True))
    trainer.model = net  # ultralytics uses a model it is handed as is
    trainer.add_callback("on_pretrain_routine_end", _square_validation)
    fxattn.log_ssia(trainer)  # "ssia_loss" joins the loss items
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    trainer.train()
    moved = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("fxattn_dia.") for k in moved)  # DIA trained
    assert fxattn.ssia_loss(net).item() > 0  # the attached term ran in training forwards
    assert set(trainer.loss_items) == {"box_loss", "cls_loss", "dfl_loss", "ssia_loss"}
    # the item is the last training forward's SSIA value (the validator ran in eval since)
    assert "ssia_loss" in trainer.loss_names and trainer.tloss["ssia_loss"].item() > 0
    with (Path(trainer.save_dir) / "results.csv").open() as f:
        row = next(csv.DictReader(f))
    logged = {k.strip(): float(v) for k, v in row.items()}
    assert logged["train/ssia_loss"] == pytest.approx(trainer.tloss["ssia_loss"].item(),
                                                      rel=1e-4, abs=1e-5)
    assert logged["train/box_loss"] > 0

    checkpoint = torch.load(trainer.last, weights_only=False)  # ultralytics pickles the module
    reloaded = checkpoint["model"].float().eval()
    assert type(reloaded).__name__ == "FxAttnDetectionModel"
    x = torch.rand(2, 3, 64, 64)
    ema = trainer.ema.ema.float().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], ema(x)[0], rtol=1e-3, atol=1e-3)  # fp16 file
    lean = fxattn.strip_ssia(reloaded)
    # the default rule: boxes in pixels are judged relative to their size (fxattn.export.verify)
    report = fxattn.export_onnx(lean, tmp_path / "yolo.onnx", x)
    assert report.verified


def test_log_ssia_names_what_it_takes() -> None:
    with pytest.raises(fxattn.ConfigError, match="a Lightning Trainer or an ultralytics"):
        fxattn.log_ssia(object())
