import textwrap

import pytest

from repro.errors import SpecError
from repro.spec import Cell, content_hash, load_spec

VALID = """
id = "{name}"
paper = "restart"
title = "t"
kind = "test.seeded_mean"
metrics = ["mean"]

[settings]
n_items = 4
shard_size = 2

[[grids]]
offset = [0.0, 1.0]

[scales.smoke]
seeds = [0]
"""


def write(tmp_path, text, name="t.case"):
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(text).replace("{name}", name))
    return path


def problems_of(tmp_path, text, name="t.case"):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text, name))
    return info.value.problems


def test_valid_spec_loads_and_expands(harness_env, tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    cells = spec.cells("smoke")
    assert [c.params for c in cells] == [{"offset": 0.0}, {"offset": 1.0}]
    assert spec.available_scales() == ["smoke"]


# (mutation of the valid spec, text expected in the single error line)
MALFORMED = [
    ("id mismatch", lambda s: s.replace('id = "{name}"', 'id = "other"'), "id: expected 't.case' (the file name)"),
    ("missing title", lambda s: s.replace('title = "t"\n', ""), "title: missing; expected a string"),
    ("unknown top key", lambda s: s.replace('title = "t"', 'title = "t"\nmetrix = ["x"]'), "metrix: unknown key (did you mean 'metrics'?)"),
    ("unknown paper", lambda s: s.replace('paper = "restart"', 'paper = "restrat"'), "paper: expected one of mar, restart, sparsity, got 'restrat' (did you mean 'restart'?)"),
    ("unknown kind", lambda s: s.replace('kind = "test.seeded_mean"', 'kind = "test.seeded_maen"'), "kind: unknown experiment kind 'test.seeded_maen' (did you mean 'test.seeded_mean'?)"),
    ("metrics not a list", lambda s: s.replace('metrics = ["mean"]', 'metrics = "mean"'), "metrics: expected a non-empty list of metric names, got string"),
    ("bad aggregate", lambda s: s.replace('metrics = ["mean"]', 'metrics = ["mean"]\naggregate = "mni"'), "aggregate: expected one of mean, min, max, got 'mni' (did you mean 'min'?)"),
    ("grid value not a list", lambda s: s.replace("offset = [0.0, 1.0]", "offset = 0.5"), "grids[0].offset: expected a non-empty list of values, got float"),
    ("unknown scale", lambda s: s.replace("[scales.smoke]", "[scales.smal]"), "scales.smal: unknown scale (did you mean 'small'?)"),
    ("seeds missing", lambda s: s.replace("seeds = [0]", 'description = "x"'), "scales.smoke.seeds: missing; expected a non-empty list of integer seeds"),
    ("seeds not ints", lambda s: s.replace("seeds = [0]", 'seeds = ["zero"]'), "scales.smoke.seeds: expected a non-empty list of integer seeds"),
    ("duplicate seeds", lambda s: s.replace("seeds = [0]", "seeds = [1, 1]"), "scales.smoke.seeds: duplicate seeds in [1, 1]"),
    ("unknown scale key", lambda s: s.replace("seeds = [0]", "seeds = [0]\nseed = 3"), "scales.smoke.seed: unknown key (did you mean 'seeds'?)"),
    ("no cells", lambda s: s.replace("[[grids]]\noffset = [0.0, 1.0]\n", ""), "scales.smoke: no cells: give [[grids]] or [[cells]]"),
    ("duplicate cells", lambda s: s.replace("offset = [0.0, 1.0]", "offset = [1.0, 1.0]"), "scales.smoke: duplicate cell"),
    ("unknown claim check", lambda s: s + '\n[[claims]]\nid = "c"\ntext = "x"\ncheck = "monotonic"\nmetric = "mean"\n', "claims[0].check: unknown claim checker 'monotonic' (did you mean 'monotone'?)"),
    ("unknown claim arg", lambda s: s + '\n[[claims]]\nid = "c"\ntext = "x"\ncheck = "monotone"\nmetric = "mean"\nx = "offset"\ndirektion = "up"\n', "claims[0].direktion: unknown key (did you mean 'direction'?)"),
    ("claim metric not reported", lambda s: s + '\n[[claims]]\nid = "c"\ntext = "x"\ncheck = "monotone"\nmetric = "fid"\nx = "offset"\n', "claims[0].metric: 'fid' is not in metrics ['mean']"),
    ("plot y unknown", lambda s: s + '\n[[plots]]\nx = "offset"\ny = "maen"\n', "plots[0].y: 'maen' is not in metrics ['mean'] (did you mean 'mean'?)"),
    ("negative tolerance", lambda s: s + "\n[tolerance]\nmean = -1\n", "tolerance.mean: expected a non-negative number, got -1"),
    ("bad toml", lambda s: s + "\n[[grids]\n", "not valid TOML"),
]


@pytest.mark.parametrize("mutate,expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_spec_gives_one_clear_line(harness_env, tmp_path, mutate, expected):
    problems = problems_of(tmp_path, mutate(VALID))
    assert len(problems) == 1, problems
    assert expected in problems[0], problems[0]
    assert problems[0].startswith(str(tmp_path)), "each problem names the file"


def test_malformed_specs_are_distinct():
    assert len({m[2] for m in MALFORMED}) == len(MALFORMED) >= 15


def test_cli_prints_problems_without_traceback(harness_env, tmp_path, capsys):
    from repro.cli import main

    path = write(tmp_path, VALID.replace("[scales.smoke]", "[scales.smol]"))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "scales.smol: unknown scale" in out and "Traceback" not in out


def test_cell_hash_ignores_key_order():
    a = Cell("t", "smoke", "k", {"x": 1, "y": {"b": 2, "a": [1, 2]}}, 0, {"n": 1, "m": 2})
    b = Cell("t", "smoke", "k", {"y": {"a": [1, 2], "b": 2}, "x": 1}, 0, {"m": 2, "n": 1})
    assert a.cell_id == b.cell_id
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})


def test_cell_hash_changes_with_content():
    base = Cell("t", "smoke", "k", {"x": 1}, 0, {"n": 1})
    variants = [
        Cell("t", "small", "k", {"x": 1}, 0, {"n": 1}),
        Cell("t", "smoke", "k", {"x": 2}, 0, {"n": 1}),
        Cell("t", "smoke", "k", {"x": 1}, 1, {"n": 1}),
        Cell("t", "smoke", "k", {"x": 1}, 0, {"n": 2}),
        Cell("u", "smoke", "k", {"x": 1}, 0, {"n": 1}),
    ]
    ids = {v.cell_id for v in variants}
    assert base.cell_id not in ids and len(ids) == len(variants)


def test_scale_overrides_grid_and_settings(harness_env, tmp_path):
    text = VALID + '\n[scales.small]\nseeds = [0, 1]\nsettings = { n_items = 8 }\ngrids = [{ offset = [5.0] }]\n'
    spec = load_spec(write(tmp_path, text))
    small = spec.cells("small")
    assert [(c.params, c.seed, c.settings["n_items"], c.settings["shard_size"]) for c in small] == [({"offset": 5.0}, 0, 8, 2), ({"offset": 5.0}, 1, 8, 2)]
    with pytest.raises(SpecError, match="has no scale 'paper'"):
        spec.cells("paper")
