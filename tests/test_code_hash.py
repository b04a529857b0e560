"""The code hash that guards an output folder covers the product only, not the research code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.output_folder import check_output_folder, code_hash

REPO = Path(__file__).resolve().parents[1]


def _copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for folder in ("pipeline", "stages", "jobs", "research"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_editing_research_code_keeps_the_code_hash(tmp_path):
    root = _copy_repo(tmp_path)
    before = code_hash(root)
    assert before == code_hash(REPO)
    with open(root / "research" / "classifier.py", "a") as fh:  # the evaluation CNN
        fh.write("\n# an edit to the evaluation\n")
    assert code_hash(root) == before
    with open(root / "pipeline" / "inversion.py", "a") as fh:  # the product's solver
        fh.write("\n# an edit to the product\n")
    assert code_hash(root) != before


def test_a_run_of_the_same_product_code_is_resumed_and_other_code_refused(tmp_path):
    root = _copy_repo(tmp_path)
    out = tmp_path / "out"
    check_output_folder(out, "cfg", code_hash(root))
    (out / "run.json").write_text(f'{{"config_hash": "cfg", "code_hash": "{code_hash(root)}"}}')
    with open(root / "research" / "classifier.py", "a") as fh:
        fh.write("\n# an edit to the evaluation\n")
    assert check_output_folder(out, "cfg", code_hash(root))["code_hash"] == code_hash(root)
    with open(root / "stages" / "walk.py", "a") as fh:
        fh.write("\n# an edit to the product\n")
    with pytest.raises(UserError, match="different version of tailseed's code"):
        check_output_folder(out, "cfg", code_hash(root))
