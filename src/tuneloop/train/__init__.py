"""Training recipes: one readable file per method; `common.py` holds the few helpers they share.

`RECIPES` maps a recipe's `task` to the function that trains it: plain data, registered explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import Recipe
from ..errors import ConfigError
from ..fileio import write_text_atomic
from ..runs import new_run_dir


def _classify(recipe: Recipe, run_dir: Path, show_progress: bool) -> dict:
    from .classify import train_classifier

    return train_classifier(recipe, run_dir, show_progress)


RECIPES: dict[str, Callable[[Recipe, Path, bool], dict]] = {
    "classify": _classify,
}


def train_run(recipe: Recipe, workspace: Path, show_progress: bool = True) -> tuple[Path, dict]:
    """Create a run folder under the workspace, train into it, log to MLflow; return (run_dir, metrics)."""
    if recipe.task not in RECIPES:
        raise ConfigError(f"task {recipe.task!r}: no recipe (known: {', '.join(sorted(RECIPES))})")
    run_dir = new_run_dir(workspace, recipe.name)
    try:
        metrics = RECIPES[recipe.task](recipe, run_dir, show_progress)
    except BaseException:
        # Leave a marker rather than a folder that looks finished.
        write_text_atomic(run_dir / "FAILED", "training did not finish\n")
        raise
    from ..tracking import log_to_mlflow

    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log_to_mlflow(workspace, recipe.name, run_dir.name, recipe.model_dump(mode="json"), numeric,
                  artifacts=[run_dir / "recipe.yaml", run_dir / "data.json"], tags={"stage": "train"})
    return run_dir, metrics
