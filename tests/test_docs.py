"""The README's measured figures are the ones `bench/` and `experiments/` wrote."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import readme  # noqa: E402


def test_readme_measured_block_is_rendered_from_the_result_files():
    """Re-rendered from bench/results and experiments/results, the block equals README.md's: a figure
    typed by hand, or a result file updated without `python bench/readme.py`, fails here."""
    with open(os.path.join(ROOT, "README.md")) as f:
        _, block, _ = readme._split(f.read())
    assert block == "\n".join(readme.render()), "README.md is stale: run `python bench/readme.py`"


def test_every_figure_line_names_the_file_it_comes_from():
    for line in readme.render()[1:-1]:
        assert "bench/" in line or "experiments/" in line, line
