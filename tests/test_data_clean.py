"""Cleaning: normalisation, PII, length filters, exact / near duplicates, conflicting labels, the log,
and that nothing is written half-way."""

from __future__ import annotations

import json

from data_helpers import run_cli, write_jsonl

from tuneloop.data.clean import clean_records, normalize_text
from tuneloop.data.pii import count_pii, scrub
from tuneloop.data.records import Record


def recs(*texts_labels) -> list[Record]:
    return [Record(text=t, label=l, source=f"f:{i + 1}") for i, (t, l) in enumerate(texts_labels)]


def test_normalize_text():
    assert normalize_text("Cafe\u0301  au\tlait\u200b\r\n\r\n\r\nok \x07") == ("Café au lait\n\nok",
                                                                              ["unicode NFC", "control characters", "whitespace"])
    assert normalize_text("clean text") == ("clean text", [])


def test_pii_kinds_and_scrub():
    text = ("Mail jo.doe@example.com, call (555) 123-4567, card 4111 1111 1111 1111, SSN 123-45-6789, "
            "host 10.0.0.12; not PII: order 1234567812345678, version 1.2.3, 2024-01-15")
    assert count_pii(text) == {"email": 1, "phone": 1, "card": 1, "ssn": 1, "ip": 1}
    out, hits = scrub(text)
    assert "[EMAIL]" in out and "[PHONE]" in out and "[CARD]" in out and "[SSN]" in out and "[IP]" in out
    assert "1234567812345678" in out and "1.2.3" in out and "2024-01-15" in out


def test_clean_drops_duplicates_near_duplicates_and_conflicts_with_reasons():
    base = "the coffee arrived quickly and tastes fresh and strong, would buy again"
    rs = recs((base, "great"), (base, "great"), (base.replace("strong", "strong!"), "great"),
              ("it broke", "other"), ("It  broke", "great"), ("totally different words here", "other"),
              ("   ", "other"))
    res = clean_records(rs, near_threshold=0.8)
    kept = [r.source for r in res.records]
    assert kept == ["f:1", "f:6"]
    by = {e["source"]: e for e in res.log if e["action"] == "dropped"}
    assert by["f:2"]["reason"] == "exact duplicate" and by["f:2"]["duplicate_of"] == "f:1"
    assert by["f:3"]["reason"] == "near duplicate" and by["f:3"]["duplicate_of"] == "f:1"
    assert by["f:4"]["reason"] == by["f:5"]["reason"] == "conflicting labels"
    assert by["f:7"]["reason"] == "empty"
    assert any(e["source"] == "f:5" and e["action"] == "changed" for e in res.log)
    kept_keep = [r.source for r in clean_records(rs, near_threshold=0.8, conflicts="keep").records]
    assert "f:4" in kept_keep and "f:5" in kept_keep


def test_near_duplicates_are_not_confused_with_different_texts():
    rs = recs(*[(f"record number {i} talks about {w}", "a") for i, w in
                enumerate(["tea", "coffee", "shipping delays", "broken jars", "sweet cookies"])])
    assert len(clean_records(rs, near_threshold=0.85).records) == 5


def test_pii_modes_and_length_filters(smol_dir):
    from tuneloop.data.clean import load_tokenizer

    rs = recs(("write to me at a@b.com please", "a"), ("short", "b"), ("word " * 300, "a"), ("fine length text", "b"))
    scrubbed = clean_records(rs, pii="scrub")
    assert scrubbed.records[0].text == "write to me at [EMAIL] please" and scrubbed.pii == {"email": 1}
    assert [r.source for r in clean_records(rs, pii="drop").records] == ["f:2", "f:3", "f:4"]
    tok = load_tokenizer(str(smol_dir))
    res = clean_records(rs, tokenizer=tok, min_tokens=2, max_tokens=100)
    assert [r.source for r in res.records] == ["f:1", "f:4"]
    reasons = {e["source"]: e["reason"] for e in res.log if e["action"] == "dropped"}
    assert reasons == {"f:2": "too short", "f:3": "too long"}


def test_clean_chat_records_keep_their_shape(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Q  one?"}, {"from": "gpt", "value": "A."}]},
            {"conversations": [{"from": "human", "value": "Q  one?"}, {"from": "gpt", "value": "A."}]}]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    code, out = run_cli("data", "clean", p, "-o", tmp_path / "out.jsonl", "--no-progress")
    assert code == 0, out
    got = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert got == [{"messages": [{"role": "user", "content": "Q one?"}, {"role": "assistant", "content": "A."}]}]


def test_clean_cli_writes_output_and_log(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "call 555-123-4567 now", "label": "a"},
                                            {"text": "hello", "label": "b"}, {"text": "hello", "label": "b"}])
    out = tmp_path / "clean.jsonl"
    code, text = run_cli("data", "clean", p, "-o", out, "--pii", "scrub", "--no-progress")
    assert code == 0, text
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["call [PHONE] now", "hello"]
    log = [json.loads(x) for x in (tmp_path / "clean.jsonl.log.jsonl").read_text().splitlines()]
    assert {(e["source"].rsplit(":", 1)[1], e["reason"]) for e in log} == {("1", "pii scrubbed"), ("3", "exact duplicate")}


def test_nothing_half_written_on_bad_input(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": \n')
    out = tmp_path / "clean.jsonl"
    code, text = run_cli("data", "clean", p, "-o", out, "--no-progress")
    assert code == 1 and "d.jsonl:2: json: broken JSON" in text
    assert not out.exists() and list(tmp_path.iterdir()) == [p]
    code, text = run_cli("data", "clean", p, "-o", out, "--lenient", "--no-progress")
    assert code == 0 and out.exists()
    log = (tmp_path / "clean.jsonl.log.jsonl").read_text()
    assert '"reason": "unusable"' in log and "d.jsonl:2" in log
    code, text = run_cli("data", "clean", p, "-o", out, "--pii", "maybe")
    assert code == 2 and "--pii: unknown mode 'maybe' (known: off, flag, scrub, drop)" in text
