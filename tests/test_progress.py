"""Progress and a clean log: per-image progress in process, --quiet and --verbose, Ray's noise
filtered, and none of it changing an output byte."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from augment_helpers import HUNG_S, shard_files, write_config
from PIL import Image

from tailseed.jobs import cli, console
from tailseed.jobs.augment import run
from tailseed.pipeline.inversion import InversionConfig, Inverter, Sampler, adjustment_steps
from tailseed.pipeline.runner import LocalRunner, NoiseLines, StderrFilter
from tailseed.stages.augment_pipeline import load_config
from tailseed.stages.invert import InvertConfig, InvertStage

REPO = Path(__file__).resolve().parents[1]
FAST = InversionConfig(num_inference_steps=4, max_iters=3, guidance_scale=2.0)


@pytest.fixture
def bars(monkeypatch):
    """Every count a StageBar shows, per stage, whether or not it is drawn (not on a terminal)."""
    shown: dict[str, list[int]] = {}
    original = console.StageBar._show

    def record(self):
        shown.setdefault(self.stage, []).append(self.n)
        original(self)

    monkeypatch.setattr(console.StageBar, "_show", record)
    yield shown
    console.configure(None)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# The numerical core reports steps, and reporting changes nothing


def test_inverter_reports_every_step_and_the_same_seeds(tiny_pipe):
    inverter = Inverter(tiny_pipe, FAST)
    images, prompts = _images(3), ["a photo of the digit four"] * 3
    seen: list[float] = []
    with_progress = inverter.invert(images, prompts, [0, 1, 2], seen.append)
    without = inverter.invert(images, prompts, [0, 1, 2])
    for name in without:
        np.testing.assert_array_equal(with_progress[name], without[name])
    steps = adjustment_steps(FAST.adjust_strength) + 2 * FAST.num_inference_steps
    assert len(seen) == steps and seen == sorted(seen) and seen[-1] == 1.0
    assert seen[0] == pytest.approx(1 / steps)


def test_sampler_reports_every_step_and_the_same_images(tiny_pipe):
    sampler = Sampler(tiny_pipe)
    seeds = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    seen: list[float] = []
    images = sampler.generate(seeds, ["a photo of the digit one"] * 2, 2.0, 5, seen.append)
    assert seen == [pytest.approx(k / 5) for k in range(1, 6)]
    np.testing.assert_array_equal(
        images, sampler.generate(seeds, ["a photo of the digit one"] * 2, 2.0, 5)
    )


def test_local_runner_passes_progress_per_unit(tiny_model_dir):
    config = InvertConfig(solver=FAST, batch_size=3)
    sources = [(f"k{i}", image, "a photo of the digit four") for i, image in enumerate(_images(5))]
    units = InvertStage.units(sources, config, "salt")
    from tailseed.pipeline.models import ModelSpec

    spec = InvertStage.spec(ModelSpec(path=str(tiny_model_dir)), config)
    calls: list[tuple[int, float]] = []
    results = list(LocalRunner().run(units, [spec], progress=lambda u, d: calls.append((u, d))))
    assert [r.unit for r in results] == [0, 1]
    for unit, size in ((0, 3), (1, 2)):
        done = [d for u, d in calls if u == unit]
        assert done == sorted(done) and done[-1] == pytest.approx(size)
        assert len({int(d) for d in done}) == size + 1  # every whole image on the way: 0..size


# ------------------------------------------------------------------------------------------------
# The bar


def test_stage_bar_counts_whole_images_across_units(bars):
    console.configure(console.QUIET)  # not drawn; the counts are the same
    with console.StageBar("invert", total=5) as bar:
        bar.within(0, 1.5)
        bar.within(0, 2.999999)
        bar.finished(0, 3)
        bar.within(1, 0.4)
        bar.within(1, 1.9)
        bar.finished(1, 2)
    assert bars["invert"] == [1, 3, 3, 3, 4, 5]
    assert bar.bar.disable  # quiet: no bar


def test_a_resumed_generation_bar_starts_at_the_images_done_before():
    console.configure(None)
    with console.StageBar("generate", total=8, initial=4) as bar:
        bar.within(1, 2.0)
        assert bar.n == 6
        bar.finished(1, 4)
        assert bar.n == 8


# ------------------------------------------------------------------------------------------------
# The augment job


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, small_dataset):
    """The tiny augment at the default verbosity, in process: its config and output folder."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "c.yaml", tiny_model_dir, small_dataset, tmp / "out")
    return config, tmp / "out", run(load_config(config))


@pytest.mark.slow
def test_augment_in_process_advances_per_image(tmp_path, tiny_model_dir, small_dataset, bars):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out")
    report = run(load_config(config))
    sources = sum(a["sources"] for a in report["counts"]["augmented_classes"].values())
    generated = report["counts"]["samples"]
    for stage, total in (("invert", sources), ("generate", generated)):
        counts = bars[stage]
        assert counts == sorted(counts) and counts[-1] == total
        # every whole image is shown on the way, not only the units' ends (units of 4 here)
        assert set(range(1, total + 1)) <= set(counts)


def _augment(config: Path, *flags: str, timeout: float = HUNG_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tailseed.jobs.augment", "--config", str(config), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )


DONE = re.compile(r"^\[tailseed\] done in \d+s: 12 images in 3 shards for 2 rare classes ")


def _only_warnings_and_the_summary(stdout: str) -> None:
    """The tiny random model reconstructs both rare classes badly: a warning for each (a warning
    is what --quiet keeps), then the summary line, and nothing else."""
    lines = stdout.splitlines()
    warnings = [f"[tailseed] warning: class {name!r}: " for name in ("rare one", "rare.two")]
    assert len(lines) == 3, stdout
    assert [line[: len(w)] for line, w in zip(lines, warnings)] == warnings, stdout
    assert DONE.match(lines[2]), stdout


@pytest.mark.slow
def test_quiet_augment_prints_the_summary_only_and_the_same_bytes(reference_run, tmp_path):
    config, reference_out, _ = reference_run
    out = tmp_path / "out"
    quiet = write_config(
        tmp_path / "c.yaml", *_model_and_data(config), out
    )  # the same config, another folder
    done = _augment(quiet, "--quiet")
    assert done.returncode == 0, done.stderr
    _only_warnings_and_the_summary(done.stdout)
    assert done.stderr == ""  # no "Loading weights" bar, no library log, no bar of ours
    assert shard_files(out) == shard_files(reference_out)
    for name in ("seeds", "walks"):
        for path in sorted(p for p in (reference_out / name).rglob("*") if p.is_file()):
            assert (out / path.relative_to(reference_out)).read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_quiet_augment_on_a_private_ray_has_none_of_rays_noise(reference_run, tmp_path):
    config, reference_out, _ = reference_run
    out = tmp_path / "out"
    on_ray = write_config(
        tmp_path / "c.yaml",
        *_model_and_data(config),
        out,
        ray__in_process=False,
        ray__local_num_cpus=2,
        ray__object_store_mb=128,
    )
    done = _augment(on_ray, "--quiet")
    assert done.returncode == 0, done.stderr
    _only_warnings_and_the_summary(done.stdout)
    # none of: the token-auth notice, core_worker.cc's max_restarts line, "Progress bars disabled"
    assert done.stderr == "", done.stderr
    assert shard_files(out) == shard_files(reference_out)


def _model_and_data(config: Path) -> tuple[Path, Path]:
    import yaml

    raw = yaml.safe_load(config.read_text())
    return Path(raw["model"]["path"]), Path(raw["dataset"]["path"])


@pytest.mark.slow
def test_default_run_keeps_its_lines_and_quiet_drops_them(reference_run, tmp_path, capsys):
    """A rerun into the done folder: with --quiet only the summary line, at the default
    verbosity the log lines too."""
    config, out, _ = reference_run
    console.configure(console.QUIET)
    try:
        run(load_config(config))
    finally:
        console.configure(None)
    lines = capsys.readouterr().out.splitlines()  # seeds reused: no health warning either
    assert len(lines) == 1 and DONE.match(lines[0]), lines
    run(load_config(config))
    lines = capsys.readouterr().out.splitlines()
    assert any("generate: 3/3 shards already done" in line for line in lines)
    assert len(lines) > 3


# ------------------------------------------------------------------------------------------------
# The seed commands


@pytest.fixture
def main():
    yield cli.main
    console.configure(None)


def test_invert_and_generate_show_progress_per_image(main, tmp_path, tiny_model_dir, bars, capsys):
    paths = []
    for i, image in enumerate(_images(3)):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(image).save(paths[-1])
    seeds = tmp_path / "s.parquet"
    fast = ["--steps", "4", "--max-iters", "3", "--batch-size", "2"]
    argv = ["invert", "--model", str(tiny_model_dir), "--prompt", "a photo of the digit four"]
    assert main([*argv, "--out", str(seeds), *fast, *map(str, paths)]) == 0
    assert bars["invert"][-1] == 3 and set(bars["invert"]) >= {1, 2, 3}
    gen = ["generate", "--model", str(tiny_model_dir), "--seeds", str(seeds), "--batch-size", "2"]
    assert main([*gen, "--out", str(tmp_path / "g")]) == 0
    assert bars["generate"][-1] == 3 and set(bars["generate"]) >= {1, 2, 3}
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["im0", "im1", "im2"]
    assert main(["--quiet", *gen, "--out", str(tmp_path / "q")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote 3 images to {tmp_path / 'q'}"]


def test_quiet_and_verbose_are_global_and_per_command_flags():
    parser = cli.build_parser()
    assert parser.parse_args(["augment"]).verbosity is None
    assert parser.parse_args(["--quiet", "augment"]).verbosity == console.QUIET
    assert parser.parse_args(["augment", "-q"]).verbosity == console.QUIET
    assert parser.parse_args(["--verbose", "augment"]).verbosity == console.VERBOSE
    assert parser.parse_args(["augment", "--verbose"]).verbosity == console.VERBOSE
    with pytest.raises(SystemExit):
        parser.parse_args(["augment", "--quiet", "--verbose"])


def test_verbose_shows_debug_lines(capsys):
    console.configure(console.VERBOSE)
    try:
        console.log("where it ran", level=10)
    finally:
        console.configure(None)
    console.log("hidden", level=10)
    assert capsys.readouterr().out.splitlines() == ["[tailseed] where it ran"]


# ------------------------------------------------------------------------------------------------
# Ray's C++ noise on fd 2


NOISE = (
    b"[2026-12-01 14:49:28,431 E 23557 23557] core_worker.cc:2465: Actor with class name: "
    b"'MapWorker(MapBatches(_UnitAdapter))' and ID: 'fe3e' has constructor arguments in the object "
    b"store and max_restarts > 0. If the arguments in the object store go out of scope or are "
    b"lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727\n"
)


def test_noise_lines_are_dropped_whole_and_the_rest_passes_as_it_comes():
    lines = NoiseLines()
    bar = b"\rinvert:   0%|      | 0/5 [00:00<?, ?img/s]"  # a bar's redraw: no newline
    assert lines.feed(bar) == bar  # shown at once, not held for a newline
    # the C++ line right after it, in two reads: held, matched, dropped
    assert lines.feed(NOISE[:40]) == b""
    assert lines.feed(NOISE[40:]) == b""
    error = b"[2026-12-01 14:49:28,431 E 1 1] raylet_client.cc:12: a real error\n"
    assert lines.feed(error[:10]) == b"" and lines.feed(error[10:]) == error
    mixed = b"Traceback (most recent call last):\n" + NOISE + b"\rinvert: 100%| 5/5\n"
    assert lines.feed(mixed) == b"Traceback (most recent call last):\n\rinvert: 100%| 5/5\n"
    assert lines.feed(b"[unterminated") == b"" and lines.flush() == b"[unterminated"


def test_stderr_filter_filters_file_descriptor_2(capfd):
    filtered = StderrFilter()
    try:
        os.write(2, b"before\n")
        os.write(2, NOISE)
        os.write(2, b"Traceback (most recent call last):\n")
        os.write(2, b"\rafter, no newline")
    finally:
        filtered.close()
    assert (
        capfd.readouterr().err == "before\nTraceback (most recent call last):\n\rafter, no newline"
    )


def test_a_bar_sees_the_terminal_through_the_filter():
    """Under the Ray runner's filter fd 2 is a pipe; a bar must still be drawn on a terminal."""
    import pty

    master, slave = pty.openpty()
    saved = os.dup(2)
    os.dup2(slave, 2)
    try:
        filtered = StderrFilter()
        try:
            assert not os.isatty(2) and StderrFilter.stderr_is_terminal()
            console.configure(None)
            with console.StageBar("invert", total=1) as bar:
                assert not bar.bar.disable
        finally:
            filtered.close()
    finally:
        os.dup2(saved, 2)
        for fd in (saved, slave, master):
            os.close(fd)
    assert not StderrFilter.active


def test_a_submitted_job_runs_with_the_same_verbosity():
    from tailseed.jobs.submit import entrypoint

    config = REPO / "configs" / "default.yaml"
    assert entrypoint(config, [], False).endswith("--config configs/default.yaml")
    assert entrypoint(config, [], False, console.QUIET).endswith(" --quiet")
    assert entrypoint(config, ["a=1"], True, console.VERBOSE).endswith("--dry-run --verbose")


@pytest.mark.slow
def test_actors_report_progress_to_the_drivers_sink(ray_session, tiny_model_dir):
    """The adapter as an actor runs it, with a real progress actor: the sink holds the unit's
    latest count, its final one (calls from one caller to an actor run in order)."""
    from tailseed.pipeline.models import ModelSpec
    from tailseed.pipeline.runner import _ProgressSink, _UnitAdapter, pack

    config = InvertConfig(solver=FAST, batch_size=3)
    sources = [(f"k{i}", image, "a photo of the digit four") for i, image in enumerate(_images(3))]
    unit = InvertStage.units(sources, config, "salt")[0]
    spec = InvertStage.spec(ModelSpec(path=str(tiny_model_dir)), config)
    sink = ray_session.remote(_ProgressSink).options(num_cpus=0).remote()
    adapter = _UnitAdapter(spec.cls, spec.kwargs, 1, sink=sink)
    adapter({"unit": np.asarray([7]), "payload": np.asarray([pack(unit)], dtype=object)})
    assert ray_session.get(sink.take.remote()) == {7: pytest.approx(3.0)}
    assert ray_session.get(sink.take.remote()) == {}  # taken
