import os
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SPEC = """
id = "test.tbl"
paper = "restart"
title = "harness test table"
kind = "test.seeded_mean"
metrics = ["mean", "energy"]

[settings]
n_items = 40
shard_size = 5

[[grids]]
offset = [0.0, 1.0, 2.0]

[scales.smoke]
seeds = [0, 1]

[[claims]]
id = "offset_raises_mean"
text = "the mean grows with the offset"
check = "monotone"
metric = "mean"
x = "offset"
direction = "increasing"

[[claims]]
id = "wrong_way"
text = "the mean falls with the offset"
check = "monotone"
metric = "mean"
x = "offset"
direction = "decreasing"

[[plots]]
x = "offset"
y = "mean"
"""


@pytest.fixture()
def harness_env(tmp_path, monkeypatch):
    """A spec folder with test.tbl, the test kinds plugin, and a results folder."""
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "test.tbl.toml").write_text(textwrap.dedent(SPEC))
    monkeypatch.setenv("REPRO_SPECS", str(specs))
    monkeypatch.setenv("REPRO_PLUGINS", "tests.harness.plugin_kinds")
    root = str(HERE.parent.parent)
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if root not in sys.path:
        sys.path.insert(0, root)
    import tests.harness.plugin_kinds  # noqa: F401  (registers the kind in this process)

    return {"specs": specs, "results": tmp_path / "results", "tmp": tmp_path}
