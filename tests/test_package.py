"""Installed as a tool: a wheel built from this checkout works in a fresh environment outside it."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy of the sources: setuptools' build/ folder in the checkout keeps files of
    # modules that no longer exist, and a wheel built there would carry them
    source = tmp_path_factory.mktemp("source") / "tailseed"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "out", "data", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(out)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("tailseed-*.whl"))


def test_the_wheel_installs_one_namespace_with_its_configs_and_model(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tailseed"}
    for needed in (
        "tailseed/configs/default.yaml",
        "tailseed/models/tiny-digits/unet/diffusion_pytorch_model.safetensors",
        "tailseed/models/tiny-digits/tailseed_card.json",
        "tailseed/pipeline/config.py",
        "tailseed/jobs/cli.py",
    ):
        assert needed in names, needed
    assert not any(n.startswith(("research/", "tests/", "tailseed/research/")) for n in names)


@pytest.mark.slow
def test_a_fresh_environment_runs_the_embedded_dry_run_outside_the_checkout(wheel, tmp_path):
    """A new venv holding only the wheel (the dependencies come from this environment's
    site-packages through a .pth path entry, so nothing is downloaded and this checkout's
    editable install is not active there), run from a folder that is not a checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (Path(purelib) / "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    user = tmp_path / "user"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=user, env=env, capture_output=True, text=True)

    where = run(str(python), "-c", "import tailseed.pipeline.config as c; print(c.__file__)")
    assert where.stdout.strip().startswith(purelib), where.stdout + where.stderr
    for name in ("pipeline", "stages", "jobs"):
        assert run(str(python), "-c", f"import {name}").returncode != 0, f"{name} is installed"
    version = run(str(venv / "bin" / "tailseed"), "--version")
    assert version.returncode == 0 and version.stdout.startswith("tailseed 0."), version.stderr
    dry = run(str(venv / "bin" / "tailseed"), "augment", "--dry-run", "--no-timing")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "rare class 2 'four'" in dry.stdout and "dry run: stopping" in dry.stdout
    assert (user / "data" / "digits" / "user" / "four").is_dir()  # written here, not in the venv
