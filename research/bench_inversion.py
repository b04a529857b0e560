"""Inversion benchmark: NFE, time and reconstruction of tailseed's solvers against their peers.

Runs on the embedded tiny-digits model, on two cases (the paper's): held-out real digits (the
user split, never seen by the model) and images the model generated itself from prompts. For each
method, case, guidance (1, and 2 as the paper uses for real images) and with/without the
prompt-aware adjustment: NFE per image, seconds per image, latent RMSE and pixel PSNR of the
regenerated image against the original, and the seed's norm ratio. Also a sweep of the solvers'
tolerance and iteration count (how the defaults were chosen) and the peers' sanity checks (EDICT's
round trip, null-text against DDIM at guidance 7.5).

Writes out/bench/inversion.json (a list of rows), out/bench/inversion_sweep.json,
out/bench/inversion.md (tables and the targets) and docs/inversion_rmse_vs_nfe.png.
    python -m research.bench_inversion [--images 32] [--null-text-images 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from research import inversion_peers as peers
from research.digits import CLASS_NAMES, load_digits_arrays, render
from tailseed.pipeline import inversion as inv
from tailseed.pipeline.models import EMBEDDED_MODEL, REPO_ROOT, ModelSpec, load_pipeline

PAPER_FIXED_ITERS = 20  # the fixed-point paper's public code: 20 iterations at every step
GUIDANCES = (1.0, 2.0)  # no guidance, and the paper's guidance for real images
CHECK_GUIDANCE = 7.5  # null-text's paper setting, where plain DDIM inversion breaks down


@dataclass
class Case:
    """Images (B, H, W, 3) uint8 with their prompts; latents and embeddings filled in by `prepare`."""

    name: str
    images: np.ndarray
    prompts: list[str]
    z0: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None

    def head(self, n: int) -> Case:
        return Case(
            self.name,
            self.images[:n],
            self.prompts[:n],
            self.z0[:n],
            self.cond[:n],
            self.uncond[:n],
        )


# ----------------------------------------------------------------------------------------------
# Cases


def real_case(card: dict, n: int) -> Case:
    """n digits of the user split (unseen by the model), spread evenly over the split."""
    images8, labels = load_digits_arrays()
    user = card["split_indices"]["user"]
    pick = [user[i] for i in np.linspace(0, len(user) - 1, n).round().astype(int)]
    template = card["prompt_template"]
    images = np.stack([np.asarray(render(images8[i])) for i in pick])
    return Case("real", images, [template.format(CLASS_NAMES[labels[i]]) for i in pick])


def generated_case(pipe, card: dict, n: int) -> Case:
    """n images the model generates itself, classes in turn, at the card's guidance and steps."""
    template = card["prompt_template"]
    prompts = [template.format(CLASS_NAMES[i % len(CLASS_NAMES)]) for i in range(n)]
    shape = (
        pipe.unet.config.in_channels,
        pipe.unet.config.sample_size,
        pipe.unet.config.sample_size,
    )
    noise = inv.adjustment_noise(shape, [torch.Generator().manual_seed(1000 + i) for i in range(n)])
    images = inv.Sampler(pipe).generate(
        noise.numpy(), prompts, card["guidance_scale"], card["num_inference_steps"]
    )
    return Case("generated", images, prompts)


@torch.no_grad()
def prepare(pipe, case: Case) -> Case:
    case.z0 = inv.encode(pipe.vae, inv.images_to_tensor(case.images))
    case.cond, case.uncond = inv.encode_prompts(pipe, case.prompts)
    return case


# ----------------------------------------------------------------------------------------------
# Methods: each returns (seed-like object, regenerated z_0, counter) and is timed by the caller


@dataclass(frozen=True)
class Setting:
    method: str  # the row's method name
    guidance: float
    steps: int
    adjusted: bool
    solver: str = "fixed_point"  # for tailseed rows: fixed_point | anderson | ddim
    max_iters: int = 1
    tol: float = 0.0
    anderson_m: int = 3
    predictor: str = "ddim"


def _adjusted_z0(pipe, case: Case, counter: inv.NFECounter) -> torch.Tensor:
    """The prompt-aware adjustment with the default strength and guidance, seeded per image."""
    cfg = inv.InversionConfig()
    gens = [torch.Generator().manual_seed(i) for i in range(len(case.images))]
    noise = inv.adjustment_noise(case.z0.shape[1:], gens)
    eps_fn = inv.GuidedEps(pipe.unet, case.cond, case.uncond, cfg.adjust_guidance, counter)
    return inv.adjust(eps_fn, case.z0, pipe.scheduler, cfg.adjust_strength, noise)


def _standard_regen(pipe, case: Case, seed: torch.Tensor, s: Setting) -> torch.Tensor:
    schedule = inv.ddim_schedule(pipe.scheduler, s.steps)
    eps_fn = inv.GuidedEps(pipe.unet, case.cond, case.uncond, s.guidance)
    return inv.sample(eps_fn, seed, schedule)


def run_setting(pipe, case: Case, s: Setting) -> dict:
    """Invert the case's images with one setting; time it; regenerate and measure."""
    batch = len(case.images)
    counter = inv.NFECounter(batch)
    schedule = inv.ddim_schedule(pipe.scheduler, s.steps)
    extra: dict = {}
    t0 = time.perf_counter()
    if s.method == "null_text":
        seed, nulls = peers.null_text_invert(
            pipe.unet, case.z0, case.cond, case.uncond, s.guidance, schedule, counter=counter
        )
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            z_hat = peers.null_text_sample(pipe.unet, seed, case.cond, nulls, s.guidance, schedule)
    else:
        with torch.no_grad():
            z_target = _adjusted_z0(pipe, case, counter) if s.adjusted else case.z0
            eps_fn = inv.GuidedEps(pipe.unet, case.cond, case.uncond, s.guidance, counter)
            if s.method == "vae_roundtrip":
                seed, z_hat = None, case.z0
            elif s.method == "ddim_diffusers":
                seed = peers.ddim_invert_diffusers(eps_fn, z_target, pipe.scheduler, s.steps)
            elif s.method == "edict":
                x_t, y_t = peers.edict_invert(eps_fn, z_target, schedule)
                seed = x_t
            else:
                # the solver exactly as the pipeline's Inverter calls it, from the registry
                config = inv.InversionConfig(
                    method=s.solver,
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance,
                    max_iters=s.max_iters,
                    tol=s.tol,
                    anderson_m=s.anderson_m,
                    predictor=s.predictor,
                )
                result = inv.SOLVERS[config.method].invert(eps_fn, z_target, schedule, config)
                seed = result.seed
                extra["failed"] = int(result.failed.sum())
                finite = result.residual[torch.isfinite(result.residual)]
                extra["residual_max"] = float(finite.max()) if len(finite) else None
            seconds = time.perf_counter() - t0
            if s.method == "edict":
                z_hat = peers.edict_sample(
                    inv.GuidedEps(pipe.unet, case.cond, case.uncond, s.guidance), x_t, y_t, schedule
                )[0]
            elif seed is not None:
                z_hat = _standard_regen(pipe, case, seed, s)
    with torch.no_grad():
        row = measure(pipe, case, z_hat, seed, counter, seconds, s)
        if s.method in ("edict", "null_text"):
            # can the seed alone be used by the standard sampler (and so by seed walks)?
            std = measure(pipe, case, _standard_regen(pipe, case, seed, s), seed, counter, 0, s)
            extra["psnr_standard_sampler"] = std["psnr"]
            extra["latent_rmse_standard_sampler"] = std["latent_rmse"]
    row.update(extra)
    return row


def measure(pipe, case, z_hat, seed, counter, seconds, s: Setting) -> dict:
    """The row's measures: means and standard deviations over the images."""
    regen = inv.tensor_to_images(inv.decode(pipe.vae, z_hat))
    psnr = inv.psnr(regen, case.images)
    rmse = inv.latent_rmse(z_hat, case.z0).cpu().numpy()
    nfe = counter.counts.numpy().astype(float)
    ratio = inv.seed_norm_ratio(seed).cpu().numpy() if seed is not None else np.array([np.nan])
    return {
        "method": s.method,
        "case": case.name,
        "adjusted": s.adjusted,
        "guidance_scale": s.guidance,
        "num_inference_steps": s.steps,
        "images": len(case.images),
        "nfe_per_image": float(nfe.mean()),
        "nfe_per_image_std": float(nfe.std()),
        "nfe_per_step": float(nfe.mean() / s.steps),
        "seconds_per_image": seconds / len(case.images),
        "psnr": float(np.mean(psnr)),
        "psnr_std": float(np.std(psnr)),
        "psnr_min": float(np.min(psnr)),
        "latent_rmse": float(np.mean(rmse)),
        "latent_rmse_std": float(np.std(rmse)),
        "seed_norm_ratio": float(np.mean(ratio)),
        "seed_norm_ratio_std": float(np.std(ratio)),
        "solver": {
            "solver": s.solver,
            "max_iters": s.max_iters,
            "tol": s.tol,
            "anderson_m": s.anderson_m,
            "predictor": s.predictor,
        }
        if s.method.startswith(("tailseed", "fpi", "sweep"))
        else None,
    }


# ----------------------------------------------------------------------------------------------
# Plan


def main_settings(
    steps: int, guidance: float, default: inv.InversionConfig, adjust: bool
) -> list[Setting]:
    """The compared methods at one guidance, with and without the adjustment if `adjust`."""
    out = [Setting("vae_roundtrip", guidance, steps, False)]
    for adjusted in (False, True) if adjust else (False,):
        out += [
            Setting("ddim_diffusers", guidance, steps, adjusted),
            Setting("fpi_fixed20", guidance, steps, adjusted, "fixed_point", PAPER_FIXED_ITERS),
            Setting(
                "tailseed_default",
                guidance,
                steps,
                adjusted,
                default.method,
                default.max_iters,
                default.tol,
                default.anderson_m,
                default.predictor,
            ),
            # the default's stopping rule and predictor without acceleration
            Setting(
                "tailseed_plain",
                guidance,
                steps,
                adjusted,
                "fixed_point",
                default.max_iters,
                default.tol,
                predictor=default.predictor,
            ),
        ]
    out.append(Setting("edict", guidance, steps, False))
    return out


def sweep_settings(steps: int, guidance: float, default: inv.InversionConfig) -> list[Setting]:
    """Tolerance, predictor, window and iteration count of the solvers (no adjustment)."""
    it, m = default.max_iters, default.anderson_m
    out = []
    for tol in (1e-3, 1e-4, 1e-5, 3e-6, 1e-6):
        out.append(
            Setting("sweep_anderson", guidance, steps, False, "anderson", it, tol, m, "extrapolate")
        )
    for tol in (1e-4, 1e-5, 1e-6):
        out.append(
            Setting("sweep_anderson_ddim_guess", guidance, steps, False, "anderson", it, tol, m)
        )
        out.append(
            Setting("sweep_plain", guidance, steps, False, "fixed_point", it, tol, m, "extrapolate")
        )
    out.append(
        Setting(
            "sweep_anderson_previous", guidance, steps, False, "anderson", it, 1e-5, m, "previous"
        )
    )
    for iters in (2, 3, 5):
        out.append(Setting("sweep_fixed_iters", guidance, steps, False, "fixed_point", iters))
    for window in (1,):
        out.append(
            Setting(
                "sweep_anderson_m",
                guidance,
                steps,
                False,
                "anderson",
                it,
                1e-5,
                window,
                "extrapolate",
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# Reports


def _fmt(row: dict, key: str, digits: int) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    spec = f".{digits}f" if digits else ".2e"  # digits 0: scientific, for errors near zero
    return f"{value:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")


def markdown(rows: list[dict], sweep: list[dict], targets: list[str], meta: dict) -> str:
    head = (
        "| method | case | guidance | adjusted | images | NFE/image | NFE/step | s/image "
        "| PSNR dB | latent RMSE | seed norm ratio | std-sampler PSNR |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        "# Inversion benchmark",
        "",
        f"Model: {meta['model']} ({meta['model_hash']}), {meta['num_inference_steps']} DDIM steps, "
        f"torch threads {meta['threads']}, {meta['device']}. Mean ± standard deviation over images. "
        f"NFE counts every UNet evaluation (x2 with guidance), adjustment included, regeneration "
        f"excluded. PSNR: image regenerated from the seed vs the original (8-bit); latent RMSE: "
        f"regenerated latent vs the unadjusted VAE latent. EDICT and null-text regenerate through "
        f"their own samplers; 'std-sampler PSNR' regenerates their seed with the standard sampler.",
        "",
        "Defaults: " + json.dumps(meta["default"]),
        "",
        "## Targets",
        "",
        *[f"- {t}" for t in targets],
        "",
        "## Results",
        "",
        head.rstrip("\n"),
    ]
    for r in rows:
        std_psnr = r.get("psnr_standard_sampler")
        lines.append(
            f"| {r['method']} | {r['case']} | {r['guidance_scale']:g} | {r['adjusted']} "
            f"| {r['images']} | {r['nfe_per_image']:.0f} | {r['nfe_per_step']:.2f} "
            f"| {r['seconds_per_image']:.4f} | {_fmt(r, 'psnr', 2)} | {_fmt(r, 'latent_rmse', 0)} "
            f"| {_fmt(r, 'seed_norm_ratio', 3)} | {'-' if std_psnr is None else f'{std_psnr:.2f}'} |"
        )
    lines += [
        "",
        "## Solver sweep (real images, no adjustment)",
        "",
        "| row | solver | predictor | guidance | max iters | tol | m | NFE/step | PSNR dB | latent RMSE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sweep:
        sv = r["solver"] or {}
        lines.append(
            f"| {r['method']} | {sv.get('solver')} | {sv.get('predictor')} | {r['guidance_scale']:g} "
            f"| {sv.get('max_iters')} | {sv.get('tol'):g} "
            f"| {sv.get('anderson_m')} | {r['nfe_per_step']:.2f} | {_fmt(r, 'psnr', 2)} "
            f"| {_fmt(r, 'latent_rmse', 0)} |"
        )
    return "\n".join(lines) + "\n"


def _find(rows, **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each with its numbers, at every case and guidance measured."""
    out = []
    for case in ("real", "generated"):
        for g in GUIDANCES:
            for adjusted in (False, True):
                key = dict(case=case, guidance_scale=g, adjusted=adjusted)
                d = _find(rows, method="tailseed_default", **key)
                f = _find(rows, method="fpi_fixed20", **key)
                dd = _find(rows, method="ddim_diffusers", **key)
                if not (d and f and dd):
                    continue
                psnr_gap = d["psnr"] - f["psnr"]
                rmse_ratio = d["latent_rmse"] / f["latent_rmse"]
                nfe_ratio = d["nfe_per_image"] / f["nfe_per_image"]
                ok = psnr_gap >= -0.1 and rmse_ratio <= 1.1 and nfe_ratio <= 0.2
                out.append(
                    f"{'MET' if ok else 'MISSED'} {case}, guidance {g:g}, adjusted {adjusted}: "
                    f"default vs fixed-20: PSNR {d['psnr']:.2f} vs {f['psnr']:.2f} dB "
                    f"(gap {psnr_gap:+.2f}, need >= -0.1), latent RMSE ratio {rmse_ratio:.3f} "
                    f"(need <= 1.1), NFE ratio {nfe_ratio:.3f} ({d['nfe_per_step']:.2f} vs "
                    f"{f['nfe_per_step']:.2f} per step; need <= 0.2); vs DDIM: "
                    f"{d['psnr'] - dd['psnr']:+.2f} dB"
                )
    for case in ("real", "generated"):
        nt = _find(rows, method="null_text", case=case, guidance_scale=2.0)
        d = _find(rows, method="tailseed_default", case=case, guidance_scale=2.0, adjusted=False)
        if nt and d:
            ok = (
                d["psnr"] >= nt["psnr"] - 0.1
                and d["seconds_per_image"] <= 0.1 * nt["seconds_per_image"]
            )
            out.append(
                f"{'MET' if ok else 'MISSED'} {case}, guidance 2: default vs null-text: PSNR "
                f"{d['psnr']:.2f} vs {nt['psnr']:.2f} dB, time {d['seconds_per_image']:.4f} vs "
                f"{nt['seconds_per_image']:.4f} s/image (ratio "
                f"{d['seconds_per_image'] / nt['seconds_per_image']:.3f}, need <= 0.1)"
            )
    nt = _find(rows, method="null_text", guidance_scale=CHECK_GUIDANCE)
    dd = _find(rows, method="ddim_diffusers", guidance_scale=CHECK_GUIDANCE)
    if nt and dd:
        out.append(
            f"{'OK' if nt['psnr'] > dd['psnr'] else 'FAILED'} check, guidance 7.5: null-text "
            f"{nt['psnr']:.2f} dB vs DDIM {dd['psnr']:.2f} dB (latent RMSE {nt['latent_rmse']:.4f} "
            f"vs {dd['latent_rmse']:.4f})"
        )
    for r in rows:
        if r["method"] == "edict":
            out.append(
                f"{'OK' if r['latent_rmse'] < 1e-3 else 'FAILED'} check, EDICT round trip "
                f"({r['case']}, guidance {r['guidance_scale']:g}): latent RMSE {r['latent_rmse']:.2e} "
                f"at {r['nfe_per_step']:.0f} NFE/step; its seed x_T through the standard sampler: "
                f"{r['psnr_standard_sampler']:.2f} dB, norm ratio {r['seed_norm_ratio']:.3f}"
            )
    return out


def plot(rows: list[dict], sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    markers = {"real": "o", "generated": "s"}
    methods = sorted({r["method"] for r in rows} - {"vae_roundtrip"})
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    for ax, g in zip(axes, GUIDANCES):
        for r in rows:
            if r["guidance_scale"] != g or r["method"] == "vae_roundtrip":
                continue
            color = colors[r["method"]]
            ax.scatter(
                max(r["nfe_per_image"], 1),
                max(r["latent_rmse"], 1e-8),
                marker=markers[r["case"]],
                facecolors="none" if r["adjusted"] else color,
                edgecolors=color,
                label=f"{r['method']}{' +adj' if r['adjusted'] else ''} ({r['case']})",
            )
        for name in (
            "sweep_anderson",
            "sweep_anderson_ddim_guess",
            "sweep_plain",
            "sweep_fixed_iters",
        ):
            pts = sorted(
                (r["nfe_per_image"], r["latent_rmse"])
                for r in sweep
                if r["method"] == name and r["guidance_scale"] == g
            )
            if pts:
                ax.plot(*zip(*pts), "--", alpha=0.6, label=f"{name} (real)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("UNet evaluations (NFE) per image")
        ax.set_title(f"guidance {g:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latent RMSE of the regenerated latent")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Inversion on tiny-digits: reconstruction error against cost")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per case")
    parser.add_argument("--null-text-images", type=int, default=8)
    # One thread: on a shared 2-core machine, 2 OpenMP threads stall whenever another process
    # holds a core (we measured 10x slower UNet calls), and a benchmark must not depend on that.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep-images", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "bench")
    parser.add_argument(
        "--plot", type=Path, default=REPO_ROOT / "docs" / "inversion_rmse_vs_nfe.png"
    )
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--model", default=str(EMBEDDED_MODEL), help="a tiny-digits-like model")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    pipe, info = load_pipeline(ModelSpec(path=args.model))
    card = info["card"]
    steps = int(card["num_inference_steps"])
    default = inv.InversionConfig()
    cases = [
        prepare(pipe, real_case(card, args.images)),
        prepare(pipe, generated_case(pipe, card, args.images)),
    ]
    rows, sweep = [], []

    def log(row):
        print(
            f"{time.perf_counter() - t_start:7.1f}s {row['method']:18s} {row['case']:9s} "
            f"g={row['guidance_scale']:<4g} adj={row['adjusted']!s:5s} nfe/step={row['nfe_per_step']:6.2f} "
            f"psnr={row['psnr']:6.2f} rmse={row['latent_rmse']:.4f} s/img={row['seconds_per_image']:.4f}",
            flush=True,
        )

    for case in cases:
        for g in GUIDANCES:
            # The adjustment repairs a real image's inconsistency with its prompt; the model's own
            # images are consistent by construction, so they are measured without it.
            for s in main_settings(steps, g, default, adjust=case.name == "real"):
                rows.append(run_setting(pipe, case, s))
                log(rows[-1])
            if g > 1:
                nt = Setting("null_text", g, steps, False)
                rows.append(run_setting(pipe, case.head(args.null_text_images), nt))
                log(rows[-1])
    # peers' checks: null-text against DDIM at the null-text paper's guidance
    check = cases[0].head(args.null_text_images)
    for method in ("ddim_diffusers", "null_text"):
        rows.append(run_setting(pipe, check, Setting(method, CHECK_GUIDANCE, steps, False)))
        log(rows[-1])
    if not args.no_sweep:
        for g in (2.0,):
            for s in sweep_settings(steps, g, default):
                sweep.append(run_setting(pipe, cases[0].head(args.sweep_images), s))
                log(sweep[-1])

    meta = {
        "model": info["model"],
        "model_hash": info["model_hash"],
        "num_inference_steps": steps,
        "threads": args.threads,
        "device": str(pipe.unet.device),
        "default": asdict(default),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inversion.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "inversion_sweep.json").write_text(json.dumps(sweep, indent=1) + "\n")
    (args.out / "inversion_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    goals = targets(rows)
    (args.out / "inversion.md").write_text(markdown(rows, sweep, goals, meta))
    plot(rows, sweep, args.plot)
    print("\n".join(goals))
    print(
        f"done in {meta['total_seconds']} s: {args.out}/inversion.json, inversion.md, {args.plot}"
    )


if __name__ == "__main__":
    main()
