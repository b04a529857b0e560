"""Seed-space benchmark: norm profiles of lerp, slerp and NAO walks, inverted seed norms, NAO timing.

Evidence for issue 4, on this machine:
1. Norm along the walk, |z| / sqrt(dim), for lerp, slerp and NAO paths between pairs of seeds:
   real tail-class images of the embedded model inverted by fixed-point (Anderson) and by DDIM
   inversion (4x8x8), and random Gaussian seeds of Stable Diffusion's size (4x64x64), against the
   chi prior's typical band (99% of Gaussian norms). Also each method's NAO objective.
2. Norms of DDIM-, fixed-point- and Anderson-inverted seeds relative to sqrt(dim).
3. Time of the batched NAO solver for 256 pairs of 4x64x64 seeds against the published method run
   one path at a time (same objective and stop rule; a sample of pairs timed and extrapolated).
4. Images generated along lerp, slerp and NAO paths between two real images of a tail class.

Writes out/bench/seeds.json, out/bench/seeds.md, docs/seed_norms.png and docs/seed_walks.png.
    python -m research.bench_seeds [--pairs 256] [--reference-sample 3] [--points 32] [--threads 1]
                               [--model models/tiny-digits]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from research.digits import CLASS_NAMES, DigitsSplit, load_digits_arrays, render
from tailseed.pipeline import inversion as inv
from tailseed.pipeline.models import EMBEDDED_MODEL, REPO_ROOT, ModelSpec, load_pipeline
from tailseed.pipeline.seed_space import (
    NaoConfig,
    chi_band,
    lerp,
    nao_path,
    nao_path_reference,
    path_loss,
    point_at,
    slerp,
)

SD_SHAPE = (4, 64, 64)  # Stable Diffusion 1.x / 2.x-base latent seeds
BAND_MASS = 0.99  # the prior's typical band: the central 99% of chi_dim
INVERSION_METHODS = ("ddim", "fixed_point", "anderson")
WALK_POSITIONS = 7  # images per walk in the picture, both real images' reconstructions included
WALK_CLASS = "seven"


# --------------------------------------------------------------------------------------------
# Walks and their norms
# --------------------------------------------------------------------------------------------


def walks(a: torch.Tensor, b: torch.Tensor, n: int, config: NaoConfig) -> dict[str, dict]:
    """lerp, slerp and NAO paths for pairs a, b (P, C, h, w): per method path (P, n, ...), t (P, n)."""
    t = torch.linspace(0.0, 1.0, n)
    nao = nao_path(a, b, n=n, config=config)
    return {
        "lerp": {"path": lerp(a, b, t), "t": t.expand(a.shape[0], n)},
        "slerp": {"path": slerp(a, b, t), "t": t.expand(a.shape[0], n)},
        "nao": {"path": nao.path, "t": nao.t, "iters": nao.iters},
    }


def ratios(path: torch.Tensor) -> torch.Tensor:
    """|z| / sqrt(dim) of every point of paths (P, n, C, h, w) -> (P, n)."""
    flat = path.flatten(2)
    return flat.norm(dim=-1) / math.sqrt(flat.shape[-1])


def profile_stats(paths: dict[str, dict], dim: int, config: NaoConfig) -> dict[str, dict]:
    """Per method: interior norm ratios against the band, and the NAO objective of the paths."""
    low, high = (v / math.sqrt(dim) for v in chi_band(dim, BAND_MASS))
    out = {}
    for name, walk in paths.items():
        r = ratios(walk["path"])  # (P, n)
        inner = r[:, 1:-1]
        mid = r[:, r.shape[1] // 2]
        a, b = walk["path"][:, 0], walk["path"][:, -1]
        n = r.shape[1]
        eps = config.eps_factor * (a - b).flatten(1).norm(dim=-1) / n
        loss = path_loss(walk["path"].flatten(2), dim, eps, config.penalty_weight)
        out[name] = {
            "interior_in_band": float(((inner >= low) & (inner <= high)).float().mean()),
            "interior_min_ratio": float(inner.min()),
            "middle_ratio_mean": float(mid.mean()),
            "middle_ratio_min": float(mid.min()),
            "objective_mean": float(loss.mean()),
        }
    return out


# --------------------------------------------------------------------------------------------
# Timing: batched against the published one-path-at-a-time loop
# --------------------------------------------------------------------------------------------


def timing(pairs: int, sample: int, n: int, config: NaoConfig) -> tuple[dict, dict]:
    """Batched NAO for `pairs` Gaussian SD-size pairs, and the reference on the first `sample`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(pairs, *SD_SHAPE, generator=gen)
    b = torch.randn(pairs, *SD_SHAPE, generator=gen)
    # 1. the batched solver on all pairs at once
    start = time.perf_counter()
    batched = nao_path(a, b, n=n, config=config)
    batched_s = time.perf_counter() - start
    # 2. the published method, one path at a time, on a sample
    ref_s, ref_loss, ref_iters = [], [], []
    for p in range(sample):
        start = time.perf_counter()
        _, loss, iters = nao_path_reference(
            a[p], b[p], n=n, stop=config.stop, generator=torch.Generator().manual_seed(p)
        )
        ref_s.append(time.perf_counter() - start)
        ref_loss.append(loss)
        ref_iters.append(iters)
    per_path = float(np.mean(ref_s))
    rel = [(float(batched.loss[p]) - ref_loss[p]) / abs(ref_loss[p]) for p in range(sample)]
    result = {
        "pairs": pairs,
        "points_per_path": n,
        "seed_shape": list(SD_SHAPE),
        "batched_seconds": batched_s,
        "batched_iters_mean": float(batched.iters.float().mean()),
        "batched_iters_max": int(batched.iters.max()),
        "reference_sample": sample,
        "reference_seconds_per_path": ref_s,
        "reference_iters": ref_iters,
        "reference_extrapolated_seconds": per_path * pairs,
        "speedup": per_path * pairs / batched_s,
        "objective_batched_minus_reference_relative": rel,
    }
    walk = {
        "lerp": {"path": lerp(a[:64], b[:64], torch.linspace(0, 1, n))},
        "slerp": {"path": slerp(a[:64], b[:64], torch.linspace(0, 1, n))},
        "nao": {"path": batched.path[:64], "t": batched.t[:64]},
    }
    for name in ("lerp", "slerp"):
        walk[name]["t"] = torch.linspace(0, 1, n).expand(64, n)
    return result, walk


# --------------------------------------------------------------------------------------------
# The embedded model: inverted tail-class seeds
# --------------------------------------------------------------------------------------------


def tail_images(card: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """User-split images of the tail classes: (B, 32, 32, 3) uint8, class names, keys."""
    images8, labels = load_digits_arrays()
    user = card["split_indices"]["user"]
    default_tails = [CLASS_NAMES[c] for c in DigitsSplit().tail_classes]
    tails = [str(c) for c in card.get("tail_classes", default_tails)]
    tails = [CLASS_NAMES[c] if isinstance(c, int) else c for c in tails]
    picked = [i for i in user if CLASS_NAMES[int(labels[i])] in tails]
    images = np.stack([np.asarray(render(images8[i])) for i in picked])
    names = [CLASS_NAMES[int(labels[i])] for i in picked]
    keys = [f"{n}_{i:04d}" for n, i in zip(names, picked)]
    return images, names, keys


def invert_all(pipe, card, images, names) -> dict[str, dict]:
    """Seeds of `images` by each inversion method, with norm ratios and reconstruction PSNR."""
    template = card["prompt_template"]
    prompts = [template.format(n) for n in names]
    out = {}
    for method in INVERSION_METHODS:
        config = inv.InversionConfig(
            method=method, num_inference_steps=int(card["num_inference_steps"])
        )
        start = time.perf_counter()
        res = inv.Inverter(pipe, config).invert(images, prompts, list(range(len(images))))
        seconds = time.perf_counter() - start
        seeds = torch.from_numpy(res["seed"])
        r = inv.seed_norm_ratio(seeds).numpy()
        out[method] = {
            "seeds": seeds,
            "config": config,
            "prompt_template": template,
            "stats": {
                "norm_ratio_mean": float(r.mean()),
                "norm_ratio_std": float(r.std()),
                "norm_ratio_min": float(r.min()),
                "norm_ratio_max": float(r.max()),
                "recon_psnr_mean": float(np.nanmean(res["recon_psnr"])),
                "nfe_mean": float(res["nfe"].mean()),
                "seconds": seconds,
                "images": len(images),
            },
        }
    return out


def class_pairs(names: list[str]) -> tuple[list[int], list[int]]:
    """All pairs of images of the same class, as index lists (first, second)."""
    first, second = [], []
    for cls in sorted(set(names)):
        idx = [i for i, n in enumerate(names) if n == cls]
        for i, j in itertools.combinations(idx, 2):
            first.append(i)
            second.append(j)
    return first, second


def most_different_pair(seeds: torch.Tensor, names: list[str], cls: str) -> tuple[int, int]:
    """Indices of the two images of class `cls` whose seeds have the largest angle between them."""
    idx = [i for i, c in enumerate(names) if c == cls]
    flat = torch.nn.functional.normalize(seeds[idx].flatten(1), dim=1)
    cos = flat @ flat.T + 2 * torch.eye(len(idx))  # the diagonal never wins
    k = int(cos.argmin())
    return idx[k // len(idx)], idx[k % len(idx)]


def walk_picture(pipe, inverted, images, names, n, config, path: Path) -> dict:
    """Images along lerp, slerp and NAO walks between two real images of each tail class.

    Seeds by Anderson fixed-point inversion; the pair of each class is the one whose seeds are the
    furthest apart in angle, so that the walk has somewhere to go. Generated with the inversion's
    prompt, guidance and steps, so t = 0 and t = 1 regenerate the real images.
    """
    import matplotlib.pyplot as plt

    entry = inverted["anderson"]
    sampler = inv.Sampler(pipe)
    classes = [c for c in CLASS_NAMES if c in names]
    t = torch.linspace(0.0, 1.0, WALK_POSITIONS)
    fig, axes = plt.subplots(
        4 * len(classes), WALK_POSITIONS, figsize=(1.45 * WALK_POSITIONS, 6.4 * len(classes))
    )
    summary = {}
    for c, cls in enumerate(classes):
        # 1. the pair and its three walks at the same positions
        i, j = most_different_pair(entry["seeds"], names, cls)
        a, b = entry["seeds"][i : i + 1], entry["seeds"][j : j + 1]
        nao = nao_path(a, b, n=n, config=config)
        rows = {
            "lerp": lerp(a, b, t)[0],
            "slerp": slerp(a, b, t)[0],
            "NAO": point_at(nao.path[0], nao.t[0], t),
        }
        # 2. the real images at the ends of the first row of the block
        top = 4 * c
        for col in range(WALK_POSITIONS):
            axes[top, col].axis("off")
        for col, k, label in ((0, i, "real A"), (-1, j, "real B")):
            axes[top, col].imshow(images[k])
            axes[top, col].set_title(f"{label} ({cls})", fontsize=8)
        # 3. a generated row per walk
        prompt = entry["prompt_template"].format(cls)
        mids = {}
        for r, (name, points) in enumerate(rows.items(), start=top + 1):
            generated = sampler.generate(
                points.numpy(),
                [prompt] * WALK_POSITIONS,
                entry["config"].guidance_scale,
                entry["config"].num_inference_steps,
            )
            norm = ratios(points.unsqueeze(0))[0]
            mids[name] = float(norm[WALK_POSITIONS // 2])
            for col in range(WALK_POSITIONS):
                ax = axes[r, col]
                ax.imshow(generated[col])
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"t={float(t[col]):.2f} |z|={float(norm[col]):.2f}", fontsize=7)
            axes[r, 0].set_ylabel(name, fontsize=10)
        cos = float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))[0])
        summary[cls] = {"middle_ratio": mids, "cosine": cos}
    fig.suptitle(
        "Generated along walks between two inverted seeds (Anderson FPI) of each tail class; "
        "|z| as a fraction of sqrt(dim)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"classes": summary, "positions": t.tolist()}


def quadrature_check(a: torch.Tensor, b: torch.Tensor, n: int, config: NaoConfig) -> dict:
    """NAO on off-shell pairs (P, C, h, w) with Simpson's rule (ours) and the published midpoint
    rule: the batched solver on all pairs, the published one-path loop on the first."""
    dim = math.prod(a.shape[1:])
    high = chi_band(dim, BAND_MASS)[1] / math.sqrt(dim)
    out = {}
    for quadrature in ("simpson", "midpoint"):
        cfg = replace(config, quadrature=quadrature)
        res = nao_path(a, b, n=n, config=cfg)
        inner = ratios(res.path)[:, 1:-1]
        ref_path, ref_loss, ref_iters = nao_path_reference(
            a[0],
            b[0],
            n=n,
            stop=cfg.stop,
            generator=torch.Generator().manual_seed(0),
            quadrature=quadrature,
        )
        out[quadrature] = {
            "pairs": a.shape[0],
            "interior_max_ratio": float(inner.max()),
            "interior_above_band": float((inner > high).float().mean()),
            "objective_mean": float(res.loss.mean()),
            "iters_mean": float(res.iters.float().mean()),
            "batched_pair0_objective": float(res.loss[0]),
            "reference_pair0_objective": ref_loss,
            "reference_pair0_iters": ref_iters,
            "reference_pair0_max_ratio": float(ratios(ref_path.unsqueeze(0))[0, 1:-1].max()),
        }
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def plot_norms(panels: list[tuple[str, dict, int]], path: Path) -> None:
    """One panel per seed set: mean norm ratio along t per method, min..max shaded, band shaded."""
    import matplotlib.pyplot as plt

    colours = {"lerp": "tab:red", "slerp": "tab:blue", "nao": "tab:green"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (title, walk, dim) in zip(np.atleast_1d(axes), panels):
        low, high = (v / math.sqrt(dim) for v in chi_band(dim, BAND_MASS))
        ax.axhspan(low, high, color="0.85", label=f"chi prior, central {BAND_MASS:.0%}")
        for name, w in walk.items():
            r = ratios(w["path"]).numpy()  # (P, n)
            t = np.asarray(w["t"])  # (P, n)
            grid = np.linspace(0, 1, 101)
            curves = np.stack([np.interp(grid, t[p], r[p]) for p in range(r.shape[0])])
            ax.plot(grid, curves.mean(0), color=colours[name], label=name)
            ax.fill_between(grid, curves.min(0), curves.max(0), color=colours[name], alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("position t along the walk (NAO: arc length)")
        ax.set_ylabel("|z| / sqrt(dim)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    tm = report["timing"]
    lines = [
        "# Seed space benchmark",
        "",
        f"`python -m research.bench_seeds` on {report['meta']['machine']}, torch threads "
        f"{report['meta']['threads']}, {tm['points_per_path']} points per path, stop rule "
        f"{report['meta']['stop_rule']}. Load average (1 min) at start "
        f"{report['meta']['load_average_at_start']:.1f}, at end "
        f"{report['meta'].get('load_average_at_end', float('nan')):.1f}: other jobs share the "
        f"CPUs, so times are upper bounds.",
        "",
        f"## NAO timing: {tm['pairs']} pairs of 4x64x64 seeds",
        "",
        "| solver | seconds | iterations |",
        "|---|---|---|",
        f"| batched (`nao_path`, all {tm['pairs']} pairs at once) | {tm['batched_seconds']:.2f} | "
        f"mean {tm['batched_iters_mean']:.0f}, max {tm['batched_iters_max']} |",
        f"| published method one path at a time (`nao_path_reference`), {tm['reference_sample']} "
        f"timed, x{tm['pairs']} | {tm['reference_extrapolated_seconds']:.0f} (per path "
        f"{np.mean(tm['reference_seconds_per_path']):.2f}) | {tm['reference_iters']} |",
        "",
        f"Speed-up {tm['speedup']:.0f}x. Objective of the batched paths relative to the "
        f"reference's on the timed pairs: "
        + ", ".join(f"{v:+.2%}" for v in tm["objective_batched_minus_reference_relative"])
        + " (negative: the batched path is better).",
        "",
        "## Norms of inverted seeds (tail classes of the user split, embedded model)",
        "",
        "| inversion | |z|/sqrt(dim) mean | std | min | max | recon PSNR | NFE |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, st in report["inverted_norms"].items():
        lines.append(
            f"| {method} | {st['norm_ratio_mean']:.3f} | {st['norm_ratio_std']:.3f} | "
            f"{st['norm_ratio_min']:.3f} | {st['norm_ratio_max']:.3f} | "
            f"{st['recon_psnr_mean']:.1f} | {st['nfe_mean']:.0f} |"
        )
    lines += [
        "",
        "## Norm along the walks (interior points; band: central 99% of chi_dim)",
        "",
        "| seeds | walk | in band | min ratio | middle ratio (mean) | objective J (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for seeds, per_method in report["profiles"].items():
        for method, st in per_method.items():
            lines.append(
                f"| {seeds} | {method} | {st['interior_in_band']:.0%} | "
                f"{st['interior_min_ratio']:.3f} | {st['middle_ratio_mean']:.3f} | "
                f"{st['objective_mean']:.4g} |"
            )
    qc = report.get("quadrature")
    if qc:
        lines += [
            "",
            "## Simpson's rule against the published midpoint rule (DDIM-inverted pairs)",
            "",
            "| rule | interior max ratio | interior above band | J mean (own rule) | iterations "
            "| pair 0: batched J / reference J (max ratio, iterations) |",
            "|---|---|---|---|---|---|",
        ]
        for rule, st in qc.items():
            lines.append(
                f"| {rule} | {st['interior_max_ratio']:.3f} | {st['interior_above_band']:.1%} | "
                f"{st['objective_mean']:.4g} | {st['iters_mean']:.0f} | "
                f"{st['batched_pair0_objective']:.4g} / {st['reference_pair0_objective']:.4g} "
                f"({st['reference_pair0_max_ratio']:.3f}, {st['reference_pair0_iters']}) |"
            )
    wp = report.get("walk_picture")
    if wp:
        lines += ["", "Walk picture (docs/seed_walks.png), norm ratio at the middle of each walk:"]
        for cls, st in wp["classes"].items():
            lines.append(
                f"- {cls} (seed cosine {st['cosine']:.2f}): "
                + ", ".join(f"{k} {v:.3f}" for k, v in st["middle_ratio"].items())
            )
    lines += ["", "Plots: docs/seed_norms.png, docs/seed_walks.png."]
    if "seconds" in report["meta"]:
        lines.append(
            "Wall time per part (s): "
            + ", ".join(f"{k} {v}" for k, v in report["meta"]["seconds"].items())
            + "."
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--reference-sample", type=int, default=3)
    parser.add_argument("--points", type=int, default=32)
    # one thread: the solver's tensors are small, and on a shared 2-core machine a second torch
    # thread that waits for a busy core slowed the one-path reference loop ~20x in our runs
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "bench"))
    parser.add_argument("--docs", default=str(REPO_ROOT / "docs"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = NaoConfig()
    out, docs = Path(args.out), Path(args.docs)
    report: dict = {
        "meta": {
            "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'})",
            "threads": args.threads,
            "torch": torch.__version__,
            "stop_rule": str(config.stop),
            "nao_config": str(config),
            "load_average_at_start": os.getloadavg()[0],
        }
    }
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    # 1. timing and the SD-size Gaussian profiles
    report["timing"], gauss_walk = timing(args.pairs, args.reference_sample, args.points, config)
    sd_dim = math.prod(SD_SHAPE)
    report["profiles"] = {"gaussian 4x64x64": profile_stats(gauss_walk, sd_dim, config)}
    lap("timing and Gaussian profiles")
    # 2. inverted seeds of the embedded model
    pipe, info = load_pipeline(ModelSpec(path=args.model))
    card = info["card"]
    images, names, _ = tail_images(card)
    inverted = invert_all(pipe, card, images, names)
    report["inverted_norms"] = {m: e["stats"] for m, e in inverted.items()}
    lap("inversion")
    # 3. walks between inverted seeds of the same class, and the published rule on DDIM seeds
    first, second = class_pairs(names)
    panels = []
    for method, label in (("anderson", "fixed-point (Anderson)"), ("ddim", "DDIM")):
        seeds = inverted[method]["seeds"]
        dim = math.prod(seeds.shape[1:])
        walk = walks(seeds[first], seeds[second], args.points, config)
        key = f"inverted {label} 4x8x8"
        report["profiles"][key] = profile_stats(walk, dim, config)
        panels.append((f"{key}, {len(first)} same-class pairs", walk, dim))
    panels.append(
        (f"Gaussian 4x64x64, {gauss_walk['nao']['path'].shape[0]} pairs", gauss_walk, sd_dim)
    )
    plot_norms(panels, docs / "seed_norms.png")
    ddim = inverted["ddim"]["seeds"]
    report["quadrature"] = quadrature_check(ddim[first], ddim[second], args.points, config)
    lap("inverted walks and quadrature check")
    # 4. the picture of generated walks
    report["walk_picture"] = walk_picture(
        pipe, inverted, images, names, args.points, config, docs / "seed_walks.png"
    )
    lap("walk picture")
    report["meta"]["seconds"] = seconds
    report["meta"]["load_average_at_end"] = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(report, indent=2))
    (out / "seeds.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
