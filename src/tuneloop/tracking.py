"""MLflow tracking with a SQLite store inside the workspace, so projects never mix."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from .fileio import fsync_dir


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


def quiet_mlflow() -> None:
    """After `import mlflow`: it configures its own loggers when imported, and its database-migration
    chatter is noise in a training log."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)


def tracking_uri(workspace: Path) -> str:
    """The workspace's one MLflow store: tracking runs and the model registry both live in it. A new
    workspace's store is put in place here, before MLflow first opens it (see `_new_store`)."""
    db = Path(workspace) / "mlflow.db"
    if not db.exists() and db.parent.is_dir():
        _new_store(db)
    return f"sqlite:///{db}"


def _new_store(db: Path) -> None:
    """An empty store at `db`, copied from one built once per MLflow version in tuneloop's cache.

    MLflow makes a new SQLite store by running each of its schema migrations in turn: about 3 s on 2 cores,
    paid by every new workspace (and by every test that trains). For one MLflow version the result is always
    the same empty database, so it is built once and copied; MLflow still checks the schema when it opens
    the copy. Where the cache cannot be written, MLflow builds the store itself, as it would without this."""
    import shutil
    import sqlite3

    import mlflow

    from .zoo import cache_dir

    quiet_mlflow()
    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    building = template.with_name(f"{template.name}.{os.getpid()}.tmp")
    copy = db.with_name(f"{db.name}.{os.getpid()}.tmp")
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()
            os.replace(building, template)  # whole or absent: a process racing this one builds its own
        shutil.copyfile(template, copy)
        with sqlite3.connect(copy) as con:
            # MLflow points its Default experiment at ./mlruns of whichever directory made the store;
            # inside the workspace it cannot litter the user's current folder.
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                        ((db.parent / "mlartifacts" / "0").as_uri(),))
        con.close()
        with open(copy, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(copy, db)  # never over a store another process put there meanwhile
        except FileExistsError:
            pass
        fsync_dir(db.parent)
    except (OSError, sqlite3.Error):
        pass
    finally:
        for leftover in (building, copy):
            leftover.unlink(missing_ok=True)


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

    quiet_mlflow()
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
