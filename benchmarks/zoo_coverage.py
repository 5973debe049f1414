"""Zoo coverage: the whole fxattn pipeline on every model of the zoos, one subprocess each.

For each model (random weights, small input where the model allows it):

    trace -> analyze -> insert   (fxattn.transform, DIA + SSIA)
    train                        (one SGD step on a task loss + fxattn.ssia_loss)
    strip                        (fxattn.strip_ssia; lean output == eval output)
    export                       (fxattn.export.portable.export_onnx, dynamic batch)
    parity                       (onnxruntime vs PyTorch at batch 2 and 3)

and records the first stage that failed with the error's first line, plus which tracer served
(``torch.fx`` or the ``torch.export`` fallback) and whether plain ``torch.fx.symbolic_trace``
could trace the original at all. Each model runs in its own subprocess under a time limit, so a
crash, a hang or a memory blow-up costs that model only.

Model lists: every torchvision classification model, the torchvision segmentation models, one
representative (the smallest variant) of every timm architecture module, a set of Hugging Face
``transformers`` models built from their default configs, tiny diffusers denoisers (an
unconditional and a text-conditioned UNet, a class-conditioned DiT), and beyond classifiers:
every torchvision video, optical-flow and quantizable model (the latter in float mode), and
ultralytics YOLOv8 / YOLO11 in their detect, segment, pose and classify tasks from the yaml.

The training step uses each family's own loss where it has one (:func:`task_loss`): cross-
entropy for video and quantizable classifiers, RAFT's sequence loss, ultralytics'
``model.loss(batch)`` on generated boxes, masks and keypoints, noise-prediction MSE for the
denoisers; the older families train on the mean square of their outputs.

Results go to ``benchmarks/results/zoo.json`` (one record per model, written after every model,
so an interrupted run resumes where it stopped) and ``zoo.md`` (summary + failures tables).

Usage::

    python benchmarks/zoo_coverage.py                    # everything, resumable, 1 job
    python benchmarks/zoo_coverage.py --family timm --jobs 2
    python benchmarks/zoo_coverage.py --only 'resnet|vit' --retry-failed
    python benchmarks/zoo_coverage.py --family ultralytics --rerun  # after an fxattn change
    python benchmarks/zoo_coverage.py --report           # rewrite zoo.md from zoo.json only
    python benchmarks/zoo_coverage.py --child timm:resnet18  # one model, JSON on stdout
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("build", "trace", "analyze", "insert", "train", "strip", "export", "parity")
FAMILIES = (
    "torchvision", "torchvision.segmentation", "timm", "timm.heldout", "transformers", "diffusers",
    "torchvision.detection", "torchvision.video", "torchvision.optical_flow",
    "torchvision.quantization", "ultralytics",
)
HELDOUT_COUNT = 40
RESULT_MARK = "@@ZOO_RESULT@@"
sys.path.insert(0, str(ROOT))  # this checkout's fxattn, also when run from elsewhere
from fxattn.config import DEFAULT_ATOL, DEFAULT_RTOL  # noqa: E402 - light: no torch import

# --------------------------------------------------------------------------- model lists


def torchvision_models() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def torchvision_segmentation_models() -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models.segmentation)
    return [f"torchvision.segmentation:{n}" for n in names]


_SIZE_WORDS = ("atto", "femto", "pico", "nano", "micro", "xxxs", "xxs", "xs", "mini", "tiny",
               "small", "s", "medium", "m", "base", "b", "large", "l", "huge", "h", "giant", "g")


def _variant_size(name: str) -> tuple[int, float, int]:
    """Sort key, smallest first: size word, then the numbers in the name, then its length.

    Building all ~1,400 timm variants (even on the ``meta`` device) to count parameters takes
    many minutes on a shared CPU; timm's names encode size consistently enough (``_atto`` <
    ``_tiny`` < ``_small``, ``resnet10`` < ``resnet50``, ``_050`` < ``_100``) to pick the
    smallest variant from the name alone.
    """
    tokens = re.split(r"[_.]", name)
    words = [t.rstrip("0123456789") for t in tokens]  # "s0", "b1", "m4" name sizes too
    base = _SIZE_WORDS.index("base")  # a name without a size word is a plain model
    word = min((_SIZE_WORDS.index(w) for w in words if w in _SIZE_WORDS), default=base)
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return word, sum(numbers) if numbers else math.inf, len(name)


def timm_representatives() -> list[str]:
    """One model per timm architecture module (``timm.models.<module>``): its smallest variant.

    Variants with a fixed large input (``_384``, ``_448``, ...) count as larger than the rest.
    """
    import timm
    from timm.models import model_entrypoint

    modules: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models():
        modules[model_entrypoint(name).__module__.rsplit(".", 1)[-1]].append(name)
    return [f"timm:{min(names, key=_variant_size)}" for _, names in sorted(modules.items())]


def timm_heldout(count: int = HELDOUT_COUNT, seed: int = 0) -> list[str]:
    """A fixed random sample of timm models that are *not* the representatives above.

    fxattn is never tuned on this list: it measures coverage on variants nobody looked at
    (other depths, widths, heads and input sizes of the same modules). Variants too large to
    run on a 2-core CPU in the time limit (``large`` and up, inputs of 384 px and more) are
    left out of the draw.
    """
    import random

    import timm

    chosen = set(timm_representatives())
    too_big = re.compile(
        r"large|huge|giant|gigantic|enormous"
        r"|_(?:l|h|g|e|xl)(?:_|\d|$)|_(?:384|448|512|518|560|576|640)"
    )
    pool = [n for n in timm.list_models() if f"timm:{n}" not in chosen and not too_big.search(n)]
    return [f"timm.heldout:{n}" for n in sorted(random.Random(seed).sample(pool, count))]


HF_MODELS = (
    # vision: CNNs, ViTs, hierarchical and hybrid transformers
    "ResNetForImageClassification",
    "ConvNextForImageClassification",
    "ConvNextV2ForImageClassification",
    "RegNetForImageClassification",
    "MobileNetV2ForImageClassification",
    "EfficientNetForImageClassification",
    "BitForImageClassification",
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "BeitForImageClassification",
    "Dinov2ForImageClassification",
    "CLIPVisionModel",
    "SwinForImageClassification",
    "Swinv2ForImageClassification",
    "PvtV2ForImageClassification",
    "LevitForImageClassification",
    "PoolFormerForImageClassification",
    "MobileViTForImageClassification",
    "SegformerForSemanticSegmentation",
    # text encoders (token ids in)
    "BertForSequenceClassification",
    "DistilBertForSequenceClassification",
    "RobertaForSequenceClassification",
    "AlbertForSequenceClassification",
    "ElectraForSequenceClassification",
    "DebertaV2ForSequenceClassification",
    "T5EncoderModel",
    # decoders
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "PhiForCausalLM",
    "GemmaForCausalLM",
    # audio (a raw waveform in)
    "Wav2Vec2ForSequenceClassification",
)
# Convolutional stems that take a 64x64 input; the others keep their config's image size
# (HF Swin, for one, keeps 7x7 windows under tracing, which 64x64 cannot tile).
HF_SMALL_IMAGE = ("ResNet", "ConvNext", "RegNet", "MobileNetV2", "EfficientNet", "Bit",
                  "PoolFormer", "Segformer")
# Decoder LLMs' default configs are 7B-wide; a 2-layer slice still has ~0.5B parameters in its
# embeddings, so their width (and the head width that goes with it) and vocabulary are cut too
# (the block structure is the default config's).
HF_NARROW = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000}


def torchvision_module_models(family: str, module: str) -> list[str]:
    """Every model torchvision registers in ``torchvision.models.<module>``."""
    import torchvision

    names = torchvision.models.list_models(module=getattr(torchvision.models, module))
    return [f"{family}:{n}" for n in names]


# Ultralytics YOLOv8 and YOLO11 in their four tasks, built from the yaml (scale n, no weights).
ULTRALYTICS_CONFIGS = tuple(
    f"{base}{task}.yaml"
    for base in ("yolov8n", "yolo11n")
    for task in ("", "-seg", "-pose", "-cls")
)
# An unconditional UNet, a text-conditioned UNet (cross-attention on encoder_hidden_states) and
# a class-conditioned diffusion transformer, each in a tiny config.
DIFFUSERS_MODELS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


def all_models(families: tuple[str, ...]) -> list[str]:
    ids: list[str] = []
    if "torchvision" in families:
        ids += torchvision_models()
    if "torchvision.segmentation" in families:
        ids += torchvision_segmentation_models()
    if "timm" in families:
        ids += timm_representatives()
    if "timm.heldout" in families:
        ids += timm_heldout()
    if "transformers" in families:
        ids += [f"transformers:{n}" for n in HF_MODELS]
    if "diffusers" in families:
        ids += [f"diffusers:{n}" for n in DIFFUSERS_MODELS]
    if "torchvision.detection" in families:  # the detector's own signature: zoo_detection.py
        from zoo_detection import detection_models

        ids += detection_models()
    for family, module in (("torchvision.video", "video"),
                           ("torchvision.optical_flow", "optical_flow"),
                           ("torchvision.quantization", "quantization")):
        if family in families:
            ids += torchvision_module_models(family, module)
    if "ultralytics" in families:
        ids += [f"ultralytics:{cfg}" for cfg in ULTRALYTICS_CONFIGS]
    return ids


# --------------------------------------------------------------------------- building (child)


def _image_candidates(
    factory: Callable[..., Any], sizes: tuple[int, ...], kwargs_for: Callable[[int], dict]
) -> tuple[Any, Any, str]:
    """The first (model, input) whose eval and train forwards run, smallest input first."""
    import torch

    errors = []
    for size in sizes:
        for kwargs in (kwargs_for(size), {}):
            try:
                torch.manual_seed(0)
                model = factory(**kwargs)
                x = torch.randn(2, 3, size, size)
                model.eval()
                with torch.no_grad():
                    model(x)
                    # training-only heads (Inception's auxiliary classifier) need more room
                    copy.deepcopy(model).train()(x)
                return model, x, f"2x3x{size}x{size}"
            except Exception as exc:  # noqa: BLE001 - try the next size
                errors.append(f"{size}: {_first_line(exc)}")
            if not kwargs_for(size):
                break
    raise RuntimeError("no input size works: " + "; ".join(errors[-2:]))


def build(model_id: str) -> tuple[Any, Any, str]:
    """``(model, example_inputs, input description)`` for a zoo id, random weights."""
    import torch

    family, name = model_id.split(":", 1)
    if family == "torchvision":
        import torchvision

        def tv(**kwargs: Any) -> Any:
            return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)

        sizes = (64, 96, 128, 224, 299)
        return _image_candidates(
            tv, sizes, lambda s: {"image_size": s} if name.startswith("vit_") else {}
        )
    if family == "torchvision.segmentation":
        import torchvision

        def seg(**kwargs: Any) -> Any:
            return torchvision.models.get_model(
                name, weights=None, weights_backbone=None, num_classes=5, **kwargs
            )

        return _image_candidates(seg, (64, 96, 128), lambda s: {})
    if family in ("timm", "timm.heldout"):
        import timm

        cfg = timm.get_pretrained_cfg(name)
        default = int(cfg.input_size[-1]) if cfg and cfg.input_size else 224

        def tm(**kwargs: Any) -> Any:
            return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

        # 56 and 112: multiples of 14 and 28 for patch-14 ViTs (DINOv2, DeepSeek) and 7x7 windows
        sizes = tuple(
            dict.fromkeys(s for s in (64, 56, 96, 112, 128, 160, default) if s <= default)
        )
        return _image_candidates(tm, sizes or (default,), lambda s: {"img_size": s})
    if family == "transformers":
        return _build_transformers(name)
    if family == "diffusers":
        return _build_diffusers(name)
    if family == "torchvision.video":
        return _build_video(name)
    if family == "torchvision.optical_flow":
        import torchvision

        torch.manual_seed(0)
        raft = torchvision.models.get_model(name, weights=None)
        # features at 1/8 resolution feed a 4-level correlation pyramid: 128 px is the least.
        # Two refinement iterations instead of 12: the graph unrolls the loop, one copy each.
        images = {"image1": torch.randn(2, 3, 128, 128), "image2": torch.randn(2, 3, 128, 128),
                  "num_flow_updates": 2}
        return raft, images, "image1, image2 2x3x128x128, num_flow_updates=2"
    if family == "torchvision.quantization":
        import torchvision

        def quantizable(**kwargs: Any) -> Any:
            return torchvision.models.get_model(
                name, weights=None, quantize=False, num_classes=10, **kwargs
            )

        return _image_candidates(quantizable, (64, 96, 128, 224, 299), lambda s: {})
    if family == "ultralytics":
        return _build_ultralytics(name)
    raise ValueError(f"unknown family {family!r}")


def _build_diffusers(name: str) -> tuple[Any, Any, str]:
    """A tiny diffusers denoiser (random weights) and one noisy batch of its own inputs."""
    import diffusers
    import torch

    torch.manual_seed(0)
    timestep = torch.tensor([10, 500])
    if name == "UNet2DModel":
        unet = diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        )
        inputs = (torch.randn(2, 3, 32, 32), timestep)
        return unet, inputs, "sample 2x3x32x32, timestep (2,) int64"
    if name == "UNet2DConditionModel":
        unet = diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": timestep,
                  "encoder_hidden_states": torch.randn(2, 7, 32)}
        return unet, inputs, "sample 2x4x16x16, timestep (2,), encoder_hidden_states 2x7x32"
    if name == "DiTTransformer2DModel":
        dit = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
        )
        inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": timestep,
                  "class_labels": torch.tensor([1, 7])}
        return dit, inputs, "hidden_states 2x4x8x8, timestep (2,), class_labels (2,)"
    raise ValueError(f"unknown diffusers model {name!r}")


# (T, H, W) clips tried smallest first. Two models take only their training size, 16x224x224:
# S3D ends in a fixed (2, 7, 7) average pool at stride (8, 32, 32), and torchvision's MViT
# builders fix the positional tables' (and pooling's) size to it.
VIDEO_SIZES = ((4, 32, 32), (8, 64, 64), (16, 112, 112), (16, 224, 224))


def _build_video(name: str) -> tuple[Any, Any, str]:
    """A torchvision video classifier on the smallest ``(B, 3, T, H, W)`` clip it accepts."""
    import torch
    import torchvision

    errors = []
    for t, h, w in VIDEO_SIZES:
        try:
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None, num_classes=10)
            clip = torch.randn(2, 3, t, h, w)
            model.eval()
            with torch.no_grad():
                model(clip)
            return model, clip, f"2x3x{t}x{h}x{w}"
        except Exception as exc:  # noqa: BLE001 - try the next size
            errors.append(f"{t}x{h}x{w}: {_first_line(exc)}")
    raise RuntimeError("no clip size works: " + "; ".join(errors[-2:]))


def _build_ultralytics(cfg: str) -> tuple[Any, Any, str]:
    """A YOLO model of the task its yaml names (detect, segment, pose, classify), no weights.

    The model carries ultralytics' default training hyperparameters (``model.args``) so that
    its own ``model.loss(batch, preds)`` works as in ultralytics' trainer.
    """
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.nn import tasks

    kind = {"-seg": tasks.SegmentationModel, "-pose": tasks.PoseModel,
            "-cls": tasks.ClassificationModel}
    cls = next((c for suffix, c in kind.items() if f"{suffix}." in cfg), tasks.DetectionModel)
    torch.manual_seed(0)
    model = cls(cfg, nc=3, verbose=False)
    model.args = get_cfg()
    size = 32 if cls is tasks.ClassificationModel else 64
    return model, torch.randn(2, 3, size, size), f"2x3x{size}x{size}"


def _build_transformers(name: str) -> tuple[Any, Any, str]:
    """A transformers model from its default config (no download), made small.

    The config is the default one with its size cut and nothing else, as a user who loads the
    model with ``from_config`` gets it - the key/value cache left on (``use_cache=True``, which
    fxattn switches off for the capture by itself): the depth is cut to 2 layers to keep the run
    short on a CPU, and decoder LLMs are narrowed too (:data:`HF_NARROW`). Causal LMs are
    trained as users train them: ``labels`` in the inputs (the loss is the model's own) and an
    ``attention_mask``, inside ``Trainer`` (:func:`_hf_trainer_step`), then exported from
    ``input_ids`` / ``attention_mask`` to logits.
    """
    import torch
    import transformers

    cls = getattr(transformers, name)
    default = cls.config_class()
    sizes: dict[str, Any] = {}
    for attr in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if hasattr(default, "depths"):
            break  # staged models (ConvNeXt, Swin, ResNet): num_hidden_layers is derived
        if isinstance(getattr(default, attr, None), int):
            sizes[attr] = 2  # depth: CPU time
    if name.endswith("ForCausalLM"):
        sizes.update({attr: value for attr, value in HF_NARROW.items() if hasattr(default, attr)})
    # Training-time randomness decided in Python, outside any graph, which no tracer can
    # capture: Wav2Vec2's SpecAugment draws its masks with numpy, and LayerDrop skips whole
    # layers on a coin flip (`if torch.rand([]) < layerdrop`). Both are off at inference; a user
    # sets them to 0 for the transform as fxattn's TraceError asks ("make that decision fixed").
    for attr in ("mask_time_prob", "layerdrop"):
        if getattr(default, attr, None):
            sizes[attr] = 0.0
    config = cls.config_class(**sizes)  # derived fields (head_dim, layer_types) follow
    torch.manual_seed(0)
    model = cls(config)
    vocab = getattr(config, "vocab_size", None)
    if name.startswith("Wav2Vec2"):
        return model, {"input_values": torch.randn(2, 4000)}, "input_values 2x4000 float32"
    if any(word in name for word in ("ImageClassification", "SemanticSegmentation", "Vision")):
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        if name.startswith(HF_SMALL_IMAGE):
            size = 64
        channels = int(getattr(config, "num_channels", 3))
        inputs = {"pixel_values": torch.randn(2, channels, size, size)}
        return model, inputs, f"pixel_values 2x{channels}x{size}x{size}"
    ids = torch.randint(0, int(vocab or 1000), (2, 16))
    if is_causal_lm(f"transformers:{name}"):
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        return model, inputs, "input_ids, attention_mask, labels 2x16 int64"
    return model, {"input_ids": ids}, "input_ids 2x16 int64"


def is_causal_lm(model_id: str) -> bool:
    """A decoder LLM row: trained in ``Trainer`` with labels, exported logits-only."""
    return model_id.startswith("transformers:") and model_id.endswith(
        ("ForCausalLM", "LMHeadModel"))


def _hf_trainer_step(net: Any, inputs: dict[str, Any]) -> float:
    """One step of Hugging Face ``Trainer`` on the example batch; the logged SSIA value.

    ``net`` was transformed with ``SSIA(attach=True)`` and ``labels`` in its inputs, so the
    Trainer's own loss (the model's ``outputs.loss``) carries the SSIA term: nothing in the
    loop mentions it. ``fxattn.log_ssia`` logs its value beside the loss.
    """
    import torch
    import transformers

    import fxattn

    batch = int(inputs["input_ids"].shape[0])

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return batch

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {key: value[i] for key, value in inputs.items()}

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            tmp, per_device_train_batch_size=batch, max_steps=1, optim="sgd",
            learning_rate=0.01, max_grad_norm=1.0, report_to=[], use_cpu=True,
            save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, logging_steps=1,
            seed=0)
        trainer = transformers.Trainer(model=net, args=args, train_dataset=Rows())
        fxattn.log_ssia(trainer)
        trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    if not math.isfinite(log["loss"]):
        raise FloatingPointError(f"loss is not finite: {log['loss']}")
    return float(log["ssia_loss"])


# --------------------------------------------------------------------------- task losses (child)


def task_loss(model_id: str, model: Any, inputs: Any) -> Callable[[Any], Any]:
    """The training loss of one zoo model, as a function of the (transformed) model's output.

    Families with a loss of their own use it on generated targets: cross-entropy for the
    video and quantizable classifiers, RAFT's sequence loss, ultralytics' ``model.loss``,
    the denoisers' noise-prediction MSE. The other families train on the mean square of every
    float output (what matters there is that the step runs and moves DIA).
    """
    import torch

    family = model_id.split(":", 1)[0]
    torch.manual_seed(1)
    if family in ("torchvision.video", "torchvision.quantization"):
        labels = torch.randint(0, 10, (_batch_of(inputs),))
        return lambda out: sum(torch.nn.functional.cross_entropy(t, labels)
                               for t in _float_leaves(out) if t.dim() == 2)
    if family == "torchvision.optical_flow":
        image1 = inputs["image1"]
        target = torch.randn(image1.shape[0], 2, *image1.shape[2:])  # a flow per pixel
        return lambda flows: _raft_sequence_loss(flows, target)
    if family == "ultralytics":
        batch = _yolo_batch(model, inputs)
        return lambda preds: model.loss(batch, preds)[0].sum()
    if family == "diffusers":
        sample = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        noise = torch.randn_like(sample)  # the noise the denoiser is trained to predict
        return lambda out: torch.nn.functional.mse_loss(_float_leaves(out)[0].float(), noise)
    return lambda out: sum(t.float().pow(2).mean() for t in _float_leaves(out))


def _batch_of(inputs: Any) -> int:
    from fxattn.capture import ExampleInputs

    return ExampleInputs.from_user(inputs).batch_size


def _raft_sequence_loss(flows: Any, target: Any, gamma: float = 0.8) -> Any:
    """RAFT's loss (torchvision's references/optical_flow): L1 per refinement, later ones weigh
    more."""
    count = len(flows)
    return sum(gamma ** (count - 1 - i) * (flow - target).abs().mean()
               for i, flow in enumerate(flows))


def _yolo_batch(model: Any, images: Any) -> dict[str, Any]:
    """An ultralytics training batch for ``images``: two objects on image 0, one on image 1,
    with the masks (segment) or keypoints (pose) their task's loss reads."""
    import torch
    from ultralytics.nn import tasks

    batch_size, _, height, width = images.shape
    if isinstance(model, tasks.ClassificationModel):
        return {"img": images, "cls": torch.arange(batch_size) % 3}
    boxes = torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 0.6, 0.6]])
    batch: dict[str, Any] = {
        "img": images,
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0], [1.0]]),
        "bboxes": boxes,  # normalised xywh
    }
    if isinstance(model, tasks.SegmentationModel):
        # overlapping-mask format (ultralytics' default): per image, pixel value i + 1 marks
        # its i-th object, at a quarter of the image resolution
        masks = torch.zeros(batch_size, height // 4, width // 4)
        per_image: dict[int, int] = defaultdict(int)
        for index, (cx, cy, w, h) in zip(batch["batch_idx"].long().tolist(), boxes.tolist(),
                                         strict=True):
            per_image[index] += 1
            mh, mw = masks.shape[1:]
            masks[index, int((cy - h / 2) * mh):int((cy + h / 2) * mh),
                  int((cx - w / 2) * mw):int((cx + w / 2) * mw)] = per_image[index]
        batch["masks"] = masks
    if isinstance(model, tasks.PoseModel):
        points, dims = model.model[-1].kpt_shape
        keypoints = torch.rand(len(boxes), points, dims) * 0.2 + 0.4
        if dims == 3:
            keypoints[..., 2] = 1.0  # visible
        batch["keypoints"] = keypoints
    return batch


# --------------------------------------------------------------------------- the pipeline (child)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    marker = "(the torch.export fallback failed too: "
    if marker in text:  # both tracers failed: keep the gist of each
        fx_part, export_part = text.split(marker, 1)
        text = f"torch.export: {export_part.rstrip(')')} | torch.fx: {fx_part[:160]}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # terminal colours in exporter messages
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:400]


def _float_leaves(value: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _call(module: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def calibrate_batchnorm(model: Any, inputs: Any, batches: int = 4) -> bool:
    """Give BatchNorm layers the running statistics of some data, as training would.

    A random-weight model's BatchNorm layers keep mean 0 and variance 1, so eval mode does not
    normalise at all and activations compound block after block: random MobileOne reaches
    logits of ~1e14, where float32 keeps no digit of its smaller logits and no verification can
    judge an export. ``batches`` train-mode forwards of fresh random inputs (cumulative average:
    ``momentum=None``) give every model of the zoo the conditioning of a trained one. Models
    without BatchNorm, or whose train-mode forward fails, are left as they are (``False``).
    """
    import torch

    from fxattn.capture import ExampleInputs

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return False
    saved = copy.deepcopy(model.state_dict())
    momenta = [m.momentum for m in norms]
    was_training = model.training
    try:
        example = ExampleInputs.from_user(inputs)
        generator = torch.Generator().manual_seed(1)
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(batches):
                example.with_batch(4, generator).call(model)
        return True
    except Exception:  # noqa: BLE001 - keep the model as it was
        model.load_state_dict(saved)
        return False
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)


def run_pipeline(model_id: str) -> dict[str, Any]:
    """The whole pipeline on one model; the record says how far it got."""
    import torch

    import fxattn
    from fxattn.capture import ExampleInputs
    from fxattn.config import Tolerance
    from fxattn.errors import AnalysisError, ConfigError, InputError, TraceError
    from fxattn.export import export_onnx, verify_onnx

    torch.set_num_threads(1)
    family, name = model_id.split(":", 1)
    if family == "torchvision.detection":
        from zoo_detection import run_detection_pipeline

        return run_detection_pipeline(model_id, _first_line)
    record: dict[str, Any] = {"id": model_id, "family": family, "name": name, "status": "failed"}
    started = time.perf_counter()
    stage = "build"
    try:
        model, inputs, described = build(model_id)
        record["input"] = described
        record["bn_calibrated"] = calibrate_batchnorm(model, inputs)
        record["parameters"] = sum(p.numel() for p in model.parameters())
        if family.startswith("timm"):
            from timm.models import model_entrypoint

            record["module"] = model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        try:
            torch.fx.symbolic_trace(copy.deepcopy(model))
            record["plain_fx"] = True
        except Exception:  # noqa: BLE001 - only whether plain FX can trace it matters
            record["plain_fx"] = False

        stage = "trace"
        lm = is_causal_lm(model_id)  # SSIA attached to the model's own loss, for Trainer
        try:
            net = fxattn.transform(model, inputs, dia=True,
                                   ssia=fxattn.SSIA(attach=True) if lm else True)
        except TraceError:
            raise
        except (AnalysisError, ConfigError, InputError):
            stage = "analyze"
            raise
        except Exception:
            stage = "insert"
            raise
        plan = net.plan
        record.update(tracer=plan.tracer, sites=len(plan.sites), taps=len(plan.taps),
                      pairs=len(plan.active_pairs), dia_parameters=plan.dia_parameters)
        if plan.fixed_arguments:
            record["captured_with"] = dict(plan.fixed_arguments)

        stage = "train"
        if lm:
            record["trainer"] = "transformers.Trainer"
            record["ssia_loss"] = _hf_trainer_step(net, inputs)
        else:
            record["ssia_loss"] = _sgd_step(net, task_loss(model_id, model, inputs), inputs)

        stage = "strip"
        training_inputs = inputs
        if lm:  # deployment: logits from input_ids / attention_mask, no labels
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            lean = fxattn.strip_ssia(net, example_inputs=inputs)
            record["export_inputs"] = sorted(inputs)
        else:
            lean = fxattn.strip_ssia(net)
        net.eval()
        with torch.no_grad():
            out = _call(net, training_inputs)
            # the training signature's output also holds the loss: compare the logits
            expected = [out.logits] if lm else _float_leaves(out)
            got = _float_leaves(_call(lean, inputs))
        if len(got) != len(expected) or not all(
            torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(got, expected, strict=True)
        ):
            raise AssertionError("the stripped model's output differs from the eval output")
        record["ssia_nodes_removed"] = lean.meta["fxattn_strip"].removed_nodes
        # the training model, its gradients and the optimizer are done with: free them before
        # the export and the verification (the largest models need the memory)
        del net

        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            report = export_onnx(lean, path, inputs, verify=False)
            record.update(exporter=report.exporter, onnx_nodes=report.nodes)
            # a model whose batch torch.export pinned exports statically: verify at that batch
            batches = (report.static_batch,) * 2 if report.static_batch else (2, 3)
            if report.static_batch:
                record["static_batch"] = report.static_batch
            stage = "parity"
            check = verify_onnx(str(path), lean, ExampleInputs.from_user(inputs), batches,
                                Tolerance(), raise_on_failure=False)
            record.update(max_abs_error=check.max_abs_error, max_rel_error=check.max_rel_error,
                          margin=check.margin, parity_rule=check.rule,
                          worst=check.worst.describe() if check.worst else None)
            if check.notes:  # e.g. why no float64 check could run
                record["parity_notes"] = list(check.notes)
            if check.float64_noise is not None:
                record.update(float64_margin=check.float64_margin,
                              float64_noise=check.float64_noise)
            if check.rule == "float64":
                record["parity_note"] = (
                    f"ill-conditioned: PyTorch float32 is {check.float64_noise:.2e} off "
                    f"float64; onnxruntime within {check.float64_margin:.2f} of the float64 rule"
                )
            if not check.passed:
                raise AssertionError(f"onnxruntime vs PyTorch: {check.summary()}")
            record["perturbed"] = _perturbation_check(lean, path, inputs, batches)
        record["status"] = "ok"
        stage = "done"
    except Exception as exc:  # noqa: BLE001 - the record names the stage and the reason
        record["error"] = _first_line(exc)
        record["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        if stage == "export":
            record["original_exports"] = _original_exports(model, inputs)
    record["stage"] = stage
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _sgd_step(net: Any, loss_of: Callable[[Any], Any], inputs: Any) -> float:
    """One SGD step on the task loss plus ``fxattn.ssia_loss``; the SSIA value."""
    import torch

    import fxattn

    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    task = loss_of(_call(net, inputs))
    ssia = fxattn.ssia_loss(net)
    loss = task + ssia
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is not finite: {loss.item()}")
    loss.backward()
    # random-weight models can have huge outputs (MobileOne's reach 1e5): clip as training
    # recipes do, so one step does not turn the weights into noise before the checks
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return float(ssia.detach())


def _perturbation_check(
    lean: Any, path: Path, inputs: Any, batches: tuple[int, int] = (2, 3)
) -> dict[str, Any]:
    """The other side of the margin: does the rule catch one weight scaled by ``1 + 1e-3``?

    The weight of the middle and of the last Conv / Gemm / MatMul node of the exported graph is
    scaled, each in its own copy of the ONNX file, which is then verified like the real export
    (``margin`` > 1 means the mismatch is caught). ``effect`` is how far the perturbation moves
    onnxruntime's own outputs, in the same units (``|perturbed - clean| / (atol + rtol |clean|)``):
    a weight whose effect is damped below 1 before it reaches the outputs (the middle of a deep
    stage behind many gates) cannot be caught by any rule, and is counted apart.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    from fxattn.capture import ExampleInputs
    from fxattn.config import Tolerance
    from fxattn.export import verify_onnx
    from fxattn.export.runtime import ort_feed, ort_session
    from fxattn.export.verify import element_ratios
    from fxattn.files import external_data_path

    if external_data_path(path).exists():
        return {"skipped": "model over 2 GB"}
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    weights = [name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
               for name in node.input[1:2] if name in initializers
               and len(initializers[name].dims) >= 2]
    if not weights:
        return {"skipped": "no Conv/Gemm/MatMul weight initializer"}
    tol = Tolerance()
    example = ExampleInputs.from_user(inputs)
    probe = example.with_batch(batches[0], torch.Generator().manual_seed(7))
    clean_session = ort_session(str(path))
    clean = clean_session.run(None, ort_feed(clean_session, probe))
    record: dict[str, Any] = {}
    for which, name in (("middle", weights[len(weights) // 2]), ("last", weights[-1])):
        tensor = initializers[name]
        original = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(original * (1 + 1e-3), name))
        perturbed = path.with_name(f"perturbed-{which}.onnx")
        onnx.save(model, str(perturbed))
        tensor.CopyFrom(numpy_helper.from_array(original, name))  # the next probe starts clean
        session = ort_session(str(perturbed))
        moved = session.run(None, ort_feed(session, probe))
        # the verification rule's own ratio, applied to onnxruntime against itself
        effect = max((float(element_ratios(m, c, tol.atol, tol.rtol).max())
                      for m, c in zip(moved, clean, strict=True)
                      if c.dtype.kind == "f" and c.size), default=0.0)
        check = verify_onnx(str(perturbed), lean, example, batches, tol, raise_on_failure=False)
        record[which] = {"initializer": name, "effect": effect, "caught": not check.passed,
                         "margin": check.margin, "float64_margin": check.float64_margin}
        perturbed.unlink()
    return record


def _original_exports(model: Any, inputs: Any) -> bool | None:
    """Whether torch.onnx can export the *original* model (judges export failures)."""
    try:
        from fxattn.export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(copy.deepcopy(model).eval(), Path(tmp) / "m.onnx", inputs, verify=False)
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- the driver (parent)


def run_child(model_id: str, timeout: float) -> dict[str, Any]:
    family, name = model_id.split(":", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_id]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"id": model_id, "family": family, "name": name, "status": "failed",
                "stage": "timeout", "error": f"no result within {timeout:.0f} s",
                "seconds": round(time.perf_counter() - started, 1)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"id": model_id, "family": family, "name": name, "status": "failed",
            "stage": "crash", "error": f"exit code {proc.returncode}: {tail[0][:300]}",
            "seconds": round(time.perf_counter() - started, 1)}


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return {r["id"]: r for r in json.loads(path.read_text()).get("models", [])}


def save_results(
    path: Path, results: dict[str, dict[str, Any]], planned: list[str], notes: list[str]
) -> None:
    import timm
    import torch
    import torchvision

    data = {
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "timm": timm.__version__, **_optional_versions()},
        "planned": planned,
        "notes": notes,
        "models": [results[k] for k in sorted(results)],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _optional_versions() -> dict[str, str]:
    versions = {}
    for package in ("transformers", "diffusers", "onnxruntime"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return versions


_MARGIN_BINS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, math.inf)


def _binned(values: list[float], bins: tuple[float, ...] = _MARGIN_BINS) -> list[int]:
    return [sum(lo < v <= hi or (lo == 0.0 and v == 0.0) for v in values)
            for lo, hi in zip(bins, bins[1:], strict=False)]


def margin_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """How much room the default verification rule leaves on both sides, from the records.

    ``margin`` is a model's worst ``|err| / (atol + rtol |ref|)``: below 1 it passes; far below
    1 the default is loose enough for it. ``perturbed.margin`` is the same ratio after one
    weight of the export is scaled by ``1 + 1e-3``: above 1 the rule catches it.
    """
    passed = [r for r in results.values() if r["status"] == "ok" and "margin" in r]
    if not passed:
        return []
    margins = [float(r["margin"]) for r in passed]
    by_float64 = [r for r in passed if r.get("parity_rule") == "float64"]

    def quantiles(values: list[float]) -> str:
        ordered = sorted(values)
        picks = [ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]
                 for q in (0.0, 0.5, 0.9, 0.99, 1.0)]
        return " | ".join(f"{v:.2e}" for v in picks)

    def decided(p: dict[str, Any]) -> float:
        # the margin of the rule that decided: the float64 rule's when it ran
        return p["float64_margin"] if p.get("float64_margin") is not None else p["margin"]

    labels = ["0 (bitwise)" if i == 0 else f"({lo:g}, {hi:g}]"
              for i, (lo, hi) in enumerate(zip(_MARGIN_BINS, _MARGIN_BINS[1:], strict=False))]
    labels[0] = "<= 1e-3"
    counts = _binned(margins)
    lines = [
        "## Verification margins",
        "",
        f"Default rule: atol {DEFAULT_ATOL:g}, rtol {DEFAULT_RTOL:g}. `margin` = a model's "
        "worst `|err| / (atol + rtol*|ref|)` over both batch sizes and every output element "
        "(<= 1 passes). The perturbed rows: one weight of the export (the middle, or the last "
        "Conv/Gemm/MatMul) scaled by 1 + 1e-3, then verified like the real export (margin > 1 "
        "means the rule catches it). `effect` is how far that moves onnxruntime's own outputs in "
        "the same units: a perturbation with effect <= 1 never reaches the outputs (damped "
        "through a deep stage) and no rule could catch it.",
        "",
        "| | models | min | median | p90 | p99 | max |",
        "|---|---|---|---|---|---|---|",
        f"| margin of the real export | {len(margins)} | {quantiles(margins)} |",
    ]
    tallies = []
    for which in ("middle", "last"):
        probes = [(r["id"], r["perturbed"][which]) for r in passed
                  if which in r.get("perturbed", {})]
        if not probes:
            continue
        visible = [(i, p) for i, p in probes if p["effect"] > 1.0]
        caught = [i for i, p in visible if p["caught"]]
        missed = [i for i, p in visible if not p["caught"]]
        if visible:
            lines.append(f"| margin, {which} weight perturbed (visible: effect > 1) | "
                         f"{len(visible)} | {quantiles([decided(p) for _, p in visible])} |")
        tallies.append(
            f"{which} weight: caught for {len(caught)} of the {len(visible)} models where it "
            f"moves the outputs beyond the tolerance"
            + (f" (missed: {', '.join(missed)})" if missed else "")
            + f"; {len(probes) - len(visible)} of {len(probes)} models damp it below the "
            "tolerance before the outputs"
        )
    lines += [
        "",
        "| margin of the real export | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
        "| models | " + " | ".join(map(str, counts)) + " |",
        "",
        f"{len(by_float64)} model(s) failed the elementwise rule and passed by the float64 rule "
        "(PyTorch's own float32 error measured against a float64 run: ill-conditioned "
        "outputs): " + (", ".join(r["id"] for r in by_float64) or "none") + ".",
        "",
    ]
    lines += [f"Perturbed {t}." for t in tallies] + ([""] if tallies else [])
    return lines


def write_markdown(
    path: Path, results: dict[str, dict[str, Any]], planned: list[str], notes: list[str]
) -> None:
    rows = ["| family | models | whole pipeline OK | % | torch.fx | torch.export | "
            "plain FX fails | failures by stage |", "|---|---|---|---|---|---|---|---|"]
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in results.values():
        by_family[record["family"]].append(record)
    planned_by_family = Counter(p.split(":", 1)[0] for p in planned)
    for family in FAMILIES:
        records = by_family.get(family, [])
        if not records and not planned_by_family.get(family):
            continue
        ok = sum(r["status"] == "ok" for r in records)
        tracers = Counter(r.get("tracer") for r in records)
        plain = sum(r.get("plain_fx") is False for r in records)
        stages = Counter(r["stage"] for r in records if r["status"] != "ok")
        failed = ", ".join(f"{s} {n}" for s, n in stages.most_common()) or "-"
        done = len(records)
        pct = f"{100 * ok / done:.0f}%" if done else "-"
        total = planned_by_family.get(family, done)
        rows.append(f"| {family} | {done} of {total} run | {ok} | {pct} | "
                    f"{tracers.get('torch.fx', 0)} | {tracers.get('torch.export', 0)} | "
                    f"{plain} | {failed} |")
    missing = [p for p in planned if p not in results]
    failures = ["| model | stage | tracer | reason |", "|---|---|---|---|"]
    for record in sorted(results.values(), key=lambda r: r["id"]):
        if record["status"] == "ok":
            continue
        reason = str(record.get("error", "")).replace("|", "\\|").replace("\n", " ")[:240]
        extra = ""
        if record["stage"] == "export" and record.get("original_exports") is False:
            extra = " (torch.onnx cannot export the original either)"
        failures.append(f"| {record['id']} | {record['stage']} | {record.get('tracer', '-')} | "
                        f"{reason}{extra} |")
    text = [
        "# Zoo coverage",
        "",
        "The whole fxattn pipeline per model, random weights, small inputs: transform (DIA + "
        "SSIA) -> one training step -> strip -> ONNX export -> onnxruntime parity (batch 2 and "
        f"3, fxattn.export_onnx's default rule: every element within atol {DEFAULT_ATOL:g} + "
        f"rtol {DEFAULT_RTOL:g} x |PyTorch|, else judged against a float64 run). One subprocess "
        "per model. `plain FX fails`: models `torch.fx.symbolic_trace` cannot trace; "
        "`torch.export`: models served by fxattn's export-based capture.",
        "",
        "Command: `python benchmarks/zoo_coverage.py` (see the script's docstring).",
        "",
    ]
    text += [f"Note: {note}" for note in notes] + ([""] if notes else [])
    if missing:
        text += [f"**Partial run:** {len(missing)} of {len(planned)} planned models have no "
                 "result yet: " + ", ".join(missing[:40]) + (" ..." if len(missing) > 40 else ""),
                 ""]
    text += ["## Summary", "", *rows, ""]
    timm_records = by_family.get("timm", [])
    if timm_records:
        text += [f"timm: one representative (the smallest variant) per architecture module; "
                 f"{sum(r['status'] == 'ok' for r in timm_records)} of {len(timm_records)} "
                 "modules pass the whole pipeline.", ""]
    heldout = by_family.get("timm.heldout", [])
    if heldout:
        text += [f"timm.heldout: a fixed random sample (seed 0) of {len(heldout)} other timm "
                 "variants, below `large` size, never used to tune fxattn; "
                 f"{sum(r['status'] == 'ok' for r in heldout)} pass the whole pipeline.", ""]
    text += ["## Failures", "", *(failures if len(failures) > 2 else ["None."]), ""]
    text += margin_section(results)
    text += _per_model_table(results, BEYOND_CLASSIFIERS)
    exporters = Counter(r.get("exporter") for r in results.values() if r["status"] == "ok")
    special = ["| model | exporter | note |", "|---|---|---|"]
    for record in sorted(results.values(), key=lambda r: r["id"]):
        if record["status"] == "ok" and (record.get("exporter") != "dynamo"
                                         or record.get("parity_note")):
            special.append(f"| {record['id']} | {record.get('exporter')} | "
                           f"{record.get('parity_note', '')} |")
    text += [
        "## Passed another way",
        "",
        "Exporters of the passing models: " + ", ".join(
            f"{name} {count}" for name, count in exporters.most_common()) + ". `dynamo+compat`: "
        "the dynamo exporter with fxattn's exact export-compatibility rewrites, used after a "
        "plain export failed; `torchscript`: the fallback exporter. An ill-conditioned model "
        "passed parity by the float64 rule (see Verification margins).",
        "",
        *(special if len(special) > 2 else ["None."]),
        "",
    ]
    path.write_text("\n".join(text))


# Families whose rows zoo.md lists one by one: what SSIA found matters as much as the status.
BEYOND_CLASSIFIERS = ("torchvision.video", "torchvision.optical_flow", "torchvision.quantization",
                      "ultralytics", "diffusers")


def _per_model_table(results: dict[str, dict[str, Any]], families: tuple[str, ...]) -> list[str]:
    """Markdown lines: one row per model of ``families`` with its input, sites and SSIA pairs."""
    records = sorted((r for r in results.values() if r["family"] in families),
                     key=lambda r: (families.index(r["family"]), r["id"]))
    if not records:
        return []
    rows = ["## Beyond classifiers, per model", "",
            "Trained with the family's own loss (see the script's docstring). `taps`: stage "
            "outputs SSIA reads; `pairs`: the (higher supervises lower) pairs it trains.", "",
            "| model | input | tracer | DIA sites | taps | pairs | exporter | result |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        result = "ok" if r["status"] == "ok" else f"fails at {r['stage']}"
        rows.append(f"| {r['id']} | {r.get('input', '-')} | {r.get('tracer', '-')} | "
                    f"{r.get('sites', '-')} | {r.get('taps', '-')} | {r.get('pairs', '-')} | "
                    f"{r.get('exporter', '-')} | {result} |")
    return [*rows, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="restrict to a family (repeatable); default all")
    parser.add_argument("--only", help="regex on model ids")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                        help="parallel subprocesses (the CPU is shared: default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--fresh", action="store_true", help="ignore existing results")
    parser.add_argument("--retry-failed", action="store_true", help="rerun failed models")
    parser.add_argument("--rerun", action="store_true",
                        help="rerun the selected models (--family/--only), passed ones too")
    parser.add_argument("--report", action="store_true", help="only rewrite zoo.md")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", action="append", default=[],
                        help="a remark on the run for zoo.md, added to the earlier ones "
                             "(repeatable; kept in zoo.json; --fresh starts over)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        record = run_pipeline(args.child)
        print(RESULT_MARK + json.dumps(record, default=str), flush=True)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "zoo.json", args.out / "zoo.md"
    families = tuple(args.family or FAMILIES)
    results = {} if args.fresh else load_results(json_path)
    kept = [] if args.fresh or not json_path.exists() else json.loads(
        json_path.read_text()).get("notes", [])
    notes = kept + [note for note in args.note if note not in kept]  # a rerun adds its note
    planned = all_models(families)
    if args.family and json_path.exists():
        previous = json.loads(json_path.read_text()).get("planned", [])
        planned = list(dict.fromkeys(previous + planned))
    selected = [m for m in planned if m.split(":", 1)[0] in families]
    if args.only:
        selected = [m for m in selected if re.search(args.only, m)]
    todo = [m for m in selected if m not in results or args.rerun
            or (args.retry_failed and results[m]["status"] != "ok")]
    if args.report:
        todo = []
    lock = threading.Lock()

    def one(model_id: str) -> None:
        record = run_child(model_id, args.timeout)
        with lock:
            results[model_id] = record
            save_results(json_path, results, planned, notes)
            write_markdown(md_path, results, planned, notes)
            where = ""
            if record["status"] != "ok":
                where = f" at {record['stage']}: {record.get('error')}"
            print(f"[{len(results)}/{len(planned)}] {model_id}: {record['status']}"
                  f" ({record.get('tracer', '-')}, {record['seconds']} s){where}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    save_results(json_path, results, planned, notes)
    write_markdown(md_path, results, planned, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
