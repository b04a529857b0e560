"""Filter: keep the best of a pool of generated candidates, judged against the user's own data.

Generation over-generates `pool_factor` candidates per image to keep. Two scores per candidate:
- the self-judge's probability of the intended class (`pipeline.self_judge`: a small CNN trained
  only on the user's real images, cross-fitted);
- the RMS distance to the nearest real image of the dataset (every class, at the judge's working
  resolution); a candidate closer than the near-copy threshold (a low percentile of the real
  images' own nearest-neighbour distances within their class) is a near-copy and is dropped.
With `clip_judge` set, a third: a CLIP model's zero-shot probability of the intended class among
the dataset's classes, each described by its generation prompt (`pipeline.clip_judge`).
Per shard and class, the candidates that are not near-copies are ranked by the judge's score
(times the CLIP probability when the CLIP judge is on: a candidate must convince both) and kept
in the order of the keep rule (`keep`: the best by default; "spread" and "uncertain" among those
scoring at least `min_score`), up to the class's slots in the shard. With `floor` set, a
candidate whose self-judge probability of its class is below it is never written (the judge
takes it for another class); a class whose pool holds too few candidates above the floor then
gets fewer images than its quota, and the run counts them ("below_floor") and says so. Every kept sample's JSON
gains a "filter" entry with its scores and the threshold, so a user can re-threshold without
regenerating.

Unit in:  the generate stage's output: shard, key, image (N, H, W, 3) uint8, ok (N,) bool,
          cls (N,) int64, meta (N,) str, slots (N,) int64 (per row: how many samples its class
          keeps in this shard; equal within a class).
Unit out: the same columns; rows not kept have ok False and skip_reason set
          ("near_copy" or "not_kept"), kept rows have their meta extended.
The judge and the references are prepared once per run by `prepare` (in the driver, before
generation), saved in the output folder's `filter/` and reused by a rerun.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailseed.pipeline.config import NOT_HASHED, hashed_unless
from tailseed.pipeline.datasets import Listing, read_bytes
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.images import SkipSample, decode_image
from tailseed.pipeline.runner import Resources, Stage
from tailseed.pipeline.shards import atomic_write, dumps

REASONS = ("near_copy", "below_floor", "not_kept")  # why a generated candidate is not written
KEEP_RULES = ("best", "spread", "uncertain")  # FilterConfig.keep


@dataclass(frozen=True)
class FilterConfig:
    # on: chosen on the evaluation's validation split (research/evaluate.py, docs/eval.md), in both
    # embedded regimes; off writes every generated image (pool_factor is then unused)
    enabled: bool = True
    pool_factor: int = 3  # candidates generated per image kept
    near_copy_percentile: float = (
        5.0  # of the real images' within-class nearest-neighbour distances
    )
    max_per_class: int = 200  # real images per class decoded for the judge and the references
    judge_folds: int = 3  # cross-fitted judge models
    judge_steps: int = 300  # updates per judge model
    judge_seed: int = 0
    # a second judge: a CLIP model (a local folder, or a hub id already in the local Hugging Face
    # cache; never downloaded); "" is off, and the ranking is the self-judge's alone
    clip_judge: str = field(default="", metadata=hashed_unless(""))
    # Which candidates are kept, among those that are not near-copies:
    # "best": the highest judge scores. A judge trained on a class's few real images scores
    #   highest what looks most like them, so the kept images stay close to the sources.
    # "spread": among the candidates whose judge score is at least `min_score`, a greedy
    #   farthest-point set: each next one the farthest from every real image and from the ones
    #   kept so far (filled from the best-scored when too few pass). The kept images cover the
    #   pool's range of the class instead of its centre.
    # "uncertain": among the candidates whose judge score is at least `min_score`, the lowest
    #   scores first (filled from the best-scored when too few pass). The judge is a classifier
    #   trained on the user's own images, so what it is sure of, a classifier trained on them
    #   already gets right; the kept images are the class as the user's data barely covers it.
    #   `min_score` is then the floor that keeps the class (0.5: the class is the judge's likeliest
    #   or nearly so).
    keep: str = field(default="best", metadata=hashed_unless("best"))
    min_score: float = field(default=0.9, metadata=hashed_unless(0.9))  # spread, uncertain
    # Never write a candidate whose self-judge probability of its class is below this, whatever
    # the keep rule (0.5: the judge finds another class at least as likely). Without a floor (0,
    # the default), a pool with too few candidates of the class (a generic prompt, a long
    # perturbation) fills the quota with whatever it holds, other classes under this class's
    # label. With one, such a class gets fewer images than its quota, counted and said. Off by
    # default: the judge is a small CNN of the user's few images, and on data it classifies
    # poorly a floor drops good images too (check `judge_out_of_fold_accuracy` in run.json).
    floor: float = field(default=0.0, metadata=hashed_unless(0.0))
    resources: Resources = field(
        default_factory=lambda: Resources(num_cpus=0.25), metadata=NOT_HASHED
    )

    def validate(self, where: str) -> None:
        if self.pool_factor < 1 or self.judge_folds < 2 or self.judge_steps < 1:
            raise UserError(f"{where}: pool_factor >= 1, judge_folds >= 2 and judge_steps >= 1")
        if not 0 <= self.near_copy_percentile <= 100 or self.max_per_class < 2:
            raise UserError(f"{where}: near_copy_percentile in [0, 100], max_per_class >= 2")
        if self.keep not in KEEP_RULES:
            raise UserError(f"{where}.keep: {self.keep!r}; use one of {', '.join(KEEP_RULES)}")
        if not 0 <= self.min_score <= 1:
            raise UserError(f"{where}.min_score: {self.min_score} is not in [0, 1]")
        if not 0 <= self.floor <= 1:
            raise UserError(f"{where}.floor: {self.floor} is not in [0, 1]")

    @property
    def pool(self) -> int:
        """Candidates generated per image kept: pool_factor when enabled, else 1."""
        return self.pool_factor if self.enabled else 1


def real_images(
    listing: Listing, image_size: int, image_column: str, per_class: int
) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Up to `per_class` decoded real images of every class, in key order: (N, S, S, 3) uint8,
    class indices (N,), and the files skipped by reason."""
    by_class: dict[int, list] = {}
    for rec in sorted(listing.records, key=lambda r: r.key):
        by_class.setdefault(rec.class_index, []).append(rec)
    images, labels, skipped = [], [], Counter()
    for c in sorted(by_class):
        kept = 0
        for rec in by_class[c]:
            if kept == per_class:
                break
            try:
                images.append(decode_image(read_bytes(rec.origin, image_column), image_size))
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            except OSError:
                skipped["unreadable"] += 1
                continue
            labels.append(c)
            kept += 1
    return np.stack(images), np.asarray(labels, np.int64), skipped


def prepare(
    config: FilterConfig,
    listing: Listing,
    image_size: int,
    image_column: str,
    folder: Path,
    log=print,
    class_texts: dict[int, str] | None = None,
    clip_described: dict | None = None,
) -> dict:
    """Train the self-judge and collect the references, once per run, into `folder` (reused when
    there): judge.safetensors, references.npy and filter.json (what the filter stage reads).

    With `config.clip_judge` set, `class_texts` gives the text CLIP compares images with, per
    class index (the class's prompt), and filter.json describes the model:
    `clip_described` when the caller has loaded it already (`describe_clip_judge`, as the augment
    job does before any work), else the model is loaded here, in the driver, so that one that
    cannot be used stops the run before generation."""
    import torch
    from safetensors.torch import load_file, save_file

    from tailseed.pipeline.self_judge import (
        JudgeTraining,
        near_copy_threshold,
        train_self_judge,
        working_images,
    )

    summary_path = folder / "filter.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    # 1. the user's own real images, every class (capped per class)
    images, labels, skipped = real_images(listing, image_size, image_column, config.max_per_class)
    class_indices = sorted({int(c) for c in labels})
    position = {c: i for i, c in enumerate(class_indices)}
    targets = np.asarray([position[int(c)] for c in labels], np.int64)
    # 2. the CLIP judge, when on: which model, and one text per class of the self-judge
    clip = (
        _describe_clip(config, class_indices, class_texts, clip_described)
        if config.clip_judge
        else None
    )
    # 3. the cross-fitted judge, on one thread: the same images give the same judge
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training = JudgeTraining(config.judge_folds, config.judge_steps, seed=config.judge_seed)
        judge = train_self_judge(images, targets, len(class_indices), training)
    finally:
        torch.set_num_threads(threads)
    # 4. references and the near-copy threshold, at the judge's working resolution
    threshold = near_copy_threshold(images, labels, config.near_copy_percentile)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".judge.safetensors.tmp"
    save_file(judge.state(), str(tmp))
    load_file(str(tmp))  # written whole before it is renamed
    tmp.replace(folder / "judge.safetensors")
    buf = folder / ".references.npy.tmp"
    with open(buf, "wb") as fh:
        np.save(fh, working_images(images))
    buf.replace(folder / "references.npy")
    summary = {
        "judge": "judge.safetensors",  # beside this file
        "references": "references.npy",
        "class_indices": class_indices,
        "folds": config.judge_folds,
        "near_copy_threshold": threshold,
        "near_copy_percentile": config.near_copy_percentile,
        "real_images": int(len(labels)),
        "real_images_skipped": dict(skipped),
        "judge_out_of_fold_accuracy": round(judge.oof_accuracy, 4),
        "judge_out_of_fold_accuracy_per_class": {
            str(class_indices[k]): round(v, 4) for k, v in judge.oof_accuracy_per_class.items()
        },
    }
    if clip is not None:
        summary["clip_judge"] = clip
    atomic_write(summary_path, dumps(summary))
    log(
        f"filter: self-judge on {len(labels)} real images, out-of-fold accuracy "
        f"{judge.oof_accuracy:.1%}; near-copy threshold {threshold:.4f} (RMS, percentile "
        f"{config.near_copy_percentile:g})"
        + (f"; CLIP judge {config.clip_judge} (weights {clip['weights_hash']})" if clip else "")
    )
    return summary


def _describe_clip(
    config: FilterConfig,
    class_indices: list[int],
    class_texts: dict[int, str] | None,
    described: dict | None = None,
) -> dict:
    """filter.json's "clip_judge": the model (`described`, or pipeline.clip_judge's
    describe_clip_judge now) and the text of every class the self-judge knows, by class index."""
    from tailseed.pipeline.clip_judge import describe_clip_judge

    missing = [c for c in class_indices if c not in (class_texts or {})]
    if missing:
        raise ValueError(f"filter.clip_judge needs a text for every class; none for {missing}")
    if described is not None and described.get("model") != config.clip_judge:
        raise ValueError(
            f"the CLIP judge described is {described.get('model')!r}, the config's "
            f"{config.clip_judge!r}"
        )
    return {
        **(described or describe_clip_judge(config.clip_judge)),
        "texts": {str(c): class_texts[c] for c in class_indices},
    }


def ranked(
    rows: list[int], judge_score: np.ndarray, clip_score: np.ndarray | None, keys
) -> list[int]:
    """`rows` best first: by the self-judge's probability of the intended class, times the CLIP
    judge's when it is on (both probabilities, so the product is high only where both agree), then
    by key so that ties are broken the same way on every run."""
    score = judge_score if clip_score is None else judge_score * clip_score
    return sorted(rows, key=lambda i: (-float(score[i]), str(keys[i])))


def spread(
    rows: list[int], score: np.ndarray, nearest: np.ndarray, images: np.ndarray, min_score: float
) -> list[int]:
    """`rows` (ranked best first) in the order "spread" keeps them: first the candidates whose
    `score` is at least `min_score`, each next the one farthest from every real image (`nearest`,
    (N,) RMS) and from those already taken (RMS over `images`, (N, S, S, 3) float at the judge's
    working resolution); then the rest in their ranked order. Ties go to the better rank."""
    from tailseed.pipeline.self_judge import rms_distances

    passing = [i for i in rows if score[i] >= min_score]
    rest = [i for i in rows if score[i] < min_score]
    gap = nearest[passing].astype(np.float64)
    order: list[int] = []
    while len(order) < len(passing):
        j = int(np.argmax(gap))  # the first of equal gaps: the better-ranked
        order.append(passing[j])
        to_new = rms_distances(images[passing], images[passing[j] : passing[j] + 1])
        gap = np.minimum(gap, to_new)  # taken ones stay at -inf
        gap[j] = -np.inf
    return order + rest


def uncertain(rows: list[int], score: np.ndarray, min_score: float) -> list[int]:
    """`rows` (ranked best first) in the order "uncertain" keeps them: first the candidates whose
    `score` is at least `min_score`, lowest score first; then the rest in their ranked order.
    Equal scores keep their ranked order (by key)."""
    passing = [i for i in rows if score[i] >= min_score]
    rest = [i for i in rows if score[i] < min_score]
    return sorted(passing, key=lambda i: float(score[i])) + rest


class FilterStage:
    """Scores a shard's candidates and keeps the best per class (schema in the module docstring)."""

    name = "filter"

    def __init__(
        self,
        judge: str,
        references: str,
        class_indices: list[int],
        folds: int,
        near_copy_threshold: float,
        pool_factor: int,
        clip_judge: str = "",
        clip_revision: str | None = None,
        clip_texts: list[str] | None = None,
        keep: str = "best",
        min_score: float = 0.9,
        floor: float = 0.0,
    ):
        """`clip_judge` (a folder or a cached hub id at `clip_revision`; "" is off) with
        `clip_texts`, one per class in the order of `class_indices`; `keep`, `min_score` and
        `floor` as in FilterConfig."""
        from safetensors.torch import load_file

        from tailseed.pipeline.self_judge import SelfJudge

        self.position = {int(c): i for i, c in enumerate(class_indices)}
        self.judge = SelfJudge.from_state(load_file(judge), len(class_indices), folds)
        self.references = np.load(references)
        self.threshold = float(near_copy_threshold)
        self.pool_factor = int(pool_factor)
        self.keep, self.min_score, self.floor = keep, float(min_score), float(floor)
        self.clip = None
        if clip_judge:
            from tailseed.pipeline.clip_judge import ClipJudge

            self.clip = ClipJudge.load(clip_judge, list(clip_texts or []), clip_revision)

    @staticmethod
    def spec(config, shards_dir: Path) -> Stage | None:
        """The runner's stage for an AugmentConfig, or None when the filter is off. The judge and
        references must have been prepared into the output folder's filter/ (see `prepare`)."""
        if not config.filter.enabled:
            return None
        folder = (shards_dir.parent / "filter").resolve()
        summary = json.loads((folder / "filter.json").read_text())
        kwargs = {
            "judge": str(folder / summary["judge"]),
            "references": str(folder / summary["references"]),
            "class_indices": summary["class_indices"],
            "folds": summary["folds"],
            "near_copy_threshold": summary["near_copy_threshold"],
            "pool_factor": config.filter.pool_factor,
            "keep": config.filter.keep,
            "min_score": config.filter.min_score,
            "floor": config.filter.floor,
        }
        clip = summary.get("clip_judge")
        if clip is not None:
            # a hub id at the revision the driver described (each node reads its own cache),
            # a local folder by its absolute path
            kwargs["clip_judge"] = clip["model"] if clip["revision"] else clip["folder"]
            kwargs["clip_revision"] = clip["revision"]
            kwargs["clip_texts"] = [clip["texts"][str(c)] for c in summary["class_indices"]]
        return Stage(FilterStage.name, FilterStage, kwargs, config.filter.resources)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tailseed.pipeline.self_judge import rms_distances, working_images

        n = len(batch["key"])
        ok = np.asarray(batch["ok"], bool).copy()
        reason = np.asarray(batch.get("skip_reason", np.full(n, "")), dtype=object).copy()
        # 1. score every candidate: the judge's probability of its class (and CLIP's, when on),
        # the nearest real image
        classes = np.asarray([self.position[int(c)] for c in batch["cls"]])
        score = self.judge.score(batch["image"], classes)
        clip = None if self.clip is None else self.clip.score(batch["image"], classes)
        working = working_images(batch["image"])
        nearest = rms_distances(working, self.references)
        # 2. per class: drop near-copies and candidates below the floor, then keep the first up
        # to the class's slots, in the order of the keep rule
        meta = list(batch["meta"])
        for c in np.unique(batch["cls"]):
            rows = np.flatnonzero(batch["cls"] == c)
            slots = int(batch["slots"][rows[0]])
            for i in rows:
                if ok[i] and nearest[i] < self.threshold:
                    ok[i], reason[i] = False, "near_copy"
                elif ok[i] and score[i] < self.floor:
                    ok[i], reason[i] = False, "below_floor"
            order = ranked([i for i in rows if ok[i]], score, clip, batch["key"])
            judged = score if clip is None else score * clip
            if self.keep == "spread":
                order = spread(order, judged, nearest, working, self.min_score)
            elif self.keep == "uncertain":
                order = uncertain(order, judged, self.min_score)
            for rank, i in enumerate(order):
                if rank >= slots:
                    ok[i], reason[i] = False, "not_kept"
                    continue
                sample = json.loads(str(meta[i]))
                sample["filter"] = {
                    "judge_score": round(float(score[i]), 6),
                    "nearest_real_distance": round(float(nearest[i]), 6),
                    "near_copy_threshold": round(self.threshold, 6),
                    "rank": rank,
                    "candidates": int(len(rows)),
                    "pool_factor": self.pool_factor,
                }
                if clip is not None:
                    sample["filter"]["clip_score"] = round(float(clip[i]), 6)
                if self.floor > 0:
                    sample["filter"]["floor"] = self.floor
                if self.keep != "best":  # "rank" is then the order of the keep rule
                    sample["filter"]["keep"] = self.keep
                    sample["filter"]["min_score"] = self.min_score
                meta[i] = json.dumps(sample, sort_keys=True, ensure_ascii=False)
        return {
            **batch,
            "ok": ok,
            "skip_reason": np.asarray([str(r) for r in reason]),
            "meta": np.asarray(meta),
        }
