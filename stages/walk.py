"""Walk: new seeds for a rare class from walks between its inverted seeds, each with its provenance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tailseed.pipeline.config import NOT_HASHED, stable_hash
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.walks import METHODS as WALK_METHODS
from tailseed.pipeline.walks import plan_walks

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
    # sources (the norm stays in the prior's range: both terms are seed-like). 0.3 (with the
    # filter) was chosen on the evaluation's validation split.
    perturb_angle: float = 0.3
    # Walk rows per Parquet part (walks/class_NNNN/part_NNNNN.parquet): the most walk seeds held in
    # memory at once, whatever the quota (1024 seeds of 4x64x64 are 64 MB). The rows are the same
    # for any value; a rerun with another value rewrites the parts (done shards stay done).
    chunk_rows: int = field(default=1024, metadata=NOT_HASHED)

    def validate(self, where: str) -> None:
        if self.chunk_rows < 1:
            raise UserError(f"{where}.chunk_rows is {self.chunk_rows}; at least 1")
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


def walk_position(key: str) -> int:
    """The walk position that `walk_key` wrote into a key."""
    return int(key.split("_")[1][1:])


def gaussian_seeds(
    class_index: int, count: int, shape: list[int], seed: int, start: int = 0
) -> np.ndarray:
    """(count, *shape) float32 standard normal seeds for positions start .. start + count - 1, each
    from its own generator, so a seed depends only on (class, position, seed) and not on how many
    others are drawn."""
    out = np.empty((count, *shape), dtype=np.float32)
    for i, position in enumerate(range(start, start + count)):
        gen = torch.Generator().manual_seed(int(stable_hash([class_index, position, seed], 8), 16))
        out[i] = torch.randn(shape, generator=gen).numpy()
    return out


class ClassWalks:
    """One class's `count` walk rows, computed a range at a time: key, seed (C, h, w) float32,
    sources, weights, method. `rows(start, stop)` of consecutive ranges give, together, exactly
    the rows of `rows(0, count)`, so the walks can be written in bounded chunks."""

    def __init__(
        self,
        class_index: int,
        class_name: str,
        seeds: np.ndarray,
        keys: list[str],
        count: int,
        config: WalkConfig,
        config_hash: str,
        latent_shape: list[int] | None = None,
    ):
        self.class_index, self.count = class_index, count
        self.config, self.config_hash = config, config_hash
        self.latent_shape = list(latent_shape) if latent_shape is not None else None
        self.plan = None
        if count == 0 or config.method == "prompt":
            return
        if len(keys) < 2:
            raise UserError(
                f"class {class_name!r}: {len(keys)} usable seed(s) ({', '.join(keys)}); at least 2 "
                f"are needed"
            )
        # each class draws its own pairs and positions, from the config's seed and the class
        class_seed = int(stable_hash([config.seed, class_index], 8), 16)
        self.plan = plan_walks(
            seeds, keys, count, method=config.method, rng_seed=class_seed, class_name=class_name
        )

    def rows(self, start: int, stop: int) -> list[dict]:
        """Rows start .. stop - 1 (positions in the class's walks)."""
        if self.config.method == "prompt":
            fresh = gaussian_seeds(
                self.class_index, stop - start, self.latent_shape, self.config.seed, start
            )
            return [
                {
                    "key": walk_key(
                        self.class_index, start + i, [], [], "prompt", self.config_hash
                    ),
                    "seed": fresh[i],
                    "sources": [],
                    "weights": [],
                    "method": "prompt",
                }
                for i in range(stop - start)
            ]
        if start == stop:
            return []
        rows = []
        for position, w in enumerate(self.plan.seeds(start, stop), start):
            key = walk_key(
                self.class_index, position, w.sources, w.weights, w.method, self.config_hash
            )
            seed = perturbed(np.asarray(w.seed, dtype=np.float32), key, self.config.perturb_angle)
            rows.append(
                {
                    "key": key,
                    "seed": seed,
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


def slot_order(slots: dict[int, int], start: int, stop: int) -> list[tuple[int, int]]:
    """(class, slot) for positions start .. stop - 1 of the one fixed order of every class's
    slots: round-robin over the classes in index order (a class whose slots run out drops out),
    so that shards mix classes. slots: class index -> its number of slots. Computed, not listed,
    so a shard's slots cost nothing for the others."""
    classes = sorted(c for c in slots if slots[c] > 0)

    def before(r: int) -> int:  # positions in rounds 0 .. r - 1
        return sum(min(slots[c], r) for c in classes)

    lo, hi = 0, max((slots[c] for c in classes), default=0)
    while lo < hi:  # the round that holds position `start`
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if before(mid) <= start else (lo, mid - 1)
    out, position, r = [], before(lo), lo
    while position < stop and classes:
        active = [c for c in classes if slots[c] > r]
        if not active:
            break
        for c in active:
            if start <= position < stop:
                out.append((c, r))
            position += 1
        r += 1
    return out


class ShardSlots:
    """Every class's walk rows as slots of `pool` candidates (one image kept per slot), in
    `slot_order`'s order, read on demand: `slots[a:b]` reads only the rows of slots a .. b - 1.

    rows: class index -> its number of walk rows; read(class_index, start, stop) -> those rows.
    """

    def __init__(self, rows: dict[int, int], pool: int, read):
        self.rows, self.pool, self.read = dict(rows), pool, read
        self.slots = {c: -(-n // pool) for c, n in self.rows.items()}

    def __len__(self) -> int:
        return sum(self.slots.values())

    def size(self, start: int, stop: int) -> int:
        """The number of walk rows (candidates) in slots start .. stop - 1, without reading them."""
        return sum(
            min(self.pool, self.rows[c] - j * self.pool)
            for c, j in slot_order(self.slots, start, min(stop, len(self)))
        )

    def __getitem__(self, part: slice) -> list[list[dict]]:
        start, stop, step = part.indices(len(self))
        if step != 1:
            raise ValueError("slots are read in contiguous ranges")
        order = slot_order(self.slots, start, stop)
        # a class's slots in one range are consecutive: read its rows at once
        spans: dict[int, list[int]] = {}
        for c, j in order:
            spans.setdefault(c, [j, j])[1] = j
        rows = {}
        for c, (first, last) in spans.items():
            lo, hi = first * self.pool, min(self.rows[c], (last + 1) * self.pool)
            rows[c] = (first, self.read(c, lo, hi))
        out = []
        for c, j in order:
            first, got = rows[c]
            out.append(got[(j - first) * self.pool : (j - first + 1) * self.pool])
        return out
