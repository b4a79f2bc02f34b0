"""Declarative experiment specs: load, validate, expand into cells, hash.

A spec is a TOML file ``repro/tables/<table id>.toml`` (schema in docs/architecture.md). Validation
collects every problem as one line (file, key path, what was expected, did-you-mean) and raises a
single :class:`SpecError`, so the CLI prints them without a traceback.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.errors import SpecError
from repro.registry import did_you_mean

SCALES = ("smoke", "small", "paper")
PAPERS = ("mar", "restart", "sparsity")
AGGREGATES = ("mean", "min", "max")

SPEC_DIR = Path(__file__).resolve().parent / "tables"

TOP_KEYS = {
    "id": "the table id, equal to the file name",
    "paper": "one of " + ", ".join(PAPERS),
    "title": "a one-line title",
    "description": "free text",
    "kind": "a registered experiment kind",
    "metrics": "a list of metric names",
    "aggregate": "how seeds combine: " + ", ".join(AGGREGATES),
    "settings": "a table of settings shared by every scale",
    "grids": "an array of tables, each a cartesian product of lists",
    "cells": "an array of tables, each one cell's parameters",
    "scales": "a table with one sub-table per scale",
    "claims": "an array of claim tables",
    "plots": "an array of plot tables",
    "tolerance": "a table: metric -> absolute tolerance floor",
    "notes": "a list of strings",
}
SCALE_KEYS = {
    "seeds": "a non-empty list of integer seeds",
    "settings": "a table of settings for this scale",
    "grids": "an array of tables (replaces the top-level grids for this scale)",
    "cells": "an array of tables (replaces the top-level cells for this scale)",
    "description": "free text",
}
CLAIM_KEYS_COMMON = {"id", "text", "check", "scales", "source", "note", "paper_claim"}
PLOT_KEYS = {"x", "y", "series", "where", "logx", "logy", "title", "reference_line", "scales", "kind", "file"}


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same content always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Cell:
    table: str
    scale: str
    kind: str
    params: dict[str, Any]
    seed: int
    settings: dict[str, Any]

    @property
    def cell_id(self) -> str:
        return content_hash(self.identity())

    def identity(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "scale": self.scale,
            "kind": self.kind,
            "params": self.params,
            "seed": self.seed,
            "settings": self.settings,
        }

    def label(self) -> str:
        parts = [f"{k}={_short(v)}" for k, v in sorted(self.params.items())]
        return ", ".join(parts + [f"seed={self.seed}"])


def _short(value: Any) -> str:
    text = canonical_json(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Spec:
    id: str
    paper: str
    title: str
    kind: str
    metrics: list[str]
    path: Path
    raw: dict[str, Any]
    aggregate: str = "mean"
    description: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    claims: list[dict[str, Any]] = field(default_factory=list)
    plots: list[dict[str, Any]] = field(default_factory=list)
    tolerance: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def spec_hash(self) -> str:
        return content_hash(self.raw)

    def available_scales(self) -> list[str]:
        return [s for s in SCALES if s in self.scales]

    def scale_settings(self, scale: str) -> dict[str, Any]:
        merged = copy.deepcopy(self.settings)
        merged.update(copy.deepcopy(self.scales[scale].get("settings", {})))
        return merged

    def cells(self, scale: str) -> list[Cell]:
        if scale not in self.scales:
            raise SpecError([f"{self.path}: table '{self.id}' has no scale '{scale}'; available: {', '.join(self.available_scales()) or 'none'}"])
        block = self.scales[scale]
        grids = block["grids"] if "grids" in block else self.raw.get("grids", [])
        explicit = block["cells"] if "cells" in block else self.raw.get("cells", [])
        settings = self.scale_settings(scale)
        params_list = expand_params(grids, explicit)
        return [
            Cell(self.id, scale, self.kind, params, int(seed), settings)
            for params in params_list
            for seed in block["seeds"]
        ]

    def claims_for(self, scale: str) -> list[dict[str, Any]]:
        return [c for c in self.claims if scale in c.get("scales", SCALES)]


def expand_params(grids: list[dict[str, list]] | dict, explicit: list[dict]) -> list[dict[str, Any]]:
    """Union of every grid's cartesian product and the explicit cells, in file order."""
    if isinstance(grids, dict):
        grids = [grids]
    out: list[dict[str, Any]] = []
    for grid in grids:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            out.append(dict(zip(keys, values)))
    out.extend(copy.deepcopy(c) for c in explicit)
    return out


# --------------------------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    return {dict: "table", list: "array", str: "string", int: "integer", float: "float", bool: "boolean"}.get(type(value), type(value).__name__)


class _Checker:
    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    def unknown_keys(self, table: dict, allowed: dict | set, prefix: str) -> None:
        for key in table:
            if key not in allowed:
                self.add(f"{prefix}{key}", f"unknown key{did_you_mean(key, list(allowed))}")

    def expect(self, table: dict, key: str, kind: type | tuple[type, ...], prefix: str, what: str, required: bool = True) -> bool:
        if key not in table:
            if required:
                self.add(f"{prefix}{key}", f"missing; expected {what}")
            return False
        value = table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            self.add(f"{prefix}{key}", f"expected {what}, got {_type_name(value)} {_short(value)}")
            return False
        return True


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _check_grids(chk: _Checker, grids: Any, prefix: str) -> None:
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(grids, list):
        chk.add(prefix.rstrip("."), f"expected {TOP_KEYS['grids']}, got {_type_name(grids)}")
        return
    for i, grid in enumerate(grids):
        where = f"{prefix}[{i}]"
        if not isinstance(grid, dict) or not grid:
            chk.add(where, "expected a non-empty table of parameter -> list of values")
            continue
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                chk.add(f"{where}.{key}", f"expected a non-empty list of values, got {_type_name(values)} {_short(values)} (use [[cells]] for a single list-valued parameter)")


def _check_cells(chk: _Checker, cells: Any, prefix: str) -> None:
    if not isinstance(cells, list):
        chk.add(prefix.rstrip("."), f"expected {TOP_KEYS['cells']}, got {_type_name(cells)}")
        return
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not cell:
            chk.add(f"{prefix}[{i}]", "expected a non-empty table of parameters")


def validate_raw(raw: dict[str, Any], path: Path, *, known_kinds: list[str] | None = None, known_checks: dict[str, set[str]] | None = None) -> list[str]:
    """Return one line per problem in a parsed spec (empty when valid)."""
    chk = _Checker(path)
    chk.unknown_keys(raw, TOP_KEYS, "")
    if chk.expect(raw, "id", str, "", "a string (the table id)"):
        if raw["id"] != path.stem:
            chk.add("id", f"expected '{path.stem}' (the file name), got '{raw['id']}'")
    if chk.expect(raw, "paper", str, "", TOP_KEYS["paper"]) and raw["paper"] not in PAPERS:
        chk.add("paper", f"expected {TOP_KEYS['paper']}, got '{raw['paper']}'{did_you_mean(raw['paper'], PAPERS)}")
    chk.expect(raw, "title", str, "", "a string")
    chk.expect(raw, "description", str, "", "a string", required=False)
    if chk.expect(raw, "kind", str, "", "a registered experiment kind") and known_kinds is not None and raw["kind"] not in known_kinds:
        chk.add("kind", f"unknown experiment kind '{raw['kind']}'{did_you_mean(raw['kind'], known_kinds)}")
    if chk.expect(raw, "metrics", list, "", "a non-empty list of metric names"):
        if not raw["metrics"] or not all(isinstance(m, str) for m in raw["metrics"]):
            chk.add("metrics", "expected a non-empty list of strings")
    if chk.expect(raw, "aggregate", str, "", "a string", required=False) and raw["aggregate"] not in AGGREGATES:
        chk.add("aggregate", f"expected one of {', '.join(AGGREGATES)}, got '{raw['aggregate']}'{did_you_mean(raw['aggregate'], AGGREGATES)}")
    chk.expect(raw, "settings", dict, "", "a table", required=False)
    if "grids" in raw:
        _check_grids(chk, raw["grids"], "grids")
    if "cells" in raw:
        _check_cells(chk, raw["cells"], "cells")
    if chk.expect(raw, "tolerance", dict, "", "a table of metric -> number", required=False):
        for key, value in raw["tolerance"].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                chk.add(f"tolerance.{key}", f"expected a non-negative number, got {_short(value)}")
    if chk.expect(raw, "notes", list, "", "a list of strings", required=False):
        if not all(isinstance(n, str) for n in raw["notes"]):
            chk.add("notes", "expected a list of strings")

    if chk.expect(raw, "scales", dict, "", "a table with sub-tables " + ", ".join(SCALES)):
        if not raw["scales"]:
            chk.add("scales", "expected at least one of " + ", ".join(SCALES))
        for scale, block in raw["scales"].items():
            prefix = f"scales.{scale}."
            if scale not in SCALES:
                chk.add(f"scales.{scale}", f"unknown scale{did_you_mean(scale, SCALES)}; expected one of {', '.join(SCALES)}")
                continue
            if not isinstance(block, dict):
                chk.add(f"scales.{scale}", f"expected a table, got {_type_name(block)}")
                continue
            chk.unknown_keys(block, SCALE_KEYS, prefix)
            if chk.expect(block, "seeds", list, prefix, SCALE_KEYS["seeds"]):
                seeds = block["seeds"]
                if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                    chk.add(prefix + "seeds", f"expected {SCALE_KEYS['seeds']}, got {_short(seeds)}")
                elif len(set(seeds)) != len(seeds):
                    chk.add(prefix + "seeds", f"duplicate seeds in {seeds}")
            chk.expect(block, "settings", dict, prefix, "a table", required=False)
            if "grids" in block:
                _check_grids(chk, block["grids"], prefix + "grids")
            if "cells" in block:
                _check_cells(chk, block["cells"], prefix + "cells")
            has_grids = block.get("grids", raw.get("grids"))
            has_cells = block.get("cells", raw.get("cells"))
            if not has_grids and not has_cells:
                chk.add(f"scales.{scale}", "no cells: give [[grids]] or [[cells]] at the top level or in this scale")
            elif not chk.problems:
                params = expand_params(has_grids or [], has_cells or [])
                seen: set[str] = set()
                for p in params:
                    key = canonical_json(p)
                    if key in seen:
                        chk.add(f"scales.{scale}", f"duplicate cell {_short(p)}")
                    seen.add(key)

    metrics = raw.get("metrics") if isinstance(raw.get("metrics"), list) else []
    if "claims" in raw:
        if not isinstance(raw["claims"], list):
            chk.add("claims", f"expected an array of tables, got {_type_name(raw['claims'])}")
        else:
            ids: set[str] = set()
            for i, claim in enumerate(raw["claims"]):
                prefix = f"claims[{i}]."
                if not isinstance(claim, dict):
                    chk.add(f"claims[{i}]", "expected a table")
                    continue
                if chk.expect(claim, "id", str, prefix, "a string"):
                    if claim["id"] in ids:
                        chk.add(prefix + "id", f"duplicate claim id '{claim['id']}'")
                    ids.add(claim["id"])
                chk.expect(claim, "text", str, prefix, "a string")
                if chk.expect(claim, "check", str, prefix, "a registered claim checker") and known_checks is not None:
                    check = claim["check"]
                    if check not in known_checks:
                        chk.add(prefix + "check", f"unknown claim checker '{check}'{did_you_mean(check, list(known_checks))}")
                    else:
                        allowed = known_checks[check] | CLAIM_KEYS_COMMON
                        chk.unknown_keys(claim, allowed, prefix)
                if "metric" in claim and metrics and claim["metric"] not in metrics:
                    chk.add(prefix + "metric", f"'{claim['metric']}' is not in metrics {metrics}{did_you_mean(str(claim['metric']), metrics)}")
                if chk.expect(claim, "scales", list, prefix, "a list of scales", required=False):
                    for s in claim["scales"]:
                        if s not in SCALES:
                            chk.add(prefix + "scales", f"unknown scale '{s}'{did_you_mean(str(s), SCALES)}")
    if "plots" in raw:
        if not isinstance(raw["plots"], list):
            chk.add("plots", f"expected an array of tables, got {_type_name(raw['plots'])}")
        else:
            for i, plot in enumerate(raw["plots"]):
                prefix = f"plots[{i}]."
                if not isinstance(plot, dict):
                    chk.add(f"plots[{i}]", "expected a table")
                    continue
                chk.unknown_keys(plot, PLOT_KEYS, prefix)
                chk.expect(plot, "x", str, prefix, "a parameter name")
                if chk.expect(plot, "y", str, prefix, "a metric name") and metrics and plot["y"] not in metrics:
                    chk.add(prefix + "y", f"'{plot['y']}' is not in metrics {metrics}{did_you_mean(plot['y'], metrics)}")
    return chk.problems


def parse_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([f"{path}: not valid TOML: {exc}"]) from None
    except FileNotFoundError:
        raise SpecError([f"{path}: file not found"]) from None


def load_spec(path: str | Path, *, strict: bool = True) -> Spec:
    """Parse and validate one spec file; ``strict`` also checks kind and claim names against the registries."""
    path = Path(path)
    raw = parse_toml(path)
    known_kinds = known_checks = None
    if strict:
        from repro.claims import CHECKS
        from repro.kinds import load_all_kinds

        known_kinds = load_all_kinds().names()
        known_checks = {name: CHECKS.get(name).keys for name in CHECKS.names()}
    problems = validate_raw(raw, path, known_kinds=known_kinds, known_checks=known_checks)
    if problems:
        raise SpecError(problems)
    return Spec(
        id=raw["id"],
        paper=raw["paper"],
        title=raw["title"],
        kind=raw["kind"],
        metrics=list(raw["metrics"]),
        path=path,
        raw=raw,
        aggregate=raw.get("aggregate", "mean"),
        description=raw.get("description", ""),
        settings=raw.get("settings", {}),
        scales=raw["scales"],
        claims=raw.get("claims", []),
        plots=raw.get("plots", []),
        tolerance=raw.get("tolerance", {}),
        notes=raw.get("notes", []),
    )


def spec_dirs() -> list[Path]:
    """The packaged specs plus any extra folders in $REPRO_SPECS (os.pathsep-separated)."""
    extra = [Path(p) for p in os.environ.get("REPRO_SPECS", "").split(os.pathsep) if p]
    return [*extra, SPEC_DIR]


def spec_paths() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in reversed(spec_dirs()):  # earlier folders win
        for path in sorted(folder.glob("*.toml")):
            found[path.stem] = path
    return dict(sorted(found.items()))


def find_spec(table_id: str) -> Path:
    paths = spec_paths()
    if table_id not in paths:
        raise SpecError([f"unknown table '{table_id}'{did_you_mean(table_id, list(paths))}; run 'repro list' to see the tables"])
    return paths[table_id]


def load_table(table_id: str, *, strict: bool = True) -> Spec:
    return load_spec(find_spec(table_id), strict=strict)


def load_all_specs(*, strict: bool = True) -> tuple[list[Spec], list[str]]:
    """Every spec that validates, plus the problems of those that do not."""
    specs, problems = [], []
    for path in spec_paths().values():
        try:
            specs.append(load_spec(path, strict=strict))
        except SpecError as exc:
            problems.extend(exc.problems)
    return specs, problems
