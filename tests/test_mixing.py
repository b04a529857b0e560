"""The mixing loader: generated samples read from real shards, and batches at a ratio and weight."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest

from tailseed.pipeline.images import encode_png
from tailseed.pipeline.mixing import (
    MixingSampler,
    mixed_batches,
    read_generated,
    torch_dataset,
)
from tailseed.pipeline.shards import write_index, write_shard


def sample(key: str, cls: int, value: int, meta: dict | None = None) -> dict:
    image = np.full((8, 8, 3), value, dtype=np.uint8)
    return {
        "__key__": key,
        "png": encode_png(image),
        "cls": str(cls).encode(),
        "json": json.dumps(meta if meta is not None else {"value": value}).encode(),
    }


def write_run(root, per_shard: int = 5, shards: int = 2) -> list[dict]:
    """A run folder with `shards` done shards of the project's writer and its classes.json."""
    written = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            n = s * per_shard + i
            samples.append(
                sample(f"c{n % 2:04d}_w{n:05d}_ab", n % 2, n, {"filter": {"judge_prob": n / 10}})
            )
        write_shard(root / "shards", s, samples, {"samples": per_shard})
        written += samples
    write_index(root / "shards", shards)
    (root / "classes.json").write_text(json.dumps({"0": "four", "1": "seven"}))
    return written


def add_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


# ------------------------------------------------------------------------------------------------
# Reading


def test_reads_every_sample_the_writer_wrote_with_its_json(tmp_path):
    written = write_run(tmp_path)
    gen = read_generated(tmp_path / "shards")
    assert len(gen) == 10 and gen.images.shape == (10, 8, 8, 3) and gen.images.dtype == np.uint8
    assert gen.keys == [s["__key__"] for s in written]
    assert gen.labels.tolist() == [n % 2 for n in range(10)]
    assert [int(img[0, 0, 0]) for img in gen.images] == list(range(10))
    assert gen.shards[:5] == ["00000.tar"] * 5 and gen.shards[5:] == ["00001.tar"] * 5
    assert gen.class_names == {0: "four", 1: "seven"}
    assert gen.skipped == {} and gen.ignored == {}
    # stored scores re-threshold without regenerating
    np.testing.assert_allclose(gen.values("filter.judge_prob"), np.arange(10) / 10)
    kept = gen.where(lambda m: m["filter"]["judge_prob"] >= 0.5)
    assert kept.keys == gen.keys[5:] and len(kept.images) == 5
    assert np.isnan(gen.values("filter.missing")).all()
    assert gen.of_classes([1]).labels.tolist() == [1] * 5


def test_bad_members_are_skipped_and_counted_and_pickles_never_opened(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("a pickle member was unpickled",))

    write_run(tmp_path, per_shard=2, shards=1)
    good = sample("good", 3, 7)
    bad_json = sample("badjson", 1, 1)
    bad_json["json"] = b"{not json"
    bad_cls = sample("badcls", 1, 1)
    bad_cls["cls"] = b"four"
    neg_cls = sample("negcls", 1, 1)
    neg_cls["cls"] = b"-1"
    bad_png = sample("badpng", 1, 1)
    bad_png["png"] = b"\x89PNG\r\n\x1a\nthen garbage"
    no_png = sample("nopng", 1, 1)
    del no_png["png"]
    other_size = sample("big", 1, 1)
    other_size["png"] = encode_png(np.zeros((16, 16, 3), np.uint8))
    samples = [good, bad_json, bad_cls, neg_cls, bad_png, no_png, other_size]
    members = [
        (f"{s['__key__']}.{ext}", s[ext])
        for s in samples
        for ext in ("png", "cls", "json")
        if ext in s
    ]
    members += [("good.pyd", pickle.dumps(Boom())), ("good.pth", b"\x80\x04junk")]
    add_tar(tmp_path / "shards" / "00001.tar", members)
    (tmp_path / "shards" / "00001_stats.json").write_text("{}")
    # a shard being written (no done-marker yet) and one that is not a tar at all
    add_tar(tmp_path / "shards" / "00002.tar", [("late.png", good["png"])])
    (tmp_path / "shards" / "00003.tar").write_bytes(b"not a tar")
    (tmp_path / "shards" / "00003_stats.json").write_text("{}")

    gen = read_generated(tmp_path / "shards")
    assert gen.keys == ["c0000_w00000_ab", "c0001_w00001_ab", "good"]
    assert gen.labels.tolist() == [0, 1, 3]
    assert gen.skipped == {
        "bad_cls": 2,
        "bad_json": 1,
        "missing_png": 1,
        "png_corrupt_image": 1,
        "shard_not_done": 1,
        "unreadable_shard": 1,
        "wrong_size": 1,
    }
    assert gen.ignored == {"pth": 1, "pyd": 1}
    # without the done-marker rule the late shard is read (and its sample lacks cls and json)
    assert read_generated(tmp_path / "shards", require_done=False).skipped["missing_cls"] == 1


def test_duplicate_keys_are_counted_once_kept(tmp_path):
    write_shard(tmp_path, 0, [sample("a", 0, 1), sample("b", 0, 2)], {"samples": 2})
    write_shard(tmp_path, 1, [sample("a", 1, 3)], {"samples": 1})
    gen = read_generated(tmp_path)
    assert gen.keys == ["a", "b"] and gen.skipped == {"duplicate_key": 1}


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_generated(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_each_batch_holds_the_ratio_and_the_running_share_is_exact(ratio):
    sampler = MixingSampler(50, 20, batch_size=10, ratio=ratio, weight=0.5, rng=3, steps=40)
    counts = [int(b.generated.sum()) for b in sampler]
    assert len(counts) == 40
    assert all(abs(c - ratio * 10) < 1 for c in counts)
    assert sum(counts) == round(ratio * 10 * 40)


def test_weights_are_one_for_real_and_weight_for_generated():
    for batch in MixingSampler(30, 12, batch_size=8, ratio=0.25, weight=0.5, rng=0, steps=10):
        assert batch.weight.dtype == np.float32
        assert (batch.weight[~batch.generated] == 1.0).all()
        assert (batch.weight[batch.generated] == 0.5).all()
    per_sample = np.linspace(0.1, 1.2, 12).astype(np.float32)
    for batch in MixingSampler(30, 12, 8, 0.5, weight=per_sample, rng=0, steps=10):
        np.testing.assert_array_equal(
            batch.weight[batch.generated], per_sample[batch.index[batch.generated]]
        )


def test_every_sample_once_per_epoch_in_each_pool():
    sampler = MixingSampler(12, 6, batch_size=6, ratio=0.5, rng=1, steps=4)
    batches = list(sampler)
    real = np.concatenate([b.index[~b.generated] for b in batches])
    gen = np.concatenate([b.index[b.generated] for b in batches])
    assert sorted(real.tolist()) == list(range(12))  # 4 batches x 3 real = one epoch of 12
    assert sorted(gen[:6].tolist()) == list(range(6)) and sorted(gen[6:].tolist()) == list(range(6))


def test_same_seed_same_batches_other_seed_other_batches():
    def order(rng):
        return [
            b.index.tolist() + b.generated.tolist()
            for b in MixingSampler(40, 10, 8, 0.25, 0.5, rng, 20)
        ]

    assert order(7) == order(7)
    assert order(7) != order(8)
    assert order(np.random.default_rng(5)) == order(np.random.default_rng(5))
    sampler = MixingSampler(40, 10, 8, 0.25, 0.5, np.random.default_rng(5), 20)
    assert [b.index.tolist() for b in sampler] == [b.index.tolist() for b in sampler]  # replays


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ratio"):
        MixingSampler(10, 10, 8, 1.5)
    with pytest.raises(ValueError, match="generated"):
        MixingSampler(10, 0, 8, 0.25)
    with pytest.raises(ValueError, match="real"):
        MixingSampler(0, 10, 8, 0.5)
    with pytest.raises(ValueError, match="weight"):
        MixingSampler(10, 10, 8, 0.5, weight=np.ones(3))
    assert len(list(MixingSampler(10, 0, 4, 0.0, steps=3))) == 3  # real only needs no generated


def test_arrays_come_from_the_right_pool(tmp_path):
    write_run(tmp_path)
    gen = read_generated(tmp_path / "shards")
    real_x = np.full((20, 8, 8, 3), 200, np.uint8)
    real_y = np.full(20, 9)
    for batch in mixed_batches(real_x, real_y, gen.images, gen.labels, 8, 0.25, 0.5, 0, steps=5):
        assert batch["image"].shape == (8, 8, 8, 3)
        is_gen = batch["generated"]
        assert (batch["label"][~is_gen] == 9).all() and (batch["image"][~is_gen] == 200).all()
        values = batch["image"][is_gen][:, 0, 0, 0]
        assert (batch["label"][is_gen] == values % 2).all()  # the labels of those very images


def test_torch_wrapper_yields_the_same_batches_as_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    write_run(tmp_path)
    gen = read_generated(tmp_path / "shards")
    real_x = np.zeros((20, 8, 8, 3), np.uint8)
    real_y = np.arange(20) % 10
    ds = torch_dataset(real_x, real_y, gen.images, gen.labels, 8, 0.25, 0.5, seed=4, steps=6)
    assert isinstance(ds, torch.utils.data.IterableDataset) and len(ds) == 6
    loaded = list(torch.utils.data.DataLoader(ds, batch_size=None))
    plain = list(mixed_batches(real_x, real_y, gen.images, gen.labels, 8, 0.25, 0.5, 4, steps=6))
    assert len(loaded) == 6
    for a, b in zip(loaded, plain):
        assert a["image"].dtype == torch.uint8 and a["weight"].dtype == torch.float32
        for k in b:
            assert np.array_equal(a[k].numpy(), b[k])


def test_the_module_imports_no_torch_and_no_research():
    import subprocess
    import sys

    code = (
        "import sys, pipeline.mixing; "
        "sys.exit(('torch' in sys.modules) or any(m.startswith('research') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
