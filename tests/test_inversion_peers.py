"""The benchmark's peers behave as their papers say: EDICT is exact, null-text beats DDIM at 7.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from research import inversion_peers as peers
from research.digits import CLASS_NAMES, load_digits_arrays, render
from tailseed.pipeline import inversion as inv

PROMPT = "a photo of the digit one"


def _random_latents(pipe, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8).repeat(4, 1).repeat(4, 2)
    with torch.no_grad():
        z0 = inv.encode(pipe.vae, inv.images_to_tensor(images))
        cond, uncond = inv.encode_prompts(pipe, [PROMPT] * n)
    return z0, cond, uncond


def test_edict_round_trip_is_near_exact(tiny_pipe):
    """EDICT inverts its own coupled sampler exactly (up to float32), even at guidance 3."""
    z0, cond, uncond = _random_latents(tiny_pipe, 2)
    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 7)  # odd: the alternation must still match
    counter = inv.NFECounter(2)
    eps_fn = inv.GuidedEps(tiny_pipe.unet, cond, uncond, 3.0, counter)
    with torch.no_grad():
        x_t, y_t = peers.edict_invert(eps_fn, z0, schedule)
        assert counter.counts.tolist() == [7 * 2 * 2] * 2  # 2 evaluations per step, x2 guidance
        x0, y0 = peers.edict_sample(eps_fn, x_t, y_t, schedule)
    assert inv.latent_rmse(x0, z0).max() < 1e-3
    assert inv.latent_rmse(y0, z0).max() < 1e-3


def test_null_text_counts_nfe_and_regenerates_with_its_embeddings(tiny_pipe):
    z0, cond, uncond = _random_latents(tiny_pipe, 2, seed=1)
    schedule = inv.ddim_schedule(tiny_pipe.scheduler, 3)
    counter = inv.NFECounter(2)
    config = peers.NullTextConfig(inner_steps=2, early_stop=0.0, early_stop_slope=0.0)
    seed, nulls = peers.null_text_invert(
        tiny_pipe.unet, z0, cond, uncond, 7.5, schedule, config, counter
    )
    assert seed.shape == z0.shape and nulls.shape == (3, *uncond.shape)
    # pivot 1 + per step: cond 1 + 2 inner + final 1
    assert counter.counts.tolist() == [3 + 3 * 4] * 2
    assert not torch.equal(nulls[0], uncond)  # the embedding was optimised
    with torch.no_grad():
        z = peers.null_text_sample(tiny_pipe.unet, seed, cond, nulls, 7.5, schedule)
    assert z.shape == z0.shape and torch.isfinite(z).all()


@pytest.mark.slow
def test_null_text_beats_ddim_at_guidance_7_5(embedded_pipe):
    """The null-text paper's claim on the trained digits model, two real digits, 10 steps."""
    images8, labels = load_digits_arrays()
    idx = [1600, 1601]
    images = np.stack([np.asarray(render(images8[i])) for i in idx])
    prompts = [f"a photo of the digit {CLASS_NAMES[labels[i]]}" for i in idx]
    pipe = embedded_pipe
    with torch.no_grad():
        z0 = inv.encode(pipe.vae, inv.images_to_tensor(images))
        cond, uncond = inv.encode_prompts(pipe, prompts)
    schedule = inv.ddim_schedule(pipe.scheduler, 10)
    guided = inv.GuidedEps(pipe.unet, cond, uncond, 7.5)
    with torch.no_grad():
        ddim_seed = inv.ddim_invert(guided, z0, schedule).seed
        ddim_err = inv.latent_rmse(inv.sample(guided, ddim_seed, schedule), z0)
    seed, nulls = peers.null_text_invert(pipe.unet, z0, cond, uncond, 7.5, schedule)
    with torch.no_grad():
        nt_err = inv.latent_rmse(
            peers.null_text_sample(pipe.unet, seed, cond, nulls, 7.5, schedule), z0
        )
    assert (nt_err < 0.7 * ddim_err).all(), (nt_err, ddim_err)
