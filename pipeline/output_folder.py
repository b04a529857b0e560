"""An output folder's layout and identity: where seeds and walks go, what made the folder, and
the refusal to mix outputs of different configs or code in one folder."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from contextlib import contextmanager
from pathlib import Path

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.shards import TMP_SUFFIX


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


LOCK_NAME = ".lock"
# What a run writes; a rerun into a folder whose run.json is unreadable redoes all of it.
OUTPUTS = ("shards", "seeds", "walks", "filter", "tone", "classes.json")


def _describe_change(before: dict, now: dict) -> str:
    """What differs between two identities ({"classes": {index: name}, "sources": {...}})."""
    lines = []
    old_c, new_c = before.get("classes", {}), now.get("classes", {})
    for index in sorted(set(old_c) | set(new_c), key=int):
        if old_c.get(index) != new_c.get(index):
            lines.append(f"class {index} was {old_c.get(index)!r}, is now {new_c.get(index)!r}")
    old_s, new_s = before.get("sources", {}), now.get("sources", {})
    for index in sorted(set(old_s) | set(new_s), key=int):
        if old_s.get(index) != new_s.get(index):
            lines.append(f"the source images of class {index} changed")
    return "; ".join(lines[:4]) + ("; ..." if len(lines) > 4 else "")


def check_output_folder(
    out: Path, config_hash: str, code: str, identity: dict | None = None, create: bool = True
) -> dict:
    """Create or reuse `out` (hold its lock first); refuse one made by a different config, by
    different code, or from a dataset whose class map or selected source images changed.

    identity: {"classes": {index: name}, "sources": {index: [[key, sha256], ...]}}, the dataset
    as this run sees it. A run.json that cannot be read is reported, and the folder's outputs are
    removed so that the run redoes them (nothing in them could be checked).
    """
    run_json = out / "run.json"
    if run_json.is_file():
        try:
            previous = json.loads(run_json.read_text())
            if not isinstance(previous, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            if not create:  # a dry run only reports
                print(f"[tailseed] {run_json} is unreadable ({exc}); the run would redo the folder")
                return {}
            print(
                f"[tailseed] {run_json} is unreadable ({exc}); the folder's outputs cannot be "
                f"checked against this config, so they are redone",
                flush=True,
            )
            for name in OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            return {}
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
        if identity is not None and previous.get("identity", identity) != identity:
            raise UserError(
                f"output folder {out} was made from a different dataset: "
                f"{_describe_change(previous['identity'], identity)}. Its shards would be "
                f"relabelled or mixed: use another output_dir or delete the folder"
            )
        return previous
    if out.exists() and any(
        p.name != LOCK_NAME and not p.name.endswith(TMP_SUFFIX) for p in out.iterdir()
    ):
        raise UserError(
            f"output folder {out} exists and is not a tailseed run; use another output_dir"
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return {}


@contextmanager
def folder_lock(out: Path):
    """Hold the output folder's lock for a run. A second run into a folder that a live run holds
    stops with a message naming that process; the kernel releases the lock of a process that
    dies, so a dead run's folder is simply taken over."""
    import fcntl
    import socket

    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder; name a folder")
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UserError(
            f"output folder {out} is in use by a running tailseed ({holder}); wait for it to "
            f"finish or use another output_dir"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def remove_temp_files(out: Path) -> int:
    """Delete the temporary files under `out` (`.<name>.<pid>-<random>.tmp`) that interrupted
    writes left; only under the folder's lock, when no other run can be writing. Returns how many."""
    removed = 0
    for path in out.rglob(f".*{TMP_SUFFIX}"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def contains(a: Path, b: Path) -> bool:
    """Whether folder `a` is `b` or holds it (both resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents


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


def walks_dir(out: Path, class_index: int) -> Path:
    """The folder of one class's walk rows, written in parts of `walk.chunk_rows` rows."""
    return out / "walks" / f"class_{class_index:04d}"


def walk_part_path(out: Path, class_index: int, part: int) -> Path:
    """Part `part` of a class's walks: its rows part * chunk_rows .. (part + 1) * chunk_rows - 1."""
    return walks_dir(out, class_index) / f"part_{part:05d}.parquet"
