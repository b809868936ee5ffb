"""blendexp: training and evaluation framework for blendshape-guided, ID-consistent face generation."""

from __future__ import annotations

from typing import Any

__all__ = ["ExpressionPipeline"]


def __getattr__(name: str) -> Any:
    """Import the pipeline (torch, diffusers) only when asked for, so ``import blendexp`` and its configs stay light."""
    if name == "ExpressionPipeline":
        from blendexp.pipeline import ExpressionPipeline

        return ExpressionPipeline
    raise AttributeError(f"module 'blendexp' has no attribute {name!r}")
