"""MLflow tracking with a SQLite store inside the workspace, so projects never mix."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any


# the characters MLflow accepts in a parameter name
_PARAM_NAME = re.compile(r"^[\w\-. :/]+$")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        # a dict keyed by the user's own names (labels, "true->predicted" error costs) stays one value
        # when a name is not one MLflow takes
        if isinstance(v, dict) and all(_PARAM_NAME.match(str(x)) for x in v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tracking_uri(workspace: Path) -> str:
    """The workspace's one MLflow store: tracking runs and the model registry both live in it."""
    return f"sqlite:///{Path(workspace) / 'mlflow.db'}"


def log_to_mlflow(
    workspace: Path,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: list[Path] = (),
    tags: dict[str, str] | None = None,
) -> str:
    """Log one finished run; returns the MLflow run id."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    # After the import: mlflow configures its own loggers when imported, and its database-migration
    # chatter is noise in a training log.
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)

    mlflow.set_tracking_uri(tracking_uri(workspace))
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(experiment, artifact_location=(workspace / "mlartifacts").as_uri())
    else:
        exp_id = exp.experiment_id
    flat = {k: ("" if v is None else str(v)[:500]) for k, v in _flatten(params).items()}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags or {}) as run:
        mlflow.log_params(flat)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for a in artifacts:
            if Path(a).exists():
                mlflow.log_artifact(str(a))
        return run.info.run_id
