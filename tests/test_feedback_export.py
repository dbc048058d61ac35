"""`tuneloop feedback export --as sft|kto|dpo`: feedback and reviews become data-studio JSONL that `data check`
reads, deduplicated, with prompts of frozen test sets left out and counted; plus reviewers add and stats."""

from __future__ import annotations

import json

import pytest

from data_helpers import run_cli, write_jsonl
from tuneloop.data.validate import read_records
from tuneloop.errors import ConfigError
from tuneloop.feedback import FeedbackStore
from tuneloop.feedback.export import export_feedback, parse_since

LIEN = "What is a lien?"
SYSTEM = "You answer questions about construction law."


@pytest.fixture
def ws(tmp_path):
    """A workspace whose store holds served answers with feedback, reviews of answers and blind pairs."""
    ws = tmp_path / "ws"
    s = FeedbackStore.for_workspace(ws)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    s.log_response("r1", "m", "chat", user(LIEN), "A lien is a tax.", "stop", "faq:1")
    s.add_feedback("r1", rating=2, correction="A lien is a legal claim on property until a debt is paid.")
    s.log_response("r2", "m", "chat", user(LIEN), "A lien is a claim on property.", "stop", "faq:2")
    s.add_feedback("r2", rating=5)
    s.log_response("r3", "m", "chat", user("Who pays for the permit?"), "The owner, usually.", "stop", "faq:2")
    s.add_feedback("r3", rating=3)
    s.log_response("r4", "m", "chat", user(LIEN), "A lien is a tax.", "stop", "faq:1")  # same answer again
    s.add_feedback("r4", rating=2, correction="A lien is a legal claim on property until a debt is paid.")
    s.log_response("r5", "m", "chat", user("What is a change order?"), "A new contract.", "stop", "faq:2")
    s.add_feedback("r5", rating=1, correction="A written change to the work agreed after the contract.")
    s.log_response("r6", "m", "chat", [{"role": "system", "content": SYSTEM}] + user("Is a verbal contract valid?"),
                   "Often, yes, but put it in writing.", "stop", "faq:2")
    s.log_response("r7", "m", "chat", user("Hi") + [{"role": "assistant", "content": "Hello."}] + user("Liens?"),
                   "No idea.", "stop", "faq:2")
    s.add_feedback("r7", correction="A lien secures a debt with property.")

    ann = s.reviewer_for_key(s.add_reviewer("ann"))["id"]
    bob = s.reviewer_for_key(s.add_reviewer("bob"))["id"]
    s.enqueue_served()
    s.enqueue_answers("system", [{"prompt": [{"role": "system", "content": SYSTEM}] + user("Is a verbal contract valid?"),
                                  "answer": "Often, yes, but put it in writing.", "source": "faq:2",
                                  "response_id": "r6"}])
    s.submit_review(s.reserve_next(ann, "system")["id"], ann, thumb=1)
    s.enqueue_pairs("ab", [
        {"prompt": "Can a subcontractor file a lien?", "answer_a": "Yes, for unpaid work.", "source_a": "faq:2",
         "answer_b": "No.", "source_b": "base", "example_id": "p1"},
        {"prompt": "Is a permit needed for a fence?", "answer_a": "It depends on the height.", "source_a": "faq:2",
         "answer_b": "Sometimes.", "source_b": "base", "example_id": "p2"},
    ], reviews_wanted=2)
    for rid in (ann, bob):
        while (it := s.reserve_next(rid, "ab")) is not None:
            if it["prompt"].startswith("Can"):
                good = "A" if it["answer_a"].startswith("Yes") else "B"
                s.submit_review(it["id"], rid, choice=good)
            else:
                s.submit_review(it["id"], rid, choice="equal")
    s.close()
    write_jsonl(tmp_path / "frozen.jsonl", [{"messages": [
        {"role": "user", "content": "What is a change order?"},
        {"role": "assistant", "content": "A change to the contract's work."}]}])
    return ws


def _export(ws, kind, *extra) -> tuple[int, str, list[dict]]:
    out = ws.parent / f"{kind}.jsonl"
    code, text = run_cli("feedback", "export", "--as", kind, "-w", ws, "-o", out,
                         "--exclude", ws.parent / "frozen.jsonl", *extra)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, text, rows


def _check(path) -> str:
    code, text = run_cli("data", "check", path)
    assert code == 0, text
    return read_records(str(path)).shape


def test_sft_export_is_the_corrections_deduplicated_without_test_prompts(ws):
    code, text, rows = _export(ws, "sft")
    assert code == 0, text
    assert rows == [
        {"messages": [{"role": "user", "content": LIEN},
                      {"role": "assistant", "content": "A lien is a legal claim on property until a debt is paid."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Liens?"},
                      {"role": "assistant", "content": "A lien secures a debt with property."}]},
    ]
    assert "1 duplicate" in text and "1 prompt in a frozen test set" in text and "wrote 2 records" in text
    assert _check(ws.parent / "sft.jsonl") == "openai"


def test_kto_export_marks_ratings_and_thumbs_and_leaves_out_the_neutral(ws):
    code, text, rows = _export(ws, "kto")
    assert code == 0, text
    got = {(json.dumps(r["prompt"]), r["completion"]): r["label"] for r in rows}
    assert got == {
        (json.dumps(LIEN), "A lien is a tax."): False,  # rated 2, twice: one record
        (json.dumps(LIEN), "A lien is a claim on property."): True,
        (json.dumps([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is a verbal contract valid?"}]),
         "Often, yes, but put it in writing."): True,  # a reviewer's thumb up, the system turn kept
    }
    assert "1 rating 3 (neither good nor bad)" in text and "1 prompt in a frozen test set" in text
    assert _check(ws.parent / "kto.jsonl") == "kto"


def test_dpo_export_pairs_corrections_rated_answers_and_blind_verdicts(ws):
    code, text, rows = _export(ws, "dpo")
    assert code == 0, text
    got = {(r["prompt"], r["chosen"], r["rejected"]): r["margin"] for r in rows}
    assert got == {
        (LIEN, "A lien is a legal claim on property until a debt is paid.", "A lien is a tax."): 3.0,  # 5 - rating 2
        (LIEN, "A lien is a claim on property.", "A lien is a tax."): 3.0,  # mean ratings 5 vs 2
        ("Can a subcontractor file a lien?", "Yes, for unpaid work.", "No."): 1.0,  # both reviewers picked it
    }
    assert "1 duplicate" in text and "1 prompt in a frozen test set" in text
    assert "2 pair judged equal" in text and "1 a conversation, not one user turn" in text
    assert _check(ws.parent / "dpo.jsonl") == "preference"
    assert {r.margin for r in read_records(str(ws.parent / "dpo.jsonl")).records} == {3.0, 1.0}


def test_without_a_frozen_test_set_the_leak_is_kept_and_the_notes_say_nothing_was_checked(ws):
    s = FeedbackStore.for_workspace(ws)
    records, notes = export_feedback(s, "sft")
    s.close()
    assert len(records) == 3 and any("nothing checked for leakage" in n for n in notes)


@pytest.mark.slow
def test_since_limits_the_export_to_newer_feedback(ws):
    code, text, rows = _export(ws, "sft", "--since", "7d")
    assert code == 0 and len(rows) == 2
    code, text, rows = _export(ws, "sft", "--since", "2999-01-01")
    assert code == 0 and rows == [] and "wrote 0 records" in text
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    with pytest.raises(ConfigError, match="--since 'yesterday'"):
        parse_since("yesterday")
    code, text = run_cli("feedback", "export", "--as", "orpo", "-w", ws, "-o", ws.parent / "x.jsonl")
    assert code == 2 and "known: sft, kto, dpo" in text
    code, text = run_cli("feedback", "export", "--as", "sft", "-w", ws, "-o", ws.parent / "x.jsonl",
                         "--exclude", ws.parent / "nope")
    assert code == 3 and "no such data file or run" in text


def test_reviewers_add_prints_the_key_once_and_stats_shows_queues_progress_agreement(ws):
    code, text = run_cli("feedback", "reviewers", "add", "cy", "-w", ws)
    assert code == 0
    key = text.strip().splitlines()[-1]
    s = FeedbackStore.for_workspace(ws)
    assert s.reviewer_for_key(key)["name"] == "cy"
    s.close()
    code, text = run_cli("feedback", "reviewers", "add", "cy", "-w", ws)
    assert code == 1 and "already exists" in text
    code, text = run_cli("feedback", "stats", "-w", ws)
    assert code == 0, text
    assert "served" in text and "ab" in text and "ann" in text and "bob" in text
    assert "agreement (2 items reviewed twice or more)" in text


def test_an_export_is_written_atomically(ws, monkeypatch):
    out = ws.parent / "sft.jsonl"
    out.write_text("old\n")
    import tuneloop.fileio as fileio

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", boom)
    code, text = run_cli("feedback", "export", "--as", "sft", "-w", ws, "-o", out)
    assert code == 1 and "cannot write (No space left on device)" in text and out.read_text() == "old\n"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".sft")] == []  # no temporary left behind


def _run_with_test_set(ws) -> str:
    """A run folder (as training leaves it before it finishes) whose held-out test.jsonl has the change-order
    question."""
    from pathlib import Path

    from tuneloop.config import load_recipe
    from tuneloop.data.records import Record, write_jsonl as write_records
    from tuneloop.runs import TEST_RECORDS, new_run_dir, start_run, write_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "faq-assistant-sft.yaml")
    run = new_run_dir(ws, "faq")
    write_recipe(run, recipe)
    start_run(run, recipe)
    write_records(run / TEST_RECORDS, [Record(messages=[{"role": "user", "content": "What is a change order?"},
                                                        {"role": "assistant", "content": "A change."}])])
    return run.name


def test_a_runs_test_set_is_excluded_by_name_and_by_default(ws):
    name = _run_with_test_set(ws)
    for extra in (["--exclude", name], []):  # named, or every run of the workspace when none is named
        out = ws.parent / "sft.jsonl"
        code, text = run_cli("feedback", "export", "--as", "sft", "-w", ws, "-o", out, *extra)
        assert code == 0, text
        assert "1 prompt in a frozen test set" in text and "test.jsonl (1)" in text
        assert len(out.read_text().splitlines()) == 2
