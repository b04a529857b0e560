"""The seeds and walks Parquet contract: schema, keys, deterministic bytes, independent reading."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tailseed.pipeline.datasets import safe_key
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.seed_table import (
    SEEDS_SCHEMA,
    WALKS_SCHEMA,
    make_key,
    read_seeds,
    read_walks,
    sanitize,
    write_seeds,
    write_walks,
)

SEEDS_COLUMNS = [
    "key",
    "class_index",
    "class_name",
    "prompt",
    "seed",
    "shape",
    "guidance_scale",
    "num_inference_steps",
    "model",
    "model_hash",
    "recon_psnr",
    "recon_latent_rmse",
    "nfe",
]


def _row(key: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "key": key,
        "class_index": 4,
        "class_name": "four",
        "prompt": "a photo of the digit four",
        "seed": rng.standard_normal((4, 8, 8)).astype(np.float32),
        "guidance_scale": 2.0,
        "num_inference_steps": 25,
        "model": "models/tiny-digits",
        "model_hash": "0123456789abcdef",
        "recon_psnr": 35.5,
        "recon_latent_rmse": 0.01,
        "nfe": 120,
    }


def test_schemas_have_the_contract_columns():
    assert SEEDS_SCHEMA.names == SEEDS_COLUMNS
    assert WALKS_SCHEMA.names == SEEDS_COLUMNS + ["sources", "weights", "method"]
    assert SEEDS_SCHEMA.field("seed").type == pa.list_(pa.float32())
    assert WALKS_SCHEMA.field("sources").type == pa.list_(pa.string())


def test_seeds_round_trip_read_back_by_pyarrow(tmp_path):
    rows = [_row("img_1", 1), _row("img-2", 2)]
    path = tmp_path / "seeds.parquet"
    write_seeds(path, rows)
    table = pq.read_table(path)  # an independent reader
    assert table.column_names == SEEDS_COLUMNS
    assert table.num_rows == 2
    flat = np.asarray(table.column("seed")[0].as_py(), dtype=np.float32)
    np.testing.assert_array_equal(flat, rows[0]["seed"].ravel())
    assert table.column("shape")[0].as_py() == [4, 8, 8]
    back = read_seeds(path)
    assert [r["key"] for r in back] == ["img_1", "img-2"]
    np.testing.assert_array_equal(back[1]["seed"], rows[1]["seed"])
    assert back[0]["nfe"] == 120 and back[0]["class_name"] == "four"


def test_writing_is_deterministic(tmp_path):
    rows = [_row("a", 1), _row("b", 2)]
    write_seeds(tmp_path / "1.parquet", rows)
    write_seeds(tmp_path / "2.parquet", [dict(r) for r in rows])
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()


def test_optional_columns_may_be_absent_and_nan_becomes_null(tmp_path):
    row = _row("x")
    for name in ("class_index", "class_name", "nfe"):
        del row[name]
    row["recon_psnr"] = float("nan")
    write_seeds(tmp_path / "s.parquet", [row])
    back = read_seeds(tmp_path / "s.parquet")[0]
    assert back["class_index"] is None and back["recon_psnr"] is None


def test_walks_round_trip_and_read_as_seeds(tmp_path):
    row = dict(_row("walk_000"), sources=["a", "b"], weights=[0.25, 0.75], method="slerp")
    row["recon_psnr"] = None
    path = tmp_path / "walks.parquet"
    write_walks(path, [row])
    back = read_walks(path)[0]
    assert back["sources"] == ["a", "b"] and back["weights"] == [0.25, 0.75]
    assert back["method"] == "slerp"
    assert read_seeds(path)[0]["key"] == "walk_000"  # generate reads walks files too


def test_duplicate_and_invalid_keys_are_errors(tmp_path):
    with pytest.raises(UserError, match="duplicate"):
        write_seeds(tmp_path / "s.parquet", [_row("a"), _row("a")])
    with pytest.raises(UserError, match="invalid key"):
        write_seeds(tmp_path / "s.parquet", [_row("a.png")])
    with pytest.raises(ValueError, match="missing column 'prompt'"):
        row = _row("a")
        del row["prompt"]
        write_seeds(tmp_path / "s.parquet", [row])


def test_reading_a_file_without_the_columns_names_it(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"key": ["a"]}), path)
    with pytest.raises(UserError, match="other.parquet.*missing column"):
        read_seeds(path)


@pytest.mark.parametrize(
    "stem, key",
    [
        ("digit_4-001", "digit_4-001"),
        ("my image.v2", "my_image_v2"),
        ("ünïcode", "_n_code"),
        ("x" * 150, "x" * 100),
    ],
)
def test_make_key(stem, key):
    assert make_key(stem) == key


@pytest.mark.parametrize(
    "text, clean",
    [
        ("digit_4-001", "digit_4-001"),
        ("a/b\\c d\n", "a_b_c_d_"),
        ("\udcff\u00e9\U0001f600", "___"),  # one "_" per code point, lone surrogates included
        ("", ""),
    ],
)
def test_sanitize(text, clean):
    assert sanitize(text) == clean


@pytest.mark.parametrize(
    "text, key",
    [
        ("my image.v2", "c3_my_image_v2_8cb555f5"),
        ("\u00fcn\u00efcode", "c3__n_code_95a07e5e"),
        ("x" * 150, "c3_" + "x" * 60 + "_def36f01"),
    ],
)
def test_dataset_keys_are_unchanged(text, key):
    """Listing keys use the same alphabet as make_key; values pinned from the pre-refactor code."""
    assert safe_key(text, "salt/" + text, "c3_") == key
