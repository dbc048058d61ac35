"""`EVALUATORS` maps a run's task to how it is evaluated: plain data, registered explicitly, like the
training `RECIPES`. Each row: the function (run, test_path, systems, out_dir, show_progress, **options)
→ report (eval/schema.py), the systems it knows, the options it takes beyond those, the function that
prints its table and the report file a person opens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from ..errors import ConfigError
from ..runs import REPORT_HTML, REPORT_JSON, Run, open_run
from .compare import SYSTEMS as CLASSIFY_SYSTEMS
from .compare import evaluate_classify
from .preference import REWARD_SYSTEMS
from .preference import SYSTEMS as PREFERENCE_SYSTEMS
from .preference import evaluate_preference, evaluate_reward, print_preference_table, print_reward_table
from .regression import SYSTEMS as REGRESS_SYSTEMS
from .regression import evaluate_regress, print_regress_table
from .report import print_table
from .textgen import SYSTEMS as SFT_SYSTEMS
from .textgen import evaluate_sft, print_sft_table


@dataclass(frozen=True)
class Evaluator:
    evaluate: Callable[..., dict]
    systems: tuple[str, ...]
    print_table: Callable[[dict, Console], None]
    options: tuple[str, ...] = ()
    report_file: str = REPORT_JSON  # the one to show a person
    caches: bool = False  # keeps base / baseline predictions in the workspace's eval cache (eval/cache.py)


def _regress(run, test_path, systems, out_dir, show_progress, **options) -> dict:
    if run.recipe.forecast is None:
        return evaluate_regress(run, test_path, systems, out_dir, show_progress, **options)
    from .forecast import backtest

    if test_path:
        raise ConfigError("--data: a forecast run is evaluated by its rolling-origin backtest over its own data")
    return backtest(run, systems, out_dir, show_progress)


def _print_regress(report: dict, out: Console) -> None:
    if report.get("kind") == "backtest":
        from .forecast import print_backtest_table

        return print_backtest_table(report, out)
    return print_regress_table(report, out)


def _classify(run, test_path, systems, out_dir, show_progress, **options) -> dict:
    return evaluate_classify(run, test_path, systems, out_dir, show_progress=show_progress, print_results=False,
                             **options)


EVALUATORS: dict[str, Evaluator] = {
    "classify": Evaluator(_classify, CLASSIFY_SYSTEMS, print_table, options=("text_field", "label_field"),
                          report_file=REPORT_HTML, caches=True),
    # forecast runs (a `forecast:` section) add gbm; `seasonal_naive` is every season of their data
    "regress": Evaluator(_regress, (*REGRESS_SYSTEMS, "gbm"), _print_regress, report_file=REPORT_HTML),
    "sft": Evaluator(evaluate_sft, SFT_SYSTEMS, print_sft_table, report_file=REPORT_HTML, caches=True),
    "dpo": Evaluator(evaluate_preference, PREFERENCE_SYSTEMS, print_preference_table, options=("judge",),
                     report_file=REPORT_HTML, caches=True),
    "kto": Evaluator(evaluate_preference, PREFERENCE_SYSTEMS, print_preference_table, options=("judge",),
                     report_file=REPORT_HTML, caches=True),
    "reward": Evaluator(evaluate_reward, REWARD_SYSTEMS, print_reward_table, report_file=REPORT_HTML,
                        caches=True),
}


def evaluator_for(task: str) -> Evaluator:
    if task not in EVALUATORS:
        raise ConfigError(f"task {task!r}: no evaluator (known: {', '.join(sorted(EVALUATORS))})")
    return EVALUATORS[task]


def evaluate_run(run: "Run | str | Path", test_path: str | None = None, systems: list[str] | None = None,
                 out_dir: Path | None = None, show_progress: bool = True, workspace: Path | None = None,
                 cache: bool = True, **options) -> dict:
    """Evaluate any run with its task's evaluator; unknown systems and options fail naming the known ones.
    `cache` False: recompute what the eval cache holds (eval/cache.py)."""
    run = open_run(run, workspace)
    ev = evaluator_for(run.task)
    for name in systems or []:
        if name not in ev.systems:
            raise ConfigError(f"--systems: unknown system {name!r} for {run.task} (known: {', '.join(ev.systems)})")
    given = {k: v for k, v in options.items() if v is not None}
    for k in given:
        if k not in ev.options:
            raise ConfigError(f"--{k.replace('_', '-')}: not used by task {run.task} "
                              f"(its options: {', '.join(ev.options) or 'none'})")
    if ev.caches:
        given["cache"] = cache
    return ev.evaluate(run, test_path, systems, out_dir, show_progress, **given)
