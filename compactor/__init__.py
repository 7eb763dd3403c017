"""compactor: compress trained models and prove they fit their targets.

The public API is re-exported here; importing it stays light (no torch, no onnxruntime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compactor.version import __version__

__all__ = ["__version__", "load_recipe", "optimize"]

if TYPE_CHECKING:
    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe


def __getattr__(name: str):
    if name == "load_recipe":
        from compactor.recipe import load_recipe

        return load_recipe
    if name == "optimize":
        from compactor.pipeline import optimize

        return optimize
    raise AttributeError(f"module 'compactor' has no attribute {name!r}")
