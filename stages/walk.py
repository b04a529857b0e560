"""Walk: new seeds for a rare class from walks between its inverted seeds, each with its provenance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tailseed.pipeline.config import HASHED_UNLESS_DEFAULT, stable_hash
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.walks import METHODS as WALK_METHODS
from tailseed.pipeline.walks import sample_walks

# the seed-space walks, plus "prompt": fresh Gaussian seeds, no inversion
METHODS = (*WALK_METHODS, "prompt")


@dataclass(frozen=True)
class WalkConfig:
    # nao (norm-aware paths and centroids) | slerp | lerp | prompt (fresh Gaussian seeds, no
    # inversion: the plain text-to-image baseline, written the same way)
    method: str = "nao"
    seed: int = 0  # which pairs and positions are drawn; same seed, same walks
    # Radians: each walk seed z becomes cos(a) z + sin(a) eps, eps a standard normal drawn from
    # the seed's key. 0 keeps the walks as they are; larger moves the images away from the
    # sources (the norm stays in the prior's range: both terms are seed-like).
    perturb_angle: float = field(default=0.0, metadata=HASHED_UNLESS_DEFAULT)

    def validate(self, where: str) -> None:
        if self.method not in METHODS:
            raise UserError(f"{where}.method: {self.method!r}; use one of {', '.join(METHODS)}")
        if not 0 <= self.perturb_angle <= math.pi / 2:
            raise UserError(f"{where}.perturb_angle: {self.perturb_angle} is not in [0, pi/2]")


def walk_key(
    class_index: int, position: int, sources, weights, method: str, config_hash: str
) -> str:
    """Content-derived key: class, walk position and a hash of sources, weights, method and config."""
    digest = stable_hash(
        [list(sources), [round(float(w), 6) for w in weights], method, config_hash], 10
    )
    return f"c{class_index:04d}_w{position:05d}_{digest}"


def gaussian_seeds(class_index: int, count: int, shape: list[int], seed: int) -> np.ndarray:
    """(count, *shape) float32 standard normal seeds, each from its own generator, so a seed
    depends only on (class, position, seed) and not on how many others are drawn."""
    out = np.empty((count, *shape), dtype=np.float32)
    for position in range(count):
        gen = torch.Generator().manual_seed(int(stable_hash([class_index, position, seed], 8), 16))
        out[position] = torch.randn(shape, generator=gen).numpy()
    return out


def make_walks(
    class_index: int,
    class_name: str,
    seeds: np.ndarray,
    keys: list[str],
    count: int,
    config: WalkConfig,
    config_hash: str,
    latent_shape: list[int] | None = None,
) -> list[dict]:
    """`count` new seeds for one class as rows: key, seed (C,h,w) float32, sources, weights, method."""
    if count == 0:
        return []
    if config.method == "prompt":
        fresh = gaussian_seeds(class_index, count, list(latent_shape), config.seed)
        return [
            {
                "key": walk_key(class_index, i, [], [], "prompt", config_hash),
                "seed": fresh[i],
                "sources": [],
                "weights": [],
                "method": "prompt",
            }
            for i in range(count)
        ]
    if len(keys) < 2:
        raise UserError(
            f"class {class_name!r}: {len(keys)} usable seed(s) ({', '.join(keys)}); at least 2 are needed"
        )
    # each class draws its own pairs and positions, from the config's seed and the class
    class_seed = int(stable_hash([config.seed, class_index], 8), 16)
    walked = sample_walks(
        seeds, keys, count, method=config.method, rng_seed=class_seed, class_name=class_name
    )
    rows = []
    for position, w in enumerate(walked):
        key = walk_key(class_index, position, w.sources, w.weights, w.method, config_hash)
        rows.append(
            {
                "key": key,
                "seed": perturbed(np.asarray(w.seed, dtype=np.float32), key, config.perturb_angle),
                "sources": list(w.sources),
                "weights": [float(x) for x in w.weights],
                "method": w.method,
            }
        )
    return rows


def perturbed(seed: np.ndarray, key: str, angle: float) -> np.ndarray:
    """cos(angle) seed + sin(angle) eps, eps standard normal from the key: (C, h, w) float32."""
    if angle == 0:
        return seed
    gen = torch.Generator().manual_seed(int(stable_hash([key, "perturb"], 8), 16))
    eps = torch.randn(seed.shape, generator=gen).numpy()
    return (math.cos(angle) * seed + math.sin(angle) * eps).astype(np.float32)


def shard_slots(walks: dict[int, list[dict]], pool: int) -> list[list[dict]]:
    """Every class's walk rows as slots of `pool` candidates (one image kept per slot), in one
    fixed order, round-robin over classes, so that shards mix classes."""
    queues = []
    for c in sorted(walks):
        rows = walks[c]
        queues.append([rows[j : j + pool] for j in range(0, len(rows), pool)])
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order
