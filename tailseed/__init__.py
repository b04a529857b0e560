"""tailseed: grow the rare classes of a labelled image dataset from inverted diffusion seeds.

Installed, the product is one namespace: tailseed.pipeline, tailseed.stages and tailseed.jobs, with
the default configs (tailseed/configs) and the embedded models (tailseed/models) as package data.
In a checkout those are the repository's top-level folders pipeline/, stages/, jobs/, configs/
and models/; an editable install (`make setup`) maps them. A checkout used without any install (a
Ray job's copy of the repository on a cluster) finds them through the lines below.
"""

from __future__ import annotations

from pathlib import Path

_checkout = Path(__file__).resolve().parents[1]
if (_checkout / "pyproject.toml").is_file() and (_checkout / "pipeline" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - a package's own __path__
