"""Claim checkers: checkable statements over aggregated results.

A claim in a spec names a checker (``check = "compare"``) and its arguments. A checker receives the
table's aggregated results (one row per parameter combination, see ``repro.results.aggregate``) and
returns a verdict: "holds", "fails" or "insufficient data", with a one-line explanation of the numbers.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from repro.registry import Registry
from repro.results import select

HOLDS, FAILS, INSUFFICIENT = "holds", "fails", "insufficient data"


@dataclass(frozen=True)
class Verdict:
    status: str
    detail: str


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[pd.DataFrame, dict], Verdict]
    keys: set[str]
    description: str


CHECKS: Registry[Check] = Registry("claim checker")


def register_check(name: str, keys: set[str], description: str = ""):
    def wrap(fn: Callable[[pd.DataFrame, dict], Verdict]):
        CHECKS.register(name, Check(name, fn, set(keys), description or (fn.__doc__ or "").strip()))
        return fn

    return wrap


def evaluate_claim(df: pd.DataFrame, claim: dict[str, Any]) -> Verdict:
    check = CHECKS.get(claim["check"])
    metric = claim.get("metric")
    if df.empty or (metric is not None and metric not in df.columns):
        return Verdict(INSUFFICIENT, f"no results for metric '{metric}'" if metric else "no results")
    try:
        return check.fn(df, claim)
    except KeyError as exc:
        return Verdict(INSUFFICIENT, f"missing column {exc}")


def combine(verdicts: list[tuple[str, Verdict]]) -> Verdict:
    """Fails if any group fails; holds only if every group holds; otherwise insufficient data."""
    if not verdicts:
        return Verdict(INSUFFICIENT, "no group has data")
    statuses = {v.status for _, v in verdicts}
    status = FAILS if FAILS in statuses else HOLDS if statuses == {HOLDS} else INSUFFICIENT
    # With several groups (e.g. one per model), say which ones hold so a mixed verdict stays readable.
    if len(verdicts) > 1:
        detail = "; ".join(f"{label or 'all'} [{v.status}]: {v.detail}" for label, v in verdicts)
    else:
        detail = "; ".join(f"{label}: {v.detail}" if label else v.detail for label, v in verdicts)
    return Verdict(status, detail)


def groups(df: pd.DataFrame, for_each: list[str] | None) -> list[tuple[str, pd.DataFrame]]:
    if not for_each:
        return [("", df)]
    missing = [k for k in for_each if k not in df.columns]
    if missing:
        raise KeyError(missing[0])
    out = []
    for values, sub in df.groupby(for_each, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        out.append((", ".join(f"{k}={v}" for k, v in zip(for_each, values)), sub))
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


REDUCERS = {"min": min, "max": max, "mean": lambda xs: sum(xs) / len(xs)}
OPS = {"<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}


def _reduce(sub: pd.DataFrame, metric: str, how: str) -> float | None:
    values = [v for v in sub[metric].tolist() if isinstance(v, (int, float)) and not math.isnan(v)] if metric in sub else []
    return REDUCERS[how](values) if values else None


@register_check("compare", {"metric", "a", "b", "op", "reduce_a", "reduce_b", "for_each", "margin"})
def check_compare(df: pd.DataFrame, claim: dict) -> Verdict:
    """metric(a) op metric(b), per group; ``b`` may be a list of selectors that must all satisfy it."""
    metric, op = claim["metric"], claim.get("op", "<")
    if op not in OPS:
        return Verdict(INSUFFICIENT, f"unknown op '{op}'")
    margin = float(claim.get("margin", 0.0))
    others = claim["b"] if isinstance(claim["b"], list) else [claim["b"]]
    verdicts = []
    for label, sub in groups(df, claim.get("for_each")):
        a = _reduce(select(sub, claim["a"]), metric, claim.get("reduce_a", "mean"))
        for b_sel in others:
            b = _reduce(select(sub, b_sel), metric, claim.get("reduce_b", "mean"))
            name = label + (f" vs {b_sel}" if len(others) > 1 else "")
            if a is None or b is None:
                verdicts.append((name, Verdict(INSUFFICIENT, f"{metric}: a={a}, b={b}")))
                continue
            shifted = b - margin if op in ("<", "<=") else b + margin
            ok = OPS[op](a, shifted)
            verdicts.append((name, Verdict(HOLDS if ok else FAILS, f"{metric} {_fmt(a)} {op} {_fmt(b)}" + ("" if ok else " is false"))))
    return combine(verdicts)


def _series(sub: pd.DataFrame, x: str, metric: str) -> list[tuple[float, float]]:
    pts = [(float(xv), float(yv)) for xv, yv in zip(sub[x], sub[metric]) if yv == yv]
    return sorted(pts)


@register_check("monotone", {"metric", "x", "where", "direction", "strict", "for_each", "rel_tol"})
def check_monotone(df: pd.DataFrame, claim: dict) -> Verdict:
    """metric is non-increasing / non-decreasing along x (a relative slack ``rel_tol`` is allowed per step)."""
    metric, x = claim["metric"], claim["x"]
    decreasing = claim.get("direction", "decreasing") == "decreasing"
    strict, tol = bool(claim.get("strict", False)), float(claim.get("rel_tol", 0.0))
    verdicts = []
    for label, sub in groups(select(df, claim.get("where")), claim.get("for_each")):
        pts = _series(sub, x, metric)
        if len(pts) < 2:
            verdicts.append((label, Verdict(INSUFFICIENT, f"{len(pts)} point(s)")))
            continue
        bad = []
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            slack = tol * abs(y0)
            step_ok = (y1 < y0 - 0 if strict else y1 <= y0 + slack) if decreasing else (y1 > y0 if strict else y1 >= y0 - slack)
            if not step_ok:
                bad.append(f"{x}={_fmt(x0)}→{_fmt(x1)}: {_fmt(y0)}→{_fmt(y1)}")
        series = ", ".join(_fmt(y) for _, y in pts)
        verdicts.append((label, Verdict(FAILS if bad else HOLDS, f"{metric} along {x}: {series}" + (f" (violations: {'; '.join(bad)})" if bad else ""))))
    return combine(verdicts)


@register_check("plateau", {"metric", "x", "where", "last_n", "rel_tol", "for_each"})
def check_plateau(df: pd.DataFrame, claim: dict) -> Verdict:
    """Over the ``last_n`` largest x, the metric's spread (max-min)/mean stays within ``rel_tol``."""
    metric, x = claim["metric"], claim["x"]
    last_n, tol = int(claim.get("last_n", 3)), float(claim.get("rel_tol", 0.05))
    verdicts = []
    for label, sub in groups(select(df, claim.get("where")), claim.get("for_each")):
        pts = _series(sub, x, metric)
        if len(pts) < last_n or last_n < 2:
            verdicts.append((label, Verdict(INSUFFICIENT, f"{len(pts)} point(s), need {last_n}")))
            continue
        tail = [y for _, y in pts[-last_n:]]
        mean = sum(tail) / len(tail)
        spread = (max(tail) - min(tail)) / abs(mean) if mean else math.inf
        detail = f"{metric} over the last {last_n} {x} values: {', '.join(_fmt(y) for y in tail)} (spread {spread:.1%}, limit {tol:.0%})"
        verdicts.append((label, Verdict(HOLDS if spread <= tol else FAILS, detail)))
    return combine(verdicts)


@register_check("ends_extreme", {"metric", "x", "where", "extreme", "for_each", "mode"})
def check_ends_extreme(df: pd.DataFrame, claim: dict) -> Verdict:
    """Both the first and the last x are more extreme (min or max) than the interior.

    mode "mean" (default): each end beats the mean of the interior values; mode "strict": each end beats
    every interior value.
    """
    metric, x = claim["metric"], claim["x"]
    want_min = claim.get("extreme", "min") == "min"
    strict = claim.get("mode", "mean") == "strict"
    verdicts = []
    for label, sub in groups(select(df, claim.get("where")), claim.get("for_each")):
        pts = _series(sub, x, metric)
        if len(pts) < 3:
            verdicts.append((label, Verdict(INSUFFICIENT, f"{len(pts)} point(s), need 3")))
            continue
        first, last = pts[0][1], pts[-1][1]
        interior = [y for _, y in pts[1:-1]]
        bound = (min(interior) if want_min else max(interior)) if strict else sum(interior) / len(interior)
        ok = (max(first, last) < bound) if want_min else (min(first, last) > bound)
        what = ("every" if strict else "the mean of the") + " interior value" + ("" if strict else "s")
        detail = f"{metric}: first {_fmt(first)}, last {_fmt(last)}, {what} {_fmt(bound)} ({'lower' if want_min else 'higher'} is the extreme)"
        verdicts.append((label, Verdict(HOLDS if ok else FAILS, detail)))
    return combine(verdicts)


_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.FloorDiv)


def eval_target(expr: str, params: dict[str, Any]) -> float:
    """Evaluate an arithmetic expression over parameter names (e.g. "a/2"); nothing else is allowed."""
    tree = ast.parse(expr, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ValueError(f"target expression '{expr}' may only use numbers, parameter names and + - * / **")
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    env = {k: params[k] for k in names}
    return float(eval(compile(tree, "<target>", "eval"), {"__builtins__": {}}, env))


@register_check("tracks", {"metric", "target_expr", "where", "rel_tol", "x", "for_each", "min_points"})
def check_tracks(df: pd.DataFrame, claim: dict) -> Verdict:
    """metric stays within ``rel_tol`` of ``target_expr`` from the smallest x up to a saturation point.

    The saturation point is the largest x below which every point is within tolerance. The claim holds
    when at least ``min_points`` (default 2) leading points track the target.
    """
    metric, x, tol = claim["metric"], claim.get("x"), float(claim.get("rel_tol", 0.15))
    min_points = int(claim.get("min_points", 2))
    verdicts = []
    for label, sub in groups(select(df, claim.get("where")), claim.get("for_each")):
        rows = sorted(sub.to_dict("records"), key=lambda r: r[x] if x else 0)
        rows = [r for r in rows if r.get(metric) == r.get(metric)]
        if not rows:
            verdicts.append((label, Verdict(INSUFFICIENT, "no points")))
            continue
        tracked, saturation, errors = 0, None, []
        for r in rows:
            target = eval_target(claim["target_expr"], r["_params"])
            err = abs(r[metric] - target) / abs(target) if target else math.inf
            errors.append(f"{_fmt(r[x]) if x else ''}:{err:.0%}")
            if err <= tol and saturation is None:
                tracked += 1
            elif saturation is None:
                saturation = r[x] if x else None
        last_ok = rows[tracked - 1][x] if tracked and x else None
        detail = f"within {tol:.0%} of {claim['target_expr']} up to {x}={_fmt(last_ok) if last_ok is not None else 'none'}" + (
            f", first miss at {x}={_fmt(saturation)}" if saturation is not None else ", at every point"
        ) + f" (relative errors {', '.join(errors)})"
        status = HOLDS if tracked >= min(min_points, len(rows)) and tracked >= 1 else FAILS
        verdicts.append((label, Verdict(status, detail)))
    return combine(verdicts)


@register_check("fraction_to_match", {"metric", "a", "b", "x", "max_fraction", "direction", "rel_tol", "for_each"})
def check_fraction_to_match(df: pd.DataFrame, claim: dict) -> Verdict:
    """``a`` reaches ``b``'s best metric (within ``rel_tol``) at no more than ``max_fraction`` of the x (e.g. NFE)
    where ``b`` attains that best value."""
    metric, x = claim["metric"], claim.get("x", "nfe")
    lower = claim.get("direction", "lower") == "lower"
    frac, tol = float(claim.get("max_fraction", 0.5)), float(claim.get("rel_tol", 0.0))
    verdicts = []
    for label, sub in groups(df, claim.get("for_each")):
        a_pts, b_pts = _series(select(sub, claim["a"]), x, metric), _series(select(sub, claim["b"]), x, metric)
        if not a_pts or not b_pts:
            verdicts.append((label, Verdict(INSUFFICIENT, f"a has {len(a_pts)} point(s), b has {len(b_pts)}")))
            continue
        bx, best = (min if lower else max)(b_pts, key=lambda p: p[1])
        target = best * (1 + tol) if lower else best * (1 - tol)
        reached = [xa for xa, ya in a_pts if (ya <= target if lower else ya >= target)]
        if not reached:
            a_best = (min if lower else max)(y for _, y in a_pts)
            verdicts.append((label, Verdict(FAILS, f"a never reaches b's best {metric} {_fmt(best)} (at {x}={_fmt(bx)}); a's best is {_fmt(a_best)}")))
            continue
        xa = min(reached)
        ratio = xa / bx
        detail = f"a reaches {metric} ≤ {_fmt(target)} at {x}={_fmt(xa)}, b's best {_fmt(best)} is at {x}={_fmt(bx)} (ratio {ratio:.2f}, limit {frac:.2f})"
        verdicts.append((label, Verdict(HOLDS if ratio <= frac else FAILS, detail)))
    return combine(verdicts)
