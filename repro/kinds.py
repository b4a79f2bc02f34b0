"""Registry of experiment kinds: a kind turns one cell into a dict of metrics.

A kind is a plain function ``run(cell, ctx) -> dict[str, float]`` plus an optional cost function
``plan(cell) -> dict`` used by ``repro plan``. See docs/architecture.md for the full contract.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from repro.registry import Registry


@dataclass(frozen=True)
class Kind:
    name: str
    run: Callable[..., dict]
    plan: Callable[..., dict] | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


KINDS: Registry[Kind] = Registry("experiment kind")

# Modules whose import registers kinds. Each paper package owns its kinds.
KIND_MODULES = (
    "repro.restart.toy_experiments",
    "repro.restart.image_experiments",
    "repro.restart.sd_experiments",
    "repro.sparsity.synthetic_experiments",
    "repro.sparsity.lm_experiments",
    "repro.mar.experiments",
)


def register_kind(name: str, plan: Callable[..., dict] | None = None, description: str = "", **extra: Any):
    """Decorator: ``@register_kind("restart.image_fid", plan=cost_fn)``."""

    def wrap(fn: Callable[..., dict]) -> Callable[..., dict]:
        KINDS.register(name, Kind(name=name, run=fn, plan=plan, description=description or (fn.__doc__ or "").strip(), extra=extra))
        return fn

    return wrap


_loaded = False


def load_all_kinds() -> Registry[Kind]:
    """Import every module that registers kinds (the paper packages and $REPRO_PLUGINS)."""
    global _loaded
    if not _loaded:
        _loaded = True
        plugins = [m.strip() for m in os.environ.get("REPRO_PLUGINS", "").split(",") if m.strip()]
        for module in (*KIND_MODULES, *plugins):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                # A paper package that is not written yet must not break the others.
                if exc.name != module:
                    raise
    return KINDS
