"""Training recipes: one readable file per task, all trained by the one loop in `loop.py` (`fit`);
`common.py` holds the few helpers they share.

`RECIPES` maps a recipe's `task` to the function that trains it: plain data, registered explicitly.
Every function takes (recipe, run_dir, show_progress, resume) and returns the training metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..config import Recipe
from ..errors import ConfigError
from ..runs import (DATA, LOSS_PLOT, RECIPE, fail_run, new_run_dir, open_run, read_history, set_mlflow_run_id,
                    start_run)


def _classify(recipe: Recipe, run_dir: Path, show_progress: bool, resume: bool = False) -> dict:
    from .classify import train_classifier

    return train_classifier(recipe, run_dir, show_progress, resume)


def _regress(recipe: Recipe, run_dir: Path, show_progress: bool, resume: bool = False) -> dict:
    if recipe.forecast is not None:  # demand forecasting on a time table: boosting + the tuned residual
        from .forecast import train_forecaster

        return train_forecaster(recipe, run_dir, show_progress, resume)
    from .regress import train_regressor

    return train_regressor(recipe, run_dir, show_progress, resume)


def _sft(recipe: Recipe, run_dir: Path, show_progress: bool, resume: bool = False) -> dict:
    from .sft import train_sft

    return train_sft(recipe, run_dir, show_progress, resume)


def _dpo(recipe: Recipe, run_dir: Path, show_progress: bool, resume: bool = False) -> dict:
    from .dpo import train_dpo

    return train_dpo(recipe, run_dir, show_progress, resume)


def _kto(recipe: Recipe, run_dir: Path, show_progress: bool, resume: bool = False) -> dict:
    from .kto import train_kto

    return train_kto(recipe, run_dir, show_progress, resume)


def _reward(recipe: Recipe, run_dir: Path, show_progress: bool, resume: bool = False) -> dict:
    from .reward import train_reward

    return train_reward(recipe, run_dir, show_progress, resume)


RECIPES: dict[str, Callable[..., dict]] = {
    "classify": _classify,
    "regress": _regress,
    "sft": _sft,
    "dpo": _dpo,
    "kto": _kto,
    "reward": _reward,
}


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _shared_run_dir(workspace: Path, name: str) -> Path:
    """Under `torchrun` / `accelerate launch` every process must train into the same folder: the main
    process creates it and tells the others."""
    if not _distributed():
        return new_run_dir(workspace, name)
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not __import__("torch").cuda.is_available())
    box = [str(new_run_dir(workspace, name)) if state.is_main_process else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _run(recipe: Recipe, run_dir: Path, workspace: Path, show_progress: bool, resume: bool) -> dict:
    if recipe.task not in RECIPES:
        raise ConfigError(f"task {recipe.task!r}: no recipe (known: {', '.join(sorted(RECIPES))})")
    # run.json says running / failed / finished (each write atomic); the recipe's save section finishes it
    if _is_main():
        start_run(run_dir, recipe)
    try:
        metrics = RECIPES[recipe.task](recipe, run_dir, show_progress, resume)
    except BaseException as e:
        # A folder that says it failed, rather than one that looks finished.
        if _is_main():
            fail_run(run_dir, recipe, e)
        raise
    if not _is_main():
        return metrics
    from ..tracking import log_to_mlflow
    from .common import log_history_to_mlflow

    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run_id = log_to_mlflow(workspace, recipe.name, run_dir.name, recipe.model_dump(mode="json"), numeric,
                           artifacts=[run_dir / RECIPE, run_dir / DATA, run_dir / LOSS_PLOT],
                           tags={"stage": "train"})
    set_mlflow_run_id(run_dir, run_id)  # the registry links a version to its tracking run through it
    h = read_history(run_dir)
    log_history_to_mlflow(workspace, run_id, h["train"], h["validation"])
    return metrics


def train_run(recipe: Recipe, workspace: Path, show_progress: bool = True,
              run_dir: Path | None = None) -> tuple[Path, dict]:
    """Create a run folder under the workspace (or train into the empty `run_dir` a caller made with
    `runs.new_run_dir` and recorded, as the loop does), train into it, log to MLflow; return (run_dir, metrics)."""
    if recipe.task not in RECIPES:
        raise ConfigError(f"task {recipe.task!r}: no recipe (known: {', '.join(sorted(RECIPES))})")
    run_dir = Path(run_dir) if run_dir is not None else _shared_run_dir(workspace, recipe.name)
    return run_dir, _run(recipe, run_dir, workspace, show_progress, resume=False)


def resume_run(run_dir: Path, workspace: Path, show_progress: bool = True) -> tuple[Path, dict]:
    """Continue an interrupted run from its last checkpoint, with the recipe it was started with."""
    run = open_run(run_dir, workspace, finished=False)
    if run.info.status == "finished":
        raise ConfigError(f"{run.dir}: this run already finished; nothing to resume")
    # The run's copy has its data paths made absolute when it was written, so it stands on its own.
    return run.dir, _run(run.recipe, run.dir, workspace, show_progress, resume=True)
