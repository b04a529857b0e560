"""Invert: encode, adjust and invert few-shot images into seeds on model actors.

Unit in:  key (B,) str, image (B, H, W, 3) uint8, prompt (B,) str, noise_seed (B,) int64.
Unit out: key, seed (B, C, h, w) float32, nfe (B,) int64, recon_psnr, recon_latent_rmse,
          vae_psnr, residual (B,) float32, failed (B,) bool (as `Inverter.invert` returns them).
A class's seeds go to `seeds/class_NNNN.parquet`, one SEEDS_SCHEMA row per source that inverted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tailseed.pipeline.config import NOT_HASHED, to_dict
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.inversion import InversionConfig, Inverter, max_nfe
from tailseed.pipeline.models import ModelSpec, load_pipeline
from tailseed.pipeline.runner import Resources, Stage
from tailseed.pipeline.seed_table import noise_seed, seed_row


@dataclass(frozen=True)
class InvertConfig:
    solver: InversionConfig = field(default_factory=InversionConfig)
    batch_size: int = 20  # images per inversion unit (fixed, so reruns compute identical seeds)
    resources: Resources = field(
        default_factory=lambda: Resources(num_cpus=1.5), metadata=NOT_HASHED
    )

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise UserError(f"{where}.batch_size is {self.batch_size}; at least 1")


class InvertStage:
    """Inverts one unit of source images (schema in the module docstring) with one model."""

    name = "invert"

    def __init__(self, model: dict, solver: dict):
        pipe, _ = load_pipeline(ModelSpec(**model), with_hash=False)
        self.inverter = Inverter(pipe, InversionConfig(**solver))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inverter.invert(
            batch["image"], [str(p) for p in batch["prompt"]], [int(s) for s in batch["noise_seed"]]
        )
        return {"key": batch["key"], **out}

    @staticmethod
    def spec(model: ModelSpec, config: InvertConfig) -> Stage:
        kwargs = {"model": to_dict(model), "solver": to_dict(config.solver)}
        return Stage(InvertStage.name, InvertStage, kwargs, config.resources)

    @staticmethod
    def units(sources: list[tuple[str, np.ndarray, str]], config: InvertConfig, salt: str) -> dict:
        """Units of `batch_size` images from (key, image, prompt) in order; each image's
        adjustment noise is seeded by its key and `salt` (the config hash)."""
        units = {}
        for u, start in enumerate(range(0, len(sources), config.batch_size)):
            chunk = sources[start : start + config.batch_size]
            units[u] = {
                "key": np.asarray([k for k, _, _ in chunk]),
                "image": np.stack([im for _, im, _ in chunk]),
                "prompt": np.asarray([p for *_, p in chunk]),
                "noise_seed": np.asarray([noise_seed(k, salt) for k, _, _ in chunk], np.int64),
            }
        return units

    @staticmethod
    def max_nfe(config: InvertConfig) -> int:
        """The most UNet evaluations one source image may cost, as the solver counts them."""
        return max_nfe(config.solver)


# A class whose sources the model reconstructs this many dB below its own VAE's round trip, or
# whose images its VAE cannot represent (under HEALTH_MIN_DB), is one the model does not know: its
# generated images are unlikely to be of the class. (Measured on the embedded digits model: its
# digits at 29.6-32.1 dB, VAE 30.7-33.2; coloured shapes at 7.2-16.9 dB, VAE 7.2-17.0.)
HEALTH_MARGIN_DB = 6.0
HEALTH_MIN_DB = 20.0


def class_health(keys: list[str], results: dict[str, dict]) -> dict:
    """Mean reconstruction PSNR of a class's sources against the VAE's own round trip, and a
    warning (with what to do) when the model reconstructs the class badly."""
    recon = [float(results[k]["recon_psnr"]) for k in keys if not results[k]["failed"]]
    vae = [float(results[k]["vae_psnr"]) for k in keys]
    health = {
        "recon_psnr": round(float(np.mean(recon)), 2) if recon else None,
        "vae_psnr": round(float(np.mean(vae)), 2),
    }
    if (
        not recon
        or health["recon_psnr"] < health["vae_psnr"] - HEALTH_MARGIN_DB
        or health["vae_psnr"] < HEALTH_MIN_DB
    ):
        health["warning"] = (
            f"the model reconstructs this class's images at {health['recon_psnr']} dB against "
            f"{health['vae_psnr']} dB for its own VAE: it does not know this domain, and its "
            f"generated images are unlikely to show the class; use a model trained on such images"
        )
    return health


def seed_rows(
    class_index: int,
    class_name: str,
    prompt: str,
    keys: list[str],
    results: dict[str, dict],
    config: InvertConfig,
    model: str,
    model_hash: str,
) -> tuple[list[dict], dict[str, str]]:
    """A class's SEEDS_SCHEMA rows from its sources' results, and the keys that failed (-> why)."""
    rows, failed = [], {}
    for key in keys:
        r = results[key]
        if r["failed"]:
            failed[key] = f"inversion diverged (residual {float(r['residual']):.3g})"
            continue
        solver = config.solver
        rows.append(
            seed_row(
                key,
                class_index,
                class_name,
                prompt,
                r,
                solver.guidance_scale,
                solver.num_inference_steps,
                model,
                model_hash,
            )
        )
    return rows, failed
