"""Shared fixtures: tiny real models built from configs (no network), the embedded model, one Ray."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.models import EMBEDDED_MODEL  # noqa: E402
from pipeline.tiny_model import ComponentSpec, assemble_pipeline, build_components  # noqa: E402

TINY_SPEC = ComponentSpec(
    image_size=16,
    vae_channels=(8, 8),  # 16x16 pixels -> 8x8 latents
    unet_channels=(16, 32),
    attention_head_dim=4,
    norm_num_groups=4,
    text_hidden=16,
    text_layers=1,
    text_heads=2,
    max_tokens=16,
)
TINY_WORDS = "a photo of the digit zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="session")
def tiny_pipe():
    """A StableDiffusionPipeline of random tiny modules (seeded), in eval mode, on CPU."""
    torch.set_num_threads(1)
    components = build_components(TINY_SPEC, TINY_WORDS, seed=0)
    pipe = assemble_pipeline(components)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipe):
    """The tiny pipeline saved as a diffusers folder, as a user's checkpoint would be."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_pipe():
    """The shipped tiny-digits model (trained weights), loaded through the project's loader."""
    from pipeline.models import ModelSpec, load_pipeline

    if not (EMBEDDED_MODEL / "model_index.json").exists():
        pytest.fail(f"embedded model missing at {EMBEDDED_MODEL}; run `make tiny-model`")
    pipe, _ = load_pipeline(ModelSpec(path=str(EMBEDDED_MODEL)))
    return pipe
