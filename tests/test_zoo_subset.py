"""A fast cross-section of the zoo through the whole pipeline (the full run is
``benchmarks/zoo_coverage.py``).

Each model runs ``tests/pipeline.py``'s ``whole_pipeline``: transform (DIA + SSIA) -> SSIA's
gradient reaches the stem -> one SGD step moves every DIA cell -> strip (the lean output is the
eval output, no SSIA left) -> ONNX export verified by the default rule at batch 2 and 3. The
models span torchvision (classification with train-only auxiliary
outputs, segmentation with a dict output), timm (CNN, ViT), Hugging Face transformers (token-id
inputs, ``ModelOutput`` dataclass outputs: only the ``torch.export`` capture can take them).
Small configs and inputs keep the whole file to a few minutes on two idle cores. The
diffusers UNet takes two inputs (a sample and integer timesteps); its skip connections leave
no single path through every stage, so its SSIA taps are the encoder stage outputs down to the
bottleneck (see tests/test_encoder_decoder.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from pipeline import whole_pipeline

import fxattn
from fxattn.export import export_onnx

transformers = pytest.importorskip("transformers")


def _tv(name: str, size: int, **kwargs: Any) -> Callable[[], tuple[torch.nn.Module, Any]]:
    def make() -> tuple[torch.nn.Module, Any]:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        return model, torch.randn(2, 3, size, size)

    return make


def _timm(name: str, size: int, **kwargs: Any) -> Callable[[], tuple[torch.nn.Module, Any]]:
    def make() -> tuple[torch.nn.Module, Any]:
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return model, torch.randn(2, 3, size, size)

    return make


def _bert() -> tuple[torch.nn.Module, Any]:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertForSequenceClassification(config)
    return model, {"input_ids": torch.randint(0, 100, (2, 12))}


def _gpt2() -> tuple[torch.nn.Module, Any]:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                     n_positions=32)  # cache on, as from_config gives it
    return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 100, (2, 12))}


def _llama() -> tuple[torch.nn.Module, Any]:
    """A decoder LLM block (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU)."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=100)  # cache on, as from_config gives it
    return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 100, (2, 12))}


def _hf_vit() -> tuple[torch.nn.Module, Any]:
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    return model, {"pixel_values": torch.randn(2, 3, 32, 32)}


def _unet() -> tuple[torch.nn.Module, Any]:
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )
    return unet, (torch.randn(2, 3, 16, 16), torch.tensor([10, 500]))


# (id, builder, tracer that must serve it)
SUBSET: list[tuple[str, Callable[[], tuple[torch.nn.Module, Any]], str]] = [
    ("torchvision:resnet18", _tv("resnet18", 32, num_classes=10), "torch.fx"),
    ("torchvision:mobilenet_v3_small", _tv("mobilenet_v3_small", 32, num_classes=10),
     "torch.fx"),
    # train mode returns GoogLeNetOutputs (logits + two auxiliary heads), eval a tensor
    ("torchvision:googlenet", _tv("googlenet", 64, num_classes=10, init_weights=False),
     "torch.fx"),
    ("torchvision.segmentation:lraspp_mobilenet_v3_large",
     _tv("lraspp_mobilenet_v3_large", 64, num_classes=3, weights_backbone=None), "torch.fx"),
    # layer scale starts at 1e-6 in timm, so one step barely reaches the first stage's DIA
    # cell; trained ConvNeXts carry scales of order 0.1 to 1
    ("timm:convnext_atto", _timm("convnext_atto", 32, ls_init_value=0.5), "torch.fx"),
    # bottleneck blocks with squeeze-and-excitation; timm zero-initialises the last norm of
    # every residual branch (zero_init_last), which pretrained weights never look like and
    # which would make every DIA gradient exactly zero before the first step
    ("timm:seresnet50", _timm("seresnet50", 32, zero_init_last=False), "torch.fx"),
    ("timm:vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8),
     "torch.fx"),
    ("transformers:BertForSequenceClassification", _bert, "torch.export"),
    ("transformers:GPT2LMHeadModel", _gpt2, "torch.export"),
    ("transformers:LlamaForCausalLM", _llama, "torch.export"),
    ("transformers:ViTForImageClassification", _hf_vit, "torch.export"),
    ("diffusers:UNet2DModel", _unet, "torch.export"),
]


@pytest.mark.parametrize(("model_id", "make", "tracer"), SUBSET, ids=[m for m, _, _ in SUBSET])
def test_zoo_model_whole_pipeline(
    model_id: str, make: Callable[[], tuple[torch.nn.Module, Any]], tracer: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, inputs = make()
    whole_pipeline(model, inputs, tmp_path, tracer=tracer)


class _DataDependent(torch.nn.Module):
    """Python control flow on a shape (torch.fx cannot trace it, torch.export can), BN, dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
            for _ in range(2)
        )
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] % 2:  # a Python branch on a proxy: torch.fx cannot trace it
            x = torch.nn.functional.pad(x, (0, 1, 0, 1))
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        x = self.down(x)
        return {"logits": self.head(x.mean((2, 3))), "features": x}


def test_export_fallback_trains_batch_norm_and_keeps_eval_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _DataDependent()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.fx raises
        torch.fx.symbolic_trace(model)
    net = fxattn.transform(model, x)
    assert net.plan.tracer == "torch.export"
    assert len(net.plan.sites) == 2 and len(net.plan.active_pairs) == 1
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items()), (
        "shape propagation of the training graph must not move the batch-norm statistics"
    )
    net.train()
    out = net(x)
    assert set(out) == {"logits", "features"}  # the model's own output structure
    after = net.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in stats.items()), "BN did not update"
    fxattn.ssia_loss(net).backward()
    net.eval()
    lean = fxattn.strip_ssia(net)
    before_eval = {k: v.clone() for k, v in lean.state_dict().items() if "running" in k}
    with torch.no_grad():
        torch.testing.assert_close(lean(x)["logits"], net(x)["logits"])
    assert all(torch.equal(lean.state_dict()[k], v) for k, v in before_eval.items())
    report = export_onnx(lean, tmp_path / "m.onnx", x, batch_sizes=(2, 3))
    assert report.verified


@pytest.mark.parametrize("make", [_gpt2, _bert, _llama], ids=["gpt2", "bert", "llama"])
def test_every_transformer_residual_add_is_a_dia_site(
    make: Callable[[], tuple[torch.nn.Module, Any]],
) -> None:
    """Two residual adds per layer (attention, MLP), each found: GPT-2's first one adds to the
    token + position embeddings and its attention ends in Conv1D's ``addmm``, so the channel
    dimension must be known through embeddings and ``addmm``."""
    model, inputs = make()
    plan = fxattn.inspect(model, inputs)
    assert len(plan.sites) == 2 * 2, [s.node for s in plan.sites]
    assert not any("could not be inferred" in note for note in plan.notes)
