"""The self-judge: a small CNN trained only on the user's own real images, cross-fitted.

It answers "does this generated image look like its intended class, to a classifier of this
dataset?" for any dataset the pipeline takes, at a small working resolution (the model's, at most
JUDGE_SIDE pixels). K models are trained on K folds of the real images (each leaves one fold
out, so every real image has an out-of-fold prediction that measures the judge honestly); a
candidate's score is the mean of the K models' probabilities of its intended class. Training
draws everything (weights, batches, augmentation) from one seeded generator, so the same images
and seed give the same judge on the same machine and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

JUDGE_SIDE = 32  # working resolution: enough to tell classes apart, cheap on a CPU


class JudgeCNN(nn.Module):
    """Three conv blocks and global average pooling: resolution-agnostic, about 25k parameters."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1] -> (B, num_classes) logits."""
        x = x - 0.5
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, w/2, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, w, S/4, S/4)
        x = F.relu(self.conv3(x)).mean(dim=(2, 3))  # (B, 2w)
        return self.head(x)


def working_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, S, S, 3) float32 in [0, 1] at the judge's working resolution."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    side = min(JUDGE_SIDE, images.shape[1])
    if images.shape[1] != side:
        x = F.interpolate(x, size=(side, side), mode="area")
    return x.permute(0, 2, 3, 1).numpy()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine per image (rotation +-15 deg, scale 0.9-1.1, shift +-6% of the side)."""
    n = len(x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(15)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class JudgeTraining:
    folds: int = 3  # K cross-fitted models
    steps: int = 300  # updates per model
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def _train_one(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: JudgeTraining, gen: torch.Generator
) -> JudgeCNN:
    model = JudgeCNN(num_classes)
    for p in model.parameters():  # the default init, drawn from our generator
        if p.ndim > 1:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=gen)
        else:
            nn.init.zeros_(p)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # class-balanced draws, so a rare class with 10 images is seen as often as a head class
    counts = torch.bincount(y, minlength=num_classes).float()
    weights = (1.0 / counts.clamp_min(1))[y]
    for _ in range(cfg.steps):
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
        loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class SelfJudge:
    """K cross-fitted models; `score` is the mean probability of the intended class."""

    models: list[JudgeCNN]
    oof_accuracy: float  # accuracy of the out-of-fold predictions on the real images
    oof_accuracy_per_class: dict[int, float]

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, num_classes) float32, the K models' mean softmax."""
        x = torch.from_numpy(working_images(images)).permute(0, 3, 1, 2)
        probs = [F.softmax(m(x), dim=1) for m in self.models]
        return torch.stack(probs).mean(0).numpy().astype(np.float32)

    def score(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Probability of each image's intended class: (N,) float32."""
        probs = self.probabilities(images)
        return probs[np.arange(len(images)), classes]

    def state(self) -> dict[str, torch.Tensor]:
        """All K models' weights in one flat dict (for safetensors)."""
        return {
            f"{k}.{name}": t
            for k, m in enumerate(self.models)
            for name, t in m.state_dict().items()
        }

    @staticmethod
    def from_state(state: dict[str, torch.Tensor], num_classes: int, folds: int) -> SelfJudge:
        models = []
        for k in range(folds):
            m = JudgeCNN(num_classes)
            m.load_state_dict(
                {n.split(".", 1)[1]: t for n, t in state.items() if n.split(".")[0] == str(k)}
            )
            models.append(m.eval())
        return SelfJudge(models, float("nan"), {})


def train_self_judge(
    images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: JudgeTraining
) -> SelfJudge:
    """Cross-fitted judges on real images (N, H, W, 3) uint8 with class indices (N,) in
    [0, num_classes): fold k's model never sees fold k, which it alone predicts out of fold."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.from_numpy(working_images(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    fold = torch.randperm(len(y), generator=gen) % cfg.folds
    models, oof = [], torch.empty(len(y), dtype=torch.int64)
    for k in range(cfg.folds):
        train, held = (fold != k).nonzero().squeeze(1), (fold == k).nonzero().squeeze(1)
        model = _train_one(x[train], y[train], num_classes, cfg, gen)
        with torch.inference_mode():
            oof[held] = model(x[held]).argmax(1)
        models.append(model)
    correct = (oof == y).float()
    per_class = {int(c): float(correct[y == c].mean()) for c in torch.unique(y).tolist()}
    return SelfJudge(models, float(correct.mean()), per_class)


def rms_distances(candidates: np.ndarray, references: np.ndarray) -> np.ndarray:
    """RMS pixel distance (working resolution, [0, 1]) from each candidate to its nearest reference.

    candidates (N, S, S, 3), references (M, S, S, 3) float32 -> (N,) float32.
    """
    a = torch.from_numpy(candidates.reshape(len(candidates), -1))
    b = torch.from_numpy(references.reshape(len(references), -1))
    d = _pairwise(a, b).min(dim=1).values / math.sqrt(a.shape[1])
    return d.numpy().astype(np.float32)


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M), the same at any thread count: float64, each pair summed on its
    own (cdist's matrix-product form rounds differently as torch's thread count changes, and the
    threshold and scores land in every sample's JSON)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def near_copy_threshold(images: np.ndarray, labels: np.ndarray, percentile: float) -> float:
    """The `percentile` of real images' distances to their nearest other real image of the same
    class (working resolution): a generated image closer than this to a real one is a near-copy."""
    x = working_images(images)
    nearest = []
    for c in np.unique(labels):
        members = x[labels == c]
        if len(members) < 2:
            continue
        flat = torch.from_numpy(members.reshape(len(members), -1))
        d = _pairwise(flat, flat) / math.sqrt(flat.shape[1])
        d.fill_diagonal_(float("inf"))
        nearest.append(d.min(dim=1).values)
    if not nearest:
        return 0.0
    return float(np.percentile(torch.cat(nearest).numpy(), percentile))
