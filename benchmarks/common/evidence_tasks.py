"""The two tasks of ``benchmarks/evidence.py``: data generators and their residual CNNs.

Both tasks were picked because a small CNN does *not* saturate them (headroom for an effect to
show) and because they are built offline, deterministically, from what is installed:

* **Cluttered digits** (2-D, ``(B, 1, 40, 40)``): the cluttered-MNIST recipe of the recurrent
  attention and spatial-transformer papers, made from scikit-learn's bundled 8x8 digits. The
  classifier has to find a digit at a random position among digit-like clutter, which is what
  attention is claimed to help with.
* **MNIST-1D** (1-D, ``(B, 1, 40)``): Greydanus' procedurally generated 1-D digits
  (``mnist1d.data.make_dataset``, which builds the data from templates and never downloads),
  designed so that architectures differ measurably. Exercises the ``(B, C, L)`` layout.

The network is one residual CNN for both (``ResidualCNN``, ``dim=1`` or ``2``): a stem, stages
of basic blocks whose first block downsamples, global average pooling and a linear head. Every
block ends in ``out + shortcut`` (a DIA site for fxattn) and has an ``attention`` slot on its
residual branch (identity unless an arm fills it, e.g. with CBAM) placed where SE-ResNet and
CBAM put theirs: after the last BN, before the addition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ClutterRecipe:
    """How the cluttered-digits set is generated (stored in the results verbatim)."""

    canvas: int = 32            # canvas side (px)
    digit: int = 16             # the 8x8 digit is bilinearly upsampled to digit x digit
    fragments: int = 2          # clutter fragments per canvas
    fragment: int = 8           # side of a fragment cut from another upsampled digit
    noise: float = 0.1          # std of the i.i.d. Gaussian pixel noise (pixels in [0, 1])
    train_copies: int = 2       # canvases per training digit (new position and clutter each)
    eval_copies: int = 2        # canvases per validation / test digit
    val_fraction: float = 0.2   # of the 1,797 source digits, stratified
    test_fraction: float = 0.2
    seed: int = 0               # split and generator seed

    def describe(self) -> str:
        return (
            f"scikit-learn's 1,797 8x8 digits, split by source digit (stratified, seed "
            f"{self.seed}) into train / validation / test "
            f"({1 - self.val_fraction - self.test_fraction:.0%} / {self.val_fraction:.0%} / "
            f"{self.test_fraction:.0%}); each digit upsampled (bilinear) to "
            f"{self.digit}x{self.digit}, pasted at a uniformly random position of a "
            f"{self.canvas}x{self.canvas} canvas together with {self.fragments} random "
            f"{self.fragment}x{self.fragment} fragments cut from other digits of the same split "
            f"(pixel-wise max), plus Gaussian pixel noise (std {self.noise}), clipped to [0, 1]; "
            f"{self.train_copies} canvases per training digit, {self.eval_copies} per "
            f"validation/test digit; normalised with the training mean/std; numpy generator "
            f"seed {self.seed}"
        )


def _upsampled_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images[:, 0].clamp(0, 1).numpy(), digits.target.astype(np.int64)


def _canvases(digits: np.ndarray, labels: np.ndarray, copies: int, recipe: ClutterRecipe,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n, side, frag = len(digits), recipe.canvas, recipe.fragment
    out = np.zeros((n * copies, side, side), dtype=np.float32)
    out_labels = np.repeat(labels, copies)
    for k, source in enumerate(np.repeat(np.arange(n), copies)):
        canvas = out[k]
        for _ in range(recipe.fragments):
            other = digits[rng.integers(n)]
            fy, fx = rng.integers(0, recipe.digit - frag + 1, size=2)
            y, x = rng.integers(0, side - frag + 1, size=2)
            np.maximum(canvas[y:y + frag, x:x + frag], other[fy:fy + frag, fx:fx + frag],
                       out=canvas[y:y + frag, x:x + frag])
        y, x = rng.integers(0, side - recipe.digit + 1, size=2)
        window = canvas[y:y + recipe.digit, x:x + recipe.digit]
        np.maximum(window, digits[source], out=window)
        canvas += rng.normal(0.0, recipe.noise, size=canvas.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0), out_labels


def cluttered_digits(recipe: ClutterRecipe = ClutterRecipe()) -> dict[str, Split]:
    """``{"train" | "val" | "test": (images (N, 1, canvas, canvas), labels (N,))}``.

    The split is by *source digit*, so no test digit is ever seen in training (only its
    writer's style through other digits). Clutter comes from digits of the same split.
    """
    from sklearn.model_selection import train_test_split

    digits, labels = _upsampled_digits(recipe.digit)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=recipe.test_fraction, stratify=labels,
                                  random_state=recipe.seed)
    train, val = train_test_split(rest, test_size=recipe.val_fraction / (1 - recipe.test_fraction),
                                  stratify=labels[rest], random_state=recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    raw = {}
    for name, idx, copies in (("train", train, recipe.train_copies),
                              ("val", val, recipe.eval_copies),
                              ("test", test, recipe.eval_copies)):
        raw[name] = _canvases(digits[idx], labels[idx], copies, recipe, rng)
    mean, std = raw["train"][0].mean(), raw["train"][0].std()
    return {name: (torch.from_numpy((x - mean) / std).unsqueeze(1), torch.from_numpy(y))
            for name, (x, y) in raw.items()}


@dataclass(frozen=True)
class Mnist1dRecipe:
    """``mnist1d``'s default generator arguments (5,000 samples, length 40, seed 42); the
    validation part carved from its 4,000 training samples, and a smaller training set (a
    residual CNN trained on all 3,200 reaches ~97%: no headroom)."""

    val_size: int = 800
    train_size: int = 1000

    def describe(self) -> str:
        from mnist1d.data import get_dataset_args

        args = {k: v for k, v in get_dataset_args(as_dict=True).items() if k != "url"}
        return (f"mnist1d.data.make_dataset with its default arguments {args} (generated, "
                f"never downloaded); its test split (1,000) is the test set, the last "
                f"{self.val_size} of its 4,000 training samples the validation set and the "
                f"first {self.train_size} the training set")


def mnist1d(recipe: Mnist1dRecipe = Mnist1dRecipe()) -> dict[str, Split]:
    """``{"train" | "val" | "test": (signals (N, 1, 40), labels (N,))}``, generated offline."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # make_dataset seeds numpy's global generator
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.long)
    test = (torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1),
            torch.tensor(data["y_test"], dtype=torch.long))
    cut = len(y) - recipe.val_size
    return {"train": (x[:recipe.train_size], y[:recipe.train_size]), "val": (x[cut:], y[cut:]),
            "test": test}


# --------------------------------------------------------------------------- network


class Block(nn.Module):
    """Basic residual block (two 3-wide convolutions) with an ``attention`` slot."""

    def __init__(self, dim: int, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv1 = conv(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.attention: nn.Module = nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(conv(inplanes, planes, 1, stride, bias=False),
                                          norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attention(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class ResidualCNN(nn.Module):
    """Stem (conv, optionally a 2x max-pool as in ImageNet ResNets) + ``len(widths)`` stages
    of ``blocks`` basic blocks (stride 2 from stage 2 on)."""

    def __init__(self, dim: int, widths: tuple[int, ...], blocks: int, stem_stride: int,
                 stem_pool: bool = False, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
        pool = nn.AdaptiveAvgPool1d if dim == 1 else nn.AdaptiveAvgPool2d
        max_pool = nn.MaxPool1d if dim == 1 else nn.MaxPool2d
        self.stem = nn.Sequential(conv(in_channels, widths[0], 3, stem_stride, 1, bias=False),
                                  norm(widths[0]), nn.ReLU(inplace=True),
                                  *([max_pool(2)] if stem_pool else []))
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(
                Block(dim, inplanes, planes, stride),
                *(Block(dim, planes, planes, 1) for _ in range(blocks - 1))))
            inplanes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = pool(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def blocks(self) -> list[Block]:
        return [m for m in self.modules() if isinstance(m, Block)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class Task:
    """A task: its data, its network and its training recipe (identical for every arm)."""

    name: str
    title: str
    dim: int
    widths: tuple[int, ...]
    blocks: int
    stem_stride: int
    stem_pool: bool
    epochs: int
    batch: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3)

    def data(self) -> dict[str, Split]:
        return cluttered_digits() if self.name == "cluttered" else mnist1d()

    def recipe(self) -> str:
        return (ClutterRecipe() if self.name == "cluttered" else Mnist1dRecipe()).describe()

    def model(self) -> ResidualCNN:
        return ResidualCNN(self.dim, self.widths, self.blocks, self.stem_stride, self.stem_pool)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "recipe": self.recipe()}


TASKS = {
    "cluttered": Task("cluttered", "Cluttered digits (32x32, 2-D residual CNN)", dim=2,
                      widths=(8, 16, 32), blocks=2, stem_stride=2, stem_pool=False, epochs=30),
    "mnist1d": Task("mnist1d", "MNIST-1D (length 40, 1-D residual CNN)", dim=1,
                    widths=(8, 16, 32), blocks=2, stem_stride=1, stem_pool=False, epochs=15),
}
