"""Every shipped config loads strictly and plans a run on a tiny stand-in of its model's structure."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailseed.jobs.augment import run
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.models import ModelSpec, describe_model
from tailseed.stages.augment_pipeline import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "sd15.yaml", "sd21base.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_plans_a_run_on_a_stand_in(path, tmp_path, tiny_model_dir, small_dataset, capsys):
    config = load_config(
        path,
        [
            f"model.path={tiny_model_dir}",
            f"dataset.path={small_dataset}",
            "dataset.materialize=''",
            f"output_dir={tmp_path / 'out'}",
            "select.rare_below=10",
            "ray.in_process=true",
            "model.dtype=float32",  # the stand-in runs here, on the CPU
        ],
    )
    result = run(config, dry_run=True)
    assert result["estimate"]["images"] > 0
    assert "rare class 1 'rare one'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "path",
    [p for p in CONFIGS if not load_config(p).model.path.startswith("models/")],  # hub ids only
    ids=lambda p: p.name,
)
def test_hub_models_must_be_in_the_local_cache(path):
    config = load_config(path)
    assert (
        "/" in config.model.path and config.model.revision is None
    )  # a hub id, no invented revision
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        describe_model(ModelSpec(path=config.model.path))
