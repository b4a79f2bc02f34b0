"""Image metrics (FID / IS / KID / precision-recall) and their feature extractors.

Entry points for experiment kinds live in :mod:`repro.metrics.image_metrics`:
``extract(images_uint8, extractor, device, **options)`` per shard, then
``metrics_from_features(feats, ref, metrics=..., backend=...)`` and ``metrics_provenance(...)``.
"""

from repro.metrics.frechet import frechet_distance
from repro.metrics.refstats import RefStats, load_reference_stats

__all__ = ["frechet_distance", "RefStats", "load_reference_stats"]
