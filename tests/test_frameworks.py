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


class _Images(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, 3, (), generator=g)
        image = 0.5 * torch.randn(3, 32, 32, generator=g)
        image[int(label), :8] += 2.0  # learnable: the bright band's channel is the label
        return {"pixel_values": image, "labels": label}


def _hf_args(out: Path, accumulate: int, steps: int, **extra: Any) -> Any:
    return transformers.TrainingArguments(
        str(out), per_device_train_batch_size=HF_BATCH, gradient_accumulation_steps=accumulate,
        max_steps=steps, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0, train_sampling_strategy="sequential",
        report_to=[], use_cpu=True, dataloader_num_workers=0, logging_steps=1,
        disable_tqdm=True, save_strategy="no", seed=0, **extra)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_trainer_step_matches_explicit_loss(tmp_path: Path, accumulate: int) -> None:
    net = _hf_resnet(attach=True)
    trainer = transformers.Trainer(model=net, args=_hf_args(tmp_path, accumulate, 1),
                                   train_dataset=_Images(HF_BATCH * accumulate))
    trainer.train()

    reference = _hf_resnet(attach=False)
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    data = _Images(HF_BATCH * accumulate)
    for micro in range(accumulate):
        items = [data[i] for i in range(micro * HF_BATCH, (micro + 1) * HF_BATCH)]
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
        loss = reference(**batch).loss + fxattn.ssia_loss(reference)
        (loss / accumulate).backward()
    opt.step()
    _assert_same_parameters(net, reference)


def test_hf_trainer_save_resume_and_export(tmp_path: Path) -> None:
    def trainer_for(net: nn.Module, steps: int) -> Any:
        args = _hf_args(tmp_path / "run", 1, steps, save_strategy="steps", save_steps=2)
        return transformers.Trainer(model=net, args=args, train_dataset=_Images(16))

    trainer = trainer_for(_hf_resnet(attach=True), 4)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4
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
