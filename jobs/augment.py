"""The augment job: labelled dataset -> rare-class seeds -> walks -> generated WebDataset shards.

Runs the stages of `stages/` through the runner (local Ray, a Ray cluster, or in-process) and owns
the output folder: shards with done-markers, seeds and walks Parquet, classes.json, run.json and a
contact sheet per augmented class. A rerun skips what is done; a rerun into a folder made by a
different config stops.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailseed.jobs import console
from tailseed.jobs.cli import add_augment, default_config
from tailseed.jobs.exits import guarded
from tailseed.pipeline.config import to_dict
from tailseed.pipeline.datasets import Listing
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.models import describe_model
from tailseed.pipeline.output_folder import (
    check_output_folder,
    code_hash,
    contains,
    folder_lock,
    package_versions,
    remove_temp_files,
    seeds_path,
    walk_part_path,
    walks_dir,
)
from tailseed.pipeline.runner import LocalRunner, RayRunner
from tailseed.pipeline.seed_table import (
    provenance,
    read_seeds,
    read_walks,
    write_seeds,
    write_walks,
)
from tailseed.pipeline.shards import atomic_write, dumps, shard_status, stats_name, write_index
from tailseed.stages.augment_pipeline import AugmentConfig, load_config, output_hash, shard_stages
from tailseed.stages.filter import REASONS as FILTER_REASONS
from tailseed.stages.filter import prepare as prepare_filter
from tailseed.stages.generate import GenerateStage
from tailseed.stages.invert import InvertStage, class_health, seed_rows
from tailseed.stages.scan import EMBEDDED, scan
from tailseed.stages.select import ClassPlan, prompt_for, select
from tailseed.stages.tone import prepare as prepare_tone
from tailseed.stages.walk import ClassWalks, ShardSlots, walk_position


def log(message: str, level: int = logging.INFO) -> None:
    """A `[tailseed]` line on stdout, if the verbosity (`--quiet`, `--verbose`) shows `level`."""
    console.log(message, level)


# ------------------------------------------------------------------------------------------------
# Planning (driver only: cheap, and everything it can check is checked before any model work)


@dataclass
class Plan:
    config: AugmentConfig
    config_hash: str
    model: dict
    classes: dict[int, str]
    counts: dict[int, int]
    plans: list[ClassPlan]
    left_out: dict[str, str]
    scan_skipped: Counter
    listing: Listing
    failed: dict[str, str] = field(default_factory=dict)  # source key -> why its inversion failed
    filter: dict = field(default_factory=dict)  # the filter's judge and threshold, when on
    tone: dict = field(default_factory=dict)  # the tone stage's decision and histograms, when on
    health: dict = field(default_factory=dict)  # class index (str) -> reconstruction health
    clip_judge: dict | None = None  # the CLIP judge described (loaded once), when it is on


def make_plan(config: AugmentConfig) -> Plan:
    model = describe_model(config.model)
    if config.dataset.materialize == EMBEDDED:
        materialize_embedded(Path(config.dataset.path), model)
    listing = scan(config.dataset)
    plans, left_out = select(
        listing, config.select, model["image_size"], config.dataset.image_column
    )
    return Plan(
        config,
        output_hash(config),
        model,
        listing.classes,
        listing.counts(),
        plans,
        left_out,
        listing.skipped,
        listing,
    )


def materialize_embedded(path: Path, model: dict) -> None:
    """Write the embedded digits dataset (user split, and the test split beside it) if missing."""
    from tailseed.pipeline.embedded import materialize

    card = model["card"]
    if "split_indices" not in card:
        raise UserError(
            f"dataset.materialize: {EMBEDDED} needs the embedded model's card, not {model['model']}"
        )
    if path.name != "user":
        raise UserError(
            f"dataset.path: with materialize {EMBEDDED}, the path must end in /user (got {path})"
        )
    materialize(path.parent, card["split_indices"])


def estimate_nfe(plan: Plan) -> dict:
    """UNet evaluations: inversion at the solver's own upper bound, generation exactly."""
    cfg = plan.config
    prompt_only = cfg.walk.method == "prompt"
    sources = 0 if prompt_only else sum(len(p.source_keys) for p in plan.plans)
    generated = sum(p.to_generate for p in plan.plans)
    candidates = generated * cfg.filter.pool
    return {
        "invert_max": sources * InvertStage.max_nfe(cfg.invert),
        "generate": GenerateStage.nfe(cfg.generate, candidates),
        "sources": sources,
        "images": generated,
        "candidates": candidates,
    }


# The dry run times the UNet at the run's batch size only where batch 1's time, scaled to that
# batch, stays under this; a slower model (a large one on a CPU) is timed at batch 1 and scaled
# linearly, an upper bound (batching only lowers the time per image).
TIMING_FULL_BATCH_S = 2.0
TIMING_WARMUP = 2  # untimed passes first: the first calls allocate and pick kernels
TIMING_REPEATS = 3  # timed passes per batch size; the fastest is used (others' load only adds)


def measure_unet(plan: Plan) -> dict:
    """Seconds per UNet evaluation (one image, one call: DESIGN's NFE), measured on this machine:
    the model's UNet on the configured device and dtype, with the torch threads its stage gets,
    at the batch that inversion and generation run (doubled for classifier-free guidance).

    Returns {"invert", "generate": seconds per NFE, "how": what was timed}. Only the UNet: the VAE,
    text encoder, filter, PNG encoding and model loading are not in it."""
    import torch
    from diffusers import UNet2DConditionModel

    from tailseed.pipeline.inversion import guided_evals
    from tailseed.pipeline.models import resolve_device, resolve_dtype

    cfg = plan.config
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    folder = Path(plan.model["folder"])
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype)
    unet = unet.to(device).eval()
    width, tokens = int(unet.config.cross_attention_dim), int(text["max_position_embeddings"])
    est = estimate_nfe(plan)

    def forward_s(batch: int) -> float:
        z = torch.randn(
            batch, *plan.model["latent_shape"], generator=torch.Generator().manual_seed(0)
        )
        z, cond = z.to(device, dtype), torch.zeros(batch, tokens, width, device=device, dtype=dtype)
        t = torch.full((batch,), 500, device=device)
        times = []
        with torch.inference_mode():
            for _ in range(TIMING_WARMUP + TIMING_REPEATS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                unet(z, t, encoder_hidden_states=cond)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        return min(times[TIMING_WARMUP:])

    threads = torch.get_num_threads()
    out, how = {}, []
    try:
        for name, batch, guidance, cpus in (
            (
                "invert",
                min(cfg.invert.batch_size, max(1, est["sources"])),
                cfg.invert.solver.guidance_scale,
                cfg.invert.resources.num_cpus,
            ),
            (
                "generate",
                min(cfg.generate.batch_size, max(1, est["candidates"])),
                cfg.generate.guidance_scale,
                cfg.generate.resources.num_cpus,
            ),
        ):
            torch.set_num_threads(max(1, math.ceil(cpus)))
            batch *= guided_evals(guidance)
            single = forward_s(1)
            if single * batch > TIMING_FULL_BATCH_S and batch > 1:
                out[name] = single
                how.append(f"{name}: batch 1 at {single * 1e3:.1f} ms (batch {batch} not run)")
            else:
                full = forward_s(batch)
                out[name] = full / batch
                how.append(f"{name}: batch {batch} at {full * 1e3:.1f} ms")
    finally:
        torch.set_num_threads(threads)
    out["how"] = (
        f"fastest of {TIMING_REPEATS} UNet passes on {device.type} {str(dtype).split('.')[-1]}, "
        + "; ".join(how)
    )
    return out


def describe_time(plan: Plan, per_nfe: dict) -> str:
    """The UNet time the plan implies, from `measure_unet`'s seconds per evaluation."""
    est = estimate_nfe(plan)
    invert = est["invert_max"] * per_nfe["invert"]
    generate = est["generate"] * per_nfe["generate"]
    actors = max(plan.config.invert.resources.num_actors, plan.config.generate.resources.num_actors)
    spread = (
        f"; {actors} actors on separate devices divide it by up to {actors}" if actors > 1 else ""
    )
    return (
        f"time (estimate, UNet evaluations only, one actor): inversion <= {invert:.0f} s, "
        f"generation {generate:.0f} s, about {(invert + generate) / 60:.1f} min{spread} "
        f"(measured: {per_nfe['how']})"
    )


def describe_plan(plan: Plan) -> list[str]:
    lines = [f"dataset: {len(plan.classes)} classes, {sum(plan.counts.values())} images"]
    if plan.scan_skipped:
        lines.append(f"  skipped while listing: {dict(plan.scan_skipped)}")
    for p in plan.plans:
        extra = f", skipped sources {dict(p.skipped)}" if p.skipped else ""
        lines.append(
            f"rare class {p.class_index} {p.class_name!r}: {p.real_count} real, {len(p.source_keys)} sources, "
            f"+{p.to_generate} to generate, prompt {p.prompt!r}{extra}"
        )
    for name, reason in plan.left_out.items():
        lines.append(f"left out {name!r}: {reason}")
    est = estimate_nfe(plan)
    pool = ""
    if plan.config.filter.enabled:
        pool = (
            f" (the best of {est['candidates']} candidates, filter pool x{plan.config.filter.pool})"
        )
    lines.append(
        f"images to generate: {est['images']}{pool}; UNet evaluations: inversion <= "
        f"{est['invert_max']}, generation {est['generate']}"
    )
    tone = plan.config.tone
    if tone.enabled:
        lines.append(
            f"tone: gray {tone.gray}"
            + (", each class's histogram of real pixel values" if tone.match_histogram else "")
        )
    return lines


# ------------------------------------------------------------------------------------------------
# The run


def make_runner(config: AugmentConfig, address: str | None):
    if config.ray.in_process:
        return LocalRunner()
    address = address or config.ray.address or None
    env = os.environ.get("RAY_ADDRESS", "")
    if not address and env and not env.startswith("http"):
        address = env  # inside a Ray job: connect to the job's cluster
    return RayRunner(
        address=address,
        num_cpus=config.ray.local_num_cpus or None,
        object_store_mb=config.ray.object_store_mb,
        log=log,
        verbose=console.verbosity() == console.VERBOSE,
    )


def run_inversion(plan: Plan, runner, out: Path, timings: dict, nodes: set) -> dict[int, dict]:
    """Seeds for every planned class: reused from seeds/ when there, else inverted on actors."""
    cfg = plan.config
    if cfg.walk.method == "prompt":
        log("invert: skipped, walk.method is prompt (fresh Gaussian seeds)")
        return {p.class_index: [] for p in plan.plans}
    tables, todo = {}, []
    for p in plan.plans:
        path = seeds_path(out, p.class_index)
        if path.is_file():
            tables[p.class_index] = read_seeds(path)
        else:
            todo.append(p)
    if not todo:
        log("invert: all seeds already in seeds/, reused")
        return tables
    sources = [
        (key, image, p.prompt) for p in todo for key, image in zip(p.source_keys, p.source_images)
    ]
    units = InvertStage.units(sources, cfg.invert, plan.config_hash)
    t0 = time.perf_counter()
    results = {}
    stages = [InvertStage.spec(cfg.model, cfg.invert)]
    with console.StageBar("invert", total=len(sources)) as bar:
        for res in runner.run(units, stages, progress=bar.within):
            bar.finished(res.unit, len(res.batch["key"]))
            results.update(
                {
                    str(k): {name: res.batch[name][i] for name in res.batch}
                    for i, k in enumerate(res.batch["key"])
                }
            )
            nodes.update(res.node_id.split(","))
            log(
                f"invert: unit {len(results)}/{len(sources)} images done ({res.seconds:.1f}s in the stage)"
            )
            log(f"invert: unit {res.unit} ran on node(s) {res.node_id}", logging.DEBUG)
    timings["invert_s"] = round(time.perf_counter() - t0, 2)
    for p in todo:
        health = class_health(p.source_keys, results)
        plan.health[str(p.class_index)] = health
        if "warning" in health:
            log(f"warning: class {p.class_name!r}: {health['warning']}", logging.WARNING)
        rows, failed = seed_rows(
            p.class_index,
            p.class_name,
            p.prompt,
            p.source_keys,
            results,
            cfg.invert,
            cfg.model.path,
            plan.model["model_hash"],
        )
        for key, why in failed.items():
            plan.failed[key] = f"class {p.class_name!r}: {why}"
            log(f"invert: {key} failed, {why}; left out of the walks", logging.WARNING)
        path = seeds_path(out, p.class_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_seeds(path, rows)
        tables[p.class_index] = read_seeds(path)
    return tables


def run_walks(plan: Plan, seeds: dict[int, list[dict]], out: Path) -> ShardSlots:
    """Every class's walk rows, in parts of `walk.chunk_rows` rows (walks/class_NNNN/part_NNNNN):
    parts already there are reused, the missing ones computed and written one at a time (each
    atomically), so memory holds one part whatever the quota. Returns the slots of all classes,
    read from walks/ as each shard needs them."""
    cfg = plan.config
    gen, chunk = cfg.generate, cfg.walk.chunk_rows
    counts = {}
    for p in plan.plans:
        count = p.to_generate * cfg.filter.pool
        counts[p.class_index] = count
        parts = -(-count // chunk)
        missing = missing_parts(out, p.class_index, count, chunk)
        if not missing:
            continue
        rows = seeds[p.class_index]
        keys = [r["key"] for r in rows]
        stacked = np.stack([r["seed"] for r in rows]) if rows else np.zeros((0,))
        walks = ClassWalks(
            p.class_index,
            p.class_name,
            stacked,
            keys,
            count,
            cfg.walk,
            plan.config_hash,
            plan.model["latent_shape"],
        )
        columns = {
            "class_index": p.class_index,
            "class_name": p.class_name,
            "prompt": p.prompt,
            "guidance_scale": gen.guidance_scale,
            "num_inference_steps": gen.num_inference_steps,
            "model": cfg.model.path,
            "model_hash": plan.model["model_hash"],
        }
        for k in missing:
            part = walks.rows(k * chunk, min(count, (k + 1) * chunk))
            write_walks(walk_part_path(out, p.class_index, k), [{**w, **columns} for w in part])
        reused = f", {parts - len(missing)} part(s) reused" if len(missing) < parts else ""
        log(
            f"walk: class {p.class_name!r}: {count} new seeds from {len(keys)} sources "
            f"({cfg.walk.method}) in {parts} part(s) of at most {chunk} rows{reused}"
        )

    def read(class_index: int, start: int, stop: int) -> list[dict]:
        return read_walk_range(out, class_index, chunk, start, stop)

    return ShardSlots(counts, cfg.filter.pool, read)


def missing_parts(out: Path, class_index: int, count: int, chunk: int) -> list[int]:
    """The parts of a class's walks still to write. A part holds its rows by their positions (in
    the keys), so parts written with another walk.chunk_rows are noticed: the class's parts are then
    removed and all rewritten (the rows do not depend on the part size)."""
    import pyarrow.parquet as pq

    folder = walks_dir(out, class_index)
    parts = -(-count // chunk)
    present = sorted(folder.glob("part_*.parquet")) if folder.is_dir() else []
    expected = {walk_part_path(out, class_index, k) for k in range(parts)}
    for path in present:
        k = int(path.stem.split("_")[1])
        want = list(range(k * chunk, min(count, (k + 1) * chunk)))
        got = [walk_position(str(key)) for key in pq.read_table(path, columns=["key"])["key"]]
        if path not in expected or got != want:
            log(
                f"walk: {folder} holds parts of another size than walk.chunk_rows={chunk}; "
                f"its {len(present)} part(s) are rewritten"
            )
            for stale in present:
                stale.unlink()
            return list(range(parts))
    return [k for k in range(parts) if not walk_part_path(out, class_index, k).is_file()]


def read_walk_range(out: Path, class_index: int, chunk: int, start: int, stop: int) -> list[dict]:
    """A class's walk rows start .. stop - 1, from the parts that hold them."""
    rows = []
    for k in range(start // chunk, -(-stop // chunk)):
        lo = k * chunk
        rows += read_walks(walk_part_path(out, class_index, k), max(start, lo) - lo, stop - lo)
    if len(rows) != stop - start:
        raise UserError(
            f"{walks_dir(out, class_index)}: {len(rows)} walk rows where {stop - start} were "
            f"expected (rows {start}..{stop - 1}); delete the folder's walks/ to redo them"
        )
    return rows


# The most bytes of walk seeds that the driver builds into shard units and hands to the runner
# at once: generation then holds a bounded window of shards, whatever the quota (each window is
# one runner call; on Ray, one set of actor pools).
UNITS_IN_FLIGHT_BYTES = 256 * 2**20


def shard_window(plan: Plan) -> int:
    """Shards per runner call: as many as UNITS_IN_FLIGHT_BYTES of their seeds allow, at least 1."""
    cfg = plan.config
    seed_bytes = int(np.prod(plan.model["latent_shape"])) * 4
    shard_bytes = cfg.shards.samples_per_shard * cfg.filter.pool * seed_bytes
    return max(1, UNITS_IN_FLIGHT_BYTES // shard_bytes)


def run_windows(runner, shards: list[int], unit_of, stages, window: int, progress=None):
    """runner.run over `shards` in windows of `window` shards, each unit built only for its window."""
    for start in range(0, len(shards), window):
        units = {s: unit_of(s) for s in shards[start : start + window]}
        yield from runner.run(units, stages, progress=progress)


def run_generation(
    plan: Plan, slots: ShardSlots, runner, out: Path, timings: dict, nodes: set
) -> int:
    """Generate (and filter) and write every shard that is not done yet; returns the number of
    shards. A shard is `samples_per_shard` slots, each of `filter.pool` candidates, read from
    walks/ only when its window of shards is handed to the runner."""
    cfg = plan.config
    per = cfg.shards.samples_per_shard
    num_shards = (len(slots) + per - 1) // per
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    inversion = to_dict(cfg.invert.solver)
    knobs = {"perturb_angle": cfg.walk.perturb_angle}

    def meta(row: dict) -> str:
        return provenance(row, inversion, plan.config_hash, knobs)

    def unit_of(s: int) -> dict:
        return GenerateStage.unit(s, slots[s * per : (s + 1) * per], meta)

    units = []
    for s in range(num_shards):
        done, why = shard_status(shards_dir, s)
        if done:
            continue
        stats = shards_dir / stats_name(s)
        if stats.exists():  # a done-marker that does not hold: never trusted again
            log(f"generate: shard {s:05d} is redone: {why}", logging.WARNING)
            stats.unlink()
        units.append(s)
    done_before = num_shards - len(units)
    if done_before:
        log(f"generate: {done_before}/{num_shards} shards already done, skipped")
    if not units:
        return num_shards
    t0 = time.perf_counter()
    finished = done_before
    stages = shard_stages(cfg, shards_dir)
    # the bar counts images generated (with the filter on, every candidate of the pool)
    todo = {s: slots.size(s * per, (s + 1) * per) for s in units}
    total = sum(slots.rows.values())
    with console.StageBar("generate", total, initial=total - sum(todo.values())) as bar:
        windows = run_windows(runner, units, unit_of, stages, shard_window(plan), bar.within)
        for res in windows:
            bar.finished(res.unit, todo[res.unit])
            finished += 1
            nodes.update(res.node_id.split(","))
            skipped = json.loads(str(res.batch["skipped"][0]))
            extra = f", skipped {skipped}" if skipped else ""
            log(
                f"generate: shard {res.unit:05d} written ({int(res.batch['samples'][0])} samples{extra}), "
                f"{finished}/{num_shards} shards done ({res.seconds:.1f}s in the stages)"
            )
            log(f"generate: shard {res.unit:05d} ran on node(s) {res.node_id}", logging.DEBUG)
    timings["generate_s"] = round(time.perf_counter() - t0, 2)
    return num_shards


def write_contact_sheets(plan: Plan, out: Path, per_class: int = 64) -> list[str]:
    """contact_class_NNNN.png per augmented class: its real sources on top, generated images below."""
    from tailseed.pipeline.contact import grid, iter_shard_images, labelled

    generated: dict[int, list[np.ndarray]] = {p.class_index: [] for p in plan.plans}
    for _, cls, image in iter_shard_images(out / "shards"):
        if cls in generated and len(generated[cls]) < per_class:
            generated[cls].append(image)
    names = []
    for p in plan.plans:
        scale = max(1, 64 // p.source_images.shape[1])
        health = plan.health.get(str(p.class_index), {})
        caution = (
            f" - WARNING: reconstructed at {health['recon_psnr']} dB, VAE {health['vae_psnr']} dB"
            if "warning" in health
            else ""
        )
        sheet = labelled(
            [
                (
                    f"{p.class_name}: {len(p.source_keys)} real sources{caution}",
                    grid(list(p.source_images), 10, scale),
                ),
                (
                    f"generated (first {len(generated[p.class_index])})",
                    grid(generated[p.class_index], 10, scale),
                ),
            ]
        )
        name = f"contact_class_{p.class_index:04d}.png"
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        atomic_write(out / name, buf.getvalue())
        names.append(name)
    return names


def finalize(
    plan: Plan, out: Path, num_shards: int, timings: dict, nodes: set, started: float
) -> dict:
    shards_dir = out / "shards"
    index = write_index(shards_dir, num_shards)
    stats = [
        json.loads((shards_dir / f"{s:05d}_stats.json").read_text()) for s in range(num_shards)
    ]
    skipped = Counter()
    for st in stats:
        skipped.update(st["skipped"])
    t0 = time.perf_counter()
    sheets = write_contact_sheets(plan, out)
    timings["contact_sheets_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    return {
        "status": "complete",
        "config_hash": plan.config_hash,
        "config": to_dict(plan.config),
        "model": {k: plan.model[k] for k in ("model", "model_hash", "image_size", "latent_shape")},
        "versions": package_versions(),
        "classes": {str(k): v for k, v in plan.classes.items()},
        "counts": {
            "real_per_class": {str(k): v for k, v in plan.counts.items()},
            "augmented_classes": {
                p.class_name: {
                    "real": p.real_count,
                    "sources": len(p.source_keys),
                    "generated": sum(st["per_class"].get(str(p.class_index), 0) for st in stats),
                }
                for p in plan.plans
            },
            "samples": sum(s["nsamples"] for s in index["shardlist"]),
            "shards": num_shards,
            "skipped_listing": dict(plan.scan_skipped),
            "skipped_sources": {p.class_name: dict(p.skipped) for p in plan.plans if p.skipped},
            "skipped_generation": {k: v for k, v in skipped.items() if k not in FILTER_REASONS},
            "dropped_by_filter": {k: v for k, v in skipped.items() if k in FILTER_REASONS},
            "inversion_failed": plan.failed,
            "left_out_classes": plan.left_out,
        },
        "filter": plan.filter,
        "tone": {k: v for k, v in plan.tone.items() if k != "histograms"},
        "health": plan.health,
        "timings": timings,
        "node_ids": sorted(n for n in nodes if n),
        "contact_sheets": sheets,
    }


def run(
    config: AugmentConfig, address: str | None = None, dry_run: bool = False, timing: bool = True
) -> dict:
    """The augment job. A dry run prints the plan, its UNet evaluations, space and (unless
    `timing` is off, or the run goes to a cluster) the time measured from a few UNet passes."""
    started = time.perf_counter()
    timings: dict = {}
    plan = make_plan(config)
    timings["plan_s"] = round(time.perf_counter() - started, 2)
    out = config.out()
    log(f"config {config.name} (hash {plan.config_hash}), model {config.model.path}, output {out}")
    for line in describe_plan(plan):
        log(line)
    if plan.listing.integer_labels() and not config.dataset.class_names:
        example = prompt_for(next(iter(plan.classes.values())), config.select)
        log(
            f"note: the dataset's labels are integers and dataset.class_names is not set, so "
            f"prompts use the raw labels ({example!r}); name the classes with "
            f"dataset.class_names (a mapping or a file) for prompts the model understands"
        )
    check_paths(config, out)
    if config.filter.enabled and config.filter.clip_judge:
        from tailseed.pipeline.clip_judge import describe_clip_judge

        # loaded once, here: a CLIP model that cannot load stops the run (or dry run) before any work
        plan.clip_judge = describe_clip_judge(config.filter.clip_judge)
    if not plan.counts or not sum(plan.counts.values()):
        raise UserError(
            f"dataset.path {config.dataset.path}: no labelled image was listed (format "
            f"{config.dataset.format}); check dataset.format and the label keys or columns"
        )
    if not plan.plans and not dry_run:
        raise UserError(
            f"no class to augment: none has fewer than select.rare_below={config.select.rare_below} "
            f"images (or select.classes names none); raise rare_below or name the classes"
        )
    local = config.ray.in_process or not (
        address or config.ray.address or os.environ.get("RAY_ADDRESS")
    )
    if local:
        check_device(config)
    if dry_run:
        check_output_folder(out, plan.config_hash, code_hash(), identity(plan), create=False)
    space = check_space(plan, out)
    log(
        f"space: walks {space['walks'] / 1e6:.1f} MB, shards at most {space['shards'] / 1e6:.1f} MB; "
        f"{space['free'] / 1e9:.1f} GB free on the output disk"
    )
    if dry_run:
        per_nfe = None
        if not timing:
            log("time: not measured (--no-timing)")
        elif not local:
            log(
                "time: not measured: the run goes to a Ray cluster, whose devices are not timed here"
            )
        elif not plan.plans:
            log("time: nothing to generate")
        else:
            per_nfe = measure_unet(plan)
            log(describe_time(plan, per_nfe))
        log("dry run: stopping before any inversion or generation")
        return {"dry_run": True, "estimate": estimate_nfe(plan), "seconds_per_nfe": per_nfe}
    with folder_lock(out):
        return _run_locked(config, plan, out, address, timings, started)


def check_device(config: AugmentConfig) -> None:
    """On a local run the driver's machine is the one that computes: CUDA and half precision
    must be there, or the run would fail (or silently run in float32) after the planning."""
    import torch

    device, dtype = config.model.device, config.model.dtype
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"model.device is {device!r}, but this machine has no CUDA; use auto or cpu"
        )
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if dtype in ("float16", "bfloat16") and not cuda:
        raise UserError(
            f"model.dtype {dtype} needs a CUDA device; this run is on the CPU: use float32"
        )


def check_paths(config: AugmentConfig, out: Path) -> None:
    """The output folder and the dataset may not hold each other: the run's own files would be
    listed as data (a contact sheet as a class) or the data overwritten."""
    data = Path(config.dataset.path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder; name a folder")
    if contains(data if data.is_dir() else data.parent, out) or contains(out, data):
        raise UserError(
            f"output_dir {out} and dataset.path {data} hold one another; put the output "
            f"outside the dataset"
        )


def check_space(plan: Plan, out: Path) -> dict:
    """Bytes the plan's walks and shards take at most, against the output disk's free space, and
    the memory that one part of walks (`walk.chunk_rows` seeds) and one window of shard units take
    at once; a plan that cannot fit is refused before any work. Memory does not grow with the
    quota: walks are made, stored and read in parts."""
    import shutil

    cfg = plan.config
    est = estimate_nfe(plan)
    latent = int(np.prod(plan.model["latent_shape"]))
    side = int(plan.model["image_size"])
    walks = est["candidates"] * (latent * 4 + 512)  # float32 seeds plus the row's provenance
    shards = est["images"] * (side * side * 3 + 2048)  # an uncompressed image bounds its PNG
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if walks + shards > free:
        raise UserError(
            f"the plan needs up to {(walks + shards) / 1e9:.1f} GB for walks and shards, the "
            f"output disk ({probe}) has {free / 1e9:.1f} GB free; lower select.quota or "
            f"filter.pool_factor, or use another output_dir"
        )
    part = cfg.walk.chunk_rows * latent * 4 * 3  # a part's seeds, with their working copies
    window = shard_window(plan) * cfg.shards.samples_per_shard * cfg.filter.pool * latent * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if part + window > memory:
        raise UserError(
            f"one part of walks (walk.chunk_rows={cfg.walk.chunk_rows} seeds) and one window of "
            f"shards would need about {(part + window) / 1e9:.1f} GB of memory, more than this "
            f"machine's {memory / 1e9:.1f} GB; lower walk.chunk_rows or shards.samples_per_shard"
        )
    return {"walks": walks, "shards": shards, "free": free, "memory": part + window}


def identity(plan: Plan) -> dict:
    """What the folder's outputs were made from, beyond the config: the class map and, per rare
    class, its source images (keys and content hashes)."""
    return {
        "classes": {str(k): v for k, v in sorted(plan.classes.items())},
        "sources": {
            str(p.class_index): [
                [key, hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]]
                for key, image in zip(p.source_keys, p.source_images)
            ]
            for p in plan.plans
        },
    }


def _run_locked(config, plan: Plan, out: Path, address, timings: dict, started: float) -> dict:
    code = code_hash()
    made_from = identity(plan)
    previous = check_output_folder(out, plan.config_hash, code, made_from)
    plan.health = dict(previous.get("health", {}))  # classes whose seeds are reused
    stale = remove_temp_files(out)
    if stale:
        log(f"removed {stale} temporary file(s) that an interrupted run left")
    # run.json first: from here on the folder is this run's, whatever happens to the process
    atomic_write(
        out / "run.json",
        dumps(
            {
                "status": "running",
                "config_hash": plan.config_hash,
                "code_hash": code,
                "identity": made_from,
                "config": to_dict(config),
            }
        ),
    )
    atomic_write(out / "classes.json", dumps({str(k): v for k, v in sorted(plan.classes.items())}))
    t0 = time.perf_counter()
    runner = make_runner(config, address)
    timings["runner_start_s"] = round(time.perf_counter() - t0, 2)
    nodes: set = set()
    try:
        seeds = run_inversion(plan, runner, out, timings, nodes)
        running = json.loads((out / "run.json").read_text())
        atomic_write(out / "run.json", dumps({**running, "health": plan.health}))
        slots = run_walks(plan, seeds, out)
        if config.filter.enabled:
            plan.filter = prepare_filter(
                config.filter,
                plan.listing,
                plan.model["image_size"],
                config.dataset.image_column,
                out / "filter",
                log,
                {c: prompt_for(name, config.select) for c, name in plan.classes.items()},
                clip_described=plan.clip_judge,
            )
        if config.tone.enabled:
            plan.tone = prepare_tone(
                config.tone,
                plan.listing,
                [p.class_index for p in plan.plans],
                plan.model["image_size"],
                config.dataset.image_column,
                out / "tone",
                log,
            )
        num_shards = run_generation(plan, slots, runner, out, timings, nodes)
    finally:
        runner.shutdown()
        remove_temp_files(out)  # what an interrupted write left, actors' included
    report = finalize(plan, out, num_shards, timings, nodes, started)
    report["code_hash"] = code
    report["identity"] = made_from
    atomic_write(out / "run.json", dumps(report))
    counts = report["counts"]
    log(
        f"done in {timings['total_s']:.0f}s: {counts['samples']} images in {num_shards} shards for "
        f"{len(plan.plans)} rare classes ({', '.join(p.class_name for p in plan.plans)}) -> {out}/shards",
        console.SUMMARY,
    )
    for line in shortfalls(plan, counts):
        log(line, logging.WARNING)
    log(f"look first: {', '.join(str(out / s) for s in report['contact_sheets'])}")
    return report


def shortfalls(plan: Plan, counts: dict) -> list[str]:
    """A warning per rare class that got fewer images than it was to generate, with why and what
    to do: the filter's floor drops candidates its judge takes for another class."""
    dropped = counts["dropped_by_filter"]
    lines = []
    for p in plan.plans:
        got = counts["augmented_classes"][p.class_name]["generated"]
        if got >= p.to_generate:
            continue
        why = ""
        if dropped.get("below_floor"):
            why = (
                f"; the filter dropped {dropped['below_floor']} candidates in this run that its "
                f"judge scores below filter.floor={plan.config.filter.floor} for their class "
                "(they look like another class). Raise filter.pool_factor, shorten "
                "walk.perturb_angle or name the class in its prompt (select.prompt_overrides); "
                "filter.floor=0 writes them anyway, under this class's label"
            )
        lines.append(f"class {p.class_name!r}: {got} of {p.to_generate} images written{why}")
    return lines


def main_args(args) -> int:
    path = args.config or default_config()
    config = load_config(path, args.overrides)
    if args.ray_address.startswith("http"):
        from tailseed.jobs.submit import submit

        return submit(
            path,
            args.overrides,
            args.ray_address,
            dry_run=args.dry_run,
            verbosity=getattr(args, "verbosity", None),
        )
    run(config, address=args.ray_address or None, dry_run=args.dry_run, timing=args.timing)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tailseed.jobs.augment", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command")
    add_augment(sub)
    args = parser.parse_args(["augment", *(argv if argv is not None else sys.argv[1:])])
    console.configure(getattr(args, "verbosity", None))
    return guarded("augment", main_args, args)


if __name__ == "__main__":
    sys.exit(main())
