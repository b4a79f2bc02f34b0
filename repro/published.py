"""Published numbers (``paper_tables/<table id>.toml``): load and validate."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.errors import SpecError
from repro.registry import did_you_mean
from repro.spec import parse_toml

PAPER_TABLES_DIR = Path(os.environ.get("REPRO_PAPER_TABLES", Path(__file__).resolve().parent.parent / "paper_tables"))

FILE_KEYS = {"table", "paper", "title", "arxiv", "version", "venue", "notes", "cells", "claims", "caption", "url"}
CELL_KEYS = {"row", "column", "metric", "value", "direction", "params", "target", "source", "note", "config", "params_count", "nfe", "paper_nfe"}
SOURCE_KEYS = {"arxiv", "version", "venue", "table", "row", "column", "section", "figure", "page", "note", "confirmation"}
CLAIM_KEYS = {"id", "text", "source", "confirmation", "note"}


@dataclass
class PublishedCell:
    row: str
    column: str
    metric: str
    value: float
    direction: str
    params: dict[str, Any]
    target: bool
    source: dict[str, Any]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PublishedTable:
    table: str
    paper: str
    title: str
    path: Path
    notes: list[str]
    cells: list[PublishedCell]
    claims: list[dict[str, Any]]
    raw: dict[str, Any]

    def source_line(self) -> str:
        bits = [self.raw.get("arxiv") and f"arXiv {self.raw['arxiv']}", self.raw.get("version") or self.raw.get("venue")]
        return ", ".join(b for b in bits if b)


def validate_published(raw: dict[str, Any], path: Path) -> list[str]:
    problems = []

    def add(key: str, msg: str) -> None:
        problems.append(f"{path}: {key}: {msg}")

    for key in raw:
        if key not in FILE_KEYS:
            add(key, f"unknown key{did_you_mean(key, FILE_KEYS)}")
    if raw.get("table") != path.stem:
        add("table", f"expected '{path.stem}' (the file name), got {raw.get('table')!r}")
    for key in ("paper", "title"):
        if not isinstance(raw.get(key), str):
            add(key, "missing; expected a string")
    cells = raw.get("cells", [])
    if not isinstance(cells, list):
        add("cells", "expected an array of tables")
        cells = []
    for i, cell in enumerate(cells):
        prefix = f"cells[{i}]."
        if not isinstance(cell, dict):
            add(f"cells[{i}]", "expected a table")
            continue
        for key in cell:
            if key not in CELL_KEYS:
                add(prefix + key, f"unknown key{did_you_mean(key, CELL_KEYS)}")
        for key in ("row", "column", "metric"):
            if not isinstance(cell.get(key), str):
                add(prefix + key, "missing; expected a string")
        if not isinstance(cell.get("value"), (int, float)) or isinstance(cell.get("value"), bool):
            add(prefix + "value", f"expected a number, got {cell.get('value')!r}")
        if cell.get("direction") not in ("lower", "higher"):
            add(prefix + "direction", f"expected 'lower' or 'higher', got {cell.get('direction')!r}")
        if not isinstance(cell.get("params", {}), dict):
            add(prefix + "params", "expected a table")
        source = cell.get("source")
        if not isinstance(source, dict) or "table" not in source:
            add(prefix + "source", "expected a table with at least 'table' (plus arxiv/version, row, column)")
        else:
            for key in source:
                if key not in SOURCE_KEYS:
                    add(prefix + "source." + key, f"unknown key{did_you_mean(key, SOURCE_KEYS)}")
    claims = raw.get("claims", [])
    if not isinstance(claims, list):
        add("claims", "expected an array of tables")
    else:
        for i, claim in enumerate(claims):
            if not isinstance(claim, dict) or not isinstance(claim.get("text"), str):
                add(f"claims[{i}]", "expected a table with 'text'")
    return problems


def load_published(table_id: str, folder: Path | None = None) -> PublishedTable | None:
    path = Path(folder or PAPER_TABLES_DIR) / f"{table_id}.toml"
    if not path.exists():
        return None
    raw = parse_toml(path)
    problems = validate_published(raw, path)
    if problems:
        raise SpecError(problems)
    cells = []
    for c in raw.get("cells", []):
        known = {"row", "column", "metric", "value", "direction", "params", "target", "source", "note"}
        cells.append(
            PublishedCell(
                row=c["row"], column=c["column"], metric=c["metric"], value=float(c["value"]), direction=c["direction"],
                params=c.get("params", {}), target=bool(c.get("target", True)), source=c["source"], note=c.get("note", ""),
                extra={k: v for k, v in c.items() if k not in known},
            )
        )
    return PublishedTable(raw["table"], raw["paper"], raw["title"], path, list(raw.get("notes", [])), cells, list(raw.get("claims", [])), raw)


def published_ids(folder: Path | None = None) -> list[str]:
    return sorted(p.stem for p in Path(folder or PAPER_TABLES_DIR).glob("*.toml"))
