"""The embedded model's training job (a few real steps of its own code) and its shipped card."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
from augment_helpers import TINY_SPEC

from research.digits import CLASS_NAMES, DigitsSplit, load_digits_arrays, split_indices
from research.train_tiny_model import (
    PROMPT_TEMPLATE,
    TrainConfig,
    captions,
    regime_config,
    train,
)
from tailseed.pipeline.embedded import materialize
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.models import (
    EMBEDDED_MODEL,
    ModelSpec,
    describe_model,
    load_pipeline,
    read_card,
)


@pytest.mark.slow
def test_training_job_runs_and_saves_a_loadable_pipeline(tmp_path):
    cfg = replace(
        TrainConfig(),
        vae_steps=2,
        unet_steps=2,
        vae_batch=4,
        unet_batch=4,
        spec=TINY_SPEC,
        threads=1,
    )
    card = train(cfg, tmp_path / "model", log=lambda _: None)
    assert card["train_counts"][4] == 3 and card["train_counts"][7] == 3
    pipe, info = load_pipeline(ModelSpec(path=str(tmp_path / "model")))
    assert info["card"]["prompt_template"] == "a photo of the digit {}"
    images = pipe("a photo of the digit seven", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_shipped_card_splits_are_disjoint_and_long_tailed():
    card = read_card(EMBEDDED_MODEL)
    splits = {k: set(v) for k, v in card["split_indices"].items()}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not splits[a] & splits[b], f"{a} and {b} overlap"
    _, labels = load_digits_arrays()
    computed = split_indices(labels, DigitsSplit(**card["split"]))
    assert (
        computed.pop("val") == []
    )  # the first model has no validation split; its card predates it
    assert computed == card["split_indices"]
    counts = np.bincount(labels[sorted(splits["model_train"])], minlength=10)
    tail = [card["class_names"].index(n) for n in card["tail_classes"]]
    assert all(counts[t] <= 5 for t in tail) and min(np.delete(counts, tail)) >= 50
    assert np.bincount(labels[sorted(splits["test"])]).tolist() == [30] * 10
    user = np.bincount(labels[sorted(splits["user"])], minlength=10)
    assert all(user[t] == 10 for t in tail)


def test_the_default_regime_is_the_shipped_models_config():
    """`make tiny-model` (the never-seen regime) retrains the shipped model with its exact config."""
    card = read_card(EMBEDDED_MODEL)
    cfg = regime_config("never-seen")
    assert cfg == TrainConfig()
    recorded = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "split"}))
    assert {k: v for k, v in recorded.items() if k != "regime"} == card["training"]
    recorded_split = {**card["split"], "tail_classes": tuple(card["split"]["tail_classes"])}
    assert DigitsSplit(**recorded_split) == cfg.split  # fields added since keep their defaults
    # every model image keeps its class-naming caption, as when the shipped model was trained
    _, labels = load_digits_arrays()
    train_idx = np.asarray(card["split_indices"]["model_train"])
    prompts = [PROMPT_TEMPLATE.format(CLASS_NAMES[c]) for c in labels[train_idx]]
    assert captions(labels, train_idx, cfg.split) == prompts


def test_shipped_model_loads_offline_with_the_stock_pipeline():
    from diffusers import StableDiffusionPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL)
    info = describe_model(ModelSpec(path=str(EMBEDDED_MODEL)))
    assert info["image_size"] == 32 and info["latent_shape"] == [4, 8, 8]
    assert pipe.scheduler.config.prediction_type == "epsilon"
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL.rglob("*.safetensors"))
    assert size <= 25 * 1024**2


def test_materialized_dataset_matches_the_card(tmp_path):
    card = read_card(EMBEDDED_MODEL)
    folders = materialize(tmp_path, card["split_indices"])
    user = {d.name: len(list(d.glob("*.png"))) for d in folders["user"].iterdir() if d.is_dir()}
    assert user["four"] == 10 and user["seven"] == 10 and user["one"] == 40
    assert sum(len(list(d.glob("*.png"))) for d in folders["test"].iterdir() if d.is_dir()) == 300


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p, "no such folder"),
        (lambda p: (p.mkdir(), p)[1], "not a diffusers pipeline"),
        (
            lambda p: (p.mkdir(), (p / "model_index.json").write_text(json.dumps({"unet": []})), p)[
                2
            ],
            "lacks vae",
        ),
    ],
)
def test_bad_model_folders_give_one_clear_line(tmp_path, make, message):
    folder = make(tmp_path / "model")
    with pytest.raises(UserError, match=message):
        describe_model(ModelSpec(path=str(folder)))


def test_v_prediction_is_refused(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path)
    cfg_path = tmp_path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="epsilon-prediction"):
        describe_model(ModelSpec(path=str(tmp_path)))
    with pytest.raises(UserError, match="epsilon-prediction"):
        load_pipeline(ModelSpec(path=str(tmp_path)))
