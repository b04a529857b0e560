"""The inversion methods tailseed is measured against: diffusers' DDIM inversion, EDICT, null-text.

Each is implemented to its paper's settings, fixed here before any measurement:
- DDIM inversion through diffusers' own `DDIMInverseScheduler`: the outside reference for plain
  DDIM inversion (tailseed's `ddim_invert` must agree with it).
- EDICT (Wallace et al., arXiv 2211.12446): two coupled latents x, y, mixing p = 0.93, alternating
  ("leapfrog") update order; exactly invertible by construction, 2 UNet evaluations per step. Its
  seed is the pair (x_T, y_T) and it regenerates through its own coupled sampler.
- Null-text inversion (Mokady et al., arXiv 2211.09794): a DDIM inversion pivot at guidance 1, then
  per step the unconditional embedding is optimised so that the guided step lands on the pivot:
  Adam, N = 10 inner iterations, learning rate 1e-2 decaying linearly to half over the run
  (1e-2 * (1 - i / 100) over 50 steps), early stop once the loss is below 1e-5 + i * 2e-5.
  Its seed is the pivot's z_T plus one optimised embedding per step.

Like `pipeline.inversion`, tensors in and out; null-text takes gradients of the UNet's output with
respect to the embedding only, so callers must not disable gradients around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tailseed.pipeline.inversion import EpsFn, NFECounter, Schedule, ddim_trajectory

EDICT_MIX = 0.93  # the EDICT paper's mixing coefficient p


# ----------------------------------------------------------------------------------------------
# diffusers' DDIMInverseScheduler


def ddim_invert_diffusers(
    eps_fn: EpsFn, z0: torch.Tensor, scheduler, num_inference_steps: int
) -> torch.Tensor:
    """DDIM inversion with diffusers' `DDIMInverseScheduler` built from `scheduler`'s config.

    z0 (B, C, h, w) -> seed z_T (B, C, h, w) float32; one eps evaluation per step, at the current
    (less noisy) latent and the step's target timestep, as the scheduler expects.
    """
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(num_inference_steps)
    z = z0.float()
    idx = torch.arange(len(z), device=z.device)
    for t in inverse.timesteps:
        eps = eps_fn(z, t.to(z.device), idx)
        z = inverse.step(eps, t, z).prev_sample.float()
    return z


# ----------------------------------------------------------------------------------------------
# EDICT


def _edict_coefficients(schedule: Schedule, i: int) -> tuple[float, float]:
    """(a, b) of sampling step i: the DDIM step is z_s = a * z_t + b * eps(z_t, t)."""
    sa_t, sb_t, sa_s, sb_s = schedule.coefficients(i)
    a = sa_s / sa_t
    return a, sb_s - a * sb_t


def edict_invert(
    eps_fn: EpsFn, z0: torch.Tensor, schedule: Schedule, p: float = EDICT_MIX
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDICT inversion of clean latents z0 (B, C, h, w) -> the coupled seed (x_T, y_T).

    Each step undoes one step of `edict_sample` exactly in reverse: first the mixing, then the two
    affine updates in the opposite order. Two eps evaluations per step.
    """
    x, y = z0.float().clone(), z0.float().clone()
    idx = torch.arange(len(x), device=x.device)
    for i in reversed(range(len(schedule))):
        a, b = _edict_coefficients(schedule, i)
        t = schedule.timesteps[i].to(x.device)
        # 1. undo the mixing layer
        y = (y - (1 - p) * x) / p
        x = (x - (1 - p) * y) / p
        # 2. undo the two updates, the later one first (the order alternates per step)
        if i % 2 == 0:
            y = (y - b * eps_fn(x, t, idx)) / a
            x = (x - b * eps_fn(y, t, idx)) / a
        else:
            x = (x - b * eps_fn(y, t, idx)) / a
            y = (y - b * eps_fn(x, t, idx)) / a
    return x, y


def edict_sample(
    eps_fn: EpsFn, x: torch.Tensor, y: torch.Tensor, schedule: Schedule, p: float = EDICT_MIX
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDICT's coupled DDIM sampler: (x_T, y_T) (B, C, h, w) each -> (x_0, y_0)."""
    x, y = x.float(), y.float()
    idx = torch.arange(len(x), device=x.device)
    for i in range(len(schedule)):
        a, b = _edict_coefficients(schedule, i)
        t = schedule.timesteps[i].to(x.device)
        # 1. two affine DDIM updates, each with eps of the other sequence (order alternates)
        if i % 2 == 0:
            x = a * x + b * eps_fn(y, t, idx)
            y = a * y + b * eps_fn(x, t, idx)
        else:
            y = a * y + b * eps_fn(x, t, idx)
            x = a * x + b * eps_fn(y, t, idx)
        # 2. the mixing layer keeps the two sequences close
        x = p * x + (1 - p) * y
        y = p * y + (1 - p) * x
    return x, y


# ----------------------------------------------------------------------------------------------
# Null-text inversion


@dataclass(frozen=True)
class NullTextConfig:
    """The null-text paper's optimisation settings."""

    inner_steps: int = 10  # N: Adam iterations per diffusion step
    lr: float = 1e-2  # Adam's learning rate at the first step
    lr_decay: float = (
        0.5  # fraction the learning rate loses linearly over the run (1 - i/100 at 50)
    )
    early_stop: float = 1e-5  # stop a step once loss < early_stop + i * early_stop_slope
    early_stop_slope: float = 2e-5


def _unet_eps(unet, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return unet(z.to(unet.dtype), t, encoder_hidden_states=hidden.to(unet.dtype)).sample.float()


def null_text_invert(
    unet,
    z0: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    schedule: Schedule,
    config: NullTextConfig = NullTextConfig(),
    counter: NFECounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Null-text inversion of z0 (B, C, h, w) with text embeddings cond, uncond (B, L, D).

    Returns (seed (B, C, h, w), null_embeddings (N, B, L, D)): the pivot's z_T and the optimised
    unconditional embedding of each sampling step. NFE counted per sample: the pivot (1 per step),
    then per step the conditional prediction (1), each inner iteration's unconditional forward
    pass (1; its backward pass is not an evaluation) and the final guided step's unconditional
    prediction (1). Each sample stops its inner loop on its own loss, with its own Adam state.
    """
    batch, device = len(z0), z0.device
    all_rows = torch.arange(batch, device=device)
    cond, uncond = cond.detach().float(), uncond.detach().float()
    counter = counter if counter is not None else NFECounter(batch)

    def cond_eps(z, t, rows):
        counter.add(rows, 1)
        return _unet_eps(unet, z, t, cond[rows])

    # 1. the pivot: DDIM inversion without guidance
    with torch.no_grad():
        pivot = ddim_trajectory(cond_eps, z0, schedule)  # pivot[j] is level N - j
    n = len(schedule)
    z = pivot[-1].clone()
    null = uncond.clone()  # (B, L, D), carried from step to step as in the paper
    nulls = []
    g = float(guidance_scale)
    for i in range(n):
        t = schedule.timesteps[i].to(device)
        target = pivot[n - i - 1]  # the pivot at the next, less noisy level

        # 2. the conditional prediction is fixed during the step's optimisation
        with torch.no_grad():
            eps_c = cond_eps(z, t, all_rows)
        # 3. optimise each sample's unconditional embedding (Adam, per-sample state and stop)
        lr = config.lr * (1 - config.lr_decay * i / n)
        threshold = config.early_stop + i * config.early_stop_slope
        m, v = torch.zeros_like(null), torch.zeros_like(null)
        active = all_rows
        for k in range(1, config.inner_steps + 1):
            u = null[active].clone().requires_grad_(True)
            counter.add(active, 1)
            eps_u = _unet_eps(unet, z[active], t, u)
            eps = eps_u + g * (eps_c[active] - eps_u)
            loss = (
                (schedule.step(i, z[active], eps) - target[active]).pow(2).flatten(1).mean(1)
            )  # (n,)
            (grad,) = torch.autograd.grad(loss.sum(), u)
            with torch.no_grad():
                m[active] = 0.9 * m[active] + 0.1 * grad
                v[active] = 0.999 * v[active] + 0.001 * grad.pow(2)
                m_hat, v_hat = m[active] / (1 - 0.9**k), v[active] / (1 - 0.999**k)
                null[active] = null[active] - lr * m_hat / (v_hat.sqrt() + 1e-8)
            # the paper checks the loss of the iterate before the update and then stops
            active = active[loss.detach() >= threshold]
            if len(active) == 0:
                break
        # 4. take the guided step with the optimised embedding
        with torch.no_grad():
            counter.add(all_rows, 1)
            eps_u = _unet_eps(unet, z, t, null)
            z = schedule.step(i, z, eps_u + g * (eps_c - eps_u))
        nulls.append(null.detach().clone())
    return pivot[-1], torch.stack(nulls)


def null_text_sample(
    unet,
    seed: torch.Tensor,
    cond: torch.Tensor,
    null_embeddings: torch.Tensor,
    guidance_scale: float,
    schedule: Schedule,
) -> torch.Tensor:
    """Null-text's sampler: guided DDIM with step i's own unconditional embedding.

    seed (B, C, h, w), cond (B, L, D), null_embeddings (N, B, L, D) -> z_0 (B, C, h, w).
    """
    z = seed.float()
    g = float(guidance_scale)
    for i in range(len(schedule)):
        t = schedule.timesteps[i].to(z.device)
        hidden = torch.cat([null_embeddings[i], cond])
        eps_u, eps_c = _unet_eps(unet, torch.cat([z, z]), t, hidden).chunk(2)
        z = schedule.step(i, z, eps_u + g * (eps_c - eps_u))
    return z
