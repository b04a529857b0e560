"""`tailseed invert` and `tailseed generate` on a tiny saved model, through the real CLI parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tailseed.jobs import cli
from tailseed.pipeline.seed_table import read_seeds


@pytest.fixture
def main():
    """The real `tailseed` entry point."""
    return cli.main


REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--max-iters", "3", "--guidance-scale", "2"]


def _png(path, size=16, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    Image.fromarray(array, "RGBA").convert(mode).save(path)
    return path


def test_invert_then_generate(main, tmp_path, tiny_model_dir, capsys):
    images = [_png(tmp_path / "a b.png", seed=1), _png(tmp_path / "c.png", seed=2)]
    seeds = tmp_path / "seeds.parquet"
    argv = ["invert", "--model", str(tiny_model_dir), "--prompt", "a photo of the digit four"]
    code = main(argv + ["--out", str(seeds), "--class-index", "4", *FAST, *map(str, images)])
    assert code == 0
    table = pq.read_table(seeds)
    assert table.column("key").to_pylist() == ["a_b", "c"]
    rows = read_seeds(seeds)
    assert rows[0]["class_index"] == 4 and rows[0]["prompt"] == "a photo of the digit four"
    assert rows[0]["seed"].shape == (4, 8, 8) and rows[0]["num_inference_steps"] == 4
    assert rows[0]["guidance_scale"] == 2.0 and rows[0]["nfe"] > 0
    assert rows[0]["recon_psnr"] > 0 and rows[0]["model"] == str(tiny_model_dir)

    out = tmp_path / "gen"
    assert (
        main(["generate", "--model", str(tiny_model_dir), "--seeds", str(seeds), "--out", str(out)])
        == 0
    )
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["a_b.png", "c.png"]
    assert Image.open(out / "c.png").size == (16, 16)
    again = tmp_path / "gen2"
    main(["generate", "--model", str(tiny_model_dir), "--seeds", str(seeds), "--out", str(again)])
    assert (again / "c.png").read_bytes() == (out / "c.png").read_bytes()


def test_wrong_size_and_mode_are_converted(main, tmp_path, tiny_model_dir, capsys):
    images = [
        _png(tmp_path / "big.png", size=40, seed=3),
        _png(tmp_path / "gray.png", mode="L", seed=4),
        _png(tmp_path / "alpha.png", mode="RGBA", seed=5),
    ]
    seeds = tmp_path / "s.parquet"
    argv = ["invert", "--model", str(tiny_model_dir), "--prompt", "a photo of the digit one"]
    assert main(argv + ["--out", str(seeds), *FAST, *map(str, images)]) == 0
    assert "big.png: resized 40x40 -> 16x16" in capsys.readouterr().err
    assert [r["key"] for r in read_seeds(seeds)] == ["big", "gray", "alpha"]


def _invert_fails(main, tmp_path, model_dir, image) -> int:
    out = tmp_path / "s.parquet"
    argv = ["invert", "--model", str(model_dir), "--prompt", "p", "--out", str(out)]
    code = main(argv + [*FAST, str(image)])
    assert not out.exists()
    return code


def test_non_square_image_is_centre_cropped_as_augment_does(main, tmp_path, tiny_model_dir, capsys):
    from tailseed.pipeline.images import decode_image

    wide = tmp_path / "wide.png"
    array = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    Image.fromarray(array).save(wide)
    seeds = tmp_path / "s.parquet"
    argv = ["invert", "--model", str(tiny_model_dir), "--prompt", "p", "--out", str(seeds)]
    assert main(argv + [*FAST, str(wide)]) == 0
    assert "wide.png: centre-cropped and resized 20x10 -> 16x16" in capsys.readouterr().err
    quiet = tmp_path / "q.parquet"
    quiet_argv = ["--quiet", "invert", "--model", str(tiny_model_dir), "--prompt", "p"]
    try:
        assert main([*quiet_argv, "--out", str(quiet), *FAST, str(wide)]) == 0
    finally:
        from tailseed.jobs import console

        console.configure(None)
    assert capsys.readouterr().err == ""  # --quiet: no crop note
    from tailseed.jobs.seed_commands import load_image

    np.testing.assert_array_equal(load_image(wide, 16), decode_image(wide.read_bytes(), 16))


def test_unreadable_image_is_rejected_naming_it(main, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert _invert_fails(main, tmp_path, tiny_model_dir, tmp_path / "broken.png") == 2
    assert "broken.png: not an image" in capsys.readouterr().err


def test_invert_defaults_are_the_augment_defaults():
    import argparse
    import dataclasses

    from tailseed.jobs.cli import add_seed_commands
    from tailseed.pipeline.inversion import InversionConfig
    from tailseed.stages.augment_pipeline import load_config

    parser = argparse.ArgumentParser()
    add_seed_commands(parser.add_subparsers())
    args = parser.parse_args(["invert", "--prompt", "p", "--out", "s.parquet", "a.png"])
    got = InversionConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(InversionConfig)}
    )
    default_yaml = load_config(REPO / "configs" / "default.yaml")
    assert got == default_yaml.invert.solver == InversionConfig()
    help_text = (
        parser.format_help() + parser._subparsers._group_actions[0].choices["invert"].format_help()
    )
    for f in dataclasses.fields(InversionConfig):  # every solver setting is a documented flag
        assert f"--{f.name.replace('_', '-')}" in help_text or f.name == "num_inference_steps"


def test_duplicate_keys_are_an_error(main, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "x").mkdir()
    a = _png(tmp_path / "img.png")
    b = _png(tmp_path / "x" / "img.png")
    argv = [
        "invert",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "p",
        "--out",
        str(tmp_path / "s.parquet"),
    ]
    assert main(argv + [*FAST, str(a), str(b)]) == 2
    assert "same key 'img'" in capsys.readouterr().err


def _one_seed_file(path: Path, shape: tuple[int, ...]) -> Path:
    """A seeds file of one row whose seed has `shape`."""
    from tailseed.pipeline.seed_table import write_seeds

    row = {
        "key": "k",
        "prompt": "p",
        "seed": np.zeros(shape, np.float32),
        "guidance_scale": 1.0,
        "num_inference_steps": 2,
        "model": "m",
        "model_hash": "h",
    }
    write_seeds(path, [row])
    return path


def test_generate_refuses_a_seed_of_another_shape(main, tmp_path, tiny_model_dir, capsys):
    _one_seed_file(tmp_path / "s.parquet", (4, 4, 4))
    argv = ["generate", "--model", str(tiny_model_dir), "--seeds", str(tmp_path / "s.parquet")]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert "shape (4, 4, 4)" in capsys.readouterr().err


def test_generate_refuses_a_tone_file_that_is_not_a_runs(main, tmp_path, tiny_model_dir, capsys):
    _one_seed_file(tmp_path / "s.parquet", (4, 8, 8))
    (tmp_path / "tone.json").write_text('{"histograms": {}}')  # no "gray": not what a run writes
    argv = ["generate", "--model", str(tiny_model_dir), "--seeds", str(tmp_path / "s.parquet")]
    argv += ["--tone", str(tmp_path / "tone.json"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert f"--tone {tmp_path / 'tone.json'}: not a run's tone/tone.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any model work


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("tailseed 0.1.0")


def test_invert_out_that_is_a_folder_is_refused_before_any_work(
    main, tmp_path, tiny_model_dir, capsys
):
    image = _png(tmp_path / "a.png")
    (tmp_path / "seeds").mkdir()
    argv = [
        "invert",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "p",
        "--out",
        str(tmp_path / "seeds"),
    ]
    assert main(argv + [*FAST, str(image)]) == 2
    assert "is a folder; name the seeds Parquet file" in capsys.readouterr().err
