"""`tuneloop feedback ...`: export feedback as training data, add reviewers, show queues / progress /
agreement. Thin calls into the store and feedback/export.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import TuneloopError

feedback_app = typer.Typer(no_args_is_help=True, help="The feedback store: export it as training data, "
                                                      "reviewers, review progress and agreement.")
reviewers_app = typer.Typer(no_args_is_help=True, help="People who review answers on the review page.")
feedback_app.add_typer(reviewers_app, name="reviewers")
console = Console(soft_wrap=True)  # notes and paths are read (and grepped) whole, not wrapped

Workspace = Annotated[Optional[Path], typer.Option(
    "--workspace", "-w", help="Workspace folder (default: $TUNELOOP_WORKSPACE or ./workspace).")]
StoreUrl = Annotated[Optional[str], typer.Option(
    "--store", help="A SQLAlchemy URL or file of the feedback store (default: <workspace>/feedback.db).")]


def _open(workspace: Path | None, store: str | None):
    from ..runs import workspace_path
    from .store import FeedbackStore

    ws = workspace_path(workspace)
    return ws, (FeedbackStore(store) if store else FeedbackStore.for_workspace(ws))


@feedback_app.command("export")
def export(
    as_: Annotated[str, typer.Option("--as", help="sft (corrections), kto (ratings / thumbs), dpo (pairs) or "
                                     "classify (labels from /v1/classify feedback).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    since: Annotated[Optional[str], typer.Option(help="Only feedback newer than an age (7d, 12h) or an ISO date.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", help="A frozen test set whose prompts must not be exported: a data file, or a run (its held-out "
        "test records); repeatable. Default: the test sets of every run in the workspace.")] = None,
    workspace: Workspace = None,
    store: StoreUrl = None,
) -> None:
    """Write the feedback as training data that `tuneloop data check` reads."""
    from .export import export_feedback, parse_since, workspace_test_sets, write_jsonl

    ws, st = _open(workspace, store)
    try:
        records, notes = export_feedback(st, as_, parse_since(since),
                                         exclude if exclude else workspace_test_sets(ws), workspace=ws)
    finally:
        st.close()
    try:
        write_jsonl(out, records)
    except OSError as e:  # a full disk or a read-only folder is the user's to fix: one line, no traceback
        raise TuneloopError(f"{out}: cannot write ({e.strerror or e})", exit_code=1) from None
    for n in notes:
        console.print(escape(n))
    console.print(f"wrote {len(records)} records to {escape(str(out))}")


@reviewers_app.command("add")
def reviewers_add(name: str, workspace: Workspace = None, store: StoreUrl = None) -> None:
    """Add a reviewer and print their key (shown this once; the store keeps only its hash)."""
    _, st = _open(workspace, store)
    try:
        key = st.add_reviewer(name)
    finally:
        st.close()
    console.print(f"reviewer {escape(name)}: key (shown once, keep it):")
    print(key)


@feedback_app.command("stats")
def stats(queue: Annotated[Optional[str], typer.Option(help="Agreement on this queue only.")] = None,
          workspace: Workspace = None, store: StoreUrl = None) -> None:
    """Review queues, each reviewer's progress, and agreement on items reviewed more than once."""
    _, st = _open(workspace, store)
    try:
        queues, progress, agreement = st.queues(), st.progress(), st.agreement(queue)
    finally:
        st.close()
    t = Table("queue", "kind", "items", "done", "reviews", "wanted", title="queues")
    for q in queues:
        t.add_row(q["queue"], q["kind"], str(q["items"]), str(q["done"]), str(q["reviews"]), str(q["reviews_wanted"]))
    console.print(t)
    t = Table("reviewer", "reviewed", "holding", "per queue", title="progress")
    for p in progress:
        t.add_row(escape(p["reviewer"]), str(p["reviewed"]), str(p["reserved"]),
                  ", ".join(f"{k} {v}" for k, v in sorted(p["queues"].items())))
    console.print(t)

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    t = Table("mark", "items", "agree", "Cohen's kappa", "Krippendorff's alpha",
              title=f"agreement ({agreement['items']} items reviewed twice or more)")
    rows = [(m, agreement[m]) for m in ("rating", "thumb", "choice")]
    rows += [(f"criteria.{k}", v) for k, v in agreement["criteria"].items()]
    for m, a in rows:
        t.add_row(escape(m), str(a["items"]), num(a["agree"]), num(a["cohen_kappa"]), num(a["krippendorff_alpha"]))
    console.print(t)
