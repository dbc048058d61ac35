"""The continuous loop (`tuneloop loop`): the loop file, the decision, gathering with provenance, the cycle's
state, warm starts, classify feedback; and (slow) a cycle killed -9 after every step and finished by a rerun."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuneloop.errors import ConfigError
from tuneloop.loop import (CYCLES, KILL_ENV, NEW, STATE, STEPS, LoopConfig, carried_rows, claim_inbox, decide,
                           gather, load_loop, loop_dir, read_state)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _soup(path: Path, n: int, start: int, seed: int = 0, extra: str = "") -> Path:
    rng = random.Random(seed + start)
    rows = []
    for i in range(start, start + n):
        good = i % 2
        word = rng.choice(["great", "tasty", "lovely"] if good else ["awful", "stale", "bland"])
        rows.append({"text": f"soup {i}{extra} was {word}", "label": "good" if good else "bad"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, model: str = "tiny", **train) -> Path:
    train_file = _soup(tmp_path / "train.jsonl", 48, 0)
    test_file = _soup(tmp_path / "test.jsonl", 30, 1000)
    doc = {"name": "soup", "task": "classify", "model": model,
           "data": {"train": str(train_file), "test": str(test_file)},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "eval": {"batch_size": 16, "systems": ["tuned"], "probe_sample": 0, "forgetting": False},
           "train": {"batch_size": 8, "precision": "fp32", "threads": 1, "max_length": 48, "max_steps": 6,
                     "lr": 3e-2, **train},
           # the tiny model's accuracy swings with every retrain; the margin lets the crash test's gate pass
           "gate": {"margin": 1.0, "class_margin": 1.0, "bootstrap_samples": 200}}
    import yaml

    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _loop_file(tmp_path: Path, **extra) -> Path:
    import yaml

    doc = {"recipe": "recipe.yaml", "name": "soup", "min_recent": 4,
           "triggers": {"min_new_examples": 10, "drift": False, "rating_drop": None}, **extra}
    p = tmp_path / "project.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


# ----------------------------------------------------------------------------------------------------
# the loop file


def test_the_loop_file_is_typed_and_an_unknown_key_names_the_allowed_ones(tmp_path):
    p = tmp_path / "project.yaml"
    p.write_text("recipe: r.yaml\nname: soup\ntriggers:\n  min_new: 3\n")
    with pytest.raises(ConfigError, match=r"project.yaml: triggers.min_new: unknown key \(allowed: drift, "):
        load_loop(p)
    p.write_text("recipe: r.yaml\nname: soup\nbudgets:\n  cooldown: soon\n")
    with pytest.raises(ConfigError, match="budgets.cooldown: 'soon': expected a duration"):
        load_loop(p)
    p.write_text("recipe: r.yaml\nname: 'no:colons'\n")
    with pytest.raises(ConfigError, match="a registered name is letters"):
        load_loop(p)
    p.write_text("name: soup\n")
    with pytest.raises(ConfigError, match="recipe: required key is missing"):
        load_loop(p)
    p.write_text("recipe: r.yaml\nname: soup\n")
    cfg = load_loop(p)
    assert cfg.alias == "production" and cfg.warm_start and cfg.triggers.min_new_examples == 50
    assert cfg.path(cfg.recipe) == tmp_path / "r.yaml"  # relative to the loop file, not the shell
    # every field is documented where it is declared (the reference in the README comes from them)
    for model in (LoopConfig, type(cfg.triggers), type(cfg.budgets)):
        assert all(f.description for f in model.model_fields.values()), model


# ----------------------------------------------------------------------------------------------------
# the decision


class _Prod:
    ref, name = "soup:1", "soup"

    class run_info:  # noqa: N801  (stands in for RunInfo)
        finished = "2026-11-01T00:00:00+0000"


NOW = 1796157000.0  # 2026-12-01T20:30Z, a month after production was trained
QUIET = {"checked": True, "score": 0.05, "drifted": False}
DRIFTED = {"checked": True, "score": 0.4, "drifted": True}
NO_RATINGS = {"now": None, "before": None, "n_now": 0, "n_before": 0}
FALLING = {"now": 2.1, "before": 4.0, "n_now": 40, "n_before": 100}


@pytest.mark.parametrize("new, drift, ratings, triggers, budgets, last, retrain, says", [
    (60, QUIET, NO_RATINGS, {}, {}, None, True, "retrain: 60 new examples (≥ 50)"),
    (12, QUIET, NO_RATINGS, {}, {}, None, False, "no retrain: 12 new examples (< 50); drift 0.050 not flagged"),
    (12, DRIFTED, NO_RATINGS, {}, {}, None, True, "retrain: drift 0.400 flagged"),
    (12, {**DRIFTED, "drifted": False}, NO_RATINGS, {"drift_threshold": 0.3}, {}, None, True,
     "retrain: drift 0.400 (threshold 0.3) flagged"),
    (12, QUIET, FALLING, {}, {}, None, True, "retrain: ratings 4.00 → 2.10 (drop 1.90 ≥ 0.5)"),
    (12, QUIET, {**FALLING, "n_now": 5}, {}, {}, None, False, "ratings: 5 of production (need 20"),
    (3, QUIET, NO_RATINGS, {"every": "7d"}, {}, None, True, "schedule due (production 30.9 d old, every 7d)"),
    (3, QUIET, NO_RATINGS, {"every": "60d"}, {}, None, False, "schedule not due"),
    (0, DRIFTED, NO_RATINGS, {}, {}, None, False, "but no new labelled example to train on"),
    (60, QUIET, NO_RATINGS, {}, {"cooldown": "12h"}, NOW - 3600, False, "trained 1.0 h ago (cooldown 12h)"),
    (60, QUIET, NO_RATINGS, {}, {"cooldown": "12h"}, NOW - 86400, True, "retrain: 60 new examples"),
    (60, {"checked": False, "why": "no live inputs"}, NO_RATINGS, {"min_new_examples": None}, {}, None, False,
     "drift not measured (no live inputs)"),
])
def test_decide_says_why_in_one_line(new, drift, ratings, triggers, budgets, last, retrain, says):
    cfg = LoopConfig(recipe="r.yaml", name="soup", triggers=triggers, budgets=budgets)
    d = decide(cfg, {"new_train": new}, _Prod, last, NOW, drift, ratings)
    assert d["retrain"] is retrain and says in d["reason"], d["reason"]
    assert "\n" not in d["reason"]


def test_the_first_cycle_trains_the_first_version():
    d = decide(LoopConfig(recipe="r.yaml", name="soup"), {"new_train": 0}, None, None, NOW, {}, NO_RATINGS)
    assert d["retrain"] and "no version holds soup@production yet" in d["reason"]


# ----------------------------------------------------------------------------------------------------
# gathering


def test_claiming_the_inbox_moves_every_file_and_keeps_both_of_one_name(tmp_path):
    inbox, into = tmp_path / "inbox", tmp_path / "cycle" / "inbox"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text("1\n")
    (inbox / ".partial").write_text("being written\n")  # hidden: a drop still in progress waits
    into.mkdir(parents=True)
    (into / "a.jsonl").write_text("0\n")  # taken by the same cycle before a crash
    got = claim_inbox(inbox, into)
    assert sorted(Path(g["file"]).name for g in got) == ["a-1.jsonl", "a.jsonl"]
    assert [p.name for p in inbox.iterdir()] == [".partial"]
    assert sorted((into / n).read_text() for n in ("a.jsonl", "a-1.jsonl")) == ["0\n", "1\n"]


def test_gather_cleans_drops_leaks_keeps_provenance_and_holds_out_the_newest(tmp_path):
    from tuneloop.config import load_recipe

    recipe = load_recipe(_recipe(tmp_path, model="unused"))
    ws = tmp_path / "ws"
    (ws / "inbox").mkdir(parents=True)
    rows = [json.loads(x) for x in _soup(tmp_path / "x.jsonl", 20, 2000).read_text().splitlines()]
    test_row = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[3])
    older = ws / "inbox" / "older.jsonl"
    older.write_text("".join(json.dumps(r) + "\n" for r in rows[:10] + [test_row, rows[0]]))
    os.utime(older, (time.time() - 100, time.time() - 100))
    newer = ws / "inbox" / "newer.jsonl"
    newer.write_text("".join(json.dumps(r) + "\n" for r in rows[10:]) + '{"text": "no label here"}\n')
    cfg = LoopConfig(recipe="r.yaml", name="soup", recent_share=0.25, feedback=False, near_duplicates=None)
    cycle = tmp_path / "cycle"
    out = gather(cfg, recipe, ws, cycle, None, carried=[])

    assert list((ws / "inbox").iterdir()) == []  # every file moved into the cycle, none lost
    assert sorted(p.name for p in (cycle / "inbox").iterdir()) == ["newer.jsonl", "older.jsonl"]
    assert out["inbox_records"] == 22 and out["problems"] == 1  # the record without a label, named
    log = json.loads((cycle / "clean.json").read_text())
    assert any("newer.jsonl:11" in p and "label" in p for p in log["problems"])
    assert out["dropped"] == {"in the frozen test set": 1}
    assert out["kept"] == 20 and out["recent"] == 5 and out["new_train"] == 15
    assert any(e["reason"] == "in the frozen test set" and "older.jsonl:11" in e["source"] for e in log["clean"])
    assert any("duplicate" in e["reason"] for e in log["clean"])  # rows[0] twice: the data studio's log
    new = [json.loads(x) for x in (cycle / NEW).read_text().splitlines()]
    assert [x["arrived"] for x in new] == sorted(x["arrived"] for x in new)
    # the recent slice is the newest: the whole of it came in the later file
    assert all(x["split"] == "recent" and "newer.jsonl" in x["source"] for x in new[-5:])
    assert all(x["split"] == "train" for x in new[:-5])
    assert {x["text"] for x in new} == {r["text"] for r in rows}


def test_what_a_cycle_leaves_to_the_next(tmp_path):
    root = tmp_path / "loop"
    rows = [{"text": f"t{i}", "label": "a", "source": f"f:{i}", "arrived": i, "split": s}
            for i, s in enumerate(["train", "train", "recent"])]

    def finished(n: int, promoted: bool | None) -> None:
        d = root / CYCLES / f"{n:04d}"
        d.mkdir(parents=True)
        (d / NEW).write_text("".join(json.dumps(r) + "\n" for r in rows))
        steps = {"gather": {}} if promoted is None else {"promote": {"promoted": promoted}}
        (d / STATE).write_text(json.dumps({"cycle": n, "steps": steps, "done": True}))

    finished(1, None)  # decided not to train: everything waits for the next cycle
    assert carried_rows(root, 2) == rows
    finished(2, False)  # a refused candidate: production still lacks all of it
    assert carried_rows(root, 3) == rows
    finished(3, True)  # promoted: it learned the training part; the held-out slice is still unseen
    assert carried_rows(root, 4) == rows[2:]
    assert carried_rows(root, 1) == []


def test_a_state_write_is_atomic_and_the_kill_hook_dies_right_after_it(tmp_path):
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {SRC!r})
        from tuneloop.loop import read_state, save_step
        st = read_state({str(tmp_path)!r} + "/0001")
        save_step({str(tmp_path)!r} + "/0001", st, "gather", {{"kept": 3}})
        save_step({str(tmp_path)!r} + "/0001", st, "decide", {{"retrain": True}})
        print("not reached")
    """)
    (tmp_path / "0001").mkdir()
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, KILL_ENV: "decide"}, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == -9 and "not reached" not in p.stdout
    st = read_state(tmp_path / "0001")
    assert st["steps"]["gather"]["kept"] == 3 and st["steps"]["decide"]["retrain"] is True
    assert [f.name for f in (tmp_path / "0001").iterdir()] == [STATE]  # no temporary file left behind


# ----------------------------------------------------------------------------------------------------
# classify feedback and warm starts


def test_classify_feedback_becomes_labelled_text(tmp_path):
    from tuneloop.feedback import FeedbackStore
    from tuneloop.feedback.export import export_feedback

    st = FeedbackStore(tmp_path / "fb.db")
    for i, (text, said, rating, correction) in enumerate([
            ("soup was cold", "good", None, "bad"),        # corrected: the correction is the label
            ("soup was lovely", "good", 5, None),          # confirmed: the predicted label
            ("soup was odd", "good", 1, None),             # wrong, but nobody said what is right
            ("soup was fine", "bad", None, "good"), ("soup was fine", "bad", None, "bad")]):  # disagree
        st.log_response(f"r{i}", "soup", "classify", text, said, "stop", "soup:1")
        st.add_feedback(f"r{i}", rating=rating, correction=correction)
    st.log_response("chat", "soup", "chat", [{"role": "user", "content": "hi"}], "hello", "stop", "soup:1")
    st.add_feedback("chat", correction="hey")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "soup was lovely", "label": "good"}) + "\n")
    rows, notes = export_feedback(st, "classify")
    assert rows == [{"text": "soup was cold", "label": "bad"}, {"text": "soup was lovely", "label": "good"}]
    assert "1 judged without the right label" in notes[-1] and notes[0].startswith("2 classify records from 5 ")
    assert "1 judged with different labels" in notes[-1]
    rows, notes = export_feedback(st, "classify", exclude=[str(test)])
    assert rows == [{"text": "soup was cold", "label": "bad"}] and "1 prompt in a frozen test set" in notes[-1]


@pytest.mark.slow
def test_a_warm_start_copies_the_weights_and_grows_the_head_by_label_name(tmp_path, tiny_llama_dir):
    import torch
    from peft import get_peft_model_state_dict

    from tuneloop.config import MethodConfig, recipe_from_dict
    from tuneloop.train import train_run
    from tuneloop.train.classify import build_classifier
    from tuneloop.train.common import warm_start

    _recipe(tmp_path)
    recipe = recipe_from_dict({"name": "a", "task": "classify", "model": str(tiny_llama_dir),
                               "data": {"train": str(tmp_path / "train.jsonl")},
                               "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                               "train": {"batch_size": 8, "precision": "fp32", "threads": 1, "max_length": 32,
                                         "max_steps": 3, "lr": 3e-2}})
    run_dir, _ = train_run(recipe, tmp_path / "ws", show_progress=False)
    old = {k: v.clone() for k, v in get_peft_model_state_dict(
        build_classifier(str(tiny_llama_dir), ["bad", "good"], MethodConfig(name="lora", r=4, alpha=8, dropout=0.0),
                         torch.float32, 0)).items()}
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "model" / "adapter_model.safetensors"))
    method = MethodConfig(name="lora", r=4, alpha=8, dropout=0.0)
    model = build_classifier(str(tiny_llama_dir), ["bad", "good", "meh"], method, torch.float32, 0)
    fresh_meh = get_peft_model_state_dict(model)
    head = next(k for k in saved if saved[k].shape[0] == 2 and saved[k].ndim == 2)
    fresh_row = fresh_meh[head][2].clone()
    out = warm_start(model, run_dir)
    now = get_peft_model_state_dict(model)
    assert out["new_labels"] == ["meh"] and out["tensors"] == len(saved)
    for k, t in saved.items():
        if k == head:
            assert torch.equal(now[k][:2], t) and torch.equal(now[k][2], fresh_row)
        else:
            assert torch.equal(now[k], t), k
    assert any(not torch.equal(old[k], saved[k]) for k in saved if k in old)  # training moved something
    # another method does not fit: said, not silently half-loaded
    other = build_classifier(str(tiny_llama_dir), ["bad", "good"], MethodConfig(name="lora", r=8, alpha=8),
                             torch.float32, 0)
    with pytest.raises(ConfigError, match="the runs must share the base model and method"):
        warm_start(other, run_dir)


# ----------------------------------------------------------------------------------------------------
# the whole cycle, killed -9 after every step


def _cli(ws: Path, project: Path, kill: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TUNELOOP_WORKSPACE": str(ws)}
    env.pop(KILL_ENV, None)
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", "loop", str(project), "--once", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # eight subprocesses, each importing torch and MLflow, and two tiny trainings
def test_a_cycle_killed_after_every_step_finishes_once_on_rerun(tmp_path, tiny_llama_dir):
    from tuneloop import registry
    from tuneloop.loop import run_cycle

    import yaml

    _recipe(tmp_path, model=str(tiny_llama_dir))
    project = _loop_file(tmp_path)
    ws = tmp_path / "ws"
    first = run_cycle(load_loop(project), ws, say=lambda _: None)  # the first version, in-process
    assert first["promoted"] and first["production_after"] == "soup:1"

    (ws / "inbox").mkdir(exist_ok=True)
    drop = _soup(ws / "inbox" / "week2.jsonl", 24, 3000, extra=" (new menu)")
    content = drop.read_text()
    kills = ["gather", "decide", "train.started", "train", "register", "gate", "promote", "report"]
    assert set(STEPS) <= set(kills)
    for step in kills:
        p = _cli(ws, project, step)
        assert p.returncode == -9, (step, p.returncode, p.stdout[-2000:], p.stderr[-3000:])
        st = read_state(loop_dir(ws, "soup") / CYCLES / "0002")
        assert step in st["steps"] and not st.get("done"), step
        # the inbox file is in the inbox or in the cycle's folder at every moment, whole
        claimed = loop_dir(ws, "soup") / CYCLES / "0002" / "inbox"
        places = list((ws / "inbox").glob("week2*")) + list(claimed.glob("*"))
        assert len(places) == 1 and places[0].read_text() == content, step
    p = _cli(ws, project, None)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "cycle 2 (resumed)" in p.stdout and "Traceback" not in p.stderr

    st = read_state(loop_dir(ws, "soup") / CYCLES / "0002")
    assert st["done"] and st["steps"]["promote"]["promoted"]
    # trained once (the run folder recorded before the kill after train.started was started again, not doubled),
    # registered once
    runs = sorted(p.name for p in (ws / "runs").iterdir())
    assert len(runs) == 2, runs
    versions = registry.list_versions(ws, "soup")
    assert [v.ref for v in versions] == ["soup:1", "soup:2"]
    assert versions[1].tags.get("parent") == "soup:1" and str(versions[1].run_dir) == st["steps"]["train"]["run_dir"]
    assert registry.resolve(ws, "soup@production").ref == "soup:2"
    assert [h["how"] for h in registry.history(ws, "soup")] == ["first", "gate"]
    # the candidate trained on the old records and the new ones, warm-started from production
    cand = yaml.safe_load((versions[1].run_dir / "recipe.yaml").read_text())
    assert cand["train"]["init_from"] == str(versions[0].run_dir)
    trained = Path(cand["data"]["train"]).read_text()
    assert "soup 0 was" in trained and "(new menu)" in trained
    recent = (loop_dir(ws, "soup") / CYCLES / "0002" / "recent.jsonl").read_text()
    assert recent and not any(line in trained for line in recent.splitlines())
    # one history with both cycles, its page with the plot, one MLflow run per cycle
    hist = json.loads((loop_dir(ws, "soup") / "history.json").read_text())
    assert [c["cycle"] for c in hist["cycles"]] == [1, 2] and hist["cycles"][1]["promoted"]
    assert hist["cycles"][1]["gate"]["frozen"]["candidate"] is not None
    assert "data:image/png;base64," in (loop_dir(ws, "soup") / "history.html").read_text()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("loop-soup")
    tags = sorted(r.data.tags["loop_cycle"] for r in client.search_runs([exp.experiment_id]))
    assert tags == ["1", "2"]

    # a third cycle with nothing new ends with its reason and trains nothing
    p = _cli(ws, project, None)
    assert p.returncode == 0 and "no retrain:" in p.stdout and len(list((ws / "runs").iterdir())) == 2


def test_the_history_page_has_a_row_per_cycle_and_the_plot_across_versions():
    from tuneloop.loop import render_history

    gate = {"passed": True, "frozen": {"metric": "accuracy", "candidate": 0.81, "production": 0.8, "lower": -0.01,
                                       "upper": 0.03}, "recent": {"candidate": 0.9, "production": 0.7}}
    cycles = [{"cycle": 1, "data": {"kept": 0}, "reason": "no version holds soup@production yet", "candidate": "soup:1",
               "gate": {"passed": True, "frozen": {"metric": "accuracy", "candidate": 0.8}}, "promoted": True,
               "production_after": "soup:1"},
              {"cycle": 2, "data": {"kept": 5, "new_train": 4, "recent": 1}, "reason": "no retrain: 4 new examples (< 50)",
               "production_after": "soup:1"},
              {"cycle": 3, "data": {"kept": 60}, "drift": 0.9, "reason": "retrain: drift 0.900 flagged <b>",
               "candidate": "soup:2", "gate": gate, "promoted": True, "production_after": "soup:2"}]
    page = render_history("soup", cycles)
    assert page.count("<tr><td>") == 3 and "data:image/png;base64," in page
    assert "0.8100 vs 0.8000 [-0.0100, 0.0300]" in page and "0.9000 vs 0.7000" in page
    assert "flagged &lt;b&gt;" in page  # reasons are escaped
