"""Strict config loading: unknown keys and wrong types name the key; hashing ignores resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.augment import AugmentConfig, load_config, output_hash
from pipeline.config import from_dict
from pipeline.errors import UserError

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def test_default_config_loads():
    config = load_config(DEFAULT)
    assert config.name == "default" and config.model.path == "models/tiny-digits"
    assert config.invert.solver.method == "anderson"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"selct": {}}, "unknown config key selct"),
        ({"select": {"quota": "many"}}, "select.quota: expected an integer"),
        ({"select": {"quota_mode": "double"}}, "select.quota_mode"),
        ({"invert": {"solver": {"method": "newton"}}}, "method"),
        (
            {"invert": {"resources": {"num_cpus": "one"}}},
            "invert.resources.num_cpus: expected a number",
        ),
        ({"walk": {"method": "zigzag"}}, "walk.method"),
        ({"select": {"classes": "four"}}, "select.classes: expected a list"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(UserError, match=message):
        from_dict(AugmentConfig, data)


def test_overrides_and_file_errors(tmp_path):
    config = load_config(DEFAULT, ["select.quota=12", "walk.method=slerp"])
    assert config.select.quota == 12 and config.walk.method == "slerp"
    with pytest.raises(UserError, match="unknown config key select.qouta"):
        load_config(DEFAULT, ["select.qouta=1"])
    with pytest.raises(UserError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("select: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_output_hash_ignores_where_and_how_fast():
    base = load_config(DEFAULT)
    same = load_config(
        DEFAULT, ["ray.in_process=true", "invert.resources.num_actors=4", "output_dir=elsewhere"]
    )
    different = load_config(DEFAULT, ["generate.batch_size=8"])
    assert output_hash(base) == output_hash(same)
    assert output_hash(base) != output_hash(different)
