"""Recipes: LAVIS's runner, tasks, dataset builders and evaluators, with an offline-built BLIP wrapped by
Aurora (see ``trainer.train``). Importing this package imports LAVIS lazily (on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["CheckpointStore", "DataError", "Recipe", "RecipeError", "ResumeError", "TrainResult",
           "check_datasets", "dataset_options", "dataset_section", "generated_recipe", "load_recipe", "train",
           "write_recipe"]

_WHERE = {
    "CheckpointStore": "run_state", "ResumeError": "run_state",
    "DataError": "data", "check_datasets": "data", "dataset_options": "data", "dataset_section": "data",
    "generated_recipe": "data", "write_recipe": "data",
    "Recipe": "recipe", "RecipeError": "recipe", "load_recipe": "recipe",
    "TrainResult": "result", "train": "trainer",
}

if TYPE_CHECKING:  # pragma: no cover
    from .run_state import CheckpointStore, ResumeError
    from .data import DataError, check_datasets, dataset_options, dataset_section, generated_recipe, write_recipe
    from .recipe import Recipe, RecipeError, load_recipe
    from .result import TrainResult
    from .trainer import train


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'aurora_pet.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
