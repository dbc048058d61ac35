"""The model registry on a real MLflow SQLite store: versions with their lineage, model cards with the
report's metrics and intervals, promotion only through a passing gate record (or forced with a reason),
rollback along the chain of holders, the history of every alias change, and the CLI's exit codes.

Run folders are made through `runs.finish_run` (training is not the point here) with a report.json in the
one schema, one row per task; one test trains a tiny model through `tuneloop train --register`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tuneloop import registry
from tuneloop.config import recipe_from_dict
from tuneloop.errors import ConfigError, NotFoundError
from tuneloop.eval.schema import Report, headline, keyed, make_examples, write_report_json
from tuneloop.runs import (ADAPTER_CONFIG, MODEL, RECIPE, RUN_INFO, Fingerprints, TargetScale, finish_run,
                           new_run_dir, open_run, start_run, write_data_info, write_recipe)

WEIGHTS = b"not really weights, but bytes to hash"


# ---- one row per task: its recipe's data section and what its report holds


def _classify_preds(score: float, n: int) -> tuple[list, list[dict], dict]:
    refs = ["good" if i % 2 else "bad" for i in range(n)]
    preds = []
    for i, ref in enumerate(refs):
        right = i < round(score * n)
        preds.append({"label": ref if right else ("bad" if ref == "good" else "good"), "probability": 0.8,
                      "correct": right})
    return refs, preds, {"accuracy": sum(p["correct"] for p in preds) / n}


def _regress_preds(score: float, n: int) -> tuple[list, list[dict], dict]:
    refs = [100.0 + i for i in range(n)]
    preds = [{"value": r + score * (1 + i % 3), "abs_error": score * (1 + i % 3)} for i, r in enumerate(refs)]
    return refs, preds, {"mae": sum(p["abs_error"] for p in preds) / n}


def _sft_preds(score: float, n: int) -> tuple[list, list[dict], dict]:
    refs = [f"It is {2 * i}." for i in range(n)]
    preds = [{"text": r, "rougeL": min(1.0, score * (0.5 + (i % 2))), "loss": 1.0} for i, r in enumerate(refs)]
    return refs, preds, {"rougeL": sum(p["rougeL"] for p in preds) / n}


@dataclass
class Task:
    task: str
    data: Callable[[Path], dict]
    preds: Callable[[float, int], tuple[list, list[dict], dict]]
    metric: str
    direction: str


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


TASKS = [
    Task("classify", lambda d: {"train": _write(d / "c.jsonl", '{"text": "a", "label": "good"}\n')},
         _classify_preds, "accuracy", "higher"),
    Task("regress", lambda d: {"train": _write(d / "r.csv", "date,riders\n2020-01-01,1\n"), "value_field": "riders",
                               "time_field": "date", "lags": [7], "template": "{{ weekday }}"},
         _regress_preds, "mae", "lower"),
    Task("sft", lambda d: {"train": _write(d / "s.jsonl", '{"instruction": "q", "output": "a"}\n')},
         _sft_preds, "rougeL", "higher"),
]
ROWS = {t.task: t for t in TASKS}


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow store with its tables made once: creating one costs seconds of migrations, copying it none."""
    ws = tmp_path_factory.mktemp("store")
    registry.list_versions(ws)
    return ws / "mlflow.db"


@pytest.fixture
def ws(tmp_path, empty_store) -> Path:
    w = tmp_path / "ws"
    w.mkdir()
    shutil.copy(empty_store, w / "mlflow.db")
    return w


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    (d / "model.safetensors").write_bytes(WEIGHTS)
    return d


def make_run(ws: Path, row: Task, base_dir: Path, score: float | None = 0.8, name: str = "reviews",
             test_fp: str = "test-fp", n: int = 20) -> Path:
    """A finished run folder of `row`'s task; with a report.json (tuned and base) unless score is None."""
    data_dir = ws.parent / "data"
    data_dir.mkdir(exist_ok=True)
    recipe = recipe_from_dict({"name": name, "task": row.task, "model": str(base_dir), "data": row.data(data_dir)})
    run_dir = new_run_dir(ws, name)
    write_recipe(run_dir, recipe)
    start_run(run_dir, recipe)
    (run_dir / MODEL).mkdir()
    (run_dir / MODEL / ADAPTER_CONFIG).write_text("{}")
    write_data_info(run_dir, {"train_records": 40, "val_records": 5, "test_records": n, "used": 40})
    labels = ["bad", "good"] if row.task == "classify" else None
    target = TargetScale(field="riders", mean=100.0, std=10.0) if row.task == "regress" else None
    finish_run(run_dir, recipe, {"steps": 4, "final_loss": 0.5}, model_path=str(base_dir),
               fingerprints=Fingerprints(train=f"train-{name}", validation="val-fp", test=test_fp),
               labels=labels, target=target)
    if score is not None:
        refs, tuned, tuned_m = row.preds(score, n)
        _, base, base_m = row.preds(score / 2, n)
        examples = make_examples([str(r) for r in refs], refs)
        systems = {"base": base_m, "tuned": tuned_m}
        report = Report(task=row.task, title="t", run=str(run_dir), model=str(base_dir), systems=systems,
                        headline=headline(systems, row.metric, row.direction),
                        test={"path": "test.jsonl", "n": n, "fingerprint": test_fp}, examples=examples,
                        predictions={"base": keyed(examples, base), "tuned": keyed(examples, tuned)},
                        labels=labels)
        write_report_json(report, run_dir)
    return run_dir


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref,parsed", [("reviews:3", ("reviews", 3, None)),
                                        ("reviews@production", ("reviews", None, "production")),
                                        ("my.model-2:10", ("my.model-2", 10, None))])
def test_parse_ref(ref, parsed):
    assert registry.parse_ref(ref) == parsed and registry.is_ref(ref)


@pytest.mark.parametrize("ref", ["reviews", "reviews:", "reviews:x", "reviews@", ":3", "a/b:1", "a@b@c", "a:1@b"])
def test_bad_refs_name_both_forms(ref):
    with pytest.raises(ConfigError, match="NAME:VERSION .* or NAME@ALIAS"):
        registry.parse_ref(ref)
    assert not registry.is_ref(ref)


def test_an_existing_path_is_not_a_ref(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs:1").mkdir()
    assert not registry.is_ref("runs:1") and registry.is_ref("runs:2")


@pytest.mark.parametrize("row", TASKS, ids=lambda t: t.task)
@pytest.mark.slow
def test_register_two_runs_lineage_and_card(row: Task, ws, base_dir):
    first = make_run(ws, row, base_dir, score=0.6)
    second = make_run(ws, row, base_dir, score=0.9)
    v1 = registry.register(ws, first)
    v2 = registry.register(ws, second.name, parent="reviews:1")  # a run's name under <workspace>/runs/ works
    assert (v1.ref, v2.ref) == ("reviews:1", "reviews:2") and v1.task == v2.task == row.task
    assert v1.run_dir == first.resolve() and v2.run_dir == second.resolve()

    t = v2.tags
    assert t["base_model"] == str(base_dir) and t["base_weights_sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert (t["data.train"], t["data.validation"], t["data.test"]) == ("train-reviews", "val-fp", "test-fp")
    assert t["recipe"] == str(second / RECIPE)
    assert t["recipe_sha256"] == hashlib.sha256((second / RECIPE).read_bytes()).hexdigest()
    assert t["tuneloop_version"] and t["parent"] == "reviews:1" and "parent" not in v1.tags
    assert "git_commit" not in t  # tmp_path is in no git repository
    report = json.loads((second / "report.json").read_text())
    assert t["report"] == str(second / "report.json") and t["headline.metric"] == row.metric
    assert float(t["headline.tuned"]) == pytest.approx(report["headline"]["values"]["tuned"])
    assert float(t["headline.base"]) == pytest.approx(report["headline"]["values"]["base"])
    assert t["report.test_fingerprint"] == "test-fp"
    # the version links to a tracking run in the same store, remembered in the run folder
    run_id = json.loads((second / RUN_INFO).read_text())["mlflow_run_id"]
    assert t["mlflow_run_id"] == run_id and registry._client(ws).get_run(run_id).info.run_id == run_id
    assert registry._client(ws).get_model_version("reviews", "2").run_id == run_id

    # resolve by version; list
    assert registry.resolve(ws, "reviews:2") == v2
    assert [v.ref for v in registry.list_versions(ws)] == ["reviews:1", "reviews:2"]
    assert [v.ref for v in registry.list_versions(ws, "reviews")] == ["reviews:1", "reviews:2"]

    # the card: HF front matter, what it is for, data, the report's metrics with intervals, limits
    card_path = v2.model_card
    assert card_path and card_path.exists() and card_path.name == "README.md"
    card = card_path.read_text()
    fm = front_matter(card)
    assert fm["base_model"] == str(base_dir) and fm["library_name"] == "peft" and fm["metrics"] == [row.metric]
    assert row.task in fm["tags"]
    tuned_value = report["systems"]["tuned"][row.metric]
    tuned_line = next(line for line in card.splitlines() if line.startswith("| tuned |"))
    cells = [c.strip() for c in tuned_line.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(tuned_value, abs=1e-4)
    lo, hi = (float(x) for x in cells[2].strip("[]").split(","))
    assert lo <= tuned_value + 1e-4 and tuned_value - 1e-4 <= hi and lo < hi
    assert "train-reviews" in card and "| train | 40 |" in card and "test-fp" in card
    if row.task == "classify":
        assert "Labels: `bad`, `good`" in card
    if row.task == "regress":
        assert "Target: `riders`" in card
    assert "## Limits" in card and "Measured on 20 examples only" in card


def test_intervals_follow_the_spread_of_the_examples():
    row = ROWS["regress"]
    refs, preds, _ = row.preds(1.0, 40)
    examples = make_examples([str(r) for r in refs], refs)
    same = [{"value": 0, "abs_error": 2.0} for _ in refs]
    report = {"headline": {"metric": "mae"}, "predictions": {"spread": keyed(examples, preds),
                                                             "constant": keyed(examples, same)}}
    iv = registry.headline_intervals(report)
    assert iv["constant"] == (2.0, 2.0)
    lo, hi = iv["spread"]
    assert 1.0 < lo < 2.0 < hi < 3.0  # abs errors 1, 2, 3 repeating: mean 2


def test_a_run_without_a_report_has_a_card_that_says_so_and_a_gate_refreshes_it(ws, base_dir):
    row = ROWS["classify"]
    v1 = registry.register(ws, make_run(ws, row, base_dir, score=0.7))
    bare = make_run(ws, row, base_dir, score=None)
    v2 = registry.register(ws, bare)
    card = v2.model_card.read_text()
    assert "Not measured: the run has no report.json yet." in card and "No evaluation" in card
    assert "metrics" not in front_matter(card) and "headline.metric" not in v2.tags
    # the gate evaluates it (here: a report appears), then records its result; the card and tags follow
    shutil.copy(v1.run_dir / "report.json", bare / "report.json")
    gate_report = ws / "gate.json"
    gate_report.write_text("{}")
    registry.record_gate(ws, v2, v1, gate_report, passed=True)
    v2 = registry.resolve(ws, "reviews:2")
    assert v2.tags["headline.metric"] == "accuracy" and "| tuned |" in v2.model_card.read_text()
    assert registry.gate_record(v2, v1)["passed"] is True


@pytest.mark.slow
def test_promote_needs_a_passing_gate_or_force_with_why_and_rollback_goes_back(ws, base_dir):
    row = ROWS["classify"]
    v1, v2, v3 = (registry.register(ws, make_run(ws, row, base_dir, score=s)) for s in (0.6, 0.7, 0.8))
    assert registry.alias_holder(ws, "reviews", "production") is None
    with pytest.raises(NotFoundError, match="no version of reviews holds the alias 'production'"):
        registry.resolve(ws, "reviews@production")

    first = registry.promote(ws, "reviews:1")  # the first holder needs no gate
    assert first.aliases == ("production",) and registry.resolve(ws, "reviews@production") == first

    with pytest.raises(ConfigError, match="reviews:2: not promoted to reviews@production: it was never gated "
                                          "against reviews:1"):
        registry.promote(ws, "reviews:2")
    with pytest.raises(ConfigError, match="--force needs --why"):
        registry.promote(ws, "reviews:2", force=True, why="  ")
    gate_report = ws / "gate-2-vs-1.json"
    gate_report.write_text("{}")
    registry.record_gate(ws, v2, v1, gate_report, passed=False)
    with pytest.raises(ConfigError, match=r"it failed the gate against reviews:1 \(.*gate-2-vs-1.json\)"):
        registry.promote(ws, "reviews:2")
    assert registry.alias_holder(ws, "reviews", "production").ref == "reviews:1"  # nothing moved

    registry.record_gate(ws, v2, v1, gate_report, passed=True)
    assert registry.promote(ws, "reviews:2").aliases == ("production",)
    assert registry.resolve(ws, "reviews:1").aliases == ()
    # a gate against reviews:1 says nothing about reviews:2, now the holder
    registry.record_gate(ws, v3, v1, gate_report, passed=True)
    with pytest.raises(ConfigError, match="never gated against reviews:2"):
        registry.promote(ws, "reviews:3")
    forced = registry.promote(ws, "reviews:3", force=True, why="hotfix #12")
    assert forced.ref == "reviews:3"
    assert registry.promote(ws, "reviews:3").ref == "reviews:3"  # already there: no new history event
    registry.promote(ws, "reviews:1", alias="staging")

    # rollback walks back the chain of holders: 3 -> 2 -> 1, then there is nothing before the first
    assert registry.rollback(ws, "reviews").ref == "reviews:2"
    assert registry.rollback(ws, "reviews").ref == "reviews:1"
    with pytest.raises(ConfigError, match="reviews:1 is the first holder; there is nothing to roll back to"):
        registry.rollback(ws, "reviews")
    assert registry.alias_holder(ws, "reviews", "production").ref == "reviews:1"
    assert registry.alias_holder(ws, "reviews", "staging").ref == "reviews:1"

    h = registry.history(ws, "reviews")
    assert [(e["alias"], e["from"], e["to"], e["how"]) for e in h] == [
        ("production", None, "reviews:1", "first"),
        ("production", "reviews:1", "reviews:2", "gate"),
        ("production", "reviews:2", "reviews:3", "force"),
        ("staging", None, "reviews:1", "first"),
        ("production", "reviews:3", "reviews:2", "rollback"),
        ("production", "reviews:2", "reviews:1", "rollback"),
    ]
    assert h[1]["gate_report"] == str(gate_report.resolve()) and h[2]["why"] == "hotfix #12"
    assert [e["time"] for e in h] == sorted(e["time"] for e in h)
    assert all(set(e) >= {"time", "alias", "from", "to", "how", "gate_report", "why"} for e in h)


def test_a_gate_report_that_is_gone_does_not_count(ws, base_dir):
    row = ROWS["classify"]
    v1, v2 = (registry.register(ws, make_run(ws, row, base_dir, score=s)) for s in (0.6, 0.7))
    registry.promote(ws, v1.ref)
    gate_report = ws / "gate.json"
    gate_report.write_text("{}")
    registry.record_gate(ws, v2, v1, gate_report, passed=True)
    gate_report.unlink()
    with pytest.raises(ConfigError, match="its gate report against reviews:1 is gone"):
        registry.promote(ws, v2.ref)


def test_rollback_refuses_when_the_alias_was_moved_outside_tuneloop(ws, base_dir):
    row = ROWS["classify"]
    v1, v2, v3 = (registry.register(ws, make_run(ws, row, base_dir, score=s)) for s in (0.6, 0.7, 0.8))
    registry.promote(ws, v1.ref)
    registry.promote(ws, v2.ref, force=True, why="test")
    registry._client(ws).set_registered_model_alias("reviews", "production", "3")
    with pytest.raises(ConfigError, match="held by reviews:3, but the history says reviews:2"):
        registry.rollback(ws, "reviews")


def test_history_skips_a_torn_last_line_and_names_a_bad_one_elsewhere(ws, base_dir):
    v1 = registry.register(ws, make_run(ws, ROWS["classify"], base_dir))
    registry.promote(ws, v1.ref)
    f = ws / "registry" / "reviews" / "history.jsonl"
    good = f.read_text()
    f.write_text(good + '{"time": "2026-')  # a crash mid-append
    assert len(registry.history(ws, "reviews")) == 1
    f.write_text('{"nope\n' + good)
    with pytest.raises(ConfigError, match="history.jsonl:1: not valid JSON"):
        registry.history(ws, "reviews")


def test_register_refuses_what_it_cannot_register(ws, base_dir):
    row = ROWS["classify"]
    run = make_run(ws, row, base_dir)
    registry.register(ws, run)
    with pytest.raises(ConfigError, match="already registered as reviews:1"):
        registry.register(ws, run)
    with pytest.raises(ConfigError, match="a sft run; reviews holds classify models"):
        registry.register(ws, make_run(ws, ROWS["sft"], base_dir))
    with pytest.raises(ConfigError, match="'bad:name': a registered name is"):
        registry.register(ws, run, name="bad:name")
    with pytest.raises(NotFoundError, match="other: no registered model of that name .*known: reviews"):
        registry.register(ws, make_run(ws, row, base_dir), parent="other:1")
    unfinished = make_run(ws, row, base_dir)
    info = json.loads((unfinished / RUN_INFO).read_text())
    (unfinished / RUN_INFO).write_text(json.dumps({**info, "status": "running"}))
    with pytest.raises(ConfigError, match="training did not finish"):
        registry.register(ws, unfinished)
    with pytest.raises(NotFoundError, match="no such run folder"):
        registry.register(ws, ws / "runs" / "nope")
    for alias in ("latest", "v2", "a@b"):
        with pytest.raises(ConfigError, match=f"alias '{alias}'"):
            registry.promote(ws, "reviews:1", alias=alias)


def test_unknown_name_version_alias_list_what_is_known(ws, base_dir):
    with pytest.raises(NotFoundError, match="none registered yet"):
        registry.resolve(ws, "reviews:1")
    registry.register(ws, make_run(ws, ROWS["classify"], base_dir))
    registry.register(ws, make_run(ws, ROWS["sft"], base_dir), name="chat")
    with pytest.raises(NotFoundError, match=r"known: chat, reviews"):
        registry.resolve(ws, "nope:1")
    with pytest.raises(NotFoundError, match=r"reviews has no version 7 \(known: 1\)"):
        registry.resolve(ws, "reviews:7")
    registry.promote(ws, "reviews:1", alias="staging")
    with pytest.raises(NotFoundError, match=r"aliases: staging → reviews:1"):
        registry.resolve(ws, "reviews@production")
    with pytest.raises(NotFoundError):
        registry.list_versions(ws, "nope")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_workspace_git_commit_is_recorded(ws, base_dir):
    git = ["git", "-C", str(ws), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (ws / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    v = registry.register(ws, make_run(ws, ROWS["classify"], base_dir))
    assert v.tags["git_commit"] == head


# ---- the CLI


from data_helpers import run_cli_split as run_cli  # noqa: E402  (one way to call the real CLI)


@pytest.mark.slow
def test_cli_registry_commands_and_exit_codes(monkeypatch, capsys, ws, base_dir):
    monkeypatch.setenv("COLUMNS", "200")
    w = ["-w", str(ws)]
    row = ROWS["classify"]
    a, b = make_run(ws, row, base_dir, score=0.6), make_run(ws, row, base_dir, score=0.9)
    code, out, err = run_cli(monkeypatch, capsys, "registry", "register", str(a), *w)
    assert (code, out) == (0, "reviews:1\n"), err
    code, out, err = run_cli(monkeypatch, capsys, "registry", "register", b.name, "--parent", "reviews:1", *w)
    assert (code, out) == (0, "reviews:2\n"), err
    code, out, err = run_cli(monkeypatch, capsys, "registry", "register", b.name, "--name", "other",
                             "--parent", "reviews:9", *w)
    assert code == 3 and "reviews has no version 9 (known: 1, 2)" in err and "Traceback" not in err

    code, out, err = run_cli(monkeypatch, capsys, "registry", "list", *w)
    assert code == 0 and "reviews:1" in out and "reviews:2" in out and "accuracy 0.9000" in out
    code, out, err = run_cli(monkeypatch, capsys, "registry", "promote", "reviews:1", *w)
    assert code == 0 and "reviews@production → reviews:1" in out
    code, out, err = run_cli(monkeypatch, capsys, "registry", "show", "reviews@production", *w)
    assert code == 0 and "reviews:1" in out and "production" in out and "base_weights_sha256" in out
    assert str(ws / "registry" / "reviews" / "1" / "README.md") in out

    code, out, err = run_cli(monkeypatch, capsys, "registry", "promote", "reviews:2", *w)
    assert code == 2 and "never gated against reviews:1" in err and "Traceback" not in err
    code, out, err = run_cli(monkeypatch, capsys, "registry", "promote", "reviews:2", "--force", *w)
    assert code == 2 and "--force needs --why" in err
    code, out, err = run_cli(monkeypatch, capsys, "registry", "promote", "reviews:2", "--force", "--why",
                             "the old one is biased", *w)
    assert code == 0 and "reviews@production → reviews:2" in out
    code, out, err = run_cli(monkeypatch, capsys, "registry", "rollback", "reviews", *w)
    assert code == 0 and "reviews:1 (rolled back)" in out
    code, out, err = run_cli(monkeypatch, capsys, "registry", "history", "reviews", *w)
    assert code == 0 and [x for x in ("first", "force", "rollback") if x in out] == ["first", "force", "rollback"]
    assert "the old one is biased" in out

    for args, code_wanted, says in [
        (("show", "nope:1"), 3, "nope: no registered model of that name"),
        (("show", "reviews:5"), 3, "known: 1, 2"),
        (("show", "reviews@staging"), 3, "aliases: production → reviews:1"),
        (("show", "reviews"), 2, "NAME:VERSION"),
        (("history", "nope"), 3, "known: reviews"),
        (("list", "nope"), 3, "known: reviews"),
        (("rollback", "reviews", "--alias", "staging"), 3, "nothing to roll back"),
        (("register", str(ws / "runs" / "missing")), 3, "no such run folder"),
    ]:
        code, out, err = run_cli(monkeypatch, capsys, "registry", *args, *w)
        assert code == code_wanted and says in err and "Traceback" not in err, (args, code, err)


def test_train_register_links_the_version_to_its_tracking_run(monkeypatch, capsys, tmp_path, ws, tiny_llama_dir):
    lines = [json.dumps({"text": f"item {i} was {'fine' if i % 2 else 'poor'}", "label": "up" if i % 2 else "down"})
             for i in range(16)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.yaml").write_text(
        f"name: tiny\nmodel: {tiny_llama_dir}\ndata: {{train: d.jsonl}}\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        "train: {max_steps: 2, batch_size: 8, precision: fp32, threads: 1, max_length: 32}\n")
    code, out, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "r.yaml"), "-w", str(ws), "--no-progress",
                             "--register", "tiny")
    assert code == 0, err
    assert "registered: tiny:1" in out
    v = registry.resolve(ws, "tiny:1")
    run = open_run(v.run_dir)
    assert run.info.mlflow_run_id and v.tags["mlflow_run_id"] == run.info.mlflow_run_id
    tracking = registry._client(ws).get_run(run.info.mlflow_run_id)
    assert tracking.data.tags.get("stage") == "train"  # the training's own run, not one made at register time
    assert v.tags["base_weights_sha256"] == run.info.base_weights_sha256


def test_a_new_workspace_store_is_a_copy_of_one_built_once_and_an_old_one_is_never_replaced(tmp_path, monkeypatch):
    """tracking._new_store: the empty store MLflow's migrations build is made once per MLflow version in the
    cache; each new workspace gets its own copy, with MLflow's Default experiment pointed inside it."""
    import sqlite3

    import mlflow

    from tuneloop.tracking import log_to_mlflow, tracking_uri

    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    log_to_mlflow(a, "soup", "r1", {"lr": 0.1}, {"accuracy": 0.9})
    (template,) = (tmp_path / "cache").glob("mlflow-*-empty.db")
    assert template.name == f"mlflow-{mlflow.__version__}-empty.db"
    built = template.stat().st_mtime_ns
    log_to_mlflow(b, "soup", "r2", {"lr": 0.2}, {"accuracy": 0.8})
    assert template.stat().st_mtime_ns == built  # copied, not rebuilt
    assert not list(tmp_path.rglob("*.tmp"))

    # each workspace holds only its own run; the template stays empty
    runs = {ws.name: [r.info.run_name for r in mlflow.MlflowClient(tracking_uri(ws)).search_runs(
        [mlflow.MlflowClient(tracking_uri(ws)).get_experiment_by_name("soup").experiment_id])] for ws in (a, b)}
    assert runs == {"a": ["r1"], "b": ["r2"]}
    with sqlite3.connect(template) as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)
    default = mlflow.MlflowClient(tracking_uri(b)).get_experiment("0")
    assert default.artifact_location == (b / "mlartifacts" / "0").as_uri()

    # an existing store is opened as it is, never swapped for the template
    log_to_mlflow(a, "soup", "r3", {"lr": 0.3}, {"accuracy": 0.7})
    exp = mlflow.MlflowClient(tracking_uri(a)).get_experiment_by_name("soup").experiment_id
    assert len(mlflow.MlflowClient(tracking_uri(a)).search_runs([exp])) == 2
    # a workspace folder that does not exist is not made here
    assert tracking_uri(tmp_path / "nowhere").endswith("nowhere/mlflow.db") and not (tmp_path / "nowhere").exists()
