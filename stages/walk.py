"""Walk: new seeds for a rare class from walks between its inverted seeds, each with its provenance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import stable_hash
from pipeline.errors import UserError
from pipeline.walks import METHODS as WALK_METHODS
from pipeline.walks import sample_walks

# the seed-space walks, plus "prompt": fresh Gaussian seeds, no inversion
METHODS = (*WALK_METHODS, "prompt")


@dataclass(frozen=True)
class WalkConfig:
    # nao (norm-aware paths and centroids) | slerp | lerp | prompt (fresh Gaussian seeds, no
    # inversion: the plain text-to-image baseline, written the same way)
    method: str = "nao"
    seed: int = 0  # which pairs and positions are drawn; same seed, same walks

    def validate(self, where: str) -> None:
        if self.method not in METHODS:
            raise UserError(f"{where}.method: {self.method!r}; use one of {', '.join(METHODS)}")


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
        rows.append(
            {
                "key": walk_key(class_index, position, w.sources, w.weights, w.method, config_hash),
                "seed": np.asarray(w.seed, dtype=np.float32),
                "sources": list(w.sources),
                "weights": [float(x) for x in w.weights],
                "method": w.method,
            }
        )
    return rows
