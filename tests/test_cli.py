"""The command line: help without heavy imports, every option documented, values as typed."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tailseed.jobs.cli import build_parser
from tailseed.pipeline.errors import UserError
from tailseed.stages.augment_pipeline import load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "default.yaml"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_of_every_command_imports_no_torch_ray_or_diffusers():
    script = (
        "import sys, contextlib, io\n"
        "from jobs.cli import build_parser\n"
        "for argv in (['--help'], ['augment', '--help'], ['invert', '--help'],\n"
        "             ['generate', '--help'], ['inspect', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            build_parser().parse_args(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, argv\n"
        "print(sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_option_has_help_and_names_its_default():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]}: no help"
            flag = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
            if action.default not in (None, [], argparse.SUPPRESS) and not (
                flag or action.required
            ):
                shown = sub._get_formatter()._expand_help(action)
                assert "default" in shown, f"{name} {action.option_strings[0]}: default not shown"


def test_set_values_for_string_fields_are_taken_as_typed():
    config = load_config(DEFAULT, ["name=2024", "model.revision=0123456", "select.quota=60"])
    assert config.name == "2024"
    assert config.model.revision == "0123456"  # not the octal 42798
    assert config.select.quota == 60


def test_a_number_where_a_config_file_wants_a_string_says_to_quote_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(DEFAULT.read_text() + "\nname: 2024\n")
    with pytest.raises(UserError, match=r"name: expected a string, got 2024 .*quote it"):
        load_config(path)


def test_relative_inputs_are_looked_up_beside_the_config_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data" / "flowers").mkdir(parents=True)
    (project / "configs").mkdir()
    config = project / "configs" / "flowers.yaml"
    config.write_text(
        "dataset:\n  path: ../data/flowers\n  class_names: names.json\n"
        "model:\n  path: models/tiny-digits\n"
    )
    (project / "configs" / "names.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config(config)
    assert loaded.dataset.path == str(project / "data" / "flowers")
    assert loaded.dataset.class_names == str(project / "configs" / "names.json")
    assert loaded.model.path == "models/tiny-digits"  # nothing beside it: as written
    shell = load_config(config, ["dataset.path=data/other"])  # --set: the shell's own path
    assert shell.dataset.path == "data/other"


def test_the_default_config_keeps_its_paths_as_written(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(Path("configs/default.yaml"))
    assert (config.dataset.path, config.model.path) == ("data/digits/user", "models/tiny-digits")


def test_a_missing_local_model_folder_is_not_sent_to_the_hub(tmp_path, capsys):
    from tailseed.jobs.cli import main

    code = main(
        [
            "augment",
            "--dry-run",
            "--set",
            "model.path=models/nothere",
            "--set",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no such folder" in err and "huggingface-cli" not in err


def test_without_a_configs_folder_the_default_config_is_the_installed_one(tmp_path, monkeypatch):
    from tailseed.jobs.cli import PACKAGE_ROOT, default_config

    monkeypatch.chdir(tmp_path)
    assert default_config() == PACKAGE_ROOT / "configs" / "default.yaml"
    assert default_config().is_file()
    monkeypatch.chdir(REPO)
    assert default_config() == Path("configs/default.yaml")


def test_an_empty_set_value_clears_a_string_and_unsets_an_optional():
    config = load_config(DEFAULT, ["dataset.materialize=", "generate.guidance_scale="])
    assert config.dataset.materialize == ""
    assert config.generate.guidance_scale == config.invert.solver.guidance_scale  # follows
