"""Markdown reports with plots, regenerated from ``results/`` and ``paper_tables/`` alone (no compute).

Paper scale: each published cell gets published | reproduced (mean ± std, n) | Δ | verdict, where the
tolerance is the seed spread (2 std) or a per-metric floor, whichever is larger: PASS within it, WARN
within twice it, FAIL beyond, NOT RUN without a result.
Small and smoke scales never get a numeric verdict against the paper: their claims are evaluated
instead (holds / fails / insufficient data).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from repro.claims import FAILS, HOLDS, INSUFFICIENT, eval_target, evaluate_claim
from repro.published import PublishedTable, load_published
from repro.results import aggregate, load_results, select
from repro.spec import SCALES, Spec, canonical_json

# Absolute tolerance floors per metric (used when the seed spread is smaller or unknown). A spec's
# [tolerance] table overrides them.
TOLERANCE_FLOORS = {
    "fid": 0.10, "fid_no_cfg": 0.10, "fid_cfg": 0.10, "fid_5k": 0.30, "rfid": 0.10,
    "is": 3.0, "is_no_cfg": 3.0, "is_cfg": 3.0,
    "precision": 0.01, "recall": 0.01, "precision_no_cfg": 0.01, "recall_no_cfg": 0.01, "precision_cfg": 0.01, "recall_cfg": 0.01,
    "clip_score": 0.002, "aesthetic": 0.02, "seconds_per_image": 0.03,
}
DEFAULT_FLOOR_REL = 0.02  # 2% of the published value for metrics without a floor


@dataclass
class CellVerdict:
    published: float
    reproduced: float | None
    std: float | None
    n: int
    delta: float | None
    tolerance: float | None
    verdict: str


def tolerance_for(metric: str, published: float, std: float | None, n: int, overrides: dict[str, float]) -> float:
    floor = overrides.get(metric, TOLERANCE_FLOORS.get(metric, DEFAULT_FLOOR_REL * abs(published)))
    spread = 2.0 * std if (std is not None and n > 1) else 0.0
    return max(floor, spread)


def verdict_for(published: float, reproduced: float | None, tol: float | None) -> str:
    if reproduced is None or tol is None:
        return "NOT RUN"
    delta = abs(reproduced - published)
    return "PASS" if delta <= tol else "WARN" if delta <= 2 * tol else "FAIL"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _param_text(value: Any) -> str:
    text = canonical_json(value) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|")


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def compare_published(spec: Spec, published: PublishedTable, df: pd.DataFrame) -> list[tuple[Any, CellVerdict]]:
    out = []
    for cell in published.cells:
        if not cell.target:
            continue
        rows = select(df, cell.params) if not df.empty else df
        reproduced = std = None
        n = 0
        if not df.empty and len(rows) == 1 and cell.metric in rows.columns and rows.iloc[0].get(f"{cell.metric}__n", 0):
            row = rows.iloc[0]
            n = int(row[f"{cell.metric}__n"])
            reproduced = float(row[f"{cell.metric}__{spec.aggregate}"] if spec.aggregate != "mean" else row[cell.metric])
            std = float(row[f"{cell.metric}__std"])
        tol = tolerance_for(cell.metric, cell.value, std, n, spec.tolerance) if reproduced is not None else None
        delta = reproduced - cell.value if reproduced is not None else None
        out.append((cell, CellVerdict(cell.value, reproduced, std, n, delta, tol, verdict_for(cell.value, reproduced, tol))))
    return out


def _plot(spec: Spec, plot: dict[str, Any], df: pd.DataFrame, scale: str, out_path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, series = plot["x"], plot["y"], plot.get("series")
    data = select(df, plot.get("where"))
    if data.empty or x not in data.columns or y not in data.columns:
        return False
    data = data[data[y].notna()]
    if data.empty:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    groups = list(data.groupby(series, sort=True)) if series and series in data.columns else [(None, data)]
    for name, sub in groups:
        sub = sub.sort_values(x)
        yerr = sub[f"{y}__std"] if f"{y}__std" in sub else None
        ax.errorbar(sub[x].astype(float), sub[y], yerr=yerr, marker="o", ms=4, capsize=3, label=f"{series}={name}" if name is not None else y)
    if plot.get("reference_line"):
        xs = sorted(set(float(v) for v in data[x]))
        ys = [eval_target(plot["reference_line"], {x: v}) for v in xs]
        ax.plot(xs, ys, "k--", lw=1, label=plot["reference_line"])
    if plot.get("logx"):
        ax.set_xscale("log")
    if plot.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(plot.get("title") or f"{spec.id} ({scale}): {y} vs {x}", fontsize=10)
    ax.grid(alpha=0.3)
    if len(groups) > 1 or plot.get("reference_line"):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return True


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers sort numerically (layer 2 before layer 10), everything else as text after them."""
    return column.map(lambda v: (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v)))


def _scale_section(spec: Spec, scale: str, records: list[dict[str, Any]], out_dir: Path, summary: dict[str, Any]) -> list[str]:
    lines = [f"## Scale `{scale}`", ""]
    block = spec.scales.get(scale, {})
    if block.get("description"):
        lines += [block["description"], ""]
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    current_ids = {c.cell_id for c in spec.cells(scale)} if scale in spec.scales else set()
    expected = len(current_ids)
    stale = [r for r in ok if r.get("cell_id") not in current_ids]
    lines.append(f"Cells: {len(ok) - len(stale)} ok, {len(failed)} failed, {expected} in the current spec" + (f"; {len(stale)} further results come from an older version of the spec and are left out" if stale else "") + ".")
    # Only results of the current spec's cells are aggregated: a changed setting must not mix with old numbers.
    if current_ids:
        ok = [r for r in ok if r.get("cell_id") in current_ids]
    prov = [r.get("provenance", {}) for r in records]
    commits = sorted({(p.get("git") or {}).get("commit", "")[:10] + ("+dirty" if (p.get("git") or {}).get("dirty") else "") for p in prov if p.get("git")})
    devices = sorted({(p.get("machine") or {}).get("device_name", "?") for p in prov})
    wall = sum(p.get("wall_seconds", 0) for p in prov)
    lines.append(f"Produced by commit(s) {', '.join(c for c in commits if c) or 'unknown'} on {', '.join(devices)}; total cell time {wall / 60:.1f} min.")
    lines.append(f"Command: `repro run {spec.id} --scale {scale}`")
    lines.append("")
    df = aggregate(ok, spec.metrics)
    if not df.empty:
        param_cols = [c for c in df.columns if not c.startswith("_") and "__" not in c and c not in spec.metrics]
        metric_cols = [m for m in spec.metrics if m in df.columns]
        rows = []
        for _, r in df.sort_values(param_cols, key=_sort_key).iterrows() if param_cols else df.iterrows():
            cells = [_param_text(r["_params"].get(p, "")) for p in param_cols]
            for m in metric_cols:
                n = int(r.get(f"{m}__n", 0) or 0)
                cells.append(f"{_fmt(r[m])} ± {_fmt(r[f'{m}__std'], 2)} (n={n})" if n > 1 else (_fmt(r[m]) if n else "—"))
            rows.append(cells)
        lines += ["### Results (mean ± std over seeds)", "", _md_table(param_cols + metric_cols, rows), ""]
    claims = spec.claims_for(scale)
    if claims:
        lines += ["### Claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
        for claim in claims:
            v = evaluate_claim(df, claim)
            summary["claims"].setdefault(scale, Counter())[v.status] += 1
            mark = {"holds": "✅ holds", "fails": "❌ fails"}.get(v.status, "⚪ " + v.status)
            lines.append(f"| {claim['text'].replace('|', '/')} | {mark} | {v.detail.replace('|', '/')} |")
        lines.append("")
    plot_links = []
    for i, plot in enumerate(spec.plots):
        if scale not in plot.get("scales", SCALES):
            continue
        name = f"{spec.id}-{scale}-{plot.get('file') or i}.png"
        if _plot(spec, plot, df, scale, out_dir / "plots" / name):
            plot_links.append(f"![{plot['y']} vs {plot['x']}](plots/{name})")
    if plot_links:
        lines += ["### Plots", ""] + plot_links + [""]
    if failed:
        lines += ["### Failed cells", ""]
        for r in failed:
            label = ", ".join(f"{k}={_param_text(v)}" for k, v in sorted(r.get("params", {}).items()))
            lines.append(f"- `{label}, seed={r.get('seed')}`: {str(r.get('error')).splitlines()[0] if r.get('error') else 'unknown error'}")
        lines.append("")
    extras = [r for r in ok if r.get("extra")]
    # Settings the cells recorded (e.g. restart_gamma): only those shared by most cells, not per-cell numbers.
    seen: dict[str, set[str]] = {}
    for r in extras:
        for k, v in r["extra"].items():
            if isinstance(v, (str, int, float, bool)):
                seen.setdefault(k, set()).add(_param_text(v))
    notes = sorted(f"{k}={' / '.join(sorted(vals))}" for k, vals in seen.items() if len(vals) <= 3)
    if notes:
        lines += ["Settings recorded by the cells: " + "; ".join(notes[:20]), ""]
    return lines


def render_table(spec: Spec, results_dir: Path, out_dir: Path, paper_tables: Path | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/<table id>.md``; returns a summary for the index."""
    published = load_published(spec.id, paper_tables)
    summary: dict[str, Any] = {"table": spec.id, "paper": spec.paper, "title": spec.title, "verdicts": Counter(), "claims": {}, "scales": {}}
    lines = [f"# {spec.id}: {spec.title}", ""]
    if published is not None:
        lines.append(f"Published source: {published.title} — {published.source_line()}.")
    lines += [f"Spec: `{os.path.relpath(spec.path, Path.cwd()) if spec.path.is_absolute() else spec.path}` (hash `{spec.spec_hash}`), kind `{spec.kind}`, seeds aggregate: {spec.aggregate}.", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    all_records = load_results(results_dir, spec.id)
    by_scale = {s: [r for r in all_records if r.get("scale") == s] for s in SCALES}
    # Published vs reproduced (paper scale only).
    if published is not None and published.cells:
        df_paper = aggregate([r for r in by_scale["paper"] if r.get("status") == "ok"], None)
        comparisons = compare_published(spec, published, df_paper)
        rows = []
        for cell, v in comparisons:
            summary["verdicts"][v.verdict] += 1
            rep = "—" if v.reproduced is None else (f"{_fmt(v.reproduced)} ± {_fmt(v.std, 2)} (n={v.n})" if v.n > 1 else f"{_fmt(v.reproduced)} (n={v.n})")
            rows.append([cell.row.replace("|", "/"), cell.column.replace("|", "/"), cell.metric, ("↓ " if cell.direction == "lower" else "↑ ") + _fmt(cell.value), rep, _fmt(v.delta, 3) if v.delta is not None else "—", v.verdict])
        lines += ["## Published vs reproduced (paper scale)", ""]
        lines.append(f"Reproduced = {spec.aggregate} over seed sets; tolerance = max(per-metric floor, 2·std over seeds).")
        lines += ["", _md_table(["row", "column", "metric", "published", "reproduced", "Δ", "verdict"], rows), ""]
        reference = [c for c in published.cells if not c.target]
        if reference:
            lines += [f"{len(reference)} further published cells are baselines copied from other papers and are shown for reference only:", ""]
            lines += [_md_table(["row", "column", "metric", "published", "note"], [[c.row, c.column, c.metric, _fmt(c.value), c.note.replace("|", "/")] for c in reference]), ""]
    if published is not None and published.claims:
        lines += ["## The paper's claims", ""]
        for claim in published.claims:
            src = claim.get("source")
            src_text = ", ".join(f"{k} {v}" for k, v in src.items()) if isinstance(src, dict) else (src or "")
            lines.append(f"- {claim['text']}" + (f" _(source: {src_text})_" if src_text else ""))
        lines.append("")
    if published is not None and published.notes:
        lines += ["## Known inconsistencies and notes", ""] + [f"- {n}" for n in published.notes] + [""]
    if spec.notes:
        lines += ["## Reproduction notes", ""] + [f"- {n}" for n in spec.notes] + [""]
    for scale in SCALES:
        if by_scale[scale]:
            summary["scales"][scale] = sum(1 for r in by_scale[scale] if r.get("status") == "ok")
            lines += _scale_section(spec, scale, by_scale[scale], out_dir, summary)
        elif scale in spec.scales:
            lines += [f"## Scale `{scale}`", "", f"NOT RUN: no results under `{results_dir}`. Run `repro run {spec.id} --scale {scale}`.", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines).rstrip() + "\n"
    (out_dir / f"{spec.id}.md").write_text(text)
    # Plots this report no longer links (a plot removed or renumbered in the spec) would linger as stale files.
    linked = set(re.findall(r"\(plots/([^)]+\.png)\)", text))
    for old in (out_dir / "plots").glob(f"{spec.id}-*.png"):
        if old.name not in linked:
            old.unlink()
    return summary


def render_index(summaries: list[dict[str, Any]], out_dir: Path, problems: list[str] | None = None) -> Path:
    lines = ["# Reproduction reports", "", "Generated by `repro report` from `results/` and `paper_tables/`.", ""]
    rows = []
    for s in summaries:
        v, c = s["verdicts"], s["claims"]
        verdicts = ", ".join(f"{k} {v[k]}" for k in ("PASS", "WARN", "FAIL", "NOT RUN") if v.get(k)) or "—"
        claims = "; ".join(
            f"{scale}: " + ", ".join(f"{k} {c[scale][k]}" for k in (HOLDS, FAILS, INSUFFICIENT) if c[scale].get(k))
            for scale in SCALES if scale in c
        ) or "—"
        scales = ", ".join(f"{k} ({n})" for k, n in s["scales"].items()) or "none"
        rows.append([f"[{s['table']}]({s['table']}.md)", s["paper"], s["title"].replace("|", "/"), scales, verdicts, claims])
    lines.append(_md_table(["table", "paper", "title", "results (ok cells)", "paper-scale verdicts", "claims"], rows))
    if problems:
        lines += ["", "## Specs that failed validation", ""] + [f"- {p}" for p in problems]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.md"
    path.write_text("\n".join(lines) + "\n")
    return path
