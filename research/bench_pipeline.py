"""Pipeline benchmark: `make augment`'s wall time against its floor and against a plain loop.

Three ways to do the same work on the default config (`out/bench/pipeline.json`, `pipeline.md`):
1. pipeline: the augment job on a local Ray (start-up reported separately, included in the ratio);
2. floor: the same stages, solver and batch sizes in one process without Ray (`ray.in_process`);
3. plain loop: what a user would write: tailseed's solver one image at a time, then the stock
   diffusers pipeline one image at a time, no Ray. It is timed on a sample of images and
   extrapolated linearly (each image costs the same) rather than waited for at 10x.
Each is measured at 1x and at `--scale` x the default number of generated images, the pipeline
also half-way between (is its time a straight line in the images?). Peak memory is
the summed RSS of the whole process tree (the driver, Ray's processes and workers), sampled.
Also draws docs/pipeline_bench.png (`--plot-only` redraws it from out/bench/pipeline.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from tailseed.jobs.augment import run
from tailseed.pipeline.inversion import InversionConfig, Inverter
from tailseed.pipeline.models import load_pipeline
from tailseed.stages.augment_pipeline import load_config

CONFIG = Path("configs/default.yaml")


class TreeMemory:
    """Peak summed RSS of this process and all its descendants, sampled every `interval` s."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def quota_for(scale: int) -> int:
    """select.quota (fill_to) that gives `scale` times the default's 40 generated per tail class."""
    return 10 + 40 * scale


def timed_run(overrides: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="tailseed-bench-"))
    try:
        config = load_config(CONFIG, [*overrides, f"output_dir={out / 'run'}"])
        with TreeMemory() as mem:
            t0 = time.perf_counter()
            report = run(config)
            wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "peak_rss_mb": mem.peak / 2**20,
            "timings": report["timings"],
            "images": report["counts"]["samples"],
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def plain_loop(scale: int, sample: int) -> dict:
    """tailseed's solver image by image, then the stock pipeline image by image, timed on a sample."""
    config = load_config(CONFIG)
    torch.set_num_threads(2)
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        pipe, _ = load_pipeline(config.model)
        startup = time.perf_counter() - t0
        inverter = Inverter(
            pipe, InversionConfig(**json.loads(json.dumps(config.invert.solver.__dict__)))
        )
        from research.digits import DigitsSplit, load_digits_arrays, render, split_indices

        images8, labels = load_digits_arrays()
        user = [i for i in split_indices(labels, DigitsSplit())["user"] if labels[i] in (4, 7)][
            :sample
        ]
        t0 = time.perf_counter()
        seeds = []
        for i in user:
            image = np.asarray(render(images8[i]))[None]
            seeds.append(inverter.invert(image, ["a photo of the digit seven"], [i])["seed"])
        per_inversion = (time.perf_counter() - t0) / len(user)
        gen = config.generate
        t0 = time.perf_counter()
        for s in seeds:
            pipe(
                "a photo of the digit seven",
                latents=torch.from_numpy(s),
                guidance_scale=gen.guidance_scale,
                num_inference_steps=gen.num_inference_steps,
                output_type="np",
            )
        per_generation = (time.perf_counter() - t0) / len(seeds)
    sources, generated = 20, 80 * scale
    return {
        "startup_s": startup,
        "per_inversion_s": per_inversion,
        "per_generation_s": per_generation,
        "sampled_images": len(user),
        "wall_s": startup + sources * per_inversion + generated * per_generation,
        "peak_rss_mb": mem.peak / 2**20,
        "images": generated,
        "extrapolated": True,
    }


def unet_batching_ceiling(reps: int = 20) -> dict:
    """What batching alone can buy on this machine: the UNet's time per sample at the plain
    loop's batch (2: one image with classifier-free guidance) and at the pipeline's generate batch
    (2 x generate.batch_size). Generation is most of the work, so the ratio bounds the speedup over
    the plain loop that batching can give here."""
    from tailseed.pipeline.inversion import encode_prompts

    config = load_config(CONFIG)
    torch.set_num_threads(2)
    pipe, _ = load_pipeline(config.model, with_hash=False)
    cond, _ = encode_prompts(pipe, ["a photo of the digit seven"])
    shape = (pipe.unet.config.in_channels, *[pipe.unet.config.sample_size] * 2)
    per_sample = {}
    for batch in (2, 2 * config.generate.batch_size):
        z, hidden = torch.randn(batch, *shape), cond.expand(batch, -1, -1).contiguous()
        t = torch.tensor(500)
        with torch.inference_mode():
            for _ in range(3):  # warm-up
                pipe.unet(z, t, encoder_hidden_states=hidden)
            n = max(3, reps * 2 // batch)
            t0 = time.perf_counter()
            for _ in range(n):
                pipe.unet(z, t, encoder_hidden_states=hidden)
        per_sample[batch] = (time.perf_counter() - t0) / n / batch * 1e3
    small, big = per_sample.values()
    return {
        "unet_ms_per_sample": {str(b): round(v, 3) for b, v in per_sample.items()},
        "batching_ceiling": small / big,
    }


def plot(result: dict, path: Path) -> None:
    """Wall time against generated images: pipeline, floor and plain loop; and each one's peak
    memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    images = [r["images"] for r in rows]
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label, style, color in (
        ("plain_loop", "plain loop (extrapolated)", "s--", "C0"),
        ("floor", "floor: same stages, one process", "^-", "C1"),
        ("pipeline", "pipeline on Ray (incl. start-up)", "o-", "C2"),
    ):
        ax.plot(images, [r[name]["wall_s"] for r in rows], style, color=color, label=label)
        if name != "plain_loop":
            gib = [r[name]["peak_rss_mb"] / 1024 for r in rows]
            mem.plot(images, gib, style, color=color, label=label)
    lin = result.get("linearity")
    if lin:
        middle = lin["points"][1]
        ax.plot(
            [middle["images"]],
            [middle["wall_s"]],
            "o",
            color="C2",
            mfc="none",
            label="pipeline, middle scale",
        )
    ax.set_xlabel("generated images")
    ax.set_ylabel("wall time (s)")
    ax.set_title("time: the pipeline against its floor and a plain loop")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    mem.set_xlabel("generated images")
    mem.set_ylabel("peak RSS of the process tree (GiB)")
    mem.legend(fontsize=8)
    mem.set_ylim(bottom=0)
    mem.set_title("memory")
    mem.grid(alpha=0.3)
    fig.suptitle(f"make augment's pipeline on {result['config']} (2 CPU cores, no GPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument(
        "--plain-sample", type=int, default=4, help="images timed in the plain loop"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the picture from OUT/pipeline.json"
    )
    parser.add_argument("--picture", type=Path, default=Path("docs/pipeline_bench.png"))
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads((args.out / "pipeline.json").read_text()), args.picture)
        return
    rows = []
    for scale in (1, args.scale):
        quota = f"select.quota={quota_for(scale)}"
        pipeline = timed_run([quota])
        floor = timed_run([quota, "ray.in_process=true"])
        plain = plain_loop(scale, args.plain_sample)
        rows.append(
            {
                "scale": scale,
                "images": pipeline["images"],
                "pipeline": pipeline,
                "floor": floor,
                "plain_loop": plain,
                "overhead_ratio": pipeline["wall_s"] / floor["wall_s"],
                "speedup_vs_plain_loop": plain["wall_s"] / pipeline["wall_s"],
            }
        )
        print(
            f"[bench_pipeline] {scale}x: pipeline {pipeline['wall_s']:.1f}s, floor {floor['wall_s']:.1f}s, "
            f"plain loop {plain['wall_s']:.1f}s (extrapolated)",
            flush=True,
        )
    one, big = rows
    # a middle scale, pipeline only: is the time a straight line in the number of images?
    middle_scale = max(2, args.scale // 2)
    middle = timed_run([f"select.quota={quota_for(middle_scale)}"])
    points = [
        (one["images"], one["pipeline"]["wall_s"]),
        (middle["images"], middle["wall_s"]),
        (big["images"], big["pipeline"]["wall_s"]),
    ]
    per_image = (points[2][1] - points[0][1]) / (points[2][0] - points[0][0])
    fixed = points[0][1] - per_image * points[0][0]
    predicted_middle = fixed + per_image * points[1][0]
    ceiling = unet_batching_ceiling()
    result = {
        "config": str(CONFIG),
        **ceiling,
        "rows": rows,
        "overhead_ratio": one["overhead_ratio"],
        "overhead_ratio_10x": big["overhead_ratio"],
        "speedup_vs_plain_loop": one["speedup_vs_plain_loop"],
        "speedup_vs_plain_loop_10x": big["speedup_vs_plain_loop"],
        "peak_rss_mb_1x": one["pipeline"]["peak_rss_mb"],
        "peak_rss_mb_10x": big["pipeline"]["peak_rss_mb"],
        "memory_growth": big["pipeline"]["peak_rss_mb"] / one["pipeline"]["peak_rss_mb"],
        "time_per_image_1x_s": one["pipeline"]["wall_s"] / one["images"],
        "time_per_image_10x_s": big["pipeline"]["wall_s"] / big["images"],
        "linearity": {
            "points": [{"images": n, "wall_s": w} for n, w in points],
            "fixed_s": fixed,
            "per_image_s": per_image,
            "middle_predicted_s": predicted_middle,
            "middle_deviation": points[1][1] / predicted_middle - 1,
        },
        "cpu_load_1min": psutil.getloadavg()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.picture)
    lines = [
        "| scale | images | pipeline (Ray) s | start-up s | floor (no Ray) s | plain loop s | overhead ratio | "
        "speedup vs plain | peak RSS MB (pipeline) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']}x | {r['images']} | {r['pipeline']['wall_s']:.1f} | "
            f"{r['pipeline']['timings']['runner_start_s']:.1f} | {r['floor']['wall_s']:.1f} | "
            f"{r['plain_loop']['wall_s']:.1f} | {r['overhead_ratio']:.2f} | {r['speedup_vs_plain_loop']:.2f} | "
            f"{r['pipeline']['peak_rss_mb']:.0f} |"
        )
    lin = result["linearity"]
    lines += [
        "",
        f"Linearity: the line through 1x and {args.scale}x ({lin['fixed_s']:.1f} s + "
        f"{lin['per_image_s']:.3f} s per image) predicts {lin['middle_predicted_s']:.1f} s at "
        f"{points[1][0]} images; measured {points[1][1]:.1f} s ({lin['middle_deviation']:+.1%}).",
        f"UNet time per sample: {ceiling['unet_ms_per_sample']} ms at batch {{plain loop, pipeline}}; "
        f"batching alone can speed generation up by at most {ceiling['batching_ceiling']:.2f}x here.",
    ]
    (args.out / "pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
