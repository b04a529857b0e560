"""Inversion of a latent diffusion model into noise seeds: DDIM, fixed-point and Anderson solvers.

Key from the papers' notation to the names here (DDIM with eta = 0, epsilon prediction):
    a_t      alphas_cumprod at timestep t, read from the diffusers scheduler (`Schedule.alphas`)
    z_t      latent at noise level t; z_0 is the VAE latent times the VAE's scaling factor
    eps      the UNet's noise prediction, with classifier-free guidance (`GuidedEps`)
    f        one inverse DDIM step from the fixed, less noisy z_s to level t, evaluated at z:
             f(z) = sqrt(a_t / a_s) * z_s + (sqrt(1 - a_t) - sqrt(a_t / a_s) * sqrt(1 - a_s)) * eps(z, t)
A sampling step maps z_t to z_s with eps(z_t, t); its exact inverse is the solution of z_t = f(z_t).
DDIM inversion takes one evaluation from z_s (the "DDIM guess"); fixed-point inversion (Meiri et
al., arXiv 2312.12540) iterates f from that guess; Anderson acceleration mixes the last m iterates.

The core functions take tensors, modules, a scheduler and generators, do no I/O and do not disable
gradients (null-text inversion differentiates through them). `Inverter` is the boundary: numpy in,
numpy out, under `torch.inference_mode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tailseed.pipeline.inversion_config import PREDICTORS, SOLVER_NAMES, InversionConfig

# The prompt-aware adjustment is img2img on the grid of the img2img pipeline's default step count
# (50), as in the paper's public code: strength 0.05 is then 2 denoising steps from t = 21.
ADJUST_GRID_STEPS = 50
# A per-element RMS residual above this (latents are O(1)) or a non-finite one marks a sample failed.
DIVERGED_RESIDUAL = 1e3


# ----------------------------------------------------------------------------------------------
# Schedule and noise prediction


@dataclass(frozen=True)
class Schedule:
    """A DDIM sampling grid read from a diffusers scheduler after `set_timesteps`.

    Sampling step i maps level i (timestep `timesteps[i]`, alpha `alphas[i]`) to level i + 1
    (alpha `alphas_prev[i]`); the last step ends at the scheduler's final alpha, the clean latent.
    timesteps: (N,) int64, decreasing. alphas, alphas_prev: (N,) float64.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def coefficients(self, i: int) -> tuple[float, float, float, float]:
        """(sqrt(a_t), sqrt(1 - a_t), sqrt(a_s), sqrt(1 - a_s)) of step i as Python floats."""
        a_t, a_s = float(self.alphas[i]), float(self.alphas_prev[i])
        return math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_s), math.sqrt(1 - a_s)

    def step(self, i: int, z_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sampling step i (DDIM, eta 0): z_t and its noise eps -> z_s, one level less noisy."""
        sa_t, sb_t, sa_s, sb_s = self.coefficients(i)
        # 1. predict the clean latent, 2. move to the next level along the same noise
        x0 = (z_t - sb_t * eps) / sa_t
        return sa_s * x0 + sb_s * eps

    def inverse_coefficients(self, i: int) -> tuple[float, float]:
        """(c_z, c_e) of the inverse of step i: z_t = c_z * z_s + c_e * eps(z_t, t)."""
        sa_t, sb_t, sa_s, sb_s = self.coefficients(i)
        c_z = sa_t / sa_s
        return c_z, sb_t - c_z * sb_s

    def inverse_step(self, i: int, z_s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The inverse of step i with the noise given: z_s, eps -> z_t (DDIM inversion when eps is
        evaluated at z_s; the exact inverse when eps is eps(z_t), which fixed-point inversion finds)."""
        c_z, c_e = self.inverse_coefficients(i)
        return c_z * z_s + c_e * eps


def ddim_schedule(scheduler, num_inference_steps: int) -> Schedule:
    """The DDIM grid of `num_inference_steps` for a (DDIM-compatible) diffusers scheduler.

    A copy of the scheduler is set up, so the caller's scheduler keeps its state. The previous
    level of timestep t is t - num_train_timesteps // num_inference_steps, as `DDIMScheduler.step`
    computes it, and its alpha is the scheduler's `final_alpha_cumprod` below zero.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    timesteps = sched.timesteps.to(torch.int64).cpu()
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    ac = sched.alphas_cumprod.to(torch.float64)
    final = float(sched.final_alpha_cumprod)
    prev = [float(ac[t - ratio]) if t - ratio >= 0 else final for t in timesteps.tolist()]
    return Schedule(timesteps, ac[timesteps], torch.tensor(prev, dtype=torch.float64))


def check_epsilon_prediction(scheduler_config, model: str = "the model") -> None:
    """DDIM and fixed-point inversion need a model that predicts the noise (epsilon): a
    v-prediction model (Stable Diffusion 2.1 at 768) is refused with a message that says so."""
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{model}: prediction_type is {prediction!r}; DDIM and fixed-point inversion need an "
            f"epsilon-prediction model (e.g. Stable Diffusion 1.5 or 2.1-base, not 2.1 768-v)"
        )


class NFECounter:
    """UNet evaluations per sample of a batch; a guided evaluation counts 2 (DESIGN's NFE)."""

    def __init__(self, batch_size: int):
        self.counts = torch.zeros(batch_size, dtype=torch.int64)

    def add(self, idx: torch.Tensor, n: int) -> None:
        self.counts[idx.cpu()] += n


EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GuidedEps:
    """eps(z, t) with classifier-free guidance for any subset of a batch, counting NFE per sample.

    cond, uncond: (B, L, D) text embeddings of the whole batch. A call takes z (n, C, h, w), a
    scalar timestep and idx (n,), the batch rows that z holds, and returns eps (n, C, h, w) float32.
    Guidance 1 runs the conditional branch only (one UNet evaluation); otherwise one UNet call on
    the stacked [uncond; cond] inputs, which counts as two evaluations per sample.
    """

    def __init__(
        self, unet, cond, uncond, guidance_scale: float, counter: NFECounter | None = None
    ):
        self.unet, self.cond, self.uncond = unet, cond, uncond
        self.guidance_scale = float(guidance_scale)
        self.counter = counter

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def __call__(self, z: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        if self.counter is not None:
            self.counter.add(idx, guided_evals(self.guidance_scale))
        if not self.guided:
            out = self.unet(z.to(dtype), t, encoder_hidden_states=self.cond[idx]).sample
            return out.float()
        z2 = torch.cat([z, z]).to(dtype)  # (2n, C, h, w)
        hidden = torch.cat([self.uncond[idx], self.cond[idx]])  # (2n, L, D)
        eps_u, eps_c = self.unet(z2, t, encoder_hidden_states=hidden).sample.float().chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


def encode_prompts(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings (cond, uncond), each (B, L, D), the uncond one of the empty prompt."""
    cond, uncond = pipe.encode_prompt(
        list(prompts), pipe.unet.device, 1, do_classifier_free_guidance=True
    )
    return cond, uncond


# ----------------------------------------------------------------------------------------------
# VAE


def images_to_tensor(images: np.ndarray, device=None) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.require(images, requirements=("C", "W"))).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).to(device)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (rounded, as diffusers' postprocess)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w) float32: the posterior mean, scaled.

    The mean rather than a sample, so that the same image always has the same latent.
    """
    mean = vae.encode(x.to(vae.dtype)).latent_dist.mean
    return mean.float() * vae.config.scaling_factor


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> pixels (B, 3, H, W) float32 in [-1, 1] (unclamped)."""
    return vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.float()


# ----------------------------------------------------------------------------------------------
# Sampling and the prompt-aware adjustment


def sample(
    eps_fn: EpsFn,
    z: torch.Tensor,
    schedule: Schedule,
    start: int = 0,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from level `start` to the clean latent.

    z: (B, C, h, w) at level `start` (the seed z_T for start = 0) -> z_0 (B, C, h, w) float32.
    on_step, if given, is called after each step (progress reporting; it sees no tensor).
    """
    z = z.float()
    idx = torch.arange(len(z), device=z.device)
    for i in range(start, len(schedule)):
        # 1. predict the noise at the current level, 2. step to the next level
        eps = eps_fn(z, schedule.timesteps[i].to(z.device), idx)
        z = schedule.step(i, z, eps)
        if on_step is not None:
            on_step()
    return z


def adjustment_noise(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One standard normal tensor of `shape` (C, h, w) per generator, stacked: (B, C, h, w) float32.

    Drawn on the generators' device (CPU generators give the same noise on any accelerator), one
    sample per generator, so a batch of N draws exactly what N batches of one draw.
    """
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def adjustment_steps(strength: float) -> int:
    """Denoising steps of the adjustment at `strength` > 0: the last int(50 * strength) of the
    img2img grid, at least one."""
    return min(max(1, int(ADJUST_GRID_STEPS * strength)), ADJUST_GRID_STEPS)


def adjust(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    scheduler,
    strength: float,
    noise: torch.Tensor,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Prompt-aware encoding adjustment: noise z0 lightly and denoise it under the prompt (img2img).

    z0, noise: (B, C, h, w). On the grid of ADJUST_GRID_STEPS steps, the last
    int(ADJUST_GRID_STEPS * strength) steps (at least one) are run, from z0 noised to their first
    level, exactly as diffusers' img2img pipeline does. Returns the adjusted z0 (B, C, h, w) float32.
    """
    if strength <= 0:
        return z0.float()
    grid = ddim_schedule(scheduler, ADJUST_GRID_STEPS)
    n = adjustment_steps(strength)
    start = len(grid) - n
    a = float(grid.alphas[start])
    # 1. noise the latent to the first level of the last n steps
    z = math.sqrt(a) * z0.float() + math.sqrt(1 - a) * noise.to(z0.device, torch.float32)
    # 2. denoise it under the prompt
    return sample(eps_fn, z, grid, start=start, on_step=on_step)


# ----------------------------------------------------------------------------------------------
# Inversion


@dataclass
class SolverResult:
    """seed (B, C, h, w) float32; residual (B,) float32, the largest final per-step RMS residual
    |f(z) - z| (NaN where not measured, i.e. DDIM inversion); failed (B,) bool (non-finite or
    diverged); evals (B, N) int64, evaluations of f per sample and inversion step (step order as
    the schedule, i.e. column 0 is the noisiest step)."""

    seed: torch.Tensor
    residual: torch.Tensor
    failed: torch.Tensor
    evals: torch.Tensor


def _rms(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n,) root mean square per sample."""
    return x.flatten(1).pow(2).mean(1).sqrt()


def _anderson_next(xs: list[torch.Tensor], gs: list[torch.Tensor], m: int) -> torch.Tensor:
    """The Anderson (type II) iterate from the histories of iterates x_j and their images g_j = f(x_j).

    xs, gs: lists of (n, D) float32, oldest first, at least two. With residuals r_j = g_j - x_j and
    the differences dR, dG of the last m + 1 entries, gamma = argmin |r_k - dR gamma| (per sample,
    float64, lightly regularised) and the next iterate is g_k - dG gamma: (n, D) float32.
    """
    xs, gs = xs[-(m + 1) :], gs[-(m + 1) :]
    r = torch.stack([g - x for x, g in zip(xs, gs)], dim=2).double()  # (n, D, k)
    g = torch.stack(gs, dim=2).double()  # (n, D, k)
    d_r, d_g = r.diff(dim=2), g.diff(dim=2)  # (n, D, k - 1)
    gram = d_r.transpose(1, 2) @ d_r  # (n, k-1, k-1)
    reg = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)  # (n,)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = d_r.transpose(1, 2) @ r[:, :, -1:]  # (n, k-1, 1)
    gamma = torch.linalg.solve(gram + reg[:, None, None] * eye, rhs)  # (n, k-1, 1)
    return (g[:, :, -1:] - d_g @ gamma).squeeze(2).float()


def _solve_step(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    idx: torch.Tensor,
    from_guess: bool,
    max_iters: int,
    tol: float,
    method: str,
    anderson_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve x = f(x) for the batch rows `idx`; each sample stops once its residual is <= tol.

    x0: (n, C, h, w) first iterates of those rows; f(x, rows) maps iterates of the given batch rows
    to f(x). from_guess: x0 is the less noisy latent z_s itself, so the first evaluation is the
    DDIM guess and its distance to x0 is the step, not a residual (no stop, nothing reported).
    Returns, per row: solution (n, C, h, w), residual (n,) (NaN if none was measured), failed (n,)
    bool, evaluations of f (n,) int64.
    """
    n, shape, device = len(idx), x0.shape[1:], x0.device
    out, res_out = x0.clone(), torch.full((n,), float("nan"), device=device)
    failed = torch.zeros(n, dtype=torch.bool, device=device)
    evals = torch.zeros(n, dtype=torch.int64)
    run = torch.arange(n, device=device)  # positions into idx of the samples still iterating
    x, xs, gs = x0, [], []
    best_res, best_g = torch.full((n,), float("inf"), device=device), x0.clone()
    for k in range(1, max_iters + 1):
        if len(run) == 0:
            break
        # 1. evaluate f at the current iterates of the running samples only
        g = f(x, idx[run])
        evals[run.cpu()] += 1
        finite = torch.isfinite(g.flatten(1)).all(1)
        if from_guess and k == 1:
            res = torch.full_like(best_res, float("nan"))
            bad, converged = ~finite, torch.zeros_like(finite)
            best_g = g.clone()
        else:
            res = _rms(g - x)
            improved = res < best_res
            best_res = torch.where(improved, res, best_res)
            best_g[improved] = g[improved]
            bad = ~finite | ~torch.isfinite(res) | (res > DIVERGED_RESIDUAL)
            converged = res <= tol
        # 2. decide per sample: diverged, converged, out of iterations, or going on. Plain
        # iteration keeps its latest image f(x) (the paper's rule); Anderson its best one.
        stop = bad | converged | (k == max_iters)
        latest = converged | (method != "anderson")
        accept = torch.where(latest.view(-1, *[1] * len(shape)), g, best_g)
        reported = torch.where(latest | torch.isinf(best_res), res, best_res)
        out[run[stop]] = accept[stop]
        res_out[run[stop]] = reported[stop]
        failed[run[bad]] = True
        # 3. the next iterate of the samples that go on: plain f(x), or the Anderson mix
        go = ~stop
        run, x, g, best_res, best_g = run[go], x[go], g[go], best_res[go], best_g[go]
        if method == "anderson":
            # the pair (z_s, DDIM guess) is an evaluation of f too: a free secant
            xs = [h[go] for h in xs[-anderson_m:]] + [x.flatten(1)]
            gs = [h[go] for h in gs[-anderson_m:]] + [g.flatten(1)]
            x = _anderson_next(xs, gs, anderson_m).view(-1, *shape) if len(xs) > 1 else g
        else:
            x = g
    return out, res_out, failed, evals


def fixed_point_invert(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    schedule: Schedule,
    max_iters: int,
    tol: float = 0.0,
    method: str = "fixed_point",
    anderson_m: int = 3,
    predictor: str = "ddim",
    on_step: Callable[[], None] | None = None,
) -> SolverResult:
    """Invert clean latents z0 (B, C, h, w) to seeds z_T by solving each step's implicit equation.

    method "fixed_point" iterates f (the paper's solver; tol 0 gives its fixed iteration count),
    "anderson" accelerates it over the last `anderson_m` iterates. At most `max_iters` evaluations
    of f per step. The first iterate: with predictor "ddim" z_s itself, so that the first
    evaluation is the DDIM guess f(z_s) (max_iters 1 is DDIM inversion); from the second step on,
    "previous" starts at c_z z_s + c_e e with e the noise predicted at the previous step's last
    iterate, "extrapolate" with e = 2 e_prev - e_prevprev (linear in the step index, the grid
    being uniform). Those guesses cost no evaluation, and their residual can already stop a sample.
    A sample stops at a step once its RMS residual is <= tol; a sample with non-finite values or a
    diverging residual is marked failed and skipped from then on; the rest of the batch goes on.
    on_step, if given, is called after each inversion step (progress reporting).
    """
    if method not in ("fixed_point", "anderson"):
        raise ValueError(f"method: {method!r}; use 'fixed_point' or 'anderson'")
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor: {predictor!r}; use one of {list(PREDICTORS)}")
    z = z0.float().clone()
    batch = len(z)
    residual = torch.full((batch,), float("nan"), device=z.device)
    failed = torch.zeros(batch, dtype=torch.bool, device=z.device)
    evals = torch.zeros(batch, len(schedule), dtype=torch.int64)
    eps_seen = torch.zeros_like(z)  # the noise predicted at each sample's latest iterate
    eps_last_step = torch.zeros_like(z)  # eps_seen as it was at the end of the step before
    for n_done, i in enumerate(reversed(range(len(schedule)))):
        t = schedule.timesteps[i].to(z.device)
        # 1. the inverse step's linear coefficients: f(x) = c_z * z_s + c_e * eps(x, t)
        c_z, c_e = schedule.inverse_coefficients(i)
        z_prev = z.clone()

        def f(x, rows, z_prev=z_prev, t=t, c_z=c_z, c_e=c_e):
            eps = eps_fn(x, t, rows)
            eps_seen[rows] = eps
            return c_z * z_prev[rows] + c_e * eps

        # 2. the first iterate: z_s (-> the DDIM guess) or a free guess from earlier noise
        idx = (~failed).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        guess = predictor == "ddim" or n_done == 0
        if guess:
            x0 = z_prev[idx]
        else:
            eps0 = eps_seen[idx]
            if predictor == "extrapolate" and n_done > 1:
                eps0 = 2 * eps0 - eps_last_step[idx]
            x0 = c_z * z_prev[idx] + c_e * eps0
        eps_last_step = eps_seen.clone()
        # 3. solve the step for the samples that have not failed
        sol, res, bad, n_eval = _solve_step(f, x0, idx, guess, max_iters, tol, method, anderson_m)
        # 4. record the solution, the worst residual so far and failures
        z[idx] = sol
        residual[idx] = torch.fmax(residual[idx], res)
        failed[idx[bad]] = True
        residual[idx[bad]] = res[bad]
        evals[idx.cpu(), i] = n_eval
        if on_step is not None:
            on_step()
    return SolverResult(z, residual, failed, evals)


def ddim_invert(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    schedule: Schedule,
    on_step: Callable[[], None] | None = None,
) -> SolverResult:
    """Plain DDIM inversion: each step evaluates eps once, at the less noisy latent.

    z0 (B, C, h, w) -> SolverResult with the seed z_T; the residual is not measured (NaN).
    """
    return fixed_point_invert(eps_fn, z0, schedule, max_iters=1, on_step=on_step)


@dataclass(frozen=True)
class Solver:
    """An inversion solver, registered by name in SOLVERS (`InversionConfig.method`).

    invert(eps_fn, z0, schedule, config, on_step=None) -> SolverResult, calling on_step (when
    given) after each of the schedule's steps; evals_per_step(config) is the most evaluations of f
    it makes per inversion step, which the NFE estimate of a plan asks for.
    """

    name: str
    invert: Callable[..., SolverResult]
    evals_per_step: Callable[[InversionConfig], int]


def _fixed_point_solver(method: str) -> Solver:
    def invert(eps_fn, z0, schedule, config: InversionConfig, on_step=None) -> SolverResult:
        return fixed_point_invert(
            eps_fn,
            z0,
            schedule,
            max_iters=config.max_iters,
            tol=config.tol,
            method=method,
            anderson_m=config.anderson_m,
            predictor=config.predictor,
            on_step=on_step,
        )

    return Solver(method, invert, lambda config: config.max_iters)


SOLVERS: dict[str, Solver] = {
    "ddim": Solver(
        "ddim",
        lambda eps_fn, z0, schedule, _, on_step=None: ddim_invert(eps_fn, z0, schedule, on_step),
        lambda _: 1,
    ),
    "fixed_point": _fixed_point_solver("fixed_point"),
    "anderson": _fixed_point_solver("anderson"),
}
assert tuple(SOLVERS) == SOLVER_NAMES  # InversionConfig checks names without importing torch


def guided_evals(guidance_scale: float) -> int:
    """UNet evaluations per sample of one guided noise prediction (DESIGN's NFE)."""
    return 1 if guidance_scale == 1 else 2


def max_nfe(config: InversionConfig) -> int:
    """The most UNet evaluations the inversion of one image may cost (regeneration excluded)."""
    adjust = (
        adjustment_steps(config.adjust_strength) * guided_evals(config.adjust_guidance)
        if config.adjust_strength > 0
        else 0
    )
    per_step = SOLVERS[config.method].evals_per_step(config)
    return adjust + config.num_inference_steps * per_step * guided_evals(config.guidance_scale)


def ddim_trajectory(eps_fn: EpsFn, z0: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
    """DDIM inversion keeping every level: [z at level N (clean), ..., z at level 0 (the seed)].

    Each entry (B, C, h, w) float32; entry j is the latent at level N - j of the schedule.
    """
    z = z0.float()
    idx = torch.arange(len(z), device=z.device)
    levels = [z]
    for i in reversed(range(len(schedule))):
        eps = eps_fn(z, schedule.timesteps[i].to(z.device), idx)
        z = schedule.inverse_step(i, z, eps)
        levels.append(z)
    return levels


# ----------------------------------------------------------------------------------------------
# Measures


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel PSNR in dB per image of two (B, H, W, 3) uint8 arrays: (B,) float32 (capped at 100 dB)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.maximum((diff**2).reshape(len(a), -1).mean(1), 255.0**2 * 1e-10)
    return (10 * np.log10(255.0**2 / mse)).astype(np.float32)


def latent_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS difference per sample of two latent batches (B, C, h, w): (B,) float32."""
    return _rms(a.float() - b.float())


def seed_norm_ratio(seeds: torch.Tensor) -> torch.Tensor:
    """|z_T| / sqrt(dim) per seed, (B,); about 1 for a seed the model could have drawn."""
    flat = seeds.float().flatten(1)
    return flat.norm(dim=1) / math.sqrt(flat.shape[1])


# ----------------------------------------------------------------------------------------------
# The boundary: numpy in, numpy out


class Inverter:
    """Invert images into seeds with one pipeline's modules, and measure each seed's reconstruction.

    pipe: a diffusers StableDiffusionPipeline (epsilon prediction) whose scheduler's alphas and
    timesteps define the DDIM grid. The pipeline's device and the UNet's dtype are used; the
    solver state stays float32.
    """

    def __init__(self, pipe, config: InversionConfig):
        check_epsilon_prediction(pipe.scheduler.config)
        self.pipe, self.config = pipe, config
        self.device = pipe.unet.device
        self.image_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.schedule = ddim_schedule(pipe.scheduler, config.num_inference_steps)

    def _check_images(self, images: np.ndarray) -> None:
        size = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(
                f"images must be (B, {size}, {size}, 3) uint8, got {images.shape} {images.dtype}"
            )

    @torch.inference_mode()
    def invert(
        self,
        images: np.ndarray,
        prompts: list[str],
        noise_seeds: list[int],
        progress: Callable[[float], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Images (B, H, W, 3) uint8 at the model's resolution -> seeds and their measures.

        Returns numpy: seed (B, C, h, w) float32; nfe (B,) int64 (every UNet evaluation for the
        image: adjustment, DDIM guess and iterations, x2 with guidance; regeneration excluded);
        recon_psnr (B,) float32 (image regenerated from the seed vs the original image, dB);
        recon_latent_rmse (B,) float32 (regenerated latent vs the unadjusted VAE latent);
        vae_psnr (B,) float32 (the VAE's own round trip of the image, dB: the ceiling of
        recon_psnr); residual (B,) float32; failed (B,) bool. Failed samples have NaN measures.

        progress, if given, is called with the fraction of the batch's denoising steps done
        (adjustment, inversion and regeneration, in [0, 1]) after each step, and with 1.0 at the
        end. The batch is solved together, so the fraction is the whole batch's, not per image.
        """
        cfg, pipe = self.config, self.pipe
        self._check_images(images)
        if not len(images) == len(prompts) == len(noise_seeds):
            raise ValueError("images, prompts and noise_seeds must have the same length")
        batch = len(images)
        # 1. encode images and prompts
        z_clean = encode(pipe.vae, images_to_tensor(images, self.device))  # (B, C, h, w)
        vae_psnr = psnr(tensor_to_images(decode(pipe.vae, z_clean)), images)
        cond, uncond = encode_prompts(pipe, prompts)
        counter = NFECounter(batch)
        adjusting = adjustment_steps(cfg.adjust_strength) if cfg.adjust_strength > 0 else 0
        on_step = _StepCounter(adjusting + 2 * len(self.schedule), progress)
        # 2. prompt-aware adjustment of the latent, with each sample's own noise
        if cfg.adjust_strength > 0:
            gens = [torch.Generator().manual_seed(int(s)) for s in noise_seeds]
            noise = adjustment_noise(z_clean.shape[1:], gens)
            adj_eps = GuidedEps(pipe.unet, cond, uncond, cfg.adjust_guidance, counter)
            z_target = adjust(adj_eps, z_clean, pipe.scheduler, cfg.adjust_strength, noise, on_step)
        else:
            z_target = z_clean
        # 3. invert
        eps_fn = GuidedEps(pipe.unet, cond, uncond, cfg.guidance_scale, counter)
        result = SOLVERS[cfg.method].invert(eps_fn, z_target, self.schedule, cfg, on_step)
        # 4. regenerate the samples that did not fail and measure against the originals
        ok = (~result.failed).nonzero().squeeze(1)
        psnr_out = np.full(batch, np.nan, np.float32)
        rmse_out = np.full(batch, np.nan, np.float32)
        if len(ok):
            regen_eps = GuidedEps(pipe.unet, cond[ok], uncond[ok], cfg.guidance_scale)
            z_hat = sample(regen_eps, result.seed[ok], self.schedule, on_step=on_step)
            regen = tensor_to_images(decode(pipe.vae, z_hat))
            psnr_out[ok.cpu().numpy()] = psnr(regen, images[ok.cpu().numpy()])
            rmse_out[ok.cpu().numpy()] = latent_rmse(z_hat, z_clean[ok]).cpu().numpy()
        on_step.finish()
        return {
            "seed": result.seed.cpu().numpy().astype(np.float32),
            "nfe": counter.counts.numpy().astype(np.int64),
            "recon_psnr": psnr_out,
            "recon_latent_rmse": rmse_out,
            "vae_psnr": vae_psnr,
            "residual": result.residual.cpu().numpy().astype(np.float32),
            "failed": result.failed.cpu().numpy(),
        }


class Sampler:
    """Generate images from seeds with one pipeline's modules: deterministic DDIM (eta 0).

    pipe: a diffusers StableDiffusionPipeline; the UNet's device and dtype are used, the sampling
    state stays float32. Grids are built once per step count.
    """

    def __init__(self, pipe):
        check_epsilon_prediction(pipe.scheduler.config)
        self.pipe = pipe
        self.device = pipe.unet.device
        self._schedules: dict[int, Schedule] = {}

    def schedule(self, num_inference_steps: int) -> Schedule:
        if num_inference_steps not in self._schedules:
            self._schedules[num_inference_steps] = ddim_schedule(
                self.pipe.scheduler, num_inference_steps
            )
        return self._schedules[num_inference_steps]

    @torch.inference_mode()
    def generate(
        self,
        seeds: np.ndarray,
        prompts: list[str],
        guidance_scale: float,
        num_inference_steps: int,
        progress: Callable[[float], None] | None = None,
    ) -> np.ndarray:
        """Seeds (B, C, h, w) float32 -> images (B, H, W, 3) uint8.

        progress, if given, is called with the fraction of the denoising steps done, in [0, 1],
        after each step (the batch is denoised together).
        """
        if len(seeds) != len(prompts):
            raise ValueError("seeds and prompts must have the same length")
        cond, uncond = encode_prompts(self.pipe, prompts)
        eps_fn = GuidedEps(self.pipe.unet, cond, uncond, guidance_scale)
        z = torch.from_numpy(np.asarray(seeds, dtype=np.float32)).to(self.device)
        schedule = self.schedule(num_inference_steps)
        on_step = _StepCounter(len(schedule), progress)
        z0 = sample(eps_fn, z, schedule, on_step=on_step)
        on_step.finish()
        return tensor_to_images(decode(self.pipe.vae, z0))


class _StepCounter:
    """Turns per-step calls into `progress(fraction of `total` steps done)`; a no-op without one."""

    def __init__(self, total: int, progress: Callable[[float], None] | None):
        self.total, self.done, self.progress = max(1, total), 0, progress

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(1.0, self.done / self.total))

    def finish(self) -> None:
        """Steps that did not run (every sample failed, nothing to regenerate) count as done."""
        if self.progress is not None and self.done < self.total:
            self.done = self.total
            self.progress(1.0)
