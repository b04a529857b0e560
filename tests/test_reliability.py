"""Nothing lost, nothing trusted blindly: each case provokes the real fault and checks the outcome."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from augment_helpers import HUNG_S, shard_files, wait_for, write_config

from tailseed.jobs.augment import run
from tailseed.pipeline.config import from_dict
from tailseed.pipeline.errors import UserError
from tailseed.stages.augment_pipeline import AugmentConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, small_dataset):
    """An uninterrupted run, to compare every recovered run with, byte for byte."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "c.yaml", tiny_model_dir, small_dataset, tmp / "out")
    run(load_config(config))
    return tmp / "out"


def _fresh(tmp_path, tiny_model_dir, dataset, name="out") -> tuple[Path, Path]:
    config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, dataset, tmp_path / name)
    return config, tmp_path / name


def _start(config: Path, slow: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TAILSEED_SLOW_WRITE_S"] = str(slow)
    return subprocess.Popen(
        [sys.executable, "-m", "tailseed.jobs.augment", "--config", str(config)],
        cwd=REPO,
        env=env,
        # a suite started in the background (`make test &`) inherits SIGINT ignored, and a child
        # that ignores it cannot be interrupted; the run under test gets Ctrl-C as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ------------------------------------------------------------------------------------------------
# The output folder knows what made it


@pytest.mark.slow
def test_a_changed_dataset_is_refused_not_relabelled(tmp_path, tiny_model_dir, small_dataset):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    config, out = _fresh(tmp_path, tiny_model_dir, data)
    run(load_config(config))
    (data / "added").mkdir()  # a new class sorts first: every index would shift
    shutil.copy(data / "head" / "000.png", data / "added" / "000.png")
    with pytest.raises(UserError, match="different dataset: class 0 was 'head', is now 'added'"):
        run(load_config(config))
    shutil.rmtree(data / "added")
    (data / "rare one" / "000.png").write_bytes((data / "head" / "001.png").read_bytes())
    with pytest.raises(UserError, match="source images of class 1 changed"):
        run(load_config(config))


def test_output_inside_the_dataset_is_refused(tmp_path, tiny_model_dir, small_dataset):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    config, _ = _fresh(tmp_path, tiny_model_dir, data)
    with pytest.raises(UserError, match="hold one another"):
        run(load_config(config, [f"output_dir={data / 'aug'}"]), dry_run=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        run(load_config(config, [f"output_dir={tmp_path / 'file'}"]), dry_run=True)


# ------------------------------------------------------------------------------------------------
# Done means verified


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["truncate_at_member", "truncate_mid_member", "corrupt_stats"])
def test_a_damaged_shard_is_redone_byte_identical(
    tmp_path, tiny_model_dir, small_dataset, reference, fault, capsys
):
    config, out = _fresh(tmp_path, tiny_model_dir, small_dataset)
    run(load_config(config))
    tar = out / "shards" / "00001.tar"
    if fault == "truncate_at_member":
        with tarfile.open(tar) as t:
            members = t.getmembers()
        os.truncate(tar, members[3].offset)  # ends cleanly after the first sample
    elif fault == "truncate_mid_member":
        os.truncate(tar, tar.stat().st_size // 2 + 7)
    else:
        (out / "shards" / "00001_stats.json").write_text('{"samples": 4, "tar": ')
    capsys.readouterr()
    report = run(load_config(config))
    assert "shard 00001 is redone" in capsys.readouterr().out
    assert report["counts"]["samples"] == 12
    assert shard_files(out) == shard_files(reference)


@pytest.mark.slow
def test_a_corrupt_run_json_is_a_message_and_a_redo(
    tmp_path, tiny_model_dir, small_dataset, reference, capsys
):
    config, out = _fresh(tmp_path, tiny_model_dir, small_dataset)
    run(load_config(config))
    (out / "run.json").write_text("{not json")
    report = run(load_config(config))
    assert "run.json is unreadable" in capsys.readouterr().out
    assert report["status"] == "complete"
    assert shard_files(out) == shard_files(reference)


# ------------------------------------------------------------------------------------------------
# Every write atomic; one run per folder


@pytest.mark.slow
def test_kill_minus_nine_during_a_parquet_write_then_rerun(
    tmp_path, tiny_model_dir, small_dataset, reference
):
    config, out = _fresh(tmp_path, tiny_model_dir, small_dataset)
    proc = _start(config, slow=30)
    wait_for(lambda: list((out / "seeds").glob(".class_0001.parquet.*.tmp")), proc, "a seeds write")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "seeds" / "class_0001.parquet").exists()  # never a half file at the name
    report = run(load_config(config))
    assert report["status"] == "complete"
    assert not list(out.rglob(".*.tmp"))
    assert shard_files(out) == shard_files(reference)


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_folder_stops_naming_it(
    tmp_path, tiny_model_dir, small_dataset
):
    config, out = _fresh(tmp_path, tiny_model_dir, small_dataset)
    proc = _start(config, slow=30)
    try:
        wait_for(
            lambda: (out / ".lock").is_file() and (out / ".lock").read_text(), proc, "the lock"
        )
        with pytest.raises(UserError, match=f"in use by a running tailseed \\(pid {proc.pid} "):
            run(load_config(config))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the dead run's lock is taken over
    assert run(load_config(config))["status"] == "complete"


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_and_sigterm_stop_with_one_line_and_no_temp_files(
    tmp_path, tiny_model_dir, small_dataset, sig, code, word
):
    config, out = _fresh(tmp_path, tiny_model_dir, small_dataset)
    proc = _start(config, slow=30)
    wait_for(lambda: list((out / "seeds").glob(".*.tmp")), proc, "a temporary file")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HUNG_S)
    assert proc.returncode == code
    assert f"tailseed augment: {word}; rerun the same command to resume" in err
    assert "Traceback" not in err
    assert not list(out.rglob(".*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs), where this machine lets the tests mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_rerun_completes(
    tmp_path, tiny_model_dir, small_dataset, reference, small_disk
):
    out = small_disk / "out"
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, out)
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 120_000))  # room for the plan's estimate, not the sheets
    proc = _start(config, slow=0)
    _, err = proc.communicate(timeout=HUNG_S)
    assert proc.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("tailseed augment:")]
    assert len(lines) == 1 and "no space left on the device while writing" in lines[0]
    assert str(out) in lines[0] and "Traceback" not in err
    assert not list(out.rglob(".*.tmp"))
    filler.unlink()
    assert run(load_config(config))["status"] == "complete"
    assert shard_files(out) == shard_files(reference)


# ------------------------------------------------------------------------------------------------
# Validation before any model work


@pytest.mark.parametrize(
    "data,named",
    [
        ({"invert": {"batch_size": 0}}, "invert.batch_size is 0"),
        ({"generate": {"batch_size": 0}}, "generate.batch_size is 0"),
        ({"shards": {"samples_per_shard": 0}}, "shards.samples_per_shard is 0"),
        ({"generate": {"num_inference_steps": 0}}, "generate.num_inference_steps is 0"),
        ({"generate": {"num_inference_steps": -3}}, "generate.num_inference_steps is -3"),
        ({"invert": {"resources": {"num_actors": 0}}}, "invert.resources.num_actors is 0"),
        ({"select": {"prompt_template": "{} {x}"}}, "select.prompt_template"),
        ({"select": {"prompt_template": "a {"}}, "select.prompt_template"),
        ({"invert": {"solver": {"tol": float("nan")}}}, "tol is nan"),
        ({"generate": {"guidance_scale": float("inf")}}, "generate.guidance_scale is inf"),
        ({"invert": {"solver": {"num_inference_steps": 0}}}, "num_inference_steps"),
    ],
)
def test_bad_values_are_refused_at_load_naming_the_key(data, named):
    with pytest.raises(UserError, match=named.replace("[", "\\[")):
        from_dict(AugmentConfig, data)


def test_bad_set_values_and_files_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--set 'select.quota=\\[1': the value is not valid YAML"):
        load_config(REPO / "configs" / "default.yaml", ["select.quota=[1"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(latin)


def test_seeds_rows_that_would_make_garbage_are_refused_when_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tailseed.pipeline.seed_table import SEEDS_SCHEMA, read_seeds, seeds_table

    row = {
        "key": "k",
        "prompt": "p",
        "seed": np.zeros((4, 2, 2), np.float32),
        "guidance_scale": 2.0,
        "num_inference_steps": 4,
        "model": "m",
        "model_hash": "h",
    }
    cases = {
        "nan_seed": ({"seed": np.full((4, 2, 2), np.nan, np.float32)}, "NaN or infinite"),
        "nan_guidance": ({"guidance_scale": float("nan")}, "guidance_scale is nan"),
        "zero_steps": ({"num_inference_steps": 0}, "num_inference_steps is 0"),
    }
    for name, (change, message) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(seeds_table([{**row, **change}]), path)
        with pytest.raises(UserError, match=message):
            read_seeds(path)
    # a shape that does not match the seed's length (written around the writer's own check)
    table = seeds_table([row])
    shapes = pa.array([[4, 3, 3]], type=SEEDS_SCHEMA.field("shape").type)
    pq.write_table(
        table.set_column(table.schema.get_field_index("shape"), "shape", shapes),
        tmp_path / "s.parquet",
    )
    with pytest.raises(UserError, match="cannot have shape"):
        read_seeds(tmp_path / "s.parquet")


def test_a_huge_label_member_is_skipped_and_counted(tmp_path):
    import io

    from PIL import Image

    from tailseed.pipeline.datasets import LABEL_MAX_BYTES, list_dataset

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name, payload in (
            ("s0.png", buf.getvalue()),
            ("s0.json", b'{"label": "cat", "pad": "' + b"x" * LABEL_MAX_BYTES + b'"}'),
            ("s1.png", buf.getvalue()),
            ("s1.json", b'{"label": "cat"}'),
            ("s1.jpg", buf.getvalue()),  # a second image for the same key
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    listing = list_dataset(tmp_path)
    assert listing.skipped["label_too_large"] == 1
    assert listing.skipped["duplicate_member"] == 1
    assert len(listing.records) == 1


def test_a_plan_that_does_not_fit_the_disk_is_refused_in_the_dry_run(
    tmp_path, tiny_model_dir, small_dataset
):
    config, _ = _fresh(tmp_path, tiny_model_dir, small_dataset)
    with pytest.raises(UserError, match="the plan needs up to .* GB for walks and shards"):
        run(load_config(config, ["select.quota=1000000000"]), dry_run=True)


def test_inspect_of_a_corrupt_run_json_is_one_line(tmp_path):
    from tailseed.jobs.inspect_output import summarize

    (tmp_path / "run.json").write_text("{half")
    with pytest.raises(UserError, match="run.json: unreadable"):
        summarize(tmp_path)


def test_a_run_with_nothing_to_augment_says_so_and_fails(tmp_path, tiny_model_dir, small_dataset):
    config, out = _fresh(tmp_path, tiny_model_dir, small_dataset)
    with pytest.raises(UserError, match="no class to augment"):
        run(load_config(config, ["select.rare_below=2"]))
    assert not out.exists()
    assert run(load_config(config, ["select.rare_below=2"]), dry_run=True)["dry_run"]  # a plan only
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no labelled image was listed"):
        run(load_config(config, [f"dataset.path={empty}"]), dry_run=True)


def test_a_class_the_model_cannot_reconstruct_is_warned_about():
    from tailseed.stages.invert import class_health

    good = {"a": {"recon_psnr": 30.5, "vae_psnr": 31.0, "failed": False}}
    assert "warning" not in class_health(["a"], good)
    shapes = {"s": {"recon_psnr": 9.1, "vae_psnr": 9.3, "failed": False}}  # the VAE fails too
    assert "does not know this domain" in class_health(["s"], shapes)["warning"]
    drifted = {"d": {"recon_psnr": 21.0, "vae_psnr": 31.0, "failed": False}}
    assert "warning" in class_health(["d"], drifted)


@pytest.mark.slow
def test_shapes_on_the_digits_model_warn_in_the_log_run_json_and_inspect(tmp_path, capsys):
    from PIL import Image, ImageDraw

    from tailseed.jobs.inspect_output import summarize

    rng = np.random.default_rng(0)
    for name, count in (("circle", 12), ("triangle", 3)):
        (tmp_path / "shapes" / name).mkdir(parents=True)
        for i in range(count):
            image = Image.new("RGB", (32, 32), tuple(int(x) for x in rng.integers(0, 255, 3)))
            draw, color = ImageDraw.Draw(image), tuple(int(x) for x in rng.integers(0, 255, 3))
            if name == "circle":
                draw.ellipse([6, 6, 26, 26], fill=color)
            else:
                draw.polygon([(4, 28), (16, 4), (28, 28)], fill=color)
            image.save(tmp_path / "shapes" / name / f"{i}.png")
    (tmp_path / "c.yaml").write_text(
        "name: shapes\n"
        f"output_dir: {tmp_path / 'out'}\n"
        f"dataset: {{path: {tmp_path / 'shapes'}}}\n"
        "select: {rare_below: 5, quota: 5}\n"
        "invert: {solver: {num_inference_steps: 5}}\n"
        "ray: {in_process: true}\n"
    )
    report = run(load_config(tmp_path / "c.yaml"))
    assert "warning: class 'triangle': the model reconstructs" in capsys.readouterr().out
    assert "does not know this domain" in report["health"]["1"]["warning"]
    assert any("WARNING: class 'triangle'" in line for line in summarize(tmp_path / "out"))


def test_the_dry_run_fails_where_the_run_would(tmp_path, tiny_model_dir, small_dataset):
    config, out = _fresh(tmp_path, tiny_model_dir, small_dataset)
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config_hash": "other", "code_hash": "x"}))
    with pytest.raises(UserError, match="made by a different config"):
        run(load_config(config), dry_run=True)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="has no CUDA"):
            run(load_config(config, ["model.device=cuda"]), dry_run=True)
        with pytest.raises(UserError, match="float16 needs a CUDA device"):
            run(load_config(config, ["model.dtype=float16"]), dry_run=True)
