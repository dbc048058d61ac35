"""The quickstart: real reviews, the bundled model, LoRA, and an honest three-way comparison."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from .config import load_recipe
from .errors import NotFoundError

console = Console()

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart-reviews.yaml"


def run_quickstart(workspace: Path, overrides: list[str] | None = None, show_progress: bool = True) -> dict:
    from .eval.compare import evaluate_classify
    from .runs import REPORT_HTML, REPORT_JSON, open_run
    from .tracking import log_to_mlflow
    from .train import train_run

    t0 = time.time()
    if not RECIPE.exists():
        raise NotFoundError(f"{RECIPE}: quickstart recipe not found (run from a clone of the repository)")
    recipe = load_recipe(RECIPE, overrides)
    console.rule(f"[bold]tuneloop quickstart[/] · {recipe.name} · model {recipe.model}")
    console.print(f"workspace: {workspace}")
    run_dir, train_metrics = train_run(recipe, workspace, show_progress)
    console.print(
        f"trained {train_metrics['steps']} steps on {train_metrics['examples']} reviews in "
        f"{train_metrics['train_seconds']:.0f} s ({train_metrics['tokens_per_second']:.0f} tokens/s, "
        f"{train_metrics['trainable_params']:,} trainable parameters, {train_metrics['dtype']})"
    )
    report = evaluate_classify(open_run(run_dir), show_progress=show_progress, print_results=False)
    report["wall_seconds"] = round(time.time() - t0, 2)
    from .eval.report import print_table, write_report

    write_report(report, run_dir)
    print_table(report, console)
    metrics = {f"{name}.{k}": v[k] for name, v in report["systems"].items() for k in ("accuracy", "macro_f1")}
    metrics["wall_seconds"] = report["wall_seconds"]
    log_to_mlflow(workspace, recipe.name, f"{run_dir.name}-eval", {"run": str(run_dir)}, metrics,
                  artifacts=[run_dir / REPORT_JSON, run_dir / REPORT_HTML], tags={"stage": "eval"})
    console.print(f"report: {run_dir / REPORT_HTML}  ·  total {report['wall_seconds']:.0f} s")
    return report
