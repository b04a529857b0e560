"""Behaviour of the inversion core: round trips, solver agreement, batching, NFE accounting, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from research.digits import load_digits_arrays, render
from tailseed.pipeline import inversion as inv

PROMPT = "a photo of the digit one"


def _random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB images (B, size, size, 3) uint8: blocky noise, upsampled."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, size // 4, size // 4, 3)).astype(np.uint8)
    return small.repeat(4, axis=1).repeat(4, axis=2)


def _digits(n: int, offset: int = 0) -> tuple[np.ndarray, list[str]]:
    """n real digits (32x32 RGB uint8) from the bundled set, with their prompts."""
    from research.digits import CLASS_NAMES

    images8, labels = load_digits_arrays()
    idx = range(1500 + offset, 1500 + offset + n)  # far from any split's first entries
    images = np.stack([np.asarray(render(images8[i])) for i in idx])
    return images, [f"a photo of the digit {CLASS_NAMES[labels[i]]}" for i in idx]


def _latents(pipe, images, prompts):
    with torch.no_grad():
        z0 = inv.encode(pipe.vae, inv.images_to_tensor(images))
        cond, uncond = inv.encode_prompts(pipe, prompts)
    return z0, cond, uncond


def _roundtrip_rmse(pipe, z0, cond, uncond, guidance, schedule, result) -> torch.Tensor:
    with torch.no_grad():
        regen = inv.sample(inv.GuidedEps(pipe.unet, cond, uncond, guidance), result.seed, schedule)
    return inv.latent_rmse(regen, z0)


def test_schedule_follows_the_diffusers_scheduler(tiny_pipe):
    """The grid is read from the scheduler, and `sample` is diffusers' DDIM step (eta 0)."""
    from diffusers import DDIMScheduler

    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 10)
    reference = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    reference.set_timesteps(10)
    assert torch.equal(schedule.timesteps, reference.timesteps.to(torch.int64))
    assert float(schedule.alphas_prev[-1]) == pytest.approx(float(reference.final_alpha_cumprod))

    z0, cond, uncond = _latents(tiny_pipe, _random_images(2, 16), [PROMPT] * 2)
    eps_fn = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 2.0)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = inv.sample(eps_fn, noise, schedule)
        z = noise
        for t in reference.timesteps:
            z = reference.step(eps_fn(z, t, torch.arange(2)), t, z).prev_sample
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def test_ddim_inversion_matches_diffusers_inverse_scheduler(tiny_pipe):
    from research.inversion_peers import ddim_invert_diffusers

    z0, cond, uncond = _latents(tiny_pipe, _random_images(2, 16), [PROMPT] * 2)
    eps_fn = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 1.0)
    with torch.no_grad():
        ours = inv.ddim_invert(eps_fn, z0, inv.ddim_schedule(tiny_pipe.scheduler, 10)).seed
        theirs = ddim_invert_diffusers(eps_fn, z0, tiny_pipe.scheduler, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_fixed_point_reconstructs_far_better_than_ddim(tiny_pipe):
    """Round trip on a random tiny model at guidance 2: FPI's latent error is far below DDIM's."""
    z0, cond, uncond = _latents(tiny_pipe, _random_images(3, 16), [PROMPT] * 3)
    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 20)
    eps_fn = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 2.0)
    with torch.no_grad():
        ddim = inv.ddim_invert(eps_fn, z0, schedule)
        fpi = inv.fixed_point_invert(eps_fn, z0, schedule, max_iters=20, tol=1e-5)
    err_ddim = _roundtrip_rmse(tiny_pipe, z0, cond, uncond, 2.0, schedule, ddim)
    err_fpi = _roundtrip_rmse(tiny_pipe, z0, cond, uncond, 2.0, schedule, fpi)
    assert (err_fpi < 0.1 * err_ddim).all(), (err_fpi, err_ddim)


def test_anderson_and_plain_iteration_converge_to_the_same_seed(tiny_pipe):
    z0, cond, uncond = _latents(tiny_pipe, _random_images(2, 16, seed=1), [PROMPT] * 2)
    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 50)
    eps_fn = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 2.0)
    with torch.no_grad():
        plain = inv.fixed_point_invert(eps_fn, z0, schedule, max_iters=40, tol=1e-6)
        accel = inv.fixed_point_invert(
            eps_fn, z0, schedule, max_iters=40, tol=1e-6, method="anderson"
        )
    assert (plain.residual <= 1e-6).all() and (accel.residual <= 1e-6).all()
    torch.testing.assert_close(accel.seed, plain.seed, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_embedded_model_fixed_point_round_trip_beats_ddim(embedded_pipe):
    """On the trained digits model at guidance 2: DDIM inversion loses detail, FPI keeps it, and
    Anderson with the free predictor reaches the same seed with fewer evaluations."""
    images, prompts = _digits(4)
    z0, cond, uncond = _latents(embedded_pipe, images, prompts)
    schedule = inv.ddim_schedule(embedded_pipe.scheduler, 25)
    eps_fn = inv.GuidedEps(embedded_pipe.unet, cond, uncond, 2.0)
    solve = dict(max_iters=20, tol=1e-5)
    with torch.no_grad():
        ddim = inv.ddim_invert(eps_fn, z0, schedule)
        plain = inv.fixed_point_invert(eps_fn, z0, schedule, **solve)
        accel = inv.fixed_point_invert(eps_fn, z0, schedule, method="anderson", **solve)
        predicted = inv.fixed_point_invert(
            eps_fn, z0, schedule, method="anderson", predictor="extrapolate", **solve
        )
    err = {
        name: _roundtrip_rmse(embedded_pipe, z0, cond, uncond, 2.0, schedule, r)
        for name, r in (("ddim", ddim), ("plain", plain), ("anderson", accel), ("pred", predicted))
    }
    for name in ("plain", "anderson", "pred"):
        assert (err[name] < 0.01 * err["ddim"]).all(), err
    # the same seed up to the tolerance, amplified along the chain (seed values reach about 5)
    assert inv.latent_rmse(accel.seed, plain.seed).max() < 1e-3
    assert inv.latent_rmse(predicted.seed, plain.seed).max() < 1e-3
    assert predicted.evals.sum() < accel.evals.sum() < plain.evals.sum()


def test_batch_of_n_equals_n_batches_of_one(tiny_pipe):
    images = _random_images(3, 16, seed=2)
    prompts = [PROMPT, "a photo of the digit seven", "a photo of the digit four"]
    config = inv.InversionConfig(num_inference_steps=8, max_iters=6, tol=1e-3, guidance_scale=2.0)
    inverter = inv.Inverter(tiny_pipe, config)
    batch = inverter.invert(images, prompts, [10, 11, 12])
    for j in range(3):
        single = inverter.invert(images[j : j + 1], prompts[j : j + 1], [10 + j])
        np.testing.assert_allclose(single["seed"][0], batch["seed"][j], rtol=0, atol=1e-4)
        assert single["nfe"][0] == batch["nfe"][j]
        np.testing.assert_allclose(single["recon_psnr"][0], batch["recon_psnr"][j], atol=0.05)


def test_same_inputs_give_identical_output(tiny_pipe):
    images = _random_images(2, 16, seed=3)
    # every sample runs to max_iters (tol 0), so each UNet batch holds the same samples whatever
    # the other sample's noise: the per-sample comparison below is then bitwise
    config = inv.InversionConfig(num_inference_steps=6, max_iters=4, tol=0.0)
    inverter = inv.Inverter(tiny_pipe, config)
    a = inverter.invert(images, [PROMPT] * 2, [5, 6])
    b = inverter.invert(images, [PROMPT] * 2, [5, 6])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = inverter.invert(images, [PROMPT] * 2, [7, 6])  # another adjustment noise for sample 0
    assert not np.array_equal(a["seed"][0], c["seed"][0])
    np.testing.assert_array_equal(a["seed"][1], c["seed"][1])
    sampler = inv.Sampler(tiny_pipe)
    g1 = sampler.generate(a["seed"], [PROMPT] * 2, 2.0, 6)
    g2 = sampler.generate(a["seed"], [PROMPT] * 2, 2.0, 6)
    assert g1.dtype == np.uint8 and g1.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(g1, g2)


def test_converged_samples_stop_consuming_nfe(tiny_pipe):
    """A sample whose iteration converges at once costs 2 evaluations per step; others go on."""
    z0, cond, uncond = _latents(tiny_pipe, _random_images(2, 16, seed=4), [PROMPT] * 2)
    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 5)
    real = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 1.0)
    counter = inv.NFECounter(2)

    def eps_fn(z, t, idx):
        """Sample 0 sees a constant noise prediction (f is then constant: converged at once)."""
        counter.add(idx, 1)
        eps = real(z, t, idx)
        return torch.where((idx == 0)[:, None, None, None], torch.zeros_like(eps), eps)

    with torch.no_grad():
        result = inv.fixed_point_invert(eps_fn, z0, schedule, max_iters=10, tol=1e-7)
    assert result.evals[0].tolist() == [2] * 5
    assert (result.evals[1] > 2).all()
    assert counter.counts.tolist() == result.evals.sum(1).tolist()


def test_nfe_counts_guidance_adjustment_and_iterations(tiny_pipe):
    steps, iters = 4, 3
    images = _random_images(2, 16, seed=5)
    base = dict(num_inference_steps=steps, max_iters=iters, tol=0.0, method="fixed_point")
    for guidance, per_eval in ((1.0, 1), (3.0, 2)):
        plain = inv.Inverter(
            tiny_pipe, inv.InversionConfig(guidance_scale=guidance, adjust_strength=0, **base)
        ).invert(images, [PROMPT] * 2, [0, 1])
        assert plain["nfe"].tolist() == [steps * iters * per_eval] * 2
    # the adjustment: strength 0.05 on the 50-step grid is 2 steps at its guidance 2 -> 4 evaluations
    adjusted = inv.Inverter(
        tiny_pipe, inv.InversionConfig(guidance_scale=1.0, adjust_strength=0.05, **base)
    ).invert(images, [PROMPT] * 2, [0, 1])
    assert adjusted["nfe"].tolist() == [steps * iters + 4] * 2


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="fixed_point", predictor="ddim", tol=0.0, adjust_strength=0.01),
        dict(method="anderson", adjust_strength=0.05, adjust_guidance=1.0),
        dict(method="ddim", guidance_scale=1.0, adjust_strength=0.3),
    ],
)
def test_the_solvers_nfe_bound_holds_and_is_reached(tiny_pipe, settings):
    """The plan's NFE estimate asks the solver: never below what runs, exact at a fixed count."""
    config = inv.InversionConfig(num_inference_steps=4, max_iters=3, **settings)
    out = inv.Inverter(tiny_pipe, config).invert(
        _random_images(2, 16, seed=6), [PROMPT] * 2, [0, 1]
    )
    assert (out["nfe"] <= inv.max_nfe(config)).all()
    if config.tol == 0.0 or config.method == "ddim":
        assert out["nfe"].tolist() == [inv.max_nfe(config)] * 2


def test_nan_sample_is_reported_failed_and_the_batch_continues(tiny_pipe):
    z0, cond, uncond = _latents(tiny_pipe, _random_images(3, 16, seed=6), [PROMPT] * 3)
    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 6)
    eps_fn = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 1.0)
    broken = z0.clone()
    broken[1, 0, 0, 0] = float("nan")
    with torch.no_grad():
        result = inv.fixed_point_invert(eps_fn, broken, schedule, max_iters=5, tol=1e-4)
        alone = inv.fixed_point_invert(eps_fn, z0[[0, 2]], schedule, max_iters=5, tol=1e-4)
    assert result.failed.tolist() == [False, True, False]
    assert not torch.isfinite(result.residual[1])
    torch.testing.assert_close(result.seed[[0, 2]], alone.seed, rtol=0, atol=1e-4)


def test_diverging_sample_is_reported_failed_with_its_residual(tiny_pipe):
    """An eps that explodes for one sample makes it diverge; it is stopped, the others converge."""
    z0, cond, uncond = _latents(tiny_pipe, _random_images(2, 16, seed=7), [PROMPT] * 2)
    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 20)
    real = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 1.0)

    def eps_fn(z, t, idx):
        eps = real(z, t, idx)
        blow_up = (idx == 0)[:, None, None, None]
        return torch.where(blow_up, 1e4 * z.abs() + 1e3, eps)

    with torch.no_grad():
        result = inv.fixed_point_invert(eps_fn, z0, schedule, max_iters=10, tol=1e-5)
    assert result.failed.tolist() == [True, False]
    assert result.residual[0] > inv.DIVERGED_RESIDUAL
    assert torch.isfinite(result.seed[1]).all()
    assert result.evals[0].sum() < result.evals[1].sum()  # the failed sample stopped early


def test_inverter_reports_failed_samples(tiny_pipe, monkeypatch):
    """Through the boundary: a failed sample has NaN measures, the others are regenerated."""
    inverter = inv.Inverter(
        tiny_pipe, inv.InversionConfig(num_inference_steps=4, adjust_strength=0)
    )
    real_encode = inv.encode

    def encode_with_nan(vae, x):
        z = real_encode(vae, x)
        z[0] = float("nan")
        return z

    monkeypatch.setattr(inv, "encode", encode_with_nan)
    out = inverter.invert(_random_images(2, 16, seed=8), [PROMPT] * 2, [0, 1])
    assert out["failed"].tolist() == [True, False]
    assert np.isnan(out["recon_psnr"][0]) and np.isfinite(out["recon_psnr"][1])
    assert np.isfinite(out["seed"][1]).all()


def test_inverter_output_contract(tiny_pipe):
    config = inv.InversionConfig(num_inference_steps=5)
    out = inv.Inverter(tiny_pipe, config).invert(_random_images(2, 16), [PROMPT] * 2, [0, 1])
    assert out["seed"].shape == (2, 4, 8, 8) and out["seed"].dtype == np.float32
    assert out["nfe"].dtype == np.int64 and out["failed"].dtype == bool
    for key in ("recon_psnr", "recon_latent_rmse", "vae_psnr", "residual"):
        assert out[key].shape == (2,) and out[key].dtype == np.float32
    with pytest.raises(ValueError, match="uint8"):
        inv.Inverter(tiny_pipe, config).invert(_random_images(1, 32), [PROMPT], [0])
    with pytest.raises(ValueError, match="method"):
        inv.InversionConfig(method="newton")
    with pytest.raises(ValueError, match="predictor"):
        inv.InversionConfig(predictor="oracle")


def test_solver_runs_with_gradients_enabled(tiny_pipe):
    """The core does not switch gradients off: a loss on the seed reaches the text embedding."""
    z0, cond, uncond = _latents(tiny_pipe, _random_images(1, 16), [PROMPT])
    cond = cond.clone().requires_grad_(True)
    eps_fn = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 2.0)
    result = inv.fixed_point_invert(eps_fn, z0, inv.ddim_schedule(tiny_pipe.scheduler, 2), 2)
    result.seed.pow(2).sum().backward()
    assert cond.grad is not None and torch.isfinite(cond.grad).all()


@pytest.mark.slow
def test_reduced_precision_model_with_float32_solver_state(embedded_pipe):
    """The float16-on-CUDA path, run on the CPU in bfloat16: modules in reduced precision, the
    solver state float32. Seeds come out float32 and finite, and reconstruct nearly as well as in
    float32 (no GPU is needed to catch a dtype mismatch between the solver and the modules)."""
    import copy

    images, prompts = _digits(4)
    config = inv.InversionConfig(num_inference_steps=10, max_iters=4, tol=1e-3)
    full = inv.Inverter(embedded_pipe, config).invert(images, prompts, [0, 1, 2, 3])
    low_pipe = copy.deepcopy(embedded_pipe).to(dtype=torch.bfloat16)
    low = inv.Inverter(low_pipe, config)
    out = low.invert(images, prompts, [0, 1, 2, 3])
    assert out["seed"].dtype == np.float32 and np.isfinite(out["seed"]).all()
    assert not out["failed"].any()
    assert np.mean(out["recon_psnr"]) > np.mean(full["recon_psnr"]) - 3.0
    regenerated = inv.Sampler(low_pipe).generate(out["seed"], prompts, config.guidance_scale, 10)
    assert regenerated.dtype == np.uint8 and regenerated.shape == images.shape
