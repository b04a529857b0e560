"""Submit the augment job to a running Ray cluster's job server and stream its progress.

The entrypoint runs `python -m jobs.augment` with the cluster's Python (never `make`); the runtime
environment ships this repository (code, configs and the embedded model) and installs only the
packages that the config's `ray.runtime_pip` names, for images that lack them.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

from tailseed.pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [
    ".venv/",
    "out/",
    "data/",
    ".git/",
    "docs/",
    "**/__pycache__/",
    ".ruff_cache/",
    ".pytest_cache/",
]


def entrypoint(config: Path, overrides: list[str], dry_run: bool) -> str:
    rel = config.resolve().relative_to(REPO) if config.resolve().is_relative_to(REPO) else config
    args = ["python", "-m", "tailseed.jobs.augment", "--config", str(rel)]
    for item in overrides:
        args += ["--set", item]
    if dry_run:
        args.append("--dry-run")
    return " ".join(shlex.quote(a) for a in args)


def _submit_with_retry(client, command: str, runtime_env: dict, wait_s: float = 120.0) -> str:
    """Submit; a cluster that has just started answers "No available agent" until its head's
    agent is up, so that one answer is retried for `wait_s` seconds. Any other error is raised."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def check_cluster_paths(cfg, dry_run: bool) -> None:
    """A Ray job runs in a temporary copy of this repository on the cluster: a relative output
    folder would land in that copy (deleted by Ray, out of other nodes' reach) and a relative
    dataset path would point into it (where `data/` is not shipped). Refuse both before submitting."""
    out = cfg.out()
    if not dry_run and not out.is_absolute():
        raise UserError(
            f"output_dir {str(out)!r} is relative, but a Ray job runs in a temporary copy of the "
            f"repository on the cluster, where the shards would be lost: set output_dir to an "
            f"absolute path on storage that every node can write (in the config, or "
            f"make augment SET=output_dir=/shared/tailseed/{cfg.name})"
        )
    model = Path(cfg.model.path)
    if not model.is_absolute() and model.exists() and not model.resolve().is_relative_to(REPO):
        raise UserError(
            f"model.path {cfg.model.path!r} is a relative path outside the repository, which the "
            f"job does not carry: give an absolute path that every node can read, or a hub id"
        )
    if not Path(cfg.dataset.path).is_absolute() and not cfg.dataset.materialize:
        raise UserError(
            f"dataset.path {cfg.dataset.path!r} is relative, but a Ray job runs in a temporary "
            f"copy of the repository on the cluster, without data/: set it to an absolute path "
            f"that every node can read"
        )


def submit(config: Path, overrides: list[str], address: str, dry_run: bool = False) -> int:
    """Submit, stream the job's log here, and return 0 if the job succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tailseed.stages.augment_pipeline import load_config

    cfg = load_config(config, overrides)
    if not config.resolve().is_relative_to(REPO):
        raise UserError(
            f"config {config}: must live inside the repository ({REPO}) to travel with the job"
        )
    check_cluster_paths(cfg, dry_run)
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the job server is reported the same way
        raise UserError(
            f"RAY_ADDRESS {address}: no Ray job server answered ({exc.__class__.__name__}: {exc})"
        ) from exc
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": EXCLUDES,
        "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    }
    if cfg.ray.runtime_pip:
        runtime_env["pip"] = list(cfg.ray.runtime_pip)
    job_id = _submit_with_retry(client, entrypoint(config, overrides, dry_run), runtime_env)
    print(f"[tailseed] submitted job {job_id} to {address}", flush=True)

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream())
    except Exception as exc:  # noqa: BLE001 - log streaming is best effort; the status decides
        print(f"[tailseed] log stream ended: {exc}", flush=True)
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"[tailseed] job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
