"""Experiment kinds used only by the harness tests (loaded through REPRO_PLUGINS).

``test.seeded_mean`` does sharded work in which every item draws from its own seed, like image
generation with per-sample seeds, so its result must not depend on sharding, world size or resumption.
"""

from __future__ import annotations

import os
import time

import numpy as np

from repro.kinds import register_kind


def _plan(cell):
    return {"samples": cell.settings["n_items"], "nfe": 1, "est_seconds": 0.01 * cell.settings["n_items"]}


@register_kind("test.seeded_mean", plan=_plan)
def seeded_mean(cell, ctx):
    n, shard = cell.settings["n_items"], cell.settings["shard_size"]
    delay = float(os.environ.get("REPRO_TEST_SHARD_DELAY", cell.settings.get("delay", 0.0)))
    if cell.params.get("fail"):
        raise RuntimeError("this cell fails on purpose")

    def work(idx):
        time.sleep(delay)
        values = np.stack([np.random.default_rng(cell.seed * 1_000_003 + int(i)).standard_normal(4) for i in idx])
        return {"values": values}

    out = ctx.sharded("values", n_items=n, shard_size=shard, fn=work)
    ctx.record_work(samples=n)
    v = out["values"]
    return {"mean": float(v.mean()) + float(cell.params.get("offset", 0.0)), "energy": float((v**2).mean())}
