"""Generate: seeds -> images on model actors, in fixed batches within each shard.

PNG encoding is left to the writer, a separate actor, so that it overlaps with the next shard's
model work instead of keeping the GPU waiting."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.inversion import InversionConfig, Inverter
from pipeline.models import ModelSpec, load_pipeline
from pipeline.runner import Resources


@dataclass(frozen=True)
class GenerateConfig:
    guidance_scale: float = 3.0  # classifier-free guidance of the regenerated images
    num_inference_steps: int = 25  # DDIM steps from each seed
    batch_size: int = 16  # images per UNet batch; fixed, so a resumed shard is computed identically
    resources: Resources = field(default_factory=Resources)


class GenerateStage:
    """batch {key (N,), seed (N,C,h,w) float32, prompt (N,), ...} -> the batch without `seed`, plus
    image (N,H,W,3) uint8 and ok (N,) bool.

    N is one shard; the shard is generated in consecutive sub-batches of `batch_size`.
    A sample whose image comes out non-finite is marked not ok (counted, never written).
    """

    def __init__(
        self, model: dict, guidance_scale: float, num_inference_steps: int, batch_size: int
    ):
        pipe, _ = load_pipeline(ModelSpec(**model), with_hash=False)
        self.inverter = Inverter(pipe, InversionConfig(num_inference_steps=num_inference_steps))
        self.guidance_scale, self.steps, self.batch_size = (
            guidance_scale,
            num_inference_steps,
            batch_size,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds, prompts = batch["seed"], [str(p) for p in batch["prompt"]]
        images, ok = [], []
        for start in range(0, len(seeds), self.batch_size):
            stop = start + self.batch_size
            finite = np.isfinite(seeds[start:stop]).reshape(len(seeds[start:stop]), -1).all(axis=1)
            images.append(
                self.inverter.generate(
                    seeds[start:stop], prompts[start:stop], self.guidance_scale, self.steps
                )
            )
            ok.append(finite)
        passed = {
            k: v for k, v in batch.items() if k != "seed"
        }  # provenance travels on to the writer
        return {**passed, "image": np.concatenate(images), "ok": np.concatenate(ok)}
