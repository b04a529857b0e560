"""The `tailseed` command line: every subcommand's arguments, declared here without heavy imports.

Nothing here imports torch, diffusers or Ray: `tailseed --help`, `tailseed augment --help` and
`--version` answer at once. A subcommand's job module is imported when the subcommand runs
(`func` names it as "module:function").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path

from tailseed.jobs import console

# The checkout's root, or the installed package's folder: both hold configs/ and models/.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path("configs/default.yaml")
DEFAULT_MODEL = "models/tiny-digits"


def default_config() -> Path:
    """configs/default.yaml of the working directory (a checkout), else the one installed with
    tailseed (the embedded digits run)."""
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else PACKAGE_ROOT / DEFAULT_CONFIG


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tailseed")
    except PackageNotFoundError:
        return "(not installed)"


def _defaults(text: str) -> str:
    return f"{text} (default: %(default)s)"


def add_augment(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "augment",
        help="augment the rare classes of a dataset (see configs/)",
        description="Find the rare classes of a labelled image dataset, invert their images into "
        "noise seeds, walk between the seeds and generate new images, written as WebDataset "
        "shards under the config's output_dir (default out/<name>). A rerun of the same command "
        "resumes; see README.md.",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the YAML config; relative input paths in it are looked up beside it first "
        "(default: configs/default.yaml here, else the one installed with tailseed: the "
        "embedded digits run; configs/ has Stable Diffusion ones)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set select.quota=60 (repeatable; VALUE is YAML: "
        "quote strings YAML would read as numbers, e.g. --set 'model.revision=\"0123456\"')",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, dataset, model config and output folder, print the plan and "
        "its cost, then stop (only the UNet is loaded, to time a few passes)",
    )
    p.add_argument(
        "--no-timing",
        dest="timing",
        action="store_false",
        help="with --dry-run: skip the few UNet passes that estimate the plan's time",
    )
    p.add_argument(
        "--ray-address",
        default="",
        help="a Ray cluster: ray://HOST:10001 or HOST:6379 connects, http://HOST:8265 submits "
        "a Ray job (default: a private local Ray; also the RAY_ADDRESS of `make augment`)",
    )
    console.add_flags(p, at_top=False)
    p.set_defaults(func="tailseed.jobs.augment:main_args")
    return p


def _solver_flags(parser) -> None:
    """One flag per InversionConfig field, with its default and help: the solver's settings are
    the command line's, so a new one needs no change here."""
    from tailseed.pipeline.inversion_config import SOLVER_NAMES, InversionConfig

    hints = typing.get_type_hints(InversionConfig)
    for f in dataclasses.fields(InversionConfig):
        flags = ["--" + f.name.replace("_", "-")]
        kwargs = {"type": hints[f.name], "default": f.default}
        if f.name == "method":
            kwargs["choices"] = list(SOLVER_NAMES)
        if f.name == "num_inference_steps":
            flags.insert(0, "--steps")
        parser.add_argument(
            *flags, dest=f.name, help=_defaults(f.metadata.get("help", "")), **kwargs
        )


def _model_flags(parser) -> None:
    """--model and --device, as `invert` and `generate` take them."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=_defaults("diffusers folder or hub id")
    )
    parser.add_argument(
        "--device",
        default="auto",
        help=_defaults("auto (cuda where present, else cpu), cpu or cuda"),
    )


def add_seed_commands(sub) -> None:
    inv = sub.add_parser(
        "invert",
        help="invert images into noise seeds (a seeds Parquet file)",
        description="Invert images into noise seeds with fixed-point inversion, with the same "
        "defaults as `tailseed augment` (configs/default.yaml). Each image's key is its file "
        "stem with characters outside [A-Za-z0-9_-] replaced by '_'.",
    )
    inv.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files; any size: centre-cropped to a square and resized to the model's",
    )
    _model_flags(inv)
    inv.add_argument("--prompt", required=True, help="the prompt that describes the images")
    inv.add_argument("--out", required=True, type=Path, help="seeds Parquet file to write")
    inv.add_argument(
        "--class-index", type=int, default=None, help=_defaults("class index of the images")
    )
    inv.add_argument("--class-name", default=None, help="class name (default: from the model card)")
    _solver_flags(inv)
    inv.add_argument(
        "--noise-seed", type=int, default=0, help=_defaults("base seed of the adjustment noise")
    )
    inv.add_argument(
        "--batch-size", type=int, default=16, help=_defaults("images per inversion batch")
    )
    console.add_flags(inv, at_top=False)
    inv.set_defaults(func="tailseed.jobs.seed_commands:run_invert")

    gen = sub.add_parser(
        "generate",
        help="generate images from a seeds (or walks) Parquet file",
        description="Regenerate DIR/<key>.png from each row's seed, prompt, guidance and steps.",
    )
    _model_flags(gen)
    gen.add_argument(
        "--seeds",
        required=True,
        type=Path,
        help="seeds or walks Parquet file, or a folder of them (a run's walks/class_NNNN/)",
    )
    gen.add_argument("--out", required=True, type=Path, help="folder for <key>.png")
    gen.add_argument(
        "--tone",
        type=Path,
        help="a run's tone/tone.json: tone the images as that run's tone stage did (gray, each "
        "class's histogram), so that they compare with its shards",
    )
    gen.add_argument("--batch-size", type=int, default=16, help=_defaults("images per batch"))
    console.add_flags(gen, at_top=False)
    gen.set_defaults(func="tailseed.jobs.seed_commands:run_generate")


def add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise an augment output folder",
        description="Summarise an output folder of `tailseed augment`: status, classes, shards, "
        "health warnings, what the filter dropped, inversion quality and timings.",
    )
    p.add_argument("out", type=Path, help="the output folder (the config's output_dir)")
    p.set_defaults(func="tailseed.jobs.inspect_output:main_args")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailseed", description="Grow the rare classes of an image dataset."
    )
    parser.add_argument("--version", action="version", version=f"tailseed {_version()}")
    console.add_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_augment(sub)
    add_seed_commands(sub)
    add_inspect(sub)
    return parser


def resolve(func: str):
    module, name = func.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    from tailseed.jobs.exits import guarded

    args = build_parser().parse_args(argv)
    console.configure(args.verbosity)
    return guarded(args.command, resolve(args.func), args)


if __name__ == "__main__":
    sys.exit(main())
