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

`plan_walks` makes every random draw of these steps and keeps only what grows with N (pairs,
subsets, each leg's count) and the generator states where the positions start; `WalkPlan.seeds`
computes any range of the K seeds from it, replaying the positions with PCG64's jump-ahead, so a
huge K is made in bounded parts, bitwise as `sample_walks` makes it whole.
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
    All at once: `plan_walks(...).seeds(start, stop)` gives the same seeds a range at a time.
    """
    plan = plan_walks(seeds, keys, count, method, rng_seed, class_name)
    return plan.seeds(0, count)


def plan_walks(
    seeds: np.ndarray,
    keys: list[str],
    count: int,
    method: str = "nao",
    rng_seed: int = 0,
    class_name: str = "",
) -> WalkPlan:
    """The plan of `sample_walks` (its arguments and checks), before any seed is computed.

    Every random draw is made here or replayed from a saved generator state, so the plan's size
    depends on the number of seeds N (pairs, centroid subsets), not on `count`; `WalkPlan.seeds`
    then computes any range of the `count` seeds, bitwise as `sample_walks` returns them.
    """
    x = _validated(seeds, keys, count, method, class_name)
    rng = np.random.default_rng(rng_seed)
    # 1. split the count between pair walks and centroid walks
    n_centroid = int(count * CENTROID_SHARE) if method == "nao" and len(keys) >= 3 else 0
    # 2. pair walks: which pairs, how many seeds on each, where
    pairs = _PairPlan.draw(x, count - n_centroid, rng, class_name, list(keys))
    # 3. centroid walks: which subsets, which legs, where
    centroids = _CentroidPlan.draw(x, n_centroid, rng) if n_centroid else None
    return WalkPlan(x, list(keys), method, count, pairs, centroids)


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
# Random draws that can be replayed: a range of a stream of uniforms without the rest
# --------------------------------------------------------------------------------------------


def _uniforms(state: dict, offset: int, n: int) -> np.ndarray:
    """Uniforms offset .. offset + n - 1 of the stream that `rng.random` draws from `state`.

    PCG64 draws one 64-bit word per double and can jump ahead, so the values are bitwise those
    of drawing the whole stream in any pieces."""
    bits = np.random.PCG64()
    bits.state = state
    bits.advance(offset)
    return np.random.Generator(bits).random(n)


def _skip_uniforms(rng: np.random.Generator, n: int) -> None:
    """Move `rng` on as if it had drawn `n` uniforms (keeping its buffered 32-bit half-word)."""
    before = rng.bit_generator.state
    rng.bit_generator.advance(n)
    after = rng.bit_generator.state
    after["has_uint32"], after["uinteger"] = before["has_uint32"], before["uinteger"]
    rng.bit_generator.state = after


def _stratified_part(m: int, q0: int, q1: int, u: np.ndarray) -> np.ndarray:
    """Positions q0 .. q1 - 1 of `_stratified(m, rng)`, given their uniforms u (q1 - q0,)."""
    return MARGIN + (1 - 2 * MARGIN) * (np.arange(m)[q0:q1] + u) / m


def _stratified(m: int, rng: np.random.Generator) -> np.ndarray:
    """m positions in [MARGIN, 1 - MARGIN], one uniformly in each of m equal bins -> (m,) float."""
    return _stratified_part(m, 0, m, rng.random(m))


# --------------------------------------------------------------------------------------------
# The plan and the seeds of a range
# --------------------------------------------------------------------------------------------


@dataclass
class _PairPlan:
    """The pairs that get new seeds, in output order, and how many each; positions are replayed.

    pairs: [(i, j)]; offsets (P + 1,): pair p's seeds are numbers offsets[p] .. offsets[p+1] - 1;
    state: the generator state where their uniforms start (one per seed, in this order)."""

    pairs: list[tuple[int, int]]
    offsets: np.ndarray
    state: dict

    @staticmethod
    def draw(x, count, rng, class_name, keys) -> _PairPlan:
        pairs = [
            (i, j)
            for i, j in itertools.combinations(range(x.shape[0]), 2)
            if not torch.equal(x[i], x[j])  # equal seeds: every point of the walk is a copy
        ]
        if not pairs:
            raise UserError(
                f"class {class_name!r}: all seeds are identical ({', '.join(keys)}); walks between "
                f"them would only copy them"
            )
        if count == 0:
            return _PairPlan([], np.zeros(1, np.int64), rng.bit_generator.state)
        order = rng.permutation(len(pairs))
        base, extra = divmod(count, len(pairs))
        chosen, counts = [], []
        for rank, p in enumerate(order):
            m = base + (1 if rank < extra else 0)
            if m:
                chosen.append(pairs[p])
                counts.append(m)
        plan = _PairPlan(chosen, np.concatenate([[0], np.cumsum(counts)]), rng.bit_generator.state)
        _skip_uniforms(rng, count)  # each pair drew its positions here, in this order
        return plan


@dataclass
class _CentroidPlan:
    """Centroid walks: the subsets, each one's leg order, and where each leg's uniforms start.

    Slot g of the centroid walks is subset g % S's visit g // S: visit 0 its centroid, visit
    v >= 1 its leg legs[s][(v - 1) % k], for the ((v - 1) // k)-th time (round-robin, as drawn)."""

    count: int
    subsets: list[tuple[int, ...]]
    legs: list[list[int]]
    # (subset, leg) -> (seeds on it, offset of its first uniform)
    per_leg: dict[tuple[int, int], tuple[int, int]]
    state: dict

    @staticmethod
    def draw(x, count, rng) -> _CentroidPlan:
        subsets = _subsets(x, count, rng)
        legs = [rng.permutation(len(s)).tolist() for s in subsets]
        S = len(subsets)
        per_leg: dict[tuple[int, int], int] = {}
        for s, subset in enumerate(subsets):
            visits = count // S + (1 if s < count % S else 0)
            on_legs, k = max(0, visits - 1), len(subset)
            for position, leg in enumerate(legs[s]):
                m = on_legs // k + (1 if position < on_legs % k else 0)
                if m:
                    per_leg[(s, leg)] = m
        offsets, total = {}, 0
        for sl, m in sorted(per_leg.items()):  # the order the positions are drawn in
            offsets[sl] = (m, total)
            total += m
        plan = _CentroidPlan(count, subsets, legs, offsets, rng.bit_generator.state)
        _skip_uniforms(rng, total)
        return plan

    def slot(self, g: int) -> tuple[int, int, int]:
        """(subset, leg, visit of that leg) of centroid seed g; leg -1 is the centroid itself."""
        S = len(self.subsets)
        s, v = g % S, g // S
        if v == 0:
            return s, -1, 0
        k = len(self.subsets[s])
        return s, self.legs[s][(v - 1) % k], (v - 1) // k


class WalkPlan:
    """A class's walks before their seeds: `seeds(start, stop)` computes seeds start .. stop - 1.

    Holds the class's N seeds, the pair plan and the centroid plan (sizes grow with N, not with the
    count), the NAO paths of the last batch of pairs used and, once a centroid seed is asked for,
    the centroids of all subsets (computed in the batches `sample_walks` uses, so every range gives
    bitwise the same seeds). Ask for ranges in increasing order to compute each pair batch once.
    """

    def __init__(self, x, keys, method, count, pairs: _PairPlan, centroids: _CentroidPlan | None):
        self.x, self.keys, self.method, self.count = x, keys, method, count
        self.pairs, self.centroids = pairs, centroids
        self.n_pair = int(pairs.offsets[-1])
        self._paths: tuple[int, object] | None = None  # (batch index, NaoPaths)
        self._centroid_results: dict[int, tuple] | None = None

    def __len__(self) -> int:
        return self.count

    def seeds(self, start: int, stop: int) -> list[WalkSeed]:
        """Seeds start .. stop - 1 (0 <= start <= stop <= count): pair walks first, then centroids."""
        if not 0 <= start <= stop <= self.count:
            raise ValueError(f"range {start}..{stop} is outside 0..{self.count}")
        out = self._pair_seeds(start, min(stop, self.n_pair))
        if stop > self.n_pair:
            out += self._centroid_seeds(max(start, self.n_pair) - self.n_pair, stop - self.n_pair)
        return out

    # pair walks ------------------------------------------------------------------------------

    def _pair_seeds(self, start: int, stop: int) -> list[WalkSeed]:
        out: list[WalkSeed] = []
        if start >= stop:
            return out
        offsets = self.pairs.offsets
        name = "nao_path" if self.method == "nao" else self.method
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        for p in range(first, len(self.pairs.pairs)):
            lo, hi = int(offsets[p]), int(offsets[p + 1])
            if lo >= stop:
                break
            q0, q1 = max(start, lo) - lo, min(stop, hi) - lo
            u = _uniforms(self.pairs.state, lo + q0, q1 - q0)
            t = torch.as_tensor(_stratified_part(hi - lo, q0, q1, u), dtype=torch.float32)
            i, j = self.pairs.pairs[p]
            a, b = self.x[i : i + 1], self.x[j : j + 1]  # (1, C, h, w)
            if self.method == "lerp":
                points = lerp(a, b, t)[0]
            elif self.method == "slerp":
                points = slerp(a, b, t)[0]
            else:
                paths, row = self._nao_paths(p)
                points = point_at(paths.path[row], paths.t[row], t)
            for q, tq in enumerate(t.tolist()):
                out.append(
                    _walk_seed(points[q], (self.keys[i], self.keys[j]), (1.0 - tq, tq), name)
                )
        return out

    def _nao_paths(self, p: int):
        """The NAO paths of pair p's batch (PAIR_BATCH pairs in plan order) and p's row in it."""
        batch = p // PAIR_BATCH
        if self._paths is None or self._paths[0] != batch:
            chunk = self.pairs.pairs[batch * PAIR_BATCH : (batch + 1) * PAIR_BATCH]
            a = torch.stack([self.x[i] for i, _ in chunk])  # (P, C, h, w)
            b = torch.stack([self.x[j] for _, j in chunk])
            self._paths = (batch, nao_path(a, b, n=NAO_PATH_POINTS))
        return self._paths[1], p - batch * PAIR_BATCH

    # centroid walks --------------------------------------------------------------------------

    def _centroid_seeds(self, start: int, stop: int) -> list[WalkSeed]:
        plan = self.centroids
        results = self._centroids()
        out = []
        for g in range(start, stop):
            s, leg, visit = plan.slot(g)
            subset = plan.subsets[s]
            centroid, paths, ts = results[s]
            names = tuple(self.keys[i] for i in subset)
            k = len(subset)
            if leg < 0:
                out.append(_walk_seed(centroid, names, (1.0 / k,) * k, "nao_centroid"))
                continue
            m, offset = plan.per_leg[(s, leg)]
            u = _uniforms(plan.state, offset + visit, 1)
            t = float(_stratified_part(m, visit, visit + 1, u)[0])
            point = point_at(paths[leg], ts[leg], torch.tensor([t], dtype=torch.float32))[0]
            weights = tuple((1.0 - t) + t / k if j == leg else t / k for j in range(k))
            out.append(_walk_seed(point, names, weights, "nao_centroid"))
        return out

    def _centroids(self) -> dict[int, tuple]:
        """subset -> (centroid, legs' paths, their positions), one batched call per subset size."""
        if self._centroid_results is None:
            subsets = self.centroids.subsets
            results: dict[int, tuple] = {}
            for size in sorted({len(s) for s in subsets}, reverse=True):
                idx = [i for i, s in enumerate(subsets) if len(s) == size]
                sets = torch.stack([self.x[list(subsets[i])] for i in idx])  # (S, k, C, h, w)
                res = nao_centroids(sets, n=CENTROID_PATH_POINTS)
                for r, i in enumerate(idx):
                    results[i] = (res.centroid[r], res.paths[r], res.t[r])
            self._centroid_results = results
        return self._centroid_results


def _walk_seed(seed: torch.Tensor, sources, weights, method) -> WalkSeed:
    array = np.ascontiguousarray(seed.detach().numpy(), dtype=np.float32)
    return WalkSeed(seed=array, sources=tuple(sources), weights=tuple(weights), method=method)


def _subsets(x: torch.Tensor, needed: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The full set first, then distinct random subsets of about half the seeds (at least 2).

    Stops once the subsets offer `needed` slots (a centroid and one point per leg each) or none are
    left. Members are in input order. A subset of equal seeds is skipped: its centroid is a copy.
    Random draws (when there are many subsets) are made one at a time and the rest skipped after,
    so the generator ends where drawing all 4 * needed of them at once would leave it.
    """
    n_seeds = x.shape[0]
    subsets = [tuple(range(n_seeds))]
    k = max(2, (n_seeds + 1) // 2)
    if k >= n_seeds:
        return subsets
    slots = 1 + n_seeds
    drawn = 0
    if math.comb(n_seeds, k) <= 1000:  # few: all of them, shuffled
        pool = list(itertools.combinations(range(n_seeds), k))
        candidates = iter([pool[i] for i in rng.permutation(len(pool))])
        draws = 0
    else:  # many: random draws; repeats are dropped below
        draws = 4 * needed

        def random_subsets():
            nonlocal drawn
            while drawn < draws:
                drawn += 1
                yield tuple(sorted(rng.choice(n_seeds, k, replace=False).tolist()))

        candidates = random_subsets()
    seen: set[tuple[int, ...]] = set()
    for subset in candidates:
        if slots >= needed:
            break
        if subset in seen or all(torch.equal(x[subset[0]], x[i]) for i in subset[1:]):
            continue
        seen.add(subset)
        subsets.append(subset)
        slots += 1 + k
    for _ in range(draws - drawn):
        rng.choice(n_seeds, k, replace=False)
    return subsets
