"""Helpers shared by the tests: the tiny model spec, a tiny augment config, a run's shard bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from research.tiny_model import ComponentSpec

# How long a test waits on a child process (a job, a node) before it calls it hung. A guard against a
# hang, never a timing expectation: on a loaded machine a run takes many times its unloaded time
# (the tests' runs take seconds to a few minutes alone), and a wait that is shorter than the run
# fails a test whose behaviour is right. TAILSEED_TEST_HUNG_S overrides it.
HUNG_S = float(os.environ.get("TAILSEED_TEST_HUNG_S", "1800"))

# A Stable-Diffusion-shaped model small enough to run a step in milliseconds: 16x16 px, 8x8 latents.
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


def write_config(path: Path, model_dir: Path, dataset: Path, out: Path, **extra) -> Path:
    config = {
        "name": "tiny",
        "output_dir": str(out),
        "model": {"path": str(model_dir)},
        "dataset": {"path": str(dataset)},
        "select": {
            "rare_below": 10,
            "max_sources": 5,
            "quota_mode": "add",
            "quota": 6,
            "prompt_template": "a photo of the digit {}",
        },
        # half a CPU each (one torch thread): the same in-process and on Ray, so the same bytes
        "invert": {
            "batch_size": 4,
            "solver": {"num_inference_steps": 4, "max_iters": 3, "guidance_scale": 2.0},
            "resources": {"num_cpus": 0.5},
        },
        "walk": {"method": "slerp"},
        "generate": {
            "num_inference_steps": 4,
            "guidance_scale": 2.0,
            "batch_size": 3,
            "resources": {"num_cpus": 0.5},
        },
        "shards": {"samples_per_shard": 4},
        "filter": {"enabled": False},  # tests/test_filter.py turns it on
        "ray": {"in_process": True},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def start_augment(config: Path, env: dict) -> subprocess.Popen:
    """The augment job as a separate process (so that a test can kill it), output discarded."""
    return subprocess.Popen(
        [sys.executable, "-m", "tailseed.jobs.augment", "--config", str(config)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = HUNG_S) -> None:
    """Poll `predicate` until it holds while `proc` runs; the test fails if the process ends
    first, or (after killing it) if `what` has not come after `timeout` seconds, the process
    still running (hung)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            tail = proc.stderr.read()[-2000:] if proc.stderr else ""
            pytest.fail(f"the job ended before {what}: {tail}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{what} had not come after {timeout:.0f} s, the job still running (hung?)")
