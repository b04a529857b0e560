"""Listing and decoding a user's dataset: every kind of bad input is an error or a counted skip."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tailseed.pipeline.datasets import list_dataset, read_bytes
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.images import SkipSample, decode_image
from tailseed.stages.scan import ScanConfig, scan
from tailseed.stages.select import SelectConfig, select


def png_bytes(mode: str = "RGB", size=(20, 20), value=128, fmt="PNG") -> bytes:
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], value * 257, dtype=np.uint16))
    else:
        img = Image.new(mode, size, value if mode in ("L", "I;16") else (value,) * len(mode))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG"), ("P", "PNG")],
)
def test_modes_are_converted_to_rgb(mode, fmt):
    image = decode_image(png_bytes(mode, fmt=fmt), size=16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


def test_16_bit_is_rescaled_not_clipped():
    image = decode_image(png_bytes("I;16", value=128), size=16)
    assert 120 <= image.mean() <= 136  # 128*257 in 16 bits is mid-grey, not saturated white


def test_sizes_far_from_the_model_are_cropped_and_resized():
    assert decode_image(png_bytes(size=(400, 100)), size=16).shape == (16, 16, 3)
    assert decode_image(png_bytes(size=(9, 12)), size=32).shape == (32, 32, 3)
    with pytest.raises(SkipSample) as info:
        decode_image(png_bytes(size=(3, 3)), size=32)
    assert info.value.reason == "too_small"


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"", "empty_file"),
        (b"hello, not an image", "not_an_image"),
        (png_bytes()[:40], "corrupt_image"),
    ],
)
def test_bad_bytes_are_skipped_with_a_reason(payload, reason):
    with pytest.raises(SkipSample) as info:
        decode_image(payload, size=16)
    assert info.value.reason == reason


def test_decompression_bomb_is_skipped(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(SkipSample) as info:
        decode_image(png_bytes(size=(20, 20)), size=16)
    assert info.value.reason == "too_large"


@pytest.fixture
def messy_folder(tmp_path):
    """An ImageFolder with good images, every kind of bad file, and awkward class names."""
    root = tmp_path / "data"
    good = {"cat": 30, "dog  spotted": 3, "ünï.code": 2}
    for name, n in good.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"img.{i:02d}.png").write_bytes(png_bytes(value=10 * i % 250))
    rare = root / "dog  spotted"
    (rare / "zero.png").write_bytes(b"")
    (rare / "broken.png").write_bytes(png_bytes()[:50])
    (rare / "notes.txt").write_text("not an image")
    (rare / "grey.png").write_bytes(png_bytes("L"))
    (rare / "cmyk.jpg").write_bytes(png_bytes("CMYK", fmt="JPEG"))
    (root / "empty class").mkdir()
    return root


def test_imagefolder_listing_counts_and_skips(messy_folder):
    listing = scan(ScanConfig(path=str(messy_folder)))
    assert listing.classes == {0: "cat", 1: "dog  spotted", 2: "empty class", 3: "ünï.code"}
    assert listing.counts() == {0: 30, 1: 7, 2: 0, 3: 2}  # listed by extension, decoded later
    assert listing.skipped["not_an_image"] == 1
    keys = [r.key for r in listing.records]
    assert len(set(keys)) == len(keys)
    assert all(len(k) <= 100 and "." not in k and "/" not in k for k in keys)


def test_select_skips_bad_sources_and_reports_empty_classes(messy_folder):
    listing = scan(ScanConfig(path=str(messy_folder)))
    plans, left_out = select(
        listing, SelectConfig(rare_below=20, quota=10, max_sources=10), image_size=16
    )
    by_name = {p.class_name: p for p in plans}
    spotted = by_name["dog  spotted"]
    assert spotted.skipped == {"empty_file": 1, "corrupt_image": 1}
    assert len(spotted.source_keys) == 5  # 3 good + grey + cmyk
    assert spotted.source_images.shape == (5, 16, 16, 3)
    assert spotted.to_generate == 3 and spotted.prompt == "a photo of a dog  spotted"
    assert "empty class" in left_out and "0 usable" in left_out["empty class"]
    assert by_name["ünï.code"].to_generate == 8
    assert "cat" not in by_name


def test_explicit_class_errors_name_the_class(messy_folder):
    listing = scan(ScanConfig(path=str(messy_folder)))
    with pytest.raises(UserError, match="'horse' is not a class"):
        select(listing, SelectConfig(classes=["horse"]), image_size=16)
    with pytest.raises(UserError, match="'empty class' has 0 usable"):
        select(listing, SelectConfig(classes=["empty class"]), image_size=16)


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        scan(ScanConfig(path=str(tmp_path / "nowhere")))


def test_tar_dataset_never_unpickles(tmp_path):
    """A tar with pickle and torch members: they are counted and ignored, never decoded."""
    sentinel = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    members = {
        "a.png": png_bytes(),
        "a.cls": b"3",
        "b.png": png_bytes(),
        "b.json": json.dumps({"label": 3}).encode(),
        "c.png": png_bytes(),
        "c.pyd": pickle.dumps(Boom()),
        "c.pth": pickle.dumps(Boom()),
        "c.cls": b"5",
        "d.png": png_bytes(),  # no label
        "e.cls": b"1",  # no image
    }
    tar_path = tmp_path / "train-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    listing = list_dataset(tmp_path)
    assert listing.format == "webdataset"
    assert listing.counts() == {3: 2, 5: 1}
    assert listing.skipped == {"ignored_member": 2, "no_label": 1, "no_image": 1}
    assert not sentinel.exists()
    rec = next(r for r in listing.records if r.class_index == 5)
    assert decode_image(read_bytes(rec.origin), 16).shape == (16, 16, 3)


def test_parquet_dataset_with_class_names(tmp_path):
    table = pa.table({"image": [png_bytes(), png_bytes(), b""], "label": ["ant", "bee", "bee"]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    listing = list_dataset(tmp_path)
    assert listing.classes == {0: "ant", 1: "bee"} and listing.counts() == {0: 1, 1: 2}
    with pytest.raises(UserError, match="'bee' has 1 usable"):
        select(listing, SelectConfig(classes=["bee"]), image_size=16)


def test_parquet_missing_column_names_it(tmp_path):
    pq.write_table(pa.table({"img": [png_bytes()], "label": [1]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match="no column 'image'"):
        list_dataset(tmp_path)


def test_explicit_classes_take_the_label_values_of_an_integer_labelled_dataset(tmp_path):
    table = pa.table({"image": [png_bytes()] * 5, "label": [3, 3, 3, 7, 7]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    listing = scan(ScanConfig(path=str(tmp_path)))
    plans, _ = select(listing, SelectConfig(classes=[7], quota=4), image_size=16)
    assert [p.class_index for p in plans] == [7]
    plans, _ = select(listing, SelectConfig(classes=["3"], quota=4), image_size=16)
    assert [p.class_index for p in plans] == [3]


def test_a_parquet_image_column_of_text_is_a_counted_skip(tmp_path):
    table = pa.table({"image": ["a.png", "b.png", "c.png"], "label": ["cat"] * 3})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=2)
    listing = scan(ScanConfig(path=str(tmp_path)))
    plans, left_out = select(listing, SelectConfig(rare_below=5, quota=4), image_size=16)
    assert plans == [] and "0 usable" in left_out["cat"]


def test_parquet_cells_are_read_from_their_row_group(tmp_path):
    images = [png_bytes(value=v) for v in (10, 20, 30, 40, 50)]
    pq.write_table(
        pa.table({"image": images, "label": [1] * 5}), tmp_path / "p.parquet", row_group_size=2
    )
    for row in range(5):
        assert read_bytes(f"{tmp_path / 'p.parquet'}#{row}") == images[row]


def test_a_brace_pattern_of_tars_is_a_dataset(tmp_path):
    for i in range(3):
        with tarfile.open(tmp_path / f"shapes-{i:03d}.tar", "w") as tar:
            for name, data in ((f"s{i}.png", png_bytes()), (f"s{i}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    listing = scan(ScanConfig(path=str(tmp_path / "shapes-{000..002}.tar")))
    assert listing.counts() == {1: 3}
    with pytest.raises(UserError, match="1 of its 4 files do not exist"):
        scan(ScanConfig(path=str(tmp_path / "shapes-{000..003}.tar")))


def _integer_parquet(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": [png_bytes()] * 5, "label": [3, 3, 3, 7, 7]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    return tmp_path


@pytest.mark.parametrize("form", ["mapping", "json", "txt"])
def test_class_names_name_integer_labels_for_prompts_and_selection(tmp_path, form):
    data = _integer_parquet(tmp_path / "data")
    if form == "mapping":
        names = {3: "three", 7: "seven"}
    elif form == "json":
        (tmp_path / "names.json").write_text(json.dumps({"3": "three", "7": "seven"}))
        names = str(tmp_path / "names.json")
    else:  # line i names label i
        lines = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
        (tmp_path / "names.txt").write_text("\n".join(lines) + "\n")
        names = str(tmp_path / "names.txt")
    listing = scan(ScanConfig(path=str(data), class_names=names))
    assert listing.classes == {3: "three", 7: "seven"}
    assert listing.label_of(7) == "7" and not listing.integer_labels()
    by_name, _ = select(listing, SelectConfig(classes=["seven"], quota=4), image_size=16)
    by_label, _ = select(listing, SelectConfig(classes=[7], quota=4), image_size=16)
    assert [p.class_index for p in by_name] == [p.class_index for p in by_label] == [7]
    assert by_name[0].prompt == "a photo of a seven"


def test_class_names_must_name_every_label_once(tmp_path):
    data = str(_integer_parquet(tmp_path))
    with pytest.raises(UserError, match="no name for label '7'"):
        scan(ScanConfig(path=data, class_names={3: "three"}))
    with pytest.raises(UserError, match="both named 'cat'"):
        scan(ScanConfig(path=data, class_names={3: "cat", 7: "cat"}))
    with pytest.raises(UserError, match="class_names .*nothere.json: no such file"):
        scan(ScanConfig(path=data, class_names=str(tmp_path / "nothere.json")))
    assert scan(ScanConfig(path=data)).integer_labels()  # unnamed: the log says prompts use them
