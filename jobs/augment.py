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
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.cli import add_augment, default_config
from jobs.exits import guarded
from pipeline.config import to_dict
from pipeline.datasets import Listing
from pipeline.errors import UserError
from pipeline.models import describe_model
from pipeline.output_folder import (
    check_output_folder,
    code_hash,
    contains,
    folder_lock,
    package_versions,
    remove_temp_files,
    seeds_path,
    walks_path,
)
from pipeline.runner import LocalRunner, RayRunner
from pipeline.seed_table import provenance, read_seeds, read_walks, write_seeds, write_walks
from pipeline.shards import atomic_write, dumps, shard_status, stats_name, write_index
from stages.augment_pipeline import AugmentConfig, load_config, output_hash, shard_stages
from stages.filter import REASONS as FILTER_REASONS
from stages.filter import prepare as prepare_filter
from stages.generate import GenerateStage
from stages.invert import InvertStage, class_health, seed_rows
from stages.scan import EMBEDDED, scan
from stages.select import ClassPlan, prompt_for, select
from stages.walk import make_walks, shard_slots


def log(message: str) -> None:
    print(f"[tailseed] {message}", flush=True)


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
    health: dict = field(default_factory=dict)  # class index (str) -> reconstruction health


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
    from pipeline.embedded import materialize

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
    for res in runner.run(units, [InvertStage.spec(cfg.model, cfg.invert)]):
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
    timings["invert_s"] = round(time.perf_counter() - t0, 2)
    for p in todo:
        health = class_health(p.source_keys, results)
        plan.health[str(p.class_index)] = health
        if "warning" in health:
            log(f"warning: class {p.class_name!r}: {health['warning']}")
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
            log(f"invert: {key} failed, {why}; left out of the walks")
        path = seeds_path(out, p.class_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_seeds(path, rows)
        tables[p.class_index] = read_seeds(path)
    return tables


def run_walks(plan: Plan, seeds: dict[int, list[dict]], out: Path) -> dict[int, list[dict]]:
    """Walk rows per class: reused from walks/ when there, else sampled and written."""
    cfg = plan.config
    gen = cfg.generate
    walks = {}
    for p in plan.plans:
        path = walks_path(out, p.class_index)
        if path.is_file():
            walks[p.class_index] = read_walks(path)
            continue
        rows = seeds[p.class_index]
        keys = [r["key"] for r in rows]
        stacked = np.stack([r["seed"] for r in rows]) if rows else np.zeros((0,))
        new = make_walks(
            p.class_index,
            p.class_name,
            stacked,
            keys,
            p.to_generate * cfg.filter.pool,
            cfg.walk,
            plan.config_hash,
            plan.model["latent_shape"],
        )
        table = [
            {
                **w,
                "class_index": p.class_index,
                "class_name": p.class_name,
                "prompt": p.prompt,
                "guidance_scale": gen.guidance_scale,
                "num_inference_steps": gen.num_inference_steps,
                "model": cfg.model.path,
                "model_hash": plan.model["model_hash"],
            }
            for w in new
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_walks(path, table)
        walks[p.class_index] = read_walks(path)
        log(
            f"walk: class {p.class_name!r}: {len(new)} new seeds from {len(keys)} sources ({cfg.walk.method})"
        )
    return walks


def run_generation(
    plan: Plan, slots: list[list[dict]], runner, out: Path, timings: dict, nodes: set
) -> int:
    """Generate (and filter) and write every shard that is not done yet; returns the number of
    shards. A shard is `samples_per_shard` slots, each of `filter.pool` candidates."""
    cfg = plan.config
    per = cfg.shards.samples_per_shard
    num_shards = (len(slots) + per - 1) // per
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    inversion = to_dict(cfg.invert.solver)
    knobs = {"perturb_angle": cfg.walk.perturb_angle}

    def meta(row: dict) -> str:
        return provenance(row, inversion, plan.config_hash, knobs)

    units = {}
    for s in range(num_shards):
        done, why = shard_status(shards_dir, s)
        if done:
            continue
        stats = shards_dir / stats_name(s)
        if stats.exists():  # a done-marker that does not hold: never trusted again
            log(f"generate: shard {s:05d} is redone: {why}")
            stats.unlink()
        units[s] = GenerateStage.unit(s, slots[s * per : (s + 1) * per], meta)
    done_before = num_shards - len(units)
    if done_before:
        log(f"generate: {done_before}/{num_shards} shards already done, skipped")
    if not units:
        return num_shards
    t0 = time.perf_counter()
    finished = done_before
    for res in runner.run(units, shard_stages(cfg, shards_dir)):
        finished += 1
        nodes.update(res.node_id.split(","))
        skipped = json.loads(str(res.batch["skipped"][0]))
        extra = f", skipped {skipped}" if skipped else ""
        log(
            f"generate: shard {res.unit:05d} written ({int(res.batch['samples'][0])} samples{extra}), "
            f"{finished}/{num_shards} shards done ({res.seconds:.1f}s in the stages)"
        )
    timings["generate_s"] = round(time.perf_counter() - t0, 2)
    return num_shards


def write_contact_sheets(plan: Plan, out: Path, per_class: int = 64) -> list[str]:
    """contact_class_NNNN.png per augmented class: its real sources on top, generated images below."""
    from pipeline.contact import grid, iter_shard_images, labelled

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
        "health": plan.health,
        "timings": timings,
        "node_ids": sorted(n for n in nodes if n),
        "contact_sheets": sheets,
    }


def run(config: AugmentConfig, address: str | None = None, dry_run: bool = False) -> dict:
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
        log("dry run: stopping before any model work")
        return {"dry_run": True, "estimate": estimate_nfe(plan)}
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
    """Bytes the plan's walks and shards take at most, against the output disk's free space and
    the memory one class's walks take at once; a plan that cannot fit is refused before any work."""
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
    largest = max((p.to_generate for p in plan.plans), default=0) * cfg.filter.pool
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if largest * latent * 4 * 3 > memory:  # a class's walks, with their working copies
        raise UserError(
            f"one class's {largest} walk seeds would need about {largest * latent * 12 / 1e9:.1f} "
            f"GB of memory, more than this machine's {memory / 1e9:.1f} GB; lower select.quota"
        )
    return {"walks": walks, "shards": shards, "free": free}


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
        walks = run_walks(plan, seeds, out)
        if config.filter.enabled:
            plan.filter = prepare_filter(
                config.filter,
                plan.listing,
                plan.model["image_size"],
                config.dataset.image_column,
                out / "filter",
                log,
            )
        slots = shard_slots(walks, config.filter.pool)
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
        f"{len(plan.plans)} rare classes ({', '.join(p.class_name for p in plan.plans)}) -> {out}/shards"
    )
    log(f"look first: {', '.join(str(out / s) for s in report['contact_sheets'])}")
    return report


def main_args(args) -> int:
    path = args.config or default_config()
    config = load_config(path, args.overrides)
    if args.ray_address.startswith("http"):
        from jobs.submit import submit

        return submit(path, args.overrides, args.ray_address, dry_run=args.dry_run)
    run(config, address=args.ray_address or None, dry_run=args.dry_run)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.augment", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command")
    add_augment(sub)
    args = parser.parse_args(["augment", *(argv if argv is not None else sys.argv[1:])])
    return guarded("augment", main_args, args)


if __name__ == "__main__":
    sys.exit(main())
