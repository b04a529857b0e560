"""The filter's optional CLIP judge: zero-shot class probabilities, ranking by both judges, early
errors, off by default. The CLIP model is a tiny random one built from a config, saved offline."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from augment_helpers import shard_files, write_config
from conftest import TINY_WORDS
from PIL import Image
from safetensors.torch import load_file, save_file

from research.tokenizer import build_clip_tokenizer
from tailseed.pipeline.clip_judge import ClipJudge, describe_clip_judge
from tailseed.pipeline.config import hashed_dict
from tailseed.pipeline.datasets import list_dataset
from tailseed.pipeline.errors import UserError
from tailseed.stages.augment_pipeline import AugmentConfig, load_config, output_hash
from tailseed.stages.filter import FilterConfig, FilterStage, prepare, ranked

CLASS_TEXTS = {0: "a photo of a head", 1: "a photo of a rare one", 2: "a photo of a rare.two"}


def save_tiny_clip(folder, image_size: int = 16, seed: int = 0):
    """A random CLIPModel (hidden size 16, one layer per tower, 8x8 patches), its tokenizer and
    image processor, saved as a user's CLIP folder would be; nothing is downloaded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(TINY_WORDS + ["head", "rare"], 32)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            **tower,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    side = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=side).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_scores_are_zero_shot_probabilities_over_the_classes(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    texts = list(CLASS_TEXTS.values())
    judge = ClipJudge.load(str(tiny_clip), texts)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)  # resized by the processor
    probs = judge.probabilities(images)
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs >= 0).all()
    assert np.ptp(probs[:, 0]) > 1e-4  # it looks at the images: they are not judged alike
    classes = np.asarray([0, 1, 2, 1, 0])
    assert np.array_equal(judge.score(images, classes), probs[np.arange(5), classes])
    # the same numbers from CLIP's own forward pass (logits_per_image, softmax over the texts)
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    processor = CLIPProcessor.from_pretrained(str(tiny_clip))
    inputs = processor(
        text=texts, images=[Image.fromarray(i) for i in images], return_tensors="pt", padding=True
    )
    with torch.inference_mode():
        want = model(**inputs).logits_per_image.softmax(dim=1).numpy()
    assert np.allclose(probs, want, atol=1e-5)
    assert len(judge.probabilities(images[:0])) == 0


def test_the_ranking_multiplies_the_two_judges():
    keys = np.asarray(["k0", "k1", "k2", "k3"])
    judge = np.asarray([0.9, 0.8, 0.5, 0.5], np.float32)
    clip = np.asarray([0.1, 0.9, 0.5, 0.5], np.float32)
    assert ranked([0, 1, 2, 3], judge, None, keys) == [0, 1, 2, 3]  # the self-judge alone
    # products 0.09, 0.72, 0.25, 0.25: the self-judge's favourite is last once CLIP disagrees
    assert ranked([0, 1, 2, 3], judge, clip, keys) == [1, 2, 3, 0]
    assert ranked([3, 2], judge, clip, keys) == [2, 3]  # a tie goes to the smaller key


@pytest.fixture(scope="module")
def prepared_with_clip(small_dataset, tiny_clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "filter"
    config = FilterConfig(pool_factor=2, judge_steps=30, clip_judge=str(tiny_clip))
    summary = prepare(
        config, list_dataset(small_dataset), 16, "image", folder, lambda _: None, CLASS_TEXTS
    )
    return folder, summary, config


def test_prepare_describes_the_clip_judge(prepared_with_clip, tiny_clip, small_dataset, tmp_path):
    _, summary, _ = prepared_with_clip
    clip = summary["clip_judge"]
    assert clip["model"] == str(tiny_clip) and clip["folder"] == str(tiny_clip.resolve())
    assert clip["revision"] is None  # a local folder has no hub revision
    assert len(clip["weights_hash"]) == 16 and clip["logit_scale"] > 0
    assert clip["texts"] == {str(c): t for c, t in CLASS_TEXTS.items()}
    config = FilterConfig(clip_judge=str(tiny_clip))
    with pytest.raises(ValueError, match=r"a text for every class; none for \[1, 2\]"):
        prepare(config, list_dataset(small_dataset), 16, "image", tmp_path, print, {0: "x"})
    assert not (tmp_path / "judge.safetensors").exists()  # refused before training the judge


def test_kept_samples_carry_both_scores_and_are_the_best_by_their_product(prepared_with_clip):
    folder, summary, filter_config = prepared_with_clip
    spec = FilterStage.spec(AugmentConfig(filter=filter_config), folder.parent / "shards")
    stage = spec.cls(**spec.kwargs)
    assert spec.kwargs["clip_texts"] == list(CLASS_TEXTS.values())
    rng = np.random.default_rng(5)
    n = 8
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    cls = np.asarray([1, 1, 1, 1, 2, 2, 2, 2])
    batch = {
        "key": np.asarray([f"k{i}" for i in range(n)]),
        "image": images,
        "ok": np.ones(n, bool),
        "cls": cls,
        "slots": np.full(n, 2),
        "meta": np.asarray([json.dumps({"key": f"k{i}"}) for i in range(n)]),
    }
    out = stage(batch)
    positions = np.asarray([stage.position[int(c)] for c in cls])
    judge = stage.judge.score(images, positions)
    clip = stage.clip.probabilities(images)  # (n, 3): every class, the intended one picked below
    product = judge * clip[np.arange(n), positions]
    for c in (1, 2):
        rows = np.flatnonzero(cls == c)
        best = rows[np.argsort(-product[rows], kind="stable")][:2]
        assert sorted(np.flatnonzero(out["ok"] & (cls == c))) == sorted(best)
    for i in np.flatnonzero(out["ok"]):
        scores = json.loads(out["meta"][i])["filter"]
        assert scores["clip_score"] == round(float(clip[i, positions[i]]), 6)
        assert scores["judge_score"] == round(float(judge[i]), 6)
    assert set(out["skip_reason"][~out["ok"]]) == {"not_kept"}


def test_a_clip_judge_that_cannot_be_loaded_names_the_key(tmp_path, tiny_clip, tiny_model_dir):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(UserError, match=rf"filter.clip_judge '{missing}': no such folder"):
        describe_clip_judge(str(missing))
    with pytest.raises(
        UserError,
        match="not in the local Hugging Face cache.*huggingface-cli download tailseed-tests/none",
    ):
        describe_clip_judge("tailseed-tests/none")
    with pytest.raises(UserError, match="filter.clip_judge.*no readable config.json"):
        describe_clip_judge(str(tiny_model_dir))  # a Stable Diffusion folder
    with pytest.raises(UserError, match="'clip_text_model' model, not a CLIP model"):
        describe_clip_judge(str(tiny_model_dir / "text_encoder"))  # only CLIP's text half
    # a CLIP folder with a part missing: each would otherwise load and judge at random
    for part, message in [
        ("*.safetensors", "could not be loaded"),
        ("preprocessor_config.json", "could not be loaded: Can't load image processor"),
        ("tokenizer*", r"has no tokenizer \(tokenizer.json or vocab.json\)"),
    ]:
        broken = tmp_path / part.strip("*.")
        shutil.copytree(tiny_clip, broken, ignore=shutil.ignore_patterns(part))
        with pytest.raises(UserError, match=f"filter.clip_judge '{broken}': {broken} {message}"):
            describe_clip_judge(str(broken))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_clip, partial)
    weights = load_file(partial / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, str(partial / "model.safetensors"), {"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 of the CLIP model's weights.*visual_projection"):
        describe_clip_judge(str(partial))


def test_a_hub_id_is_read_from_the_local_cache_at_its_revision(
    tmp_path, tiny_clip, small_dataset, monkeypatch
):
    import huggingface_hub.constants

    # the layout huggingface-cli download leaves: refs/main names a snapshot folder
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tailseed-tests--tiny-clip"
    shutil.copytree(tiny_clip, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = FilterConfig(judge_steps=1, clip_judge="tailseed-tests/tiny-clip")
    folder = tmp_path / "run" / "filter"
    listing = list_dataset(small_dataset)
    summary = prepare(config, listing, 16, "image", folder, lambda _: None, CLASS_TEXTS)
    assert summary["clip_judge"]["revision"] == commit
    assert summary["clip_judge"]["folder"] == str((repo / "snapshots" / commit).resolve())
    spec = FilterStage.spec(AugmentConfig(filter=config), folder.parent / "shards")
    assert spec.kwargs["clip_judge"] == "tailseed-tests/tiny-clip"  # each node reads its cache
    assert spec.kwargs["clip_revision"] == commit
    clip = spec.cls(**spec.kwargs).clip
    local = ClipJudge.load(str(tiny_clip), list(CLASS_TEXTS.values()))
    image = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(clip.probabilities(image), local.probabilities(image))


def test_a_run_with_an_unusable_clip_judge_stops_before_any_work(
    tmp_path, tiny_model_dir, small_dataset
):
    from tailseed.jobs.augment import run

    out = tmp_path / "a"
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, out)
    config = load_config(path, ["filter.enabled=true", f"filter.clip_judge={tmp_path / 'missing'}"])
    for dry_run in (True, False):
        with pytest.raises(UserError, match="filter.clip_judge"):
            run(config, dry_run=dry_run, timing=False)
    assert not out.exists()  # no folder, no inversion


def test_the_clip_judge_is_off_by_default_and_out_of_the_hash_until_set(tmp_path):
    default = AugmentConfig()
    assert default.filter.clip_judge == ""
    assert "clip_judge" not in hashed_dict(default)["filter"]
    config = tmp_path / "c.yaml"
    (tmp_path / "my-clip").mkdir()
    config.write_text("filter:\n  clip_judge: my-clip\n")  # a folder beside the config file
    loaded = load_config(config)
    assert loaded.filter.clip_judge == str((tmp_path / "my-clip").resolve())
    assert output_hash(loaded) != output_hash(default)


@pytest.mark.parametrize("name", ["sd15.yaml", "sd21base.yaml"])
def test_the_shipped_configs_show_how_to_turn_it_on(name, tmp_path):
    path = Path(__file__).resolve().parents[1] / "configs" / name
    assert load_config(path).filter.clip_judge == ""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# filter:"))
    for i in (start, start + 1):  # the two commented lines, uncommented
        lines[i] = lines[i].removeprefix("# ")
    (tmp_path / name).write_text("\n".join(lines))
    assert load_config(tmp_path / name).filter.clip_judge == "openai/clip-vit-base-patch32"


@pytest.mark.slow
def test_augment_with_the_clip_judge_end_to_end(
    tmp_path, tiny_model_dir, small_dataset, tiny_clip, monkeypatch
):
    from tailseed.jobs.augment import run
    from tailseed.pipeline import clip_judge

    described = []  # the driver loads the model to describe it once per run, not per use
    real_describe = clip_judge.describe_clip_judge

    def counted(name):
        described.append(name)
        return real_describe(name)

    monkeypatch.setattr(clip_judge, "describe_clip_judge", counted)

    overrides = [
        "filter.enabled=true",
        "filter.pool_factor=2",
        "filter.judge_steps=30",
        f"filter.clip_judge={tiny_clip}",
        # the filter scores the images as generated; the tone stage after it would change them
        "tone.gray=never",
        "tone.match_histogram=false",
    ]
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "a")
    report = run(load_config(path, overrides))
    assert described == [str(tiny_clip)]
    clip = report["filter"]["clip_judge"]
    assert clip["model"] == str(tiny_clip) and len(clip["weights_hash"]) == 16
    # the texts are the classes' prompts, as generation used them
    assert clip["texts"] == {
        "0": "a photo of the digit head",
        "1": "a photo of the digit rare one",
        "2": "a photo of the digit rare.two",
    }
    judge = ClipJudge.load(str(tiny_clip), list(clip["texts"].values()))
    position = {int(c): i for i, c in enumerate(clip["texts"])}
    seen = 0
    for tar_path in sorted((tmp_path / "a" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            sample = json.loads(data)
            png = members[name[: -len(".json")] + ".png"]
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[None]
            cls = int(members[name[: -len(".json")] + ".cls"])
            want = judge.score(image, np.asarray([position[cls]]))[0]
            assert sample["filter"]["clip_score"] == pytest.approx(float(want), abs=1e-5)
            seen += 1
    assert seen == report["counts"]["samples"] > 0
    # the same config into another folder: the same CLIP scores, the same shards, byte for byte
    other = write_config(tmp_path / "c2.yaml", tiny_model_dir, small_dataset, tmp_path / "b")
    run(load_config(other, overrides))
    assert shard_files(tmp_path / "b") == shard_files(tmp_path / "a")
