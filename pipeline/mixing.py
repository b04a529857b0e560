"""Training on real and generated samples together: read a run's shards, draw mixed batches.

A tailseed run writes its images as WebDataset shards (`out/<name>/shards/NNNNN.tar`; a sample is
`<key>.png`, `<key>.cls`, `<key>.json`). This module is what a training loop uses beside the
user's real data:

- `read_generated(shards_dir)` reads every sample of the done shards with `tarfile`, decoding only
  the PNG, the class index and the provenance JSON (never a pickle or `torch.load`). A sample with
  a bad or missing member is skipped and counted by reason; members of other kinds are ignored
  and counted. The JSON travels with each image, so a user can re-threshold on the scores it
  carries (`GeneratedSet.where`, `GeneratedSet.values`) without regenerating.
- `MixingSampler` draws batches of indices in which a fraction `ratio` is generated (exactly
  `round(ratio * batch_size * (t + 1)) - round(ratio * batch_size * t)` samples in batch `t`, so
  every batch is within one sample of the ratio and the running share is exact), each generated
  sample with loss weight `weight` (real samples: 1.0). Real and generated samples are each drawn
  epoch by epoch from their own shuffled order (every sample once before any repeats). All
  randomness comes from one `numpy.random.Generator` (or an integer seed): the same seed gives the
  same batches.
- `mixed_batches(...)` yields the arrays themselves (images, labels, weights, generated flags);
  `torch_dataset(...)` wraps it as a `torch.utils.data.IterableDataset` (torch is imported only
  there).

A weighted loss that keeps the learning rate's meaning is `(weight * loss).sum() / weight.sum()`:
with ratio r and weight w, generated samples then carry r w / (r w + 1 - r) of each batch's
gradient.

    from tailseed.pipeline.mixing import read_generated, torch_dataset
    gen = read_generated("out/default/shards")
    ds = torch_dataset(real_images, real_labels, gen.images, gen.labels,
                       batch_size=32, ratio=0.25, weight=0.5, seed=0, steps=1000)
    for batch in torch.utils.data.DataLoader(ds, batch_size=None):
        logits = model(batch["image"].permute(0, 3, 1, 2).float() / 255)
        loss = F.cross_entropy(logits, batch["label"], reduction="none")
        loss = (batch["weight"] * loss).sum() / batch["weight"].sum()

Labels: `.cls` is the run's class index, the same index as the user's dataset (`classes.json` in
the run folder maps it to the class name; `GeneratedSet.class_names` holds that map when present).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tailseed.pipeline.images import SkipSample, decode_image
from tailseed.pipeline.shards import stats_name

DECODED = ("png", "cls", "json")  # the only members ever decoded
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # a larger member is skipped unread


# ------------------------------------------------------------------------------------------------
# Reading generated samples


@dataclass
class GeneratedSet:
    """Generated samples read from shards, in shard order and then member order.

    images: (N, H, W, 3) uint8. labels: (N,) int64, the `.cls` class index. meta: the N provenance
    dicts (each sample's JSON). keys, shards: each sample's key and the shard file it came from.
    skipped: samples left out, by reason. ignored: members never decoded, by extension.
    class_names: index -> name from the run's classes.json (empty when there is none).
    """

    keys: list[str]
    images: np.ndarray
    labels: np.ndarray
    meta: list[dict]
    shards: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    class_names: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, keep) -> GeneratedSet:
        """The samples selected by a boolean mask or an index array (counts are kept as they were)."""
        idx = np.asarray(keep)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return GeneratedSet(
            keys=[self.keys[i] for i in idx],
            images=self.images[idx],
            labels=self.labels[idx],
            meta=[self.meta[i] for i in idx],
            shards=[self.shards[i] for i in idx],
            skipped=dict(self.skipped),
            ignored=dict(self.ignored),
            class_names=dict(self.class_names),
        )

    def where(self, predicate: Callable[[dict], bool]) -> GeneratedSet:
        """The samples whose JSON satisfies `predicate`, e.g. re-thresholding a stored score:
        `gen.where(lambda m: m["filter"]["judge_prob"] >= 0.9)`."""
        return self.subset(np.asarray([bool(predicate(m)) for m in self.meta], dtype=bool))

    def values(self, path: str, default: float = math.nan) -> np.ndarray:
        """(N,) float64 of a number in each sample's JSON at a dotted path ("filter.judge_prob");
        `default` where a sample lacks it."""
        out = np.full(len(self), default, dtype=np.float64)
        for i, meta in enumerate(self.meta):
            value: Any = meta
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[i] = float(value)
        return out

    def of_classes(self, labels) -> GeneratedSet:
        """The samples whose label is among `labels`."""
        return self.subset(np.isin(self.labels, np.asarray(list(labels))))


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's grouping: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


def _decode_sample(
    members: dict[str, bytes], image_size: int | None
) -> tuple[np.ndarray, int, dict]:
    """One sample's members -> (image, class index, provenance); raises SkipSample with a reason."""
    for ext in DECODED:
        if ext not in members:
            raise SkipSample(f"missing_{ext}")
    data = members["png"]
    if not data.startswith(b"\x89PNG"):
        raise SkipSample("png_not_a_png")
    size = image_size
    if size is None:
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on garbage
            raise SkipSample("png_corrupt_image", str(exc)) from exc
        if width != height:
            raise SkipSample("png_not_square", f"{width}x{height}")
        size = width
    try:
        image = decode_image(data, size)
    except SkipSample as exc:
        raise SkipSample(f"png_{exc.reason}", exc.detail) from exc
    try:
        text = members["cls"].decode("ascii").strip()
        cls = int(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SkipSample("bad_cls", repr(members["cls"][:20])) from exc
    if cls < 0 or not text.lstrip("+").isdigit():
        raise SkipSample("bad_cls", text)
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SkipSample("bad_json", str(exc)) from exc
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", "not a JSON object")
    return image, cls, meta


def _read_tar(path: Path, skipped: Counter, ignored: Counter) -> list[tuple[str, dict[str, bytes]]]:
    """A tar's samples as (key, {ext: bytes}) in member order; only DECODED members are read."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, ext = _split_name(member.name)
                if not member.isfile():
                    ignored["not_a_file"] += 1
                    continue
                if ext not in DECODED:
                    ignored[ext or "no_extension"] += 1
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                if ext in samples[key]:
                    samples[key]["__duplicate__"] = b""
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    samples[key]["__too_large__"] = b""
                    continue
                handle = tar.extractfile(member)
                samples[key][ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError):
        skipped["unreadable_shard"] += 1
        return []
    return [(key, samples[key]) for key in order]


def read_generated(
    shards_dir: str | Path, image_size: int | None = None, require_done: bool = True
) -> GeneratedSet:
    """Every good sample of the shards `shards_dir/*.tar` (sorted by name), with its JSON.

    require_done: read only shards whose `NNNNN_stats.json` done-marker exists (a shard being
    written by a running job is left out and counted as `shard_not_done`).
    image_size: decode every image to this square size (default: the PNGs' own size, which must be
    square and equal for all samples; a sample of another size is skipped as `wrong_size`).
    Skipped samples are counted in `skipped` by reason (`missing_png`, `png_corrupt_image`,
    `bad_cls`, `bad_json`, `duplicate_key`, ...); a shard that tarfile cannot read counts as
    `unreadable_shard`. Raises FileNotFoundError when the folder does not exist.
    """
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise FileNotFoundError(f"{shards_dir}: no such shards folder")
    skipped: Counter = Counter()
    ignored: Counter = Counter()
    keys, images, labels, metas, shards = [], [], [], [], []
    seen: set[str] = set()
    size = image_size
    for path in sorted(shards_dir.glob("*.tar")):
        if require_done and not (shards_dir / stats_name_of(path)).is_file():
            skipped["shard_not_done"] += 1
            continue
        for key, members in _read_tar(path, skipped, ignored):
            if "__duplicate__" in members:
                skipped["duplicate_member"] += 1
                continue
            if "__too_large__" in members:
                skipped["member_too_large"] += 1
                continue
            if key in seen:
                skipped["duplicate_key"] += 1
                continue
            try:
                image, cls, meta = _decode_sample(members, image_size)
            except SkipSample as exc:
                skipped[exc.reason] += 1
                continue
            if size is None:
                size = image.shape[0]
            if image.shape[:2] != (size, size):
                skipped["wrong_size"] += 1
                continue
            seen.add(key)
            keys.append(key)
            images.append(image)
            labels.append(cls)
            metas.append(meta)
            shards.append(path.name)
    classes_path = shards_dir.parent / "classes.json"
    class_names: dict[int, str] = {}
    if classes_path.is_file():
        try:
            class_names = {int(k): str(v) for k, v in json.loads(classes_path.read_text()).items()}
        except (ValueError, AttributeError):
            class_names = {}
    shape = (0, size or 0, size or 0, 3)
    return GeneratedSet(
        keys=keys,
        images=np.stack(images) if images else np.zeros(shape, np.uint8),
        labels=np.asarray(labels, dtype=np.int64),
        meta=metas,
        shards=shards,
        skipped=dict(sorted(skipped.items())),
        ignored=dict(sorted(ignored.items())),
        class_names=class_names,
    )


def stats_name_of(shard: Path) -> str:
    """The done-marker's file name of a shard file (`00003.tar` -> `00003_stats.json`)."""
    stem = shard.name[: -len(".tar")]
    return stats_name(int(stem)) if stem.isdigit() else f"{stem}_stats.json"


# ------------------------------------------------------------------------------------------------
# Mixed batches


@dataclass(frozen=True)
class MixedBatch:
    """One batch of indices. generated[i] says which pool index[i] points into (False: the real
    samples, True: the generated ones); weight[i] is its loss weight (float32)."""

    index: np.ndarray  # (B,) int64
    generated: np.ndarray  # (B,) bool
    weight: np.ndarray  # (B,) float32


class _EpochStream:
    """Indices 0..n-1 in a fresh shuffled order each epoch: every index once before any repeats."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.order = np.zeros(0, dtype=np.int64)

    def take(self, count: int) -> np.ndarray:
        while len(self.order) < count:
            self.order = np.concatenate([self.order, self.rng.permutation(self.n)])
        out, self.order = self.order[:count], self.order[count:]
        return out


class MixingSampler:
    """Batches of `batch_size` indices with a fraction `ratio` of generated samples.

    num_real, num_generated: pool sizes. ratio in [0, 1]: generated share of every batch (batch t
    holds round(ratio * batch_size * (t + 1)) - round(ratio * batch_size * t) generated samples).
    weight: loss weight of every generated sample, or a (num_generated,) array of per-sample
    weights (from stored scores, say); real samples weigh 1.0. rng: a numpy Generator or an
    integer seed; the same seed gives the same batches. steps: batches per iteration (None: no
    end). Each `iter()` starts again from the seed, so two iterations give the same batches.
    """

    def __init__(
        self,
        num_real: int,
        num_generated: int,
        batch_size: int,
        ratio: float,
        weight: float | np.ndarray = 1.0,
        rng: np.random.Generator | int = 0,
        steps: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], not {ratio}")
        if ratio > 0 and num_generated < 1:
            raise ValueError(f"ratio {ratio} needs generated samples, and there are none")
        if ratio < 1 and num_real < 1:
            raise ValueError(f"ratio {ratio} needs real samples, and there are none")
        weights = np.asarray(weight, dtype=np.float32)
        if weights.ndim == 0:
            weights = np.full(num_generated, float(weights), dtype=np.float32)
        if weights.shape != (num_generated,):
            raise ValueError(
                f"weight: one per generated sample ({num_generated}), got {weights.shape}"
            )
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weight: generated weights must be finite and non-negative")
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be non-negative, not {steps}")
        self.num_real, self.num_generated = int(num_real), int(num_generated)
        self.batch_size, self.ratio, self.steps = int(batch_size), float(ratio), steps
        self.generated_weights = weights
        if isinstance(rng, np.random.Generator):
            # keep the generator's state at construction, so that every iteration replays it
            self._state = rng.bit_generator.state
            self._bit_generator = type(rng.bit_generator)
        else:
            self._state = np.random.PCG64(int(rng)).state
            self._bit_generator = np.random.PCG64

    def generated_count(self, t: int) -> int:
        """How many generated samples batch `t` holds."""
        share = self.ratio * self.batch_size
        return int(math.floor(share * (t + 1) + 0.5) - math.floor(share * t + 0.5))

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless sampler (steps=None) has no length")
        return self.steps

    def __iter__(self) -> Iterator[MixedBatch]:
        bit_generator = self._bit_generator()
        bit_generator.state = self._state
        rng = np.random.Generator(bit_generator)
        real = _EpochStream(self.num_real, rng)
        gen = _EpochStream(self.num_generated, rng)
        t = 0
        while self.steps is None or t < self.steps:
            n_gen = self.generated_count(t)
            n_real = self.batch_size - n_gen
            index = np.concatenate([real.take(n_real), gen.take(n_gen)]).astype(np.int64)
            generated = np.concatenate([np.zeros(n_real, bool), np.ones(n_gen, bool)])
            weight = np.ones(self.batch_size, dtype=np.float32)
            weight[n_real:] = self.generated_weights[index[n_real:]]
            order = rng.permutation(self.batch_size)  # generated samples anywhere in the batch
            yield MixedBatch(index[order], generated[order], weight[order])
            t += 1


def mixed_batches(
    real_images: np.ndarray,
    real_labels: np.ndarray,
    generated_images: np.ndarray,
    generated_labels: np.ndarray,
    batch_size: int,
    ratio: float,
    weight: float | np.ndarray = 1.0,
    rng: np.random.Generator | int = 0,
    steps: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The batches of a MixingSampler as arrays: {"image", "label", "weight", "generated"}."""
    if len(real_images) != len(real_labels) or len(generated_images) != len(generated_labels):
        raise ValueError("images and labels differ in length")
    sampler = MixingSampler(
        len(real_labels), len(generated_labels), batch_size, ratio, weight, rng, steps
    )
    for batch in sampler:
        yield take(batch, real_images, real_labels, generated_images, generated_labels)


def take(
    batch: MixedBatch,
    real_images: np.ndarray,
    real_labels: np.ndarray,
    generated_images: np.ndarray,
    generated_labels: np.ndarray,
) -> dict[str, np.ndarray]:
    """The arrays of one MixedBatch: image (B, ...), label (B,) int64, weight (B,), generated (B,)."""
    real, gen = ~batch.generated, batch.generated
    shape = real_images.shape[1:] if len(real_images) else generated_images.shape[1:]
    dtype = real_images.dtype if len(real_images) else generated_images.dtype
    images = np.empty((len(batch.index), *shape), dtype=dtype)
    labels = np.empty(len(batch.index), dtype=np.int64)
    images[real] = real_images[batch.index[real]]
    labels[real] = real_labels[batch.index[real]]
    images[gen] = generated_images[batch.index[gen]]
    labels[gen] = generated_labels[batch.index[gen]]
    return {"image": images, "label": labels, "weight": batch.weight, "generated": batch.generated}


# ------------------------------------------------------------------------------------------------
# The torch wrapper (torch is imported here only)

_TORCH_CLASS = None


def torch_dataset(
    real_images: np.ndarray,
    real_labels: np.ndarray,
    generated_images: np.ndarray,
    generated_labels: np.ndarray,
    batch_size: int,
    ratio: float,
    weight: float | np.ndarray = 1.0,
    seed: int = 0,
    steps: int | None = None,
):
    """A `torch.utils.data.IterableDataset` of whole mixed batches (use `DataLoader(ds,
    batch_size=None)`): dicts of tensors image (B, H, W, 3) uint8, label (B,) int64, weight (B,)
    float32, generated (B,) bool. Iterating again replays the same batches. With several
    DataLoader workers, worker k yields batches k, k + n, ...: the same batches in all."""
    global _TORCH_CLASS
    if _TORCH_CLASS is None:
        import torch
        from torch.utils.data import IterableDataset, get_worker_info

        class MixedIterableDataset(IterableDataset):
            """Mixed real and generated batches, as tensors (see `pipeline.mixing.torch_dataset`)."""

            def __init__(self, arrays: tuple, sampler: MixingSampler):
                super().__init__()
                self.arrays, self.sampler = arrays, sampler

            def __len__(self) -> int:
                return len(self.sampler)

            def __iter__(self):
                info = get_worker_info()
                worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
                for t, batch in enumerate(self.sampler):
                    if t % workers != worker:
                        continue
                    arrays = take(batch, *self.arrays)
                    yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

        _TORCH_CLASS = MixedIterableDataset
    if len(real_images) != len(real_labels) or len(generated_images) != len(generated_labels):
        raise ValueError("images and labels differ in length")
    sampler = MixingSampler(
        len(real_labels), len(generated_labels), batch_size, ratio, weight, seed, steps
    )
    arrays = (real_images, real_labels, generated_images, generated_labels)
    return _TORCH_CLASS(arrays, sampler)
