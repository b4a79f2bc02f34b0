"""Command line: ``repro list | plan | run | report | validate``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from repro.errors import ReproError, SpecError
from repro.provenance import REPO_ROOT
from repro.spec import SCALES

DEFAULT_RESULTS = Path(os.environ.get("REPRO_RESULTS", REPO_ROOT / "results"))
DEFAULT_REPORTS = DEFAULT_RESULTS / "reports"


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, sort_keys=False, default=str)
    sys.stdout.write("\n")


def cmd_list(args) -> int:
    from repro.published import load_published, published_ids
    from repro.results import is_complete, read_result, result_path
    from repro.spec import load_all_specs

    specs, problems = load_all_specs()
    rows = []
    for spec in specs:
        status = {}
        for scale in spec.available_scales():
            cells = spec.cells(scale)
            done = sum(is_complete(read_result(result_path(args.results, spec.id, scale, c.cell_id))) for c in cells)
            status[scale] = {"done": done, "cells": len(cells)}
        pub = load_published(spec.id)
        rows.append({
            "table": spec.id, "paper": spec.paper, "title": spec.title, "kind": spec.kind, "scales": spec.available_scales(),
            "results": status, "published_cells": len(pub.cells) if pub else 0, "published_claims": len(pub.claims) if pub else 0,
        })
    orphans = sorted(set(published_ids()) - {s.id for s in specs})
    if args.json:
        _print_json({"tables": rows, "published_without_spec": orphans, "problems": problems})
    else:
        print(f"{'table':<20} {'paper':<9} {'scales':<20} {'results (done/cells)':<36} title")
        for r in rows:
            res = ", ".join(f"{s} {v['done']}/{v['cells']}" for s, v in r["results"].items())
            print(f"{r['table']:<20} {r['paper']:<9} {','.join(r['scales']):<20} {res:<36} {r['title']}")
        for o in orphans:
            print(f"{o:<20} (published numbers only: no spec yet)")
        for p in problems:
            print(f"invalid spec: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_plan(args) -> int:
    from repro.runner import plan_table
    from repro.spec import load_table

    spec = load_table(args.table)
    rows = plan_table(spec, args.scale, results_dir=args.results)
    if args.json:
        _print_json({"table": spec.id, "scale": args.scale, "kind": spec.kind, "cells": rows})
        return 0
    total = sum(r.get("est_seconds", 0) or 0 for r in rows)
    print(f"{spec.id} at scale {args.scale}: {len(rows)} cells, estimated {total / 3600:.2f} h in total")
    for r in rows:
        params = ", ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in r["params"].items())
        cost = ", ".join(f"{k}={r[k]}" for k in ("samples", "nfe", "train_steps", "est_seconds") if k in r)
        print(f"  {r['cell_id']}  [{r['status']:<7}] {params}, seed={r['seed']}  {cost}")
    return 0


def cmd_run(args) -> int:
    from repro.runner import run_table
    from repro.spec import load_all_specs, load_table

    if args.all:
        specs, problems = load_all_specs()
        if problems:
            raise SpecError(problems)
        specs = [s for s in specs if args.scale in s.scales]
    else:
        if not args.tables:
            raise ReproError("name at least one table (see 'repro list'), or pass --all")
        specs = [load_table(t) for t in args.tables]
    failed = 0
    for spec in specs:
        summary = run_table(spec, args.scale, results_dir=args.results, device=args.device, force=args.force, only=args.only, show_progress=not args.no_progress)
        failed += sum(1 for s in summary if s["status"] == "failed")
    if failed:
        print(f"{failed} cell(s) failed; their errors are recorded in the result files and shown by 'repro report'", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args) -> int:
    from repro.report import render_index, render_table
    from repro.spec import load_all_specs, load_table

    if args.tables:
        specs, problems = [load_table(t) for t in args.tables], []
    else:
        specs, problems = load_all_specs()
    summaries = [render_table(spec, args.results, args.out) for spec in specs]
    index = render_index(summaries, args.out, problems)
    print(f"wrote {len(summaries)} table report(s) and {index}")
    return 0


def compare_to_baseline(results_dir: Path, baseline_dir: Path, scale: str, rtol: float, atol: float, tables: list[str] | None = None) -> dict:
    """Cells present in both folders (same cell id = same table, params, seed and settings) must agree."""
    from repro.results import load_results

    base = {(r["table"], r["cell_id"]): r for r in load_results(baseline_dir, None, scale) if r.get("status") == "ok"}
    compared, differing, new, failed = 0, [], [], []
    for rec in load_results(results_dir, None, scale):
        if tables and rec["table"] not in tables:
            continue
        if rec.get("status") != "ok":
            failed.append(f"{rec['table']} {rec['cell_id']}: {rec.get('error')}")
            continue
        ref = base.get((rec["table"], rec["cell_id"]))
        if ref is None:
            new.append(f"{rec['table']} {rec['cell_id']}")
            continue
        compared += 1
        for name, value in ref["metrics"].items():
            got = rec["metrics"].get(name)
            if got is None or abs(got - value) > atol + rtol * abs(value):
                differing.append(f"{rec['table']} {rec['cell_id']} {name}: baseline {value:.6g}, now {got}")
    return {"compared": compared, "differing": differing, "without_baseline": new, "failed": failed}


def cmd_compare(args) -> int:
    out = compare_to_baseline(args.results, args.baseline, args.scale, args.rtol, args.atol, args.tables or None)
    if args.json:
        _print_json(out)
    else:
        print(f"{out['compared']} cell(s) compared with {args.baseline} at scale {args.scale} (rtol {args.rtol}); "
              f"{len(out['differing'])} metric(s) differ, {len(out['without_baseline'])} cell(s) have no baseline, {len(out['failed'])} failed")
        for line in out["differing"] + [f"FAILED {f}" for f in out["failed"]]:
            print("  " + line)
    return 1 if out["differing"] or out["failed"] else 0


def cmd_validate(args) -> int:
    from repro.published import load_published, published_ids
    from repro.spec import load_spec, spec_paths

    paths = [Path(p) for p in args.paths] or list(spec_paths().values())
    problems = []
    for path in paths:
        try:
            load_spec(path)
        except SpecError as exc:
            problems.extend(exc.problems)
    if not args.paths:
        for table_id in published_ids():
            try:
                load_published(table_id)
            except SpecError as exc:
                problems.extend(exc.problems)
    for p in problems:
        print(p)
    if not problems:
        print(f"{len(paths)} spec(s) valid")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description="Reproduce the tables of MAR, Restart sampling and feature-sparsity papers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the tables, their papers, scales and result status")
    p.add_argument("--json", action="store_true")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("plan", help="each cell of a table with its parameters and cost")
    p.add_argument("table")
    p.add_argument("--scale", choices=SCALES, default="small")
    p.add_argument("--json", action="store_true")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a table's cells (resumable; completed cells are skipped)")
    p.add_argument("tables", nargs="*")
    p.add_argument("--all", action="store_true", help="every table that has the chosen scale")
    p.add_argument("--scale", choices=SCALES, default="small")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--force", action="store_true", help="rerun cells that already have a result")
    p.add_argument("--only", help="run only cells whose label or id contains this text")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write Markdown reports with plots from results/ and paper_tables/")
    p.add_argument("tables", nargs="*")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=None, help="default: <results>/reports")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="check results against committed baselines (regression guard)")
    p.add_argument("tables", nargs="*")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--baseline", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--scale", choices=SCALES, default="smoke")
    p.add_argument("--rtol", type=float, default=0.05, help="relative tolerance (CPU numerics differ slightly across machines)")
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("validate", help="validate spec files (all packaged specs and paper tables by default)")
    p.add_argument("paths", nargs="*")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "out", "unset") is None:
        args.out = Path(args.results) / "reports"
    try:
        return args.func(args)
    except SpecError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except ReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
