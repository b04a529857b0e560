"""`tailseed inspect OUT`: summarise an augment output folder for a person."""

from __future__ import annotations

import json
from pathlib import Path

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.shards import shard_done


def summarize(out: Path) -> list[str]:
    run_json = out / "run.json"
    if not run_json.is_file():
        raise UserError(f"{out}: no run.json; expected the output folder of `tailseed augment`")
    try:
        run = json.loads(run_json.read_text())
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{run_json}: unreadable ({exc}); rerun the same augment command to redo the folder"
        ) from None
    lines = [f"{out}: status {run.get('status')}, config hash {run.get('config_hash')}"]
    if run.get("status") != "complete":
        shards = sorted((out / "shards").glob("[0-9]*.tar")) if (out / "shards").is_dir() else []
        done = sum(shard_done(out / "shards", int(p.stem)) for p in shards)
        lines.append(
            f"  incomplete run: {done} shard(s) done so far; rerun the same command to finish"
        )
        return lines
    counts, model = run["counts"], run["model"]
    lines.append(
        f"  model {model['model']} (hash {model['model_hash']}), images {model['image_size']}px"
    )
    lines.append(
        f"  {counts['samples']} generated samples in {counts['shards']} shards (shards/index.json)"
    )
    for name, c in counts["augmented_classes"].items():
        lines.append(
            f"  class {name!r}: {c['real']} real + {c['generated']} generated (from {c['sources']} sources)"
        )
    for key in (
        "skipped_listing",
        "skipped_sources",
        "skipped_generation",
        "dropped_by_filter",
        "inversion_failed",
        "left_out_classes",
    ):
        if counts.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {counts[key]}")
    for index, health in sorted(run.get("health", {}).items()):
        if "warning" in health:
            name = run.get("classes", {}).get(index, index)
            lines.append(f"  WARNING: class {name!r}: {health['warning']}")
    seeds = sorted((out / "seeds").glob("*.parquet"))
    if seeds:
        from tailseed.pipeline.seed_table import read_seeds

        rows = [r for p in seeds for r in read_seeds(p)]
        psnr = [r["recon_psnr"] for r in rows if r["recon_psnr"] is not None]
        nfe = [r["nfe"] for r in rows if r["nfe"] is not None]
        if psnr:
            lines.append(
                f"  inversion: {len(rows)} seeds, reconstruction PSNR mean {sum(psnr) / len(psnr):.2f} dB "
                f"(min {min(psnr):.2f}), {sum(nfe) / max(1, len(nfe)):.0f} UNet evaluations per image"
            )
    walks = sorted((out / "walks").glob("class_*/part_*.parquet"))
    if walks:
        import pyarrow.parquet as pq

        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in walks)  # footers only
        classes = len({p.parent.name for p in walks})
        lines.append(
            f"  walks: {rows} walk seeds of {classes} class(es) in {len(walks)} part(s) "
            f"(walks/class_NNNN/part_NNNNN.parquet; `tailseed generate --seeds` takes a class's folder)"
        )
    t = run.get("timings", {})
    lines.append("  time: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    lines.append(
        f"  nodes: {len(run.get('node_ids', []))}; contact sheets: {', '.join(run.get('contact_sheets', []))}"
    )
    return lines


def main_args(args) -> int:
    print("\n".join(summarize(args.out)))
    return 0
