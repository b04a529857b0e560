"""An output folder's layout and identity: where seeds and walks go, what made the folder, and
the refusal to mix outputs of different configs or code in one folder."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from pipeline.errors import UserError


def code_hash(root: Path | None = None) -> str:
    """Hash of the product code that computes a run's outputs (pipeline/, stages/, the augment job) under
    the repository `root`: a folder made by other code is not resumed as if it were current.
    Research code (research/: evaluation, benchmarks, trainers) is not part of it."""
    root = root or Path(__file__).resolve().parents[1]
    files = sorted(
        [
            *(root / "pipeline").glob("*.py"),
            *(root / "stages").glob("*.py"),
            root / "jobs" / "augment.py",
        ]
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def check_output_folder(out: Path, config_hash: str, code: str) -> dict:
    """Create or reuse `out`; refuse one made by a different config or by different code."""
    run_json = out / "run.json"
    if run_json.is_file():
        previous = json.loads(run_json.read_text())
        if previous.get("config_hash") != config_hash:
            raise UserError(
                f"output folder {out} was made by a different config (hash {previous.get('config_hash')} "
                f"vs {config_hash}); use another output_dir or delete the folder"
            )
        if previous.get("code_hash") != code:
            raise UserError(
                f"output folder {out} was made by a different version of tailseed's code (code hash "
                f"{previous.get('code_hash')} vs {code}); its outputs would not match a fresh run: use "
                f"another output_dir or delete the folder"
            )
        return previous
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"output folder {out} exists and is not a tailseed run; use another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    return {}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "ray",
        "webdataset",
        "pyarrow",
        "pillow",
        "numpy",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def seeds_path(out: Path, class_index: int) -> Path:
    return out / "seeds" / f"class_{class_index:04d}.parquet"


def walks_path(out: Path, class_index: int) -> Path:
    return out / "walks" / f"class_{class_index:04d}.parquet"
