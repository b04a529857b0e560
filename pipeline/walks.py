"""The walk sampler: new seeds of one class from walks between the seeds of its real images.

Given the N inverted seeds of a class and a target count K, `sample_walks` chooses which pairs or
subsets of seeds to walk between and where on each walk to take a new seed, and returns K new seeds
with their provenance. Walks come from `pipeline.seed_space`; randomness from one numpy Generator
seeded with the caller's integer, so the same inputs and seed give bitwise the same seeds (on the
same machine and torch thread count).

Plan, for every method:
1. Pairs: all unordered pairs of distinct seeds, in a random order, each given K // pairs new
   seeds and the first K % pairs one more, so the walks spread over all pairs before any repeats.
2. Positions on a pair's walk: stratified, one in each of m equal bins of [MARGIN, 1 - MARGIN],
   so a pair's new seeds are spread along it and none lies near a source (no copies).
3. "nao" (the default) gives a third of the seeds (when N >= 3) to centroid walks: the NAO centroid
   of all N seeds and of random distinct subsets of about half of them, and points on the NAO legs
   from each seed of a subset to its centroid; the rest to NAO paths between pairs. Paths keep the
   pairwise variety; centroids are more generic images of the class (SeedSelect #12).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.seed_space import lerp, nao_centroids, nao_path, point_at, slerp

METHODS = ("nao", "slerp", "lerp")  # the walks `sample_walks` takes; "nao" is the default
MARGIN = 0.1  # walk positions stay in [MARGIN, 1 - MARGIN]: no new seed next to a source
NAO_PATH_POINTS = 32  # points of a discretised NAO path, endpoints included (published: 50)
CENTROID_PATH_POINTS = 16  # points of a leg from a seed to a centroid, ends included
CENTROID_SHARE = 1 / 3  # share of new seeds that "nao" takes from centroid walks (N >= 3)
PAIR_BATCH = 256  # pairs per batched NAO call: bounds memory at 256 * 32 * dim floats


@dataclass(frozen=True)
class WalkSeed:
    """One new seed and where it came from.

    seed: (C, h, w) float32.
    sources: keys of the source seeds. Pairs: (start, end). Centroid walks: the subset, in input order.
    weights: one float per source, summing to 1, that say where on the walk the seed lies.
        Pairs ("lerp", "slerp", "nao_path"): (1 - t, t) with t the position from start (0) to end
        (1): the interpolation parameter for lerp and slerp, the arc-length fraction for NAO.
        "nao_centroid": a seed at arc-length fraction t on the leg from source j to the centroid of
        the k sources has weight (1 - t) + t / k for j and t / k for the others; the centroid itself
        (t = 1) has 1 / k for all. So the leg is the source with the largest weight and
        t = k * min(weights). The weights describe the position, not a formula for the seed: on
        curved walks the seed is not the weighted sum of its sources.
    method: "lerp", "slerp", "nao_path" or "nao_centroid".
    """

    seed: np.ndarray
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    method: str


def sample_walks(
    seeds: np.ndarray,
    keys: list[str],
    count: int,
    method: str = "nao",
    rng_seed: int = 0,
    class_name: str = "",
) -> list[WalkSeed]:
    """`count` new seeds of one class from walks between its seeds (see the module docstring).

    seeds: (N, C, h, w) float32 numpy array or tensor (or a sequence of N (C, h, w) arrays), keyed
    by `keys` (N unique strings). method: "lerp", "slerp" or "nao". Raises UserError, naming the
    class and keys, for seeds of different shapes, fewer than two distinct seeds, or non-finite seeds.
    """
    x = _validated(seeds, keys, count, method, class_name)
    if count == 0:
        return []
    rng = np.random.default_rng(rng_seed)
    # 1. split the count between pair walks and centroid walks
    n_centroid = int(count * CENTROID_SHARE) if method == "nao" and len(keys) >= 3 else 0
    # 2. pair walks: which pairs, how many seeds on each, where
    plan = _pair_plan(x, count - n_centroid, rng, class_name, keys)
    out = _pair_walks(x, keys, plan, method)
    # 3. centroid walks: which subsets, which legs, where
    if n_centroid:
        out += _centroid_walks(x, keys, n_centroid, rng)
    return out


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _validated(seeds, keys, count, method, class_name) -> torch.Tensor:
    """The seeds as a float32 tensor (N, C, h, w), or a UserError that says what is wrong."""
    where = f"class {class_name!r}" if class_name else "class ''"
    keys = list(keys)
    if method not in METHODS:
        raise UserError(f"{where}: unknown walk method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(count, (int, np.integer)) or count < 0:
        raise UserError(f"{where}: the number of new seeds must be an integer >= 0, got {count!r}")
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise UserError(f"{where}: seed keys must be unique; repeated: {', '.join(dupes)}")
    if isinstance(seeds, (list, tuple)):
        arrays = [np.asarray(s) for s in seeds]
        shapes = {k: tuple(a.shape) for k, a in zip(keys, arrays)}
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{k} {s}" for k, s in shapes.items())
            raise UserError(f"{where}: seeds have different shapes: {listing}")
        seeds = np.stack(arrays) if arrays else np.zeros((0,), np.float32)
    x = torch.as_tensor(np.asarray(seeds) if not torch.is_tensor(seeds) else seeds)
    if x.shape[0] != len(keys):
        raise UserError(f"{where}: {x.shape[0]} seeds but {len(keys)} keys ({', '.join(keys)})")
    if len(keys) < 2:
        raise UserError(
            f"{where}: needs at least two seeds to walk between, got {len(keys)} "
            f"({', '.join(keys) or 'none'}); give the class more real images or leave it out"
        )
    if x.ndim != 4:
        raise UserError(
            f"{where}: seeds must be (N, C, h, w), got shape {tuple(x.shape)} for {', '.join(keys)}"
        )
    x = x.to(torch.float32)
    finite = torch.isfinite(x).flatten(1).all(-1)
    if not bool(finite.all()):
        bad = [k for k, ok in zip(keys, finite.tolist()) if not ok]
        raise UserError(f"{where}: seeds with NaN or infinite values: {', '.join(bad)}")
    return x.contiguous()


# --------------------------------------------------------------------------------------------
# Pair walks
# --------------------------------------------------------------------------------------------


def _stratified(m: int, rng: np.random.Generator) -> np.ndarray:
    """m positions in [MARGIN, 1 - MARGIN], one uniformly in each of m equal bins -> (m,) float."""
    u = rng.random(m)
    return MARGIN + (1 - 2 * MARGIN) * (np.arange(m) + u) / m


def _pair_plan(x, count, rng, class_name, keys) -> list[tuple[int, int, np.ndarray]]:
    """[(i, j, positions)] for the pairs that get new seeds, in the order they are returned."""
    pairs = [
        (i, j)
        for i, j in itertools.combinations(range(x.shape[0]), 2)
        if not torch.equal(x[i], x[j])  # equal seeds: every point of the walk is a copy
    ]
    if not pairs:
        raise UserError(
            f"class {class_name!r}: all seeds are identical ({', '.join(keys)}); walks between them "
            f"would only copy them"
        )
    if count == 0:
        return []
    order = rng.permutation(len(pairs))
    base, extra = divmod(count, len(pairs))
    plan = []
    for rank, p in enumerate(order):
        m = base + (1 if rank < extra else 0)
        if m:
            plan.append((*pairs[p], _stratified(m, rng)))
    return plan


def _pair_walks(x, keys, plan, method) -> list[WalkSeed]:
    """New seeds on the walks of `plan`, with (1 - t, t) weights."""
    out: list[WalkSeed] = []
    name = "nao_path" if method == "nao" else method
    for start in range(0, len(plan), PAIR_BATCH):
        chunk = plan[start : start + PAIR_BATCH]
        a = torch.stack([x[i] for i, _, _ in chunk])  # (P, C, h, w)
        b = torch.stack([x[j] for _, j, _ in chunk])
        paths = nao_path(a, b, n=NAO_PATH_POINTS) if method == "nao" else None
        for p, (i, j, ts) in enumerate(chunk):
            t = torch.as_tensor(ts, dtype=torch.float32)
            if method == "lerp":
                points = lerp(a[p : p + 1], b[p : p + 1], t)[0]
            elif method == "slerp":
                points = slerp(a[p : p + 1], b[p : p + 1], t)[0]
            else:
                points = point_at(paths.path[p], paths.t[p], t)
            for q, tq in enumerate(t.tolist()):
                out.append(_walk_seed(points[q], (keys[i], keys[j]), (1.0 - tq, tq), name))
    return out


def _walk_seed(seed: torch.Tensor, sources, weights, method) -> WalkSeed:
    array = np.ascontiguousarray(seed.detach().numpy(), dtype=np.float32)
    return WalkSeed(seed=array, sources=tuple(sources), weights=tuple(weights), method=method)


# --------------------------------------------------------------------------------------------
# Centroid walks
# --------------------------------------------------------------------------------------------


def _subsets(x: torch.Tensor, needed: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The full set first, then distinct random subsets of about half the seeds (at least 2).

    Stops once the subsets offer `needed` slots (a centroid and one point per leg each) or none are
    left. Members are in input order. A subset of equal seeds is skipped: its centroid is a copy.
    """
    n_seeds = x.shape[0]
    subsets = [tuple(range(n_seeds))]
    k = max(2, (n_seeds + 1) // 2)
    if k >= n_seeds:
        return subsets
    slots = 1 + n_seeds
    if math.comb(n_seeds, k) <= 1000:  # few: all of them, shuffled
        pool = list(itertools.combinations(range(n_seeds), k))
        candidates = [pool[i] for i in rng.permutation(len(pool))]
    else:  # many: random draws; repeats are dropped below
        draws = [rng.choice(n_seeds, k, replace=False) for _ in range(4 * needed)]
        candidates = [tuple(sorted(d.tolist())) for d in draws]
    seen: set[tuple[int, ...]] = set()
    for subset in candidates:
        if slots >= needed:
            break
        if subset in seen or all(torch.equal(x[subset[0]], x[i]) for i in subset[1:]):
            continue
        seen.add(subset)
        subsets.append(subset)
        slots += 1 + k
    return subsets


def _slot_order(subsets, count, rng) -> list[tuple[int, int]]:
    """(subset index, leg) for `count` seeds, leg -1 meaning the centroid itself.

    Round-robin over the subsets; each yields its centroid once, then its legs in a random order,
    over and over (a leg visited again gets a further position on it).
    """

    def sequence(legs: list[int]):
        yield -1
        while True:
            yield from legs

    streams = [sequence(rng.permutation(len(s)).tolist()) for s in subsets]
    slots = []
    while len(slots) < count:
        for s, stream in enumerate(streams):
            if len(slots) < count:
                slots.append((s, next(stream)))
    return slots


def _centroid_walks(x, keys, count, rng) -> list[WalkSeed]:
    """`count` seeds from NAO centroids of subsets and the legs from their seeds to them."""
    subsets = _subsets(x, count, rng)
    # 1. which centroid or leg each new seed comes from
    slots = _slot_order(subsets, count, rng)
    # 2. positions on each leg, stratified like pair walks
    per_leg: dict[tuple[int, int], int] = {}
    for s, leg in slots:
        if leg >= 0:
            per_leg[(s, leg)] = per_leg.get((s, leg), 0) + 1
    positions = {sl: iter(_stratified(m, rng).tolist()) for sl, m in sorted(per_leg.items())}
    # 3. the centroids, one batched call per subset size
    results: dict[int, tuple] = {}
    for size in sorted({len(s) for s in subsets}, reverse=True):
        idx = [i for i, s in enumerate(subsets) if len(s) == size]
        sets = torch.stack([x[list(subsets[i])] for i in idx])  # (S, k, C, h, w)
        res = nao_centroids(sets, n=CENTROID_PATH_POINTS)
        for r, i in enumerate(idx):
            results[i] = (res.centroid[r], res.paths[r], res.t[r])
    # 4. the seeds, in slot order
    out = []
    for s, leg in slots:
        subset = subsets[s]
        centroid, paths, ts = results[s]
        names = tuple(keys[i] for i in subset)
        k = len(subset)
        if leg < 0:
            out.append(_walk_seed(centroid, names, (1.0 / k,) * k, "nao_centroid"))
            continue
        t = next(positions[(s, leg)])
        point = point_at(paths[leg], ts[leg], torch.tensor([t], dtype=torch.float32))[0]
        weights = tuple((1.0 - t) + t / k if j == leg else t / k for j in range(k))
        out.append(_walk_seed(point, names, weights, "nao_centroid"))
    return out
