"""repro: a reproducibility benchmark suite for MAR, Restart sampling and feature-sparsity metrics."""

__version__ = "0.1.0"
