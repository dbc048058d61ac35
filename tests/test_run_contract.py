"""The run-folder contract, one row per task: train a tiny model, open the run, load it for inference,
evaluate it through the eval table (the report follows the one schema, with a prediction of every
system for every test example), and serve it. A new task is a new row in `TASKS`."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

import pytest

from tuneloop.config import recipe_from_dict
from tuneloop.errors import ConfigError, NotFoundError
from tuneloop.eval.schema import Report
from tuneloop.eval.tasks import EVALUATORS, evaluate_run
from tuneloop.runs import FORMAT_VERSION, HISTORY, RUN_INFO, TRAIN_METRICS, load_for_inference, open_run
from tuneloop.train import RECIPES, train_run

TINY_TRAIN = {"batch_size": 8, "lr": 1e-2, "precision": "fp32", "threads": 1, "max_length": 48, "max_steps": 4}
TINY_METHOD = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def classify_data(tmp: Path) -> dict:
    rng = random.Random(0)

    def write(name: str, n: int) -> str:
        rows = []
        for i in range(n):
            good = i % 2
            word = rng.choice(["great", "tasty", "lovely"] if good else ["awful", "stale", "bland"])
            rows.append({"text": f"the soup was {word} {i}", "label": "good" if good else "bad"})
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp / name)

    return {"train": write("train.jsonl", 32), "test": write("test.jsonl", 10)}


def sft_data(tmp: Path) -> dict:
    path = tmp / "chat.jsonl"
    with path.open("w") as f:
        for i in range(30):
            row = {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."}
            f.write(json.dumps(row) + "\n")
    return {"train": str(path), "test_ratio": 0.2, "val_ratio": 0.2}


def regress_data(tmp: Path) -> dict:
    path = tmp / "daily.csv"
    rng = random.Random(0)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "temp", "riders"])
        for i in range(60):
            d = date(2020, 1, 6) + timedelta(days=i)
            w.writerow([d.isoformat(), round(rng.uniform(20, 80)), round(1000 + 800 * (d.weekday() < 5), 1)])
    return {"train": str(path), "value_field": "riders", "time_field": "date", "lags": [7], "test_ratio": 0.2,
            "val_ratio": 0.15, "template": "{{ weekday }}, temp {{ temp }}"}


def preference_data(tmp: Path) -> dict:
    path = tmp / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.",
                                "rejected": f"It is {2 * i + 1}.", "margin": 1.0}) + "\n")
    return {"train": str(path), "test_ratio": 0.2, "val_ratio": 0.2}


def kto_data(tmp: Path) -> dict:
    path = tmp / "thumbs.jsonl"
    with path.open("w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i + i % 2}.",
                                "label": i % 2 == 0}) + "\n")
    return {"train": str(path), "test_ratio": 0.2, "val_ratio": 0.2}


def serve_classify(tc, name: str) -> None:
    r = tc.post("/v1/classify", json={"model": name, "input": ["the soup was great", "the soup was stale"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and {d["label"] for d in data} <= {"good", "bad"}
    assert abs(sum(data[0]["probabilities"].values()) - 1) < 1e-4


def serve_chat(tc, name: str) -> None:
    r = tc.post("/v1/chat/completions", json={"model": name, "max_tokens": 4, "temperature": 0,
                                              "messages": [{"role": "user", "content": "What is 2 plus 2?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name and isinstance(r.json()["choices"][0]["message"]["content"], str)


@dataclass
class Task:
    task: str
    data: Callable[[Path], dict]
    # what serving this run means (None: the task is not servable, and loading it says so clearly)
    serve: Callable | None
    eval: dict


TASKS = [
    Task("classify", classify_data, serve_classify, {"batch_size": 8}),
    Task("sft", sft_data, serve_chat, {"batch_size": 4, "max_new_tokens": 4, "max_test_examples": 3}),
    Task("regress", regress_data, None, {"batch_size": 8}),
    Task("dpo", preference_data, serve_chat, {"batch_size": 4, "max_new_tokens": 4, "max_test_examples": 3}),
    Task("kto", kto_data, serve_chat, {"batch_size": 4, "max_new_tokens": 4, "max_test_examples": 3}),
    Task("reward", preference_data, None, {"batch_size": 4}),
]


def test_every_trainable_task_has_a_row_and_an_evaluator():
    assert {t.task for t in TASKS} == set(RECIPES) == set(EVALUATORS)


@pytest.mark.parametrize("row", TASKS, ids=lambda t: t.task)
@pytest.mark.slow
def test_train_open_load_evaluate_serve(row: Task, tmp_path, tiny_llama_dir):
    recipe = recipe_from_dict({"name": f"contract-{row.task}", "task": row.task, "model": str(tiny_llama_dir),
                               "data": row.data(tmp_path), "method": TINY_METHOD, "train": TINY_TRAIN,
                               "eval": row.eval})
    ws = tmp_path / "ws"
    run_dir, metrics = train_run(recipe, ws, show_progress=False)

    # ---- open: the typed description, found by path and by name
    run = open_run(run_dir.name, ws)
    assert run.dir == run_dir and run.task == row.task and run.recipe.name == recipe.name
    info = run.info
    assert info.format_version == FORMAT_VERSION and info.status == "finished" and info.finished
    assert info.base_model == str(tiny_llama_dir) and info.model_path == str(tiny_llama_dir)
    assert info.base_weights_sha256 and len(info.base_weights_sha256) == 64
    assert info.input.max_length == 48 and info.data.train and info.metrics["steps"] == metrics["steps"] == 4
    assert run.base_model_path() == str(tiny_llama_dir)
    hist = json.loads((run_dir / HISTORY).read_text())
    assert set(hist) == {"train", "validation"} and [h["step"] for h in hist["train"]] == [1, 2, 3, 4]

    # ---- load for inference: a typed object, nothing stuck onto the model
    loaded = load_for_inference(run)
    assert loaded.task == row.task and loaded.input == info.input and not loaded.model.training
    assert loaded.labels == (["bad", "good"] if row.task == "classify" else None)
    assert (loaded.target is not None) == (row.task == "regress")
    assert not hasattr(loaded.model, "input_max_length")

    # ---- evaluate through the table: the one schema, a prediction of every system for every example
    report = evaluate_run(run, show_progress=False)
    on_disk = Report.model_validate_json((run_dir / "report.json").read_text())
    assert on_disk.model_dump(mode="json") == report
    assert on_disk.task == row.task and on_disk.test.n == len(on_disk.examples) > 0
    assert set(on_disk.systems) == set(on_disk.predictions) == set(on_disk.headline.values)
    assert set(on_disk.systems) <= set(EVALUATORS[row.task].systems) and "tuned" in on_disk.systems
    ids = [e.id for e in on_disk.examples]
    assert len(set(ids)) == len(ids)
    for system, preds in on_disk.predictions.items():
        assert list(preds) == ids, system
    tuned = [p for p in on_disk.predictions["tuned"].values()]
    assert all(p is not None for p in tuned)
    if row.task == "classify":
        correct = [p["correct"] for p in tuned]
        assert sum(correct) / len(correct) == pytest.approx(on_disk.systems["tuned"]["accuracy"])
    if row.task == "regress":
        errors = [p["abs_error"] for p in tuned]
        assert sum(errors) / len(errors) == pytest.approx(on_disk.systems["tuned"]["mae"])
    if row.task == "sft":
        assert all(isinstance(p["text"], str) and 0 <= p["rougeL"] <= 1 and p["loss"] > 0 for p in tuned)
    # the same test set evaluated twice has the same example ids: two runs can be paired example by example
    again = evaluate_run(run, systems=["tuned"], out_dir=tmp_path / "again", show_progress=False)
    assert [e["id"] for e in again["examples"]] == ids
    with pytest.raises(ConfigError, match="unknown system 'nope'"):
        evaluate_run(run, systems=["nope"], show_progress=False)
    # the task's printer reads the report (what `tuneloop eval` shows)
    import io

    from rich.console import Console

    out = io.StringIO()
    EVALUATORS[row.task].print_table(report, Console(file=out, width=200))
    assert "tuned" in out.getvalue()

    # ---- serve it
    from fastapi.testclient import TestClient

    from tuneloop.serve.app import ServeSettings, create_app
    from tuneloop.serve.engine import Engine

    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_new_tokens=8)
    try:
        if row.serve is None:
            with pytest.raises(ConfigError, match=f"a {row.task} run; serving knows classify, dpo, kto, sft"):
                engine.load_adapter("r", run_dir)
            return
        engine.load_adapter("r", run_dir).result()
        with TestClient(create_app(engine, ServeSettings(max_new_tokens=8), None)) as tc:
            row.serve(tc, "r")
    finally:
        engine.close()


def test_older_or_unfinished_or_no_run_folders_get_a_clear_error(tmp_path):
    with pytest.raises(NotFoundError, match="nope: no such run folder"):
        open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match=f"empty: not a run folder \\(no {RUN_INFO}\\)"):
        open_run(tmp_path / "empty")
    old = tmp_path / "old"
    old.mkdir()
    (old / TRAIN_METRICS).write_text('{"task": "classify"}')
    (old / "recipe.yaml").write_text("name: r\ndata: {train: d.jsonl}\n")
    with pytest.raises(ConfigError, match=f"old: a run folder from an older tuneloop \\(no {RUN_INFO}"):
        open_run(old)
    (old / RUN_INFO).write_text('{"format_version": 0, "task": "classify"}')
    with pytest.raises(ConfigError, match="format_version 0"):
        open_run(old)


def test_a_failed_run_says_so_and_is_not_opened(tmp_path, tiny_llama_dir):
    recipe = recipe_from_dict({"name": "broken", "model": str(tiny_llama_dir), "method": TINY_METHOD,
                               "data": {"train": str(tmp_path / "missing.jsonl")}, "train": TINY_TRAIN})
    with pytest.raises(NotFoundError):
        train_run(recipe, tmp_path / "ws", show_progress=False)
    run_dir = next((tmp_path / "ws" / "runs").iterdir())
    info = json.loads((run_dir / RUN_INFO).read_text())
    assert info["status"] == "failed" and "missing.jsonl" in info["error"] and (run_dir / "FAILED").exists()
    with pytest.raises(ConfigError, match="training did not finish \\(status failed\\)"):
        open_run(run_dir)
