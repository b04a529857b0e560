"""Behaviour of seed-space interpolation: lerp, slerp, NAO paths and centroids (pipeline/seed_space)."""

from __future__ import annotations

import math

import pytest
import torch

from tailseed.pipeline.seed_space import (
    NaoConfig,
    StopRule,
    chi_band,
    chi_log_prob,
    lerp,
    nao_centroid,
    nao_centroids,
    nao_path,
    nao_path_reference,
    path_loss,
    point_at,
    slerp,
)

SHAPE = (4, 8, 8)  # the embedded model's latent
DIM = math.prod(SHAPE)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def gaussian(count: int, seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))


def norms(x: torch.Tensor) -> torch.Tensor:
    """Norm of each seed of (..., C, h, w) -> (...)."""
    return x.flatten(-3).norm(dim=-1)


def test_chi_log_prob_matches_textbook_form_in_float64():
    dim = 16384
    r = torch.tensor([100.0, 120.0, 127.5, 128.0, 131.0, 140.0], dtype=torch.float64)
    textbook = (dim - 1) * torch.log(r) - 0.5 * r**2
    textbook -= (0.5 * dim - 1) * math.log(2.0) + math.lgamma(0.5 * dim)
    ours = chi_log_prob(r.float(), dim).double()
    assert torch.allclose(ours, textbook, rtol=1e-5, atol=1e-3)
    assert int(chi_log_prob(r.float(), dim).argmax()) == 3  # the mode is near sqrt(dim)


def test_chi_band_holds_most_gaussian_norms():
    low, high = chi_band(DIM, mass=0.99)
    r = norms(gaussian(2000, 0))
    inside = ((r >= low) & (r <= high)).float().mean()
    assert 0.97 <= float(inside) <= 1.0


@pytest.mark.parametrize("fn", [lerp, slerp])
def test_closed_form_paths_keep_endpoints_and_shapes(fn):
    a, b = gaussian(3, 1), gaussian(3, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    path = fn(a, b, t)
    assert path.shape == (3, 4, *SHAPE) and path.dtype == torch.float32
    assert torch.allclose(path[:, 0], a, atol=1e-5)
    assert torch.allclose(path[:, -1], b, atol=1e-5)


def test_slerp_keeps_norm_of_equal_norm_endpoints_and_lerp_dips():
    a, b = gaussian(4, 3), gaussian(4, 4)
    b = b / norms(b).view(-1, 1, 1, 1) * norms(a).view(-1, 1, 1, 1)
    t = torch.linspace(0, 1, 9)
    assert torch.allclose(norms(slerp(a, b, t)), norms(a).unsqueeze(1).expand(4, 9), rtol=1e-4)
    mid_lerp = norms(lerp(a, b, t))[:, 4]
    assert bool((mid_lerp < 0.8 * norms(a)).all())  # ~ sqrt(1/2) for near-orthogonal seeds


def test_slerp_of_parallel_seeds_falls_back_to_lerp():
    a = gaussian(1, 5)
    path = slerp(a, 2 * a, torch.tensor([0.5]))
    assert torch.isfinite(path).all()
    assert torch.allclose(path[:, 0], 1.5 * a, rtol=1e-5)


def test_nao_path_keeps_endpoints_exactly():
    a, b = gaussian(3, 6), gaussian(3, 7)
    result = nao_path(a, b, n=12)
    assert result.path.shape == (3, 12, *SHAPE)
    assert torch.equal(result.path[:, 0], a) and torch.equal(result.path[:, -1], b)
    assert torch.equal(result.t[:, 0], torch.zeros(3)) and torch.allclose(
        result.t[:, -1], torch.ones(3)
    )
    assert bool((result.t[:, 1:] >= result.t[:, :-1]).all())


def test_nao_interior_stays_in_band_where_lerp_dips():
    low, high = chi_band(DIM, mass=0.99)
    a, b = gaussian(16, 8), gaussian(16, 9)
    # typical-norm endpoints: inside the band themselves
    a = a / norms(a).view(-1, 1, 1, 1) * math.sqrt(DIM)
    b = b / norms(b).view(-1, 1, 1, 1) * math.sqrt(DIM)
    n = 16
    nao = norms(nao_path(a, b, n=n).path[:, 1:-1])
    straight = norms(lerp(a, b, torch.linspace(0, 1, n))[:, 1:-1])
    assert bool(((nao >= low) & (nao <= high)).all())
    assert bool((straight.amin(1) < low).all())


def test_nao_pulls_interior_of_off_shell_seeds_toward_the_shell():
    a, b = 0.55 * gaussian(4, 10), 0.55 * gaussian(4, 11)  # like DDIM-inverted seeds
    result = nao_path(a, b, n=24)
    ratio = norms(result.path) / math.sqrt(DIM)
    assert bool((ratio[:, 0] < 0.7).all()) and bool((ratio[:, -1] < 0.7).all())
    assert bool((ratio[:, 8:16] > 0.95).all())  # the middle of the path is on the shell


def test_nao_objective_beats_slerp_and_matches_reference():
    n = 16
    a, b = gaussian(2, 12), gaussian(2, 13)
    result = nao_path(a, b, n=n)
    eps = 2.0 * (a - b).flatten(1).norm(dim=-1) / n
    slerp_loss = path_loss(slerp(a, b, torch.linspace(0, 1, n)).flatten(2), DIM, eps)
    assert bool((result.loss < slerp_loss).all())
    for p in range(2):
        _, ref_loss, _ = nao_path_reference(
            a[p], b[p], n=n, generator=torch.Generator().manual_seed(p)
        )
        # same objective, same stop rule: the batched solver is as good as the reference or better
        assert float(result.loss[p]) <= ref_loss * (1 + 1e-3)
        assert float(result.loss[p]) >= ref_loss * (1 - 2e-2)


def test_reported_loss_is_path_loss_of_the_returned_path():
    a, b = gaussian(2, 14), gaussian(2, 15)
    result = nao_path(a, b, n=10)
    eps = 2.0 * (a - b).flatten(1).norm(dim=-1) / 10
    again = path_loss(result.path.flatten(2), DIM, eps)
    assert torch.allclose(again, result.loss, rtol=1e-3)


def test_batched_paths_equal_per_pair_paths():
    a, b = gaussian(5, 16), gaussian(5, 17)
    a[3] *= 0.6  # mixed problems in one batch: one off-shell pair converges differently
    batched = nao_path(a, b, n=10)
    for p in range(5):
        single = nao_path(a[p : p + 1], b[p : p + 1], n=10)
        assert torch.allclose(single.path[0], batched.path[p], atol=1e-4, rtol=1e-4)
        assert int(single.iters[0]) == int(batched.iters[p])


def test_nao_is_deterministic():
    a, b = gaussian(3, 18), gaussian(3, 19)
    first, second = nao_path(a, b, n=10), nao_path(a, b, n=10)
    assert torch.equal(first.path, second.path) and torch.equal(first.loss, second.loss)
    sets = gaussian(6, 20).view(2, 3, *SHAPE)
    c1, c2 = nao_centroid(sets, n=8), nao_centroid(sets, n=8)
    assert torch.equal(c1.centroid, c2.centroid) and torch.equal(c1.paths, c2.paths)


def test_stop_rule_bounds_the_iterations():
    a, b = gaussian(2, 21), gaussian(2, 22)
    result = nao_path(a, b, n=10, config=NaoConfig(stop=StopRule(max_iters=7)))
    assert result.iters.tolist() == [7, 7]


def test_centroid_of_identical_seeds_is_that_seed():
    seed = gaussian(2, 23)
    sets = seed.unsqueeze(1).expand(2, 4, *SHAPE).clone()
    sets[1] *= 0.55  # also off the shell: the centroid stays at the seed, not on the shell
    result = nao_centroid(sets, n=8)
    assert torch.equal(result.centroid, sets[:, 0])
    assert torch.allclose(result.paths, sets.unsqueeze(2).expand_as(result.paths), atol=1e-5)


def test_centroid_of_nearly_identical_seeds_stays_near_them():
    seed = gaussian(1, 25)
    jitter = 1e-3 * gaussian(3, 26)
    sets = (seed + jitter).unsqueeze(0)  # (1, 3, C, h, w)
    result = nao_centroid(sets, n=8)
    assert float(norms(result.centroid[0] - seed[0])) < 0.05


def test_centroid_is_on_the_shell_and_paths_join_seeds_to_it():
    low, high = chi_band(DIM, mass=0.99)
    sets = gaussian(8, 24).view(2, 4, *SHAPE)
    result = nao_centroid(sets, n=8)
    assert result.paths.shape == (2, 4, 8, *SHAPE)
    assert torch.equal(result.paths[:, :, 0], sets)
    assert torch.allclose(result.paths[:, :, -1], result.centroid.unsqueeze(1).expand_as(sets))
    c = norms(result.centroid)
    assert bool(((c >= low) & (c <= high)).all())
    plain_mean = norms(sets.mean(1))
    assert bool((plain_mean < low).all())  # why the plain average is not a centroid here


def test_point_at_returns_path_points_and_stays_on_the_shell_between_them():
    a, b = gaussian(1, 27), gaussian(1, 28)
    result = nao_path(a, b, n=10)
    path, positions = result.path[0], result.t[0]
    again = point_at(path, positions, positions)
    assert torch.allclose(again, path, atol=1e-4)
    between = point_at(path, positions, 0.5 * (positions[1:] + positions[:-1]))
    expected = 0.5 * (norms(path[1:]) + norms(path[:-1]))
    assert torch.allclose(norms(between), expected, rtol=1e-5)


def test_one_set_and_a_batch_of_sets_agree():
    sets = gaussian(6, 29).view(2, 3, *SHAPE)
    batch = nao_centroids(sets, n=8)
    one = nao_centroid(sets[1], n=8)
    assert one.centroid.shape == SHAPE and one.paths.shape == (3, 8, *SHAPE)
    assert torch.allclose(one.centroid, batch.centroid[1], atol=1e-4)
    with pytest.raises(ValueError):
        nao_centroids(sets[0], n=8)


def test_simpson_rule_removes_the_published_midpoint_exploit_off_shell():
    a, b = 0.55 * gaussian(2, 30), 0.55 * gaussian(2, 31)  # like DDIM-inverted seeds
    high = chi_band(DIM, mass=0.99)[1]
    simpson = nao_path(a, b, n=16)
    midpoint_config = NaoConfig(quadrature="midpoint", stop=StopRule(max_iters=2000))
    midpoint = nao_path(a, b, n=16, config=midpoint_config)
    assert float(norms(simpson.path).max()) <= high
    # the published rule scores only segment midpoints: points next to the ends overshoot the shell
    assert float(norms(midpoint.path).max()) > 1.2 * high
