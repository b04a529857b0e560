"""Invert: encode, adjust and invert few-shot images into seeds on model actors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.inversion import InversionConfig, Inverter
from pipeline.models import ModelSpec, load_pipeline
from pipeline.runner import Resources


@dataclass(frozen=True)
class InvertConfig:
    solver: InversionConfig = field(default_factory=InversionConfig)
    batch_size: int = 8  # images per inversion unit (fixed, so reruns compute identical seeds)
    resources: Resources = field(default_factory=Resources)


class InvertStage:
    """batch {key (B,), image (B,H,W,3) uint8, prompt (B,), noise_seed (B,) int64} -> the batch's
    seeds and measures: key, seed (B,C,h,w) float32, nfe, recon_psnr, recon_latent_rmse, residual,
    failed."""

    def __init__(self, model: dict, solver: dict):
        pipe, _ = load_pipeline(ModelSpec(**model), with_hash=False)
        self.inverter = Inverter(pipe, InversionConfig(**solver))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inverter.invert(
            batch["image"], [str(p) for p in batch["prompt"]], [int(s) for s in batch["noise_seed"]]
        )
        return {"key": batch["key"], **out}
