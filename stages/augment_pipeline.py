"""The augment pipeline declared: its config (one section per stage) and its stages in order.

`make augment` and `tailseed augment` load a YAML file into `AugmentConfig`; the dataclass
defaults are the defaults (configs/default.yaml says the same values, with why). The shard stages
run in the order of SHARD_STAGES on every shard: a stage between generate and write is one file
in stages/ and one entry here, with its config section beside the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from tailseed.pipeline.config import (
    NOT_HASHED,
    apply_overrides,
    config_hash,
    from_dict,
    hashed_unless,
    load_yaml,
)
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.models import ModelSpec
from tailseed.stages.filter import FilterConfig, FilterStage
from tailseed.stages.generate import GenerateConfig, GenerateStage
from tailseed.stages.invert import InvertConfig
from tailseed.stages.scan import ScanConfig
from tailseed.stages.select import SelectConfig
from tailseed.stages.tone import TONE_OFF, ToneConfig, ToneStage
from tailseed.stages.walk import WalkConfig
from tailseed.stages.write import ShardsConfig, WriteStage


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" starts a local Ray; inside a Ray job the job's cluster is used
    local_num_cpus: int = 0  # CPUs of the local Ray (0: all of this machine's)
    object_store_mb: int = 256  # small: blocks are small, and Ray's default takes 30% of RAM
    in_process: bool = False  # run the stages in this process, without Ray
    runtime_pip: list[str] = field(default_factory=list)  # packages a cluster's image lacks


@dataclass(frozen=True)
class AugmentConfig:
    name: str = field(default="default", metadata=NOT_HASHED)
    output_dir: str = field(default="", metadata=NOT_HASHED)  # default: out/<name>
    model: ModelSpec = field(default_factory=ModelSpec)
    dataset: ScanConfig = field(default_factory=ScanConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)
    walk: WalkConfig = field(default_factory=WalkConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    # added after outputs existed: off leaves a config's hash as it was before; on (the default)
    # enters it, so a folder written without the stage is not resumed as if it had it
    tone: ToneConfig = field(default_factory=ToneConfig, metadata=hashed_unless(TONE_OFF))
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    ray: RayConfig = field(default_factory=RayConfig, metadata=NOT_HASHED)

    def __post_init__(self) -> None:
        # Generation follows the inversion where the config leaves it open.
        solver, gen = self.invert.solver, self.generate
        resolved = replace(
            gen,
            guidance_scale=solver.guidance_scale
            if gen.guidance_scale is None
            else gen.guidance_scale,
            num_inference_steps=solver.num_inference_steps
            if gen.num_inference_steps is None
            else gen.num_inference_steps,
        )
        object.__setattr__(self, "generate", resolved)

    def out(self) -> Path:
        return Path(self.output_dir or f"out/{self.name}")


# The stages every shard goes through, in order. Each has `name` and
# `spec(config: AugmentConfig, shards_dir: Path) -> pipeline.runner.Stage`; the first takes the
# unit that GenerateStage.unit builds, the last writes the shard and its done-marker.
# A stage whose spec is None for a config (the filter or tone when off) is left out.
SHARD_STAGES = (GenerateStage, FilterStage, ToneStage, WriteStage)


def shard_stages(config: AugmentConfig, shards_dir: Path) -> list:
    """The runner's stages for the shard chain of `config`."""
    specs = [stage.spec(config, shards_dir) for stage in SHARD_STAGES]
    return [s for s in specs if s is not None]


def output_hash(config: AugmentConfig) -> str:
    """Hash of every setting that affects the output (fields marked NOT_HASHED are left out)."""
    return config_hash(config)


# Inputs that a config file names by path. A relative one is looked up beside the config file
# first, so that a config and its data can live anywhere; where nothing is there it is taken as
# written: relative to the working directory (model.path also beside the repository, or a hub id;
# filter.clip_judge also a hub id).
# Outputs (output_dir, and dataset.path where `materialize` writes the embedded dataset) are
# always relative to the working directory. `--set` values are the shell's: never looked up.
CONFIG_RELATIVE = (
    ("dataset", "path"),
    ("dataset", "class_names"),
    ("model", "path"),
    ("filter", "clip_judge"),
)


def resolve_beside(data: dict, config_dir: Path) -> dict:
    """`data` (a config file's mapping) with its relative input paths that exist beside the
    config file made absolute; everything else unchanged."""
    for section, key in CONFIG_RELATIVE:
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if section == "dataset" and key == "path" and node.get("materialize"):
            continue  # where the embedded dataset is written: an output
        beside = config_dir / value
        probe = beside.parent if "{" in beside.name else beside  # a brace pattern of tars
        if probe.exists() and config_dir.resolve() != Path.cwd().resolve():
            node[key] = os.path.normpath(beside.resolve())
    return data


def load_config(path: Path, overrides: list[str] = ()) -> AugmentConfig:
    """A YAML config file (plus `--set key=value` overrides) as an AugmentConfig, strictly."""
    data = apply_overrides(resolve_beside(load_yaml(path), Path(path).parent), list(overrides))
    try:
        return from_dict(AugmentConfig, data)
    except UserError as exc:
        raise UserError(f"config {path}: {exc}") from exc
