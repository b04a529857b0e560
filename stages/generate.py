"""Generate: seeds -> images on model actors, in fixed batches within each shard.

Unit in:  shard (N,) int64 (all equal), key (N,) str, seed (N, C, h, w) float32, prompt (N,) str,
          guidance_scale (N,) float64, num_inference_steps (N,) int64, cls (N,) int64,
          meta (N,) str (the sample's provenance JSON), slots (N,) int64 (images its class keeps
          in the shard: N's rows of a class when there is no filter pool).
Unit out: the unit without `seed`, plus image (N, H, W, 3) uint8 and ok (N,) bool.
One unit is one shard; PNG encoding is left to the writer, a separate actor, so that it overlaps
with the next shard's model work instead of keeping the GPU waiting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailseed.pipeline.config import NOT_HASHED, to_dict
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.inversion import Sampler, guided_evals
from tailseed.pipeline.models import ModelSpec, load_pipeline
from tailseed.pipeline.runner import Resources, Stage


@dataclass(frozen=True)
class GenerateConfig:
    # None: as inverted. The seeds are solutions at the inversion's guidance and steps, so a walk
    # seed is regenerated with those unless the config sets its own.
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    batch_size: int = 40  # images per UNet batch; fixed, so a resumed shard is computed identically
    resources: Resources = field(
        default_factory=lambda: Resources(num_cpus=1.5), metadata=NOT_HASHED
    )

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise UserError(f"{where}.batch_size is {self.batch_size}; at least 1")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise UserError(
                f"{where}.num_inference_steps is {self.num_inference_steps}; at least 1"
            )
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise UserError(f"{where}.guidance_scale is {self.guidance_scale}; a finite number")


class GenerateStage:
    """Generates one shard's images (schema in the module docstring) with one model.

    Each sub-batch of `batch_size` rows runs at its rows' guidance and steps (a walks row carries
    them). A sample whose seed is not finite (which would decode to a black image) is marked not
    ok: counted, never written.
    """

    name = "generate"

    def __init__(self, model: dict, batch_size: int):
        pipe, _ = load_pipeline(ModelSpec(**model), with_hash=False)
        self.sampler = Sampler(pipe)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds, prompts = batch["seed"], [str(p) for p in batch["prompt"]]
        images = []
        for start in range(0, len(seeds), self.batch_size):
            part = slice(start, start + self.batch_size)
            for settings, rows in _by_settings(batch, part):
                image = self.sampler.generate(
                    seeds[rows], [prompts[i] for i in rows], settings[0], settings[1]
                )
                images.append((rows, image))
        image_out = np.zeros((len(seeds), *images[0][1].shape[1:]), np.uint8)
        for rows, image in images:
            image_out[rows] = image
        ok = np.isfinite(seeds.reshape(len(seeds), -1)).all(axis=1)
        passed = {k: v for k, v in batch.items() if k != "seed"}  # provenance travels on
        return {**passed, "image": image_out, "ok": ok}

    @staticmethod
    def spec(config, shards_dir: Path) -> Stage:
        """The runner's stage for an AugmentConfig: the model, and the `generate` section."""
        kwargs = {"model": to_dict(config.model), "batch_size": config.generate.batch_size}
        return Stage(GenerateStage.name, GenerateStage, kwargs, config.generate.resources)

    @staticmethod
    def unit(shard: int, slots: list[list[dict]], provenance) -> dict[str, np.ndarray]:
        """One shard's unit from its slots (each a list of walks rows: the candidates for one
        image kept); provenance(row) -> the sample's JSON. `slots` says, per row, how many images
        its class keeps in this shard."""
        rows = [r for slot in slots for r in slot]
        per_class: dict[int, int] = {}
        for slot in slots:
            per_class[slot[0]["class_index"]] = per_class.get(slot[0]["class_index"], 0) + 1
        return {
            "shard": np.full(len(rows), shard, dtype=np.int64),
            "key": np.asarray([r["key"] for r in rows]),
            "seed": np.stack([r["seed"] for r in rows]).astype(np.float32),
            "prompt": np.asarray([r["prompt"] for r in rows]),
            "guidance_scale": np.asarray([r["guidance_scale"] for r in rows], np.float64),
            "num_inference_steps": np.asarray([r["num_inference_steps"] for r in rows], np.int64),
            "cls": np.asarray([r["class_index"] for r in rows], dtype=np.int64),
            "meta": np.asarray([provenance(r) for r in rows]),
            "slots": np.asarray([per_class[r["class_index"]] for r in rows], np.int64),
        }

    @staticmethod
    def nfe(config: GenerateConfig, images: int) -> int:
        """UNet evaluations of generating `images` images (exact)."""
        return images * config.num_inference_steps * guided_evals(config.guidance_scale)


def _by_settings(batch: dict[str, np.ndarray], part: slice) -> list[tuple[tuple, np.ndarray]]:
    """The rows of `part` grouped by (guidance, steps), in first-seen order: one UNet batch each."""
    rows = np.arange(len(batch["key"]))[part]
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        settings = (float(batch["guidance_scale"][i]), int(batch["num_inference_steps"][i]))
        groups.setdefault(settings, []).append(int(i))
    return [(k, np.asarray(v)) for k, v in groups.items()]
