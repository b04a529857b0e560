"""The downstream classifier of evaluation: a small CNN, its training loop, and the classic baselines.

Everything random takes an explicit `torch.Generator` (weights, batch order, augmentation draws),
so a training seed fully determines a run on a given machine. Images are (N, 32, 32, 3) uint8
numpy arrays throughout, as read from PNGs; the model sees them as (N, 3, 32, 32) float in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


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


def reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default conv/linear initialisation, drawn from `generator` instead of the global RNG."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)


@dataclass(frozen=True)
class TrainRecipe:
    """The CNN's training settings; one recipe for every variant, fixed before any measurement."""

    steps: int = 600  # a fixed number of updates for every variant, so none gets more training
    batch_size: int = 32
    lr: float = 1e-3  # Adam's usual learning rate
    weight_decay: float = 0.0
    threads: int = 1  # torch threads: the CNN is tiny and the machine is shared

    def to_dict(self) -> dict:
        return asdict(self)


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
