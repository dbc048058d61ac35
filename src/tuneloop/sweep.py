"""`tuneloop sweep`: Optuna over the recipe's declared search space; each trial is an ordinary run folder,
picked by a validation metric from its train_metrics.json (never by the test set)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import Recipe, apply_override, recipe_from_dict
from .errors import ConfigError
from .fileio import write_json_atomic


def _check_space(recipe: Recipe) -> None:
    if not recipe.sweep.space:
        raise ConfigError("sweep.space: empty; declare what to search, e.g. train.lr: {low: 1.0e-5, high: 1.0e-3, "
                          "log: true}")
    doc = recipe.model_dump(mode="json")
    for key in recipe.sweep.space:
        node = doc
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"sweep.space: {key}: not a recipe key (see `tuneloop recipe keys`)")
            node = node[part]


def _suggest(trial, key: str, dim):
    if dim.choices is not None:
        return trial.suggest_categorical(key, dim.choices)
    if dim.integer:
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_float(key, dim.low, dim.high, log=dim.log)


def run_sweep(recipe: Recipe, workspace: Path, trials: int, show_progress: bool = True) -> dict:
    import optuna

    from .runs import TRAIN_METRICS, open_run
    from .train import train_run

    _check_space(recipe)
    metric, direction = recipe.sweep.metric, recipe.sweep.direction
    base_doc = recipe.model_dump(mode="json")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=recipe.train.seed))
    rows: list[dict] = []

    def objective(trial) -> float:
        doc = dict(base_doc, name=f"{recipe.name}-trial{trial.number}")
        values = {k: _suggest(trial, k, d) for k, d in recipe.sweep.space.items()}
        for k, v in values.items():
            apply_override(doc, f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")
        r = recipe_from_dict(doc, where=f"sweep trial {trial.number}", source_dir=recipe.source_dir)
        run_dir, _ = train_run(r, workspace, show_progress=show_progress)
        m = open_run(run_dir).train_metrics
        value = m.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"sweep.metric: {metric!r} is not in the trial's {TRAIN_METRICS} "
                              f"(has: {', '.join(k for k, v in m.items() if isinstance(v, (int, float)))})")
        rows.append({"trial": trial.number, **values, metric: value, "run": str(run_dir),
                     "seconds": m.get("wall_seconds")})
        return float(value)

    study.optimize(objective, n_trials=trials)
    best = study.best_trial
    result = {"metric": metric, "direction": direction, "trials": rows, "best_trial": best.number,
              "best_value": best.value, "best_params": best.params,
              "best_run": next(r["run"] for r in rows if r["trial"] == best.number)}
    write_json_atomic(workspace / "sweeps" / f"{recipe.name}.json", result)
    return result


def print_trials(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    keys = [k for k in (result["trials"][0] if result["trials"] else {}) if k not in ("trial", "run", "seconds")]
    t = Table(title=f"sweep: {result['metric']} ({result['direction']})")
    for c in ["trial", *keys, "seconds", ""]:
        t.add_column(c)
    for r in result["trials"]:
        cells = [str(r["trial"])] + [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        t.add_row(*cells, str(r["seconds"]), "best" if r["trial"] == result["best_trial"] else "")
    console.print(t)
    console.print(f"best: trial {result['best_trial']} · {result['metric']} {result['best_value']:.4g} · {result['best_run']}")
