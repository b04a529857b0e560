"""The downstream classifiers of evaluation: two CNNs, their training loops, and the classic baselines.

Two training loops:
- `train_classifier`: the first protocol (today's second table): the small DigitCNN on a fixed
  training set, uniform shuffling, no augmentation in the loop.
- `train_as_users_train`: the protocol users follow: every batch is augmented on the fly
  (`OnlineAugment`: rotation, scale, shift), and batches mix real and generated (or added)
  samples at a ratio, each added sample with a loss weight, through the product's mixing loader
  (`pipeline.mixing.MixingSampler`). Recipes: `SMALL` (DigitCNN, 600 steps of 32) and `WIDE`
  (WideCNN, 800 steps of 48).

Everything random takes an explicit generator (weights and augmentation draws: a
`torch.Generator`; batch order: the sampler's numpy Generator, or a torch one in the first loop),
so a training seed fully determines a run on a given machine. Images are (N, 32, 32, 3) uint8
numpy arrays throughout, as read from PNGs; the model sees them as (N, 3, 32, 32) float in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tailseed.pipeline.mixing import MixingSampler


class DigitCNN(nn.Module):
    """Three conv blocks (3x3 conv, ReLU, 2x2 max-pool) and one linear layer: ~25k parameters."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.head = nn.Linear(c3 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) float in [0, 1] -> (B, num_classes) logits."""
        x = x - 0.5
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, 8, 8)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, c3, 4, 4)
        return self.head(x.flatten(1))


class WideCNN(nn.Module):
    """Three wider conv layers (24, 48, 64 channels; 3x3, ReLU; 2x2 max-pool after the first two),
    global average pooling and one linear layer: ~40k parameters, all at 32x32 and 16x16 maps."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, int, int] = (24, 48, 64)):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) float in [0, 1] -> (B, num_classes) logits."""
        x = x - 0.5
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, 8, 8)
        x = F.relu(self.conv3(x))  # (B, c3, 8, 8)
        return self.head(x.mean((2, 3)))


ARCHITECTURES = {"small": DigitCNN, "wide": WideCNN}


def reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default conv/linear initialisation, drawn from `generator` instead of the global RNG."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)


@dataclass(frozen=True)
class OnlineAugment:
    """On-the-fly augmentation of every training batch, as users train: a random rotation, scale
    and shift of each image about its centre (bilinear, black fill), drawn from the training
    run's torch.Generator. No flips: a mirrored digit is not the same digit."""

    degrees: float = 15.0  # rotation uniform in [-degrees, degrees]
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor uniform in this range
    shift_px: float = 2.0  # shift uniform in [-shift_px, shift_px] pixels, per axis

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) float -> the same shape, each image moved by its own random draw."""
        n, _, h, w = x.shape

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        angle = torch.deg2rad(uniform(-self.degrees, self.degrees))
        scale = uniform(*self.scale)
        # a shift of s pixels is 2 s / size in grid_sample's normalised coordinates
        shift = torch.stack(
            [
                uniform(-self.shift_px, self.shift_px) * 2 / w,
                uniform(-self.shift_px, self.shift_px) * 2 / h,
            ],
            -1,
        )
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # output pixel p samples the input at A^-1 (p - shift): the inverse of rotate-scale-shift
        inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        offset = -(inverse @ shift[:, :, None])
        theta = torch.cat([inverse, offset], -1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class TrainRecipe:
    """The CNN's training settings; one recipe for every variant, fixed before any measurement.

    The defaults are the first protocol's (the small CNN, no augmentation in the loop);
    `SMALL` and `WIDE` below are the recipes of the protocol users follow.
    """

    steps: int = 600  # a fixed number of updates for every variant, so none gets more training
    batch_size: int = 32
    lr: float = 1e-3  # Adam's usual learning rate
    weight_decay: float = 0.0
    threads: int = 1  # torch threads: the CNN is tiny and the machine is shared
    arch: str = "small"  # a key of ARCHITECTURES
    augment: OnlineAugment | None = None  # on-the-fly augmentation of every batch (None: off)
    lr_schedule: str = "constant"  # "constant", or "cosine": lr * (1 + cos(pi t / steps)) / 2

    def to_dict(self) -> dict:
        return asdict(self)


# The recipes of the protocol users follow (augmentation on). WIDE is the prototype study's.
SMALL = TrainRecipe(steps=600, batch_size=32, arch="small", augment=OnlineAugment())
WIDE = TrainRecipe(steps=800, batch_size=48, arch="wide", augment=OnlineAugment())
RECIPES = {"small": SMALL, "wide": WIDE}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def train_classifier(
    images: np.ndarray, labels: np.ndarray, recipe: TrainRecipe, seed: int, num_classes: int = 10
) -> DigitCNN:
    """Train a fresh DigitCNN with cross-entropy on (N, 32, 32, 3) uint8 images and (N,) labels.

    Batches are drawn epoch by epoch from a shuffled order (every image once per epoch), for
    exactly `recipe.steps` updates. No augmentation inside the loop: what differs between
    variants is only the training set.
    """
    torch.set_num_threads(recipe.threads)
    generator = torch.Generator().manual_seed(seed)
    model = DigitCNN(num_classes)
    reset_parameters(model, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    x_all = to_tensor(images)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(recipe.steps):
        # 1. next batch of the current epoch's shuffled order (a new order when it runs out)
        if len(order) < recipe.batch_size:
            order = torch.cat([order, torch.randperm(len(y_all), generator=generator)])
        batch, order = order[: recipe.batch_size], order[recipe.batch_size :]
        # 2. one cross-entropy step
        loss = F.cross_entropy(model(x_all[batch]), y_all[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def train_as_users_train(
    real_images: np.ndarray,
    real_labels: np.ndarray,
    added_images: np.ndarray | None,
    added_labels: np.ndarray | None,
    recipe: TrainRecipe,
    seed: int,
    ratio: float = 0.0,
    weight: float = 1.0,
    num_classes: int = 10,
    checkpoints: dict[int, Callable[[nn.Module], object]] | None = None,
) -> tuple[nn.Module, dict[int, object]]:
    """Train a fresh `recipe.arch` CNN on real plus added samples, as users train.

    Batches come from the product's mixing loader: a fraction `ratio` of each batch is drawn from
    the added samples (generated images, or oversampled copies), each with loss weight `weight`
    (real ones 1.0), with the weighted mean cross-entropy sum(w * loss) / sum(w). Every batch is
    augmented with `recipe.augment` when set. The seed fixes everything: the weights and the
    augmentation draws (one torch.Generator, weights first, so the same seed starts every variant
    from the same weights) and the batch order (the sampler's numpy Generator).
    `checkpoints`: step -> callable(model), called (in eval mode) after that many updates; their
    results are returned by step, so one run gives the accuracies of several step counts.
    """
    torch.set_num_threads(recipe.threads)
    generator = torch.Generator().manual_seed(seed)
    model = ARCHITECTURES[recipe.arch](num_classes)
    reset_parameters(model, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    real_x = to_tensor(real_images)
    real_y = torch.as_tensor(real_labels, dtype=torch.long)
    if added_images is None or len(added_images) == 0:
        added_x, added_y = real_x[:0], real_y[:0]
    else:
        added_x, added_y = to_tensor(added_images), torch.as_tensor(added_labels, dtype=torch.long)
    if recipe.lr_schedule == "cosine":
        # decays to 0 at `recipe.steps`, so an earlier checkpoint is not a shorter run's model
        early = sorted(s for s in (checkpoints or {}) if s != recipe.steps)
        if early:
            raise ValueError(f"checkpoints {early}: a cosine schedule has only the final one")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / recipe.steps))
        )
    elif recipe.lr_schedule == "constant":
        schedule = None
    else:
        raise ValueError(f"lr_schedule {recipe.lr_schedule!r}: use constant or cosine")
    sampler = MixingSampler(
        len(real_y), len(added_y), recipe.batch_size, ratio, weight, rng=seed, steps=recipe.steps
    )
    results: dict[int, object] = {}
    model.train()
    for step, batch in enumerate(sampler, start=1):
        # 1. the batch's images from both pools, augmented
        index = torch.from_numpy(batch.index)
        is_added = torch.from_numpy(batch.generated)
        x = torch.empty((len(index), *real_x.shape[1:]))
        y = torch.empty(len(index), dtype=torch.long)
        x[~is_added], y[~is_added] = real_x[index[~is_added]], real_y[index[~is_added]]
        x[is_added], y[is_added] = added_x[index[is_added]], added_y[index[is_added]]
        if recipe.augment is not None:
            x = recipe.augment(x, generator)
        # 2. one weighted cross-entropy step
        w = torch.from_numpy(batch.weight)
        loss = (w * F.cross_entropy(model(x), y, reduction="none")).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if checkpoints and step in checkpoints:
            model.eval()
            results[step] = checkpoints[step](model)
            model.train()
    model.eval()
    return model, results


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> (N,) predicted class."""
    model.eval()
    out = [
        model(to_tensor(images[i : i + batch_size])).argmax(1).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


# ------------------------------------------------------------------------------------------------
# Baselines that add images without a generative model


def oversample(images: np.ndarray, count: int) -> np.ndarray:
    """`count` copies of the real images, cycling through them in order (each used equally often)."""
    if len(images) == 0:
        raise ValueError("oversample: no images to copy")
    return images[np.arange(count) % len(images)].copy()


@dataclass(frozen=True)
class ClassicAugment:
    """The usual hand-made augmentation for small digit images, fixed before any measurement.

    Random affine (rotation, scale, shear about the centre, as torchvision's RandomAffine), random
    crop of a zero-padded image (a shift of up to `pad` pixels: 10% of 32, the usual translate for
    digits) and additive Gaussian pixel noise. No flips: a mirrored digit is not the same digit.
    """

    degrees: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear_degrees: float = 10.0
    pad: int = 3
    noise_std: float = 0.05  # in [0, 1] pixel units

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, images: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
        """`count` augmented images (uint8) from (N, H, W, 3) uint8 sources, each used equally often."""
        if len(images) == 0:
            raise ValueError("classic augmentation: no images to augment")
        x = to_tensor(images[np.arange(count) % len(images)])  # (count, 3, H, W)
        x = self.affine(x, generator)
        x = self.crop(x, generator)
        x = x + self.noise_std * torch.randn(x.shape, generator=generator)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Rotate, scale and shear each image about its centre; the background fills with 0 (black)."""
        n = x.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        angle = torch.deg2rad(uniform(-self.degrees, self.degrees))
        scale = uniform(*self.scale)
        shear = torch.deg2rad(uniform(-self.shear_degrees, self.shear_degrees))
        # forward map A = R(angle) @ Shear_x(shear) * scale; grid_sample needs its inverse
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        forward = (
            torch.stack(
                [
                    torch.stack([cos, cos * tan - sin], -1),
                    torch.stack([sin, sin * tan + cos], -1),
                ],
                -2,
            )
            * scale[:, None, None]
        )  # (n, 2, 2)
        theta = torch.cat([torch.linalg.inv(forward), torch.zeros(n, 2, 1)], -1)  # (n, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pad by `pad` zeros on each side and cut a window of the original size at a random offset."""
        if self.pad == 0:
            return x
        n, _, h, w = x.shape
        padded = F.pad(x, (self.pad,) * 4)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        return torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
        )
