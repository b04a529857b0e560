"""Shared fixtures: tiny real models built from configs (no network), the embedded model, one Ray."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if "TAILSEED_CACHE_DIR" not in os.environ:  # the model-hash cache: never the user's home in tests
    import tempfile

    os.environ["TAILSEED_CACHE_DIR"] = tempfile.mkdtemp(prefix="tailseed-test-cache-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from augment_helpers import TINY_SPEC  # noqa: E402
from PIL import Image  # noqa: E402

from research.tiny_model import assemble_pipeline, build_components  # noqa: E402
from tailseed.pipeline.models import EMBEDDED_MODEL  # noqa: E402

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
    from tailseed.pipeline.models import ModelSpec, load_pipeline

    if not (EMBEDDED_MODEL / "model_index.json").exists():
        pytest.fail(f"embedded model missing at {EMBEDDED_MODEL}; run `make tiny-model`")
    pipe, _ = load_pipeline(ModelSpec(path=str(EMBEDDED_MODEL)))
    return pipe


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, a small object store)."""
    import logging

    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=128 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    yield ray
    ray.shutdown()


def _digit_like(rng, value: int) -> bytes:
    """A 16x16 image with a class-dependent bar, plus noise (so inversion has something to do)."""
    image = rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
    image[:, 3 + 3 * value : 6 + 3 * value] = 220
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Head class of 25 images; two rare classes (4 and 3 images), awkward names; one bad file."""
    root = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(0)
    for value, (name, n) in enumerate({"head": 25, "rare one": 4, "rare.two": 3}.items()):
        (root / name).mkdir()
        for i in range(n):
            (root / name / f"{i:03d}.png").write_bytes(_digit_like(rng, value))
    (root / "rare one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root
