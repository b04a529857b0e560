"""Behaviour of the walk sampler (pipeline/walks): counts, provenance, determinism, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.walks import MARGIN, WalkSeed, plan_walks, sample_walks

SHAPE = (4, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def class_seeds(n: int, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, list[str]]:
    x = np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32) * scale
    return x, [f"four_{i:02d}" for i in range(n)]


def as_tuple(w: WalkSeed):
    return (w.seed.tobytes(), w.sources, w.weights, w.method)


@pytest.mark.parametrize("method", ["lerp", "slerp", "nao"])
def test_count_shapes_and_provenance(method):
    x, keys = class_seeds(5)
    walks = sample_walks(x, keys, 23, method=method, rng_seed=1, class_name="four")
    assert len(walks) == 23
    for w in walks:
        assert w.seed.shape == SHAPE and w.seed.dtype == np.float32
        assert set(w.sources) <= set(keys) and len(w.sources) >= 2
        assert len(w.weights) == len(w.sources)
        assert math.isclose(sum(w.weights), 1.0, abs_tol=1e-6)
        assert all(0.0 <= v <= 1.0 for v in w.weights)
    methods = {w.method for w in walks}
    assert methods == ({"nao_path", "nao_centroid"} if method == "nao" else {method})


@pytest.mark.parametrize("method", ["lerp", "slerp", "nao"])
def test_same_inputs_and_seed_give_identical_walks(method):
    x, keys = class_seeds(4)
    first = sample_walks(x, keys, 12, method=method, rng_seed=7)
    second = sample_walks(x.copy(), list(keys), 12, method=method, rng_seed=7)
    assert [as_tuple(w) for w in first] == [as_tuple(w) for w in second]
    other = sample_walks(x, keys, 12, method=method, rng_seed=8)
    assert [as_tuple(w) for w in other] != [as_tuple(w) for w in first]


@pytest.mark.parametrize("method", ["lerp", "slerp", "nao"])
def test_no_new_seed_is_a_source_or_next_to_one(method):
    x, keys = class_seeds(3)
    walks = sample_walks(x, keys, 30, method=method, rng_seed=2)
    gap = min(np.linalg.norm(x[i] - x[j]) for i in range(3) for j in range(i + 1, 3))
    for w in walks:
        nearest = min(np.linalg.norm(w.seed - s) for s in x)
        assert nearest > 0.05 * gap
        if w.method != "nao_centroid":
            assert MARGIN <= w.weights[1] <= 1 - MARGIN


def test_pair_weights_recreate_lerp_seeds():
    x, keys = class_seeds(4)
    index = {k: i for i, k in enumerate(keys)}
    for w in sample_walks(x, keys, 10, method="lerp", rng_seed=3):
        a, b = (x[index[k]] for k in w.sources)
        assert np.allclose(w.seed, w.weights[0] * a + w.weights[1] * b, atol=1e-5)


def test_walks_spread_over_all_pairs_before_repeating():
    x, keys = class_seeds(5)
    walks = sample_walks(x, keys, 10, method="slerp", rng_seed=4)  # 10 pairs of 5 seeds
    assert len({w.sources for w in walks}) == 10


def test_nao_walk_seeds_stay_near_the_shell_where_lerp_dips():
    x, keys = class_seeds(4)
    dim = math.prod(SHAPE)
    for method, low in [("nao", 0.85), ("lerp", None)]:
        ratios = [
            np.linalg.norm(w.seed) / math.sqrt(dim)
            for w in sample_walks(x, keys, 12, method=method, rng_seed=5)
        ]
        if low is None:
            assert min(ratios) < 0.8
        else:
            assert min(ratios) > low


def test_centroid_walk_weights_name_the_leg_and_centroid():
    x, keys = class_seeds(5)
    walks = [
        w for w in sample_walks(x, keys, 30, method="nao", rng_seed=6) if w.method == "nao_centroid"
    ]
    assert walks, "nao with 5 seeds takes some seeds from centroid walks"
    centroids = [w for w in walks if len(set(w.weights)) == 1]
    assert centroids and all(len(w.sources) in (5, 3) for w in walks)
    assert len({w.seed.tobytes() for w in walks}) == len(walks)  # no seed twice


def test_two_seeds_are_enough_and_count_zero_is_empty():
    x, keys = class_seeds(2)
    assert len(sample_walks(x, keys, 5, rng_seed=0)) == 5
    assert sample_walks(x, keys, 0) == []


def test_tensor_and_list_input_match_numpy_input():
    x, keys = class_seeds(3)
    ref = [as_tuple(w) for w in sample_walks(x, keys, 6, method="slerp")]
    assert [as_tuple(w) for w in sample_walks(torch.from_numpy(x), keys, 6, method="slerp")] == ref
    assert [as_tuple(w) for w in sample_walks(list(x), keys, 6, method="slerp")] == ref


def test_bad_input_names_the_class_and_keys():
    x, keys = class_seeds(3)
    with pytest.raises(UserError, match=r"'seven'.*four_00"):
        sample_walks(x[:1], keys[:1], 4, class_name="seven")
    with pytest.raises(UserError, match=r"'seven'.*four_01"):
        bad = x.copy()
        bad[1, 0, 0, 0] = np.nan
        sample_walks(bad, keys, 4, class_name="seven")
    with pytest.raises(UserError, match=r"'seven'.*different shapes.*four_02 \(4, 4, 4\)"):
        sample_walks([x[0], x[1], x[2, :, :4, :4]], keys, 4, class_name="seven")
    with pytest.raises(UserError, match=r"'seven'.*identical"):
        sample_walks(np.stack([x[0], x[0]]), keys[:2], 4, class_name="seven")
    with pytest.raises(UserError, match="unknown walk method"):
        sample_walks(x, keys, 4, method="cubic", class_name="seven")
    with pytest.raises(UserError, match="unique"):
        sample_walks(x, [keys[0], keys[0], keys[1]], 4, class_name="seven")


def test_duplicate_seeds_are_not_walked_between():
    x, keys = class_seeds(3)
    x[2] = x[0]
    for w in sample_walks(x, keys, 12, method="nao", rng_seed=0):
        assert set(w.sources) != {"four_00", "four_02"}


def test_seed_perturbation_moves_seeds_by_the_angle_and_is_reproducible():
    from tailseed.stages.walk import perturbed

    z = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float32)
    assert perturbed(z, "k", 0.0) is z
    a, b = perturbed(z, "k", 0.6), perturbed(z, "k", 0.6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(perturbed(z, "other", 0.6), a)  # the noise comes from the key
    cos = float((a * z).sum() / (np.linalg.norm(a) * np.linalg.norm(z)))
    assert abs(cos - np.cos(0.6)) < 0.15  # about the angle away from the walk seed
    assert abs(np.linalg.norm(a) / np.linalg.norm(z) - 1) < 0.2  # a seed-like norm


@pytest.mark.parametrize(
    "n, count, method, chunk",
    [
        (10, 90, "nao", 7),
        (5, 23, "nao", 4),
        (4, 31, "slerp", 9),
        (3, 17, "lerp", 5),
        (14, 40, "nao", 11),
    ],
)
def test_a_plan_gives_the_same_seeds_in_any_ranges(n, count, method, chunk):
    """Walks are made in bounded parts: any split of the positions gives bitwise the seeds of one
    call (14 seeds: the subsets are random draws, replayed rather than held)."""
    x, keys = class_seeds(n, seed=n)
    whole = [as_tuple(w) for w in sample_walks(x, keys, count, method=method, rng_seed=3)]
    plan = plan_walks(x, keys, count, method, 3)
    parts = [plan.seeds(a, min(count, a + chunk)) for a in range(0, count, chunk)]
    assert all(len(p) <= chunk for p in parts)
    assert [as_tuple(w) for p in parts for w in p] == whole
    tail = plan_walks(x, keys, count, method, 3).seeds(count - chunk, count)  # a part alone
    assert [as_tuple(w) for w in tail] == whole[count - chunk :]


def test_the_plan_does_not_hold_the_seeds():
    """A huge count costs a plan the size of its pairs and subsets, not of its seeds."""
    x, keys = class_seeds(10)
    plan = plan_walks(x, keys, 10_000_000, "nao", 0)
    assert len(plan.pairs.pairs) == 45 and len(plan.centroids.subsets) <= 253
    assert len(plan.seeds(5_000_000, 5_000_003)) == 3


def test_shard_slots_read_only_their_range_in_round_robin_order():
    from tailseed.stages.walk import ShardSlots, slot_order

    counts = {3: 7, 1: 2, 5: 4, 8: 0}
    queues = [[(c, j) for j in range(counts[c])] for c in sorted(counts)]
    rr = []
    while any(queues):
        for q in queues:
            if q:
                rr.append(q.pop(0))
    assert slot_order(counts, 0, len(rr)) == rr
    for a in range(len(rr)):
        for b in range(a, len(rr) + 1):
            assert slot_order(counts, a, b) == rr[a:b]
    reads = []

    def read(c, lo, hi):
        reads.append((c, lo, hi))
        return [{"class_index": c, "row": r} for r in range(lo, hi)]

    slots = ShardSlots({c: 3 * n for c, n in counts.items()}, 3, read)
    assert len(slots) == 13
    got = slots[4:9]
    assert [[r["row"] for r in s] for s in got] == [
        [3 * j + i for i in range(3)] for _, j in rr[4:9]
    ]
    assert sorted(reads) == [(3, 3, 12), (5, 3, 9)]  # one contiguous read per class
