"""Long documents: windows, pooling, chunked training end to end on a tiny Llama, one predictor for eval
and `/v1/classify`, the e-mail cleaning step and the long-input warning (offline, seconds)."""

import json
import random
from pathlib import Path

import pytest
import torch

from tuneloop.config import recipe_from_dict
from tuneloop.data.email import email_body
from tuneloop.data.longdoc import long_input_check, long_input_lines
from tuneloop.errors import ConfigError
from tuneloop.infer.chunks import WindowPooler, chunked_logits, encode_windows, window_spans

FIXTURES = Path(__file__).parent / "fixtures" / "emails"
FILLER = ["the", "shipment", "arrived", "on", "monday", "with", "pallets", "and", "boxes", "as", "usual"]


# ------------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("n,size,overlap,cap,want", [
    (3, 4, 1, 8, [(0, 3)]),
    (4, 4, 1, 8, [(0, 4)]),
    (10, 4, 1, 8, [(0, 4), (3, 7), (6, 10)]),
    (11, 4, 1, 8, [(0, 4), (3, 7), (6, 10), (9, 11)]),
    (11, 4, 0, 8, [(0, 4), (4, 8), (8, 11)]),
    (11, 4, 1, 2, [(0, 4), (7, 11)]),         # capped: the start and the last window
    (20, 4, 2, 3, [(0, 4), (2, 6), (16, 20)]),
    (20, 4, 2, 1, [(0, 4)]),
])
def test_window_spans_are_exact(n, size, overlap, cap, want):
    assert window_spans(n, size, overlap, cap) == want


def test_uncapped_windows_cover_every_token_and_overlap_exactly():
    for n in range(1, 60):
        spans = window_spans(n, 7, 3, 100)
        covered = set()
        for s, e in spans:
            covered |= set(range(s, e))
        assert covered == set(range(n))
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            assert e0 - s1 == 3  # consecutive windows share exactly `overlap` tokens


@pytest.mark.parametrize("overlap", [-1, 4, 9])
def test_overlap_must_be_below_the_window(overlap):
    with pytest.raises(ConfigError, match="chunk_overlap"):
        window_spans(10, 4, overlap, 8)


def test_every_window_holds_the_template_and_fits(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = " ".join(FILLER * 12)
    body = tok(text, add_special_tokens=False)["input_ids"]
    pre = tok("Mail: ", add_special_tokens=False)["input_ids"]
    suf = tok("\nSpam? Answer:", add_special_tokens=False)["input_ids"]
    special = tok("", add_special_tokens=True)["input_ids"]
    (docs,) = [encode_windows(tok, [text], 40, "Mail: {text}\nSpam? Answer:", overlap=5, max_chunks=100)]
    room = 40 - len(pre) - len(suf)
    spans = window_spans(len(body), room, 5, 100)
    assert len(docs[0]) == len(spans) > 3
    for w, (s, e) in zip(docs[0], spans):
        assert len(w) <= 40 + len(special)
        assert w == special + pre + body[s:e] + suf


# ------------------------------------------------------------------------------------------ pooling
def test_pooling_equals_a_hand_computation():
    torch.manual_seed(0)
    h = torch.randn(5, 6)
    counts = [2, 3]
    mean = WindowPooler(6, "mean")(h, counts)
    assert torch.allclose(mean, torch.stack([h[:2].mean(0), h[2:].mean(0)]))
    mx = WindowPooler(6, "max")(h, counts)
    assert torch.allclose(mx[1], torch.tensor([max(h[2, j], h[3, j], h[4, j]) for j in range(6)]))
    att = WindowPooler(6, "attention")
    assert torch.allclose(att(h, counts), mean)  # it starts as the mean
    with torch.no_grad():
        att.query.copy_(torch.randn(6))
    q = att.query.detach()
    want = []
    for rows in (h[:2], h[2:]):
        s = [float(r @ q) for r in rows]
        z = sum(pow(2.718281828459045, x) for x in s)
        want.append(sum(pow(2.718281828459045, x) / z * r for x, r in zip(s, rows)))
    assert torch.allclose(att(h, counts), torch.stack(want), atol=1e-5)
    with pytest.raises(ConfigError, match="known: mean, max, attention"):
        WindowPooler(6, "sum")


def _classifier(tiny_llama_dir, pooling="mean"):
    from tuneloop.infer.chunks import attach_pooler
    from tuneloop.infer.encode import load_tokenizer
    from tuneloop.train.classify import build_classifier

    r = recipe_from_dict({"name": "x", "model": str(tiny_llama_dir), "data": {"train": "a.jsonl"},
                          "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}})
    tok = load_tokenizer(str(tiny_llama_dir))
    torch.manual_seed(0)
    model = build_classifier(str(tiny_llama_dir), ["ham", "spam"], r.method, torch.float32, tok.pad_token_id)
    attach_pooler(model, pooling)
    return model, tok


def test_one_window_reads_exactly_as_the_unchunked_model(tiny_llama_dir):
    model, tok = _classifier(tiny_llama_dir)
    model.eval()
    texts = ["short mail one", "another short mail about pallets and boxes"]
    docs = encode_windows(tok, texts, 64, "Mail: {text}\nAnswer:", overlap=4, max_chunks=4)
    assert all(len(d) == 1 for d in docs)
    with torch.no_grad():
        got = chunked_logits(model, docs, tok.pad_token_id)
        for i, d in enumerate(docs):
            want = model(input_ids=torch.tensor([d[0]])).logits[0]
            assert torch.allclose(got[i], want, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
@pytest.mark.slow
def test_the_gradient_reaches_every_window_of_a_document(tiny_llama_dir, pooling):
    model, tok = _classifier(tiny_llama_dir, pooling)
    model.train()
    docs = encode_windows(tok, [" ".join(FILLER * 12), "spam " * 3], 24, "{text}", overlap=3, max_chunks=6)
    assert len(docs[0]) == 6 and len(docs[1]) == 1
    grabbed = []
    # the first block's output: its LoRA weights make it the first activation that carries a gradient
    first = model.get_base_model().model.layers[0]

    def keep(m, i, out):
        out = out[0] if isinstance(out, tuple) else out
        out.retain_grad()
        grabbed.append(out)

    handle = first.register_forward_hook(keep)
    logits = chunked_logits(model, docs, tok.pad_token_id)
    handle.remove()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    g = grabbed[0].grad  # (windows, tokens, hidden)
    assert g.shape[0] == 7
    for w in range(7):
        assert g[w].abs().sum() > 0, f"window {w} got no gradient"
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora and all(x is not None for x in lora) and any(x.abs().sum() > 0 for x in lora)
    if pooling == "attention":
        assert model.window_pooler.query.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ chunked run end to end
def _long_mails(path: Path, n: int, seed: int, after: int = 60, before: int = 0) -> str:
    """Labels the start cannot tell: the deciding word comes after `after` filler words (and `before` more
    follow it)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        word = rng.choice(["prize", "winner", "cash"] if label == "spam" else ["invoice", "meeting", "report"])
        filler = lambda k: " ".join(rng.choice(FILLER) for _ in range(k))
        rows.append({"text": f"{filler(after)} {word} {word}. {filler(before)}".strip(), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def chunk_recipe(tmp_path, tiny_llama_dir):
    def make(**data):
        return recipe_from_dict({
            "name": "tiny-long",
            "model": str(tiny_llama_dir),
            "data": {"train": _long_mails(tmp_path / "train.jsonl", 48, 0),
                     "test": _long_mails(tmp_path / "test.jsonl", 16, 1),
                     "labels": ["ham", "spam"], "val_ratio": 0.25, "input_template": "Mail: {text}\nAnswer:",
                     "long_inputs": "chunk", "chunk_overlap": 4, "max_chunks": 4, **data},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3, "max_length": 24, "precision": "fp32",
                      "threads": 1, "max_steps": 3},
            "eval": {"batch_size": 16},
        })
    return make


@pytest.mark.slow
def test_chunked_run_is_stored_and_eval_and_classify_endpoint_agree(chunk_recipe, tmp_path, tiny_llama_dir):
    from fastapi.testclient import TestClient

    from tuneloop.eval.compare import evaluate_classify
    from tuneloop.runs import POOLER, load_for_inference, open_run
    from tuneloop.serve.app import create_app
    from tuneloop.serve.engine import Engine
    from tuneloop.serve.dependencies import ServeSettings
    from tuneloop.train import train_run

    run_dir, m = train_run(chunk_recipe(chunk_pooling="attention"), tmp_path / "ws", show_progress=False)
    info = open_run(run_dir).info
    assert info.input.chunks.model_dump() == {"overlap": 4, "max_chunks": 4, "pooling": "attention"}
    assert (run_dir / POOLER).exists() and m["long_inputs"] == "chunk" and m["windows"] > 36
    assert json.loads((run_dir / "data.json").read_text())["long_inputs"]["most_cut"] is True
    loaded = load_for_inference(run_dir)
    assert loaded.model.window_pooler.query.abs().sum() > 0  # trained, saved and read back

    report = evaluate_classify(run_dir, systems=["tuned"], show_progress=False, print_results=False)
    rows = [json.loads(l) for l in (tmp_path / "test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_batch=4, max_queue=8)
    try:
        engine.load_adapter("long", run_dir).result()
        with TestClient(create_app(engine, ServeSettings(), None)) as tc:
            served = tc.post("/v1/classify", json={"model": "long", "input": texts}).json()["data"]
    finally:
        engine.close()
    from tuneloop.infer.predict import predict_classifier

    spec = loaded.input
    probs = predict_classifier(loaded.model, loaded.tokenizer, texts, 16, spec.max_length, loaded.dtype, False,
                               template=spec.template, chunks=spec.chunks)
    for i, d in enumerate(served):
        assert d["probabilities"]["spam"] == pytest.approx(float(probs[i, 1]), abs=1e-5)
    assert report["systems"]["tuned"]["accuracy"] == pytest.approx(
        sum((p[1] > p[0]) == (r["label"] == "spam") for p, r in zip(probs.tolist(), rows)) / len(rows))


@pytest.mark.slow
def test_auto_measures_each_reading_and_takes_the_best(chunk_recipe, tmp_path, capsys):
    from tuneloop.train import train_run
    from tuneloop.train.longdoc import measure_readings

    # the deciding word in the middle: neither the start nor head + tail reach it, the windows do
    r = chunk_recipe(long_inputs="auto", max_chunks=4, train=_long_mails(tmp_path / "mid.jsonl", 80, 2, 30, 30))
    run_dir, m = train_run(r, tmp_path / "ws", show_progress=False)
    err = capsys.readouterr().err
    assert "long inputs: 60 of 60 texts (100%) are longer" in err and "ways out" in err
    assert "data.long_inputs=auto → chunk" in err
    assert m["long_inputs"] == "chunk" and m["share_cut"] == 1.0
    measured = json.loads((run_dir / "data.json").read_text())["long_inputs"]["measured"]
    assert measured["chunk"] > max(measured["truncate"], measured["middle"]) + 0.2, measured
    # at the end, head + tail reads it as well as the windows do, and costs less: a tie goes to it
    from tuneloop.data.validate import load_classification
    from tuneloop.infer.encode import load_tokenizer

    end = load_classification(_long_mails(tmp_path / "end.jsonl", 80, 3), "text", "label", None, "auto").records
    tok = load_tokenizer(r.model)
    scores = measure_readings(tok, end, [], 20, r.data, 0)
    assert scores["middle"] == scores["chunk"] == 1.0 and scores["truncate"] < 0.8


# ------------------------------------------------------------------------------------------ the warning
def test_the_warning_says_share_cut_and_where_the_evidence_is():
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(40):
        label = "spam" if i % 2 else "ham"
        word = "prize" if label == "spam" else "invoice"
        texts.append(" ".join(rng.choice(FILLER) for _ in range(80)) + f" {word}")
        labels.append(label)
    lengths = [81] * 40
    check = long_input_check(texts, labels, lengths, 40)
    assert check["share_cut"] == 1.0 and check["most_cut"] and check["evidence_past_cut"] > 0.9
    lines = long_input_lines(check)
    assert lines[0].startswith("long inputs: 40 of 40 texts (100%)") and any("ways out" in l for l in lines)
    short = long_input_check(texts, labels, [30] * 40, 40)
    assert not short["most_cut"] and long_input_lines(short) == [] and short["evidence_past_cut"] < 0.1
    mails = [(FIXTURES / "reply.eml").read_text()] * 3
    assert long_input_check(mails, None, [200] * 3, 60)["read_is_headers"] > 0.5


# ------------------------------------------------------------------------------------------ e-mails
def test_email_body_keeps_subject_and_body_only():
    reply, info = email_body((FIXTURES / "reply.eml").read_text())
    assert reply == ("Subject: Re: the invoice for October\n\nThe invoice is wrong: we were charged twice for the "
                     "pallets.\nPlease refund the second charge.")
    assert info["header_lines"] == 10 and info["quoted_lines"] == 3 and info["signature_lines"] >= 3
    html, info = email_body((FIXTURES / "html.eml").read_text())
    assert html == "Subject: WIN a FREE cruise!!!\n\nClick here to claim your prize" and info["body"] == "text/html"
    fwd, _ = email_body((FIXTURES / "forwarded.eml").read_text())
    assert fwd == "Subject: Fwd: delivery times\n\nCan someone answer this customer?"
    for plain in ("just a review: great tea", "Review: great\nScore: 5\n\nloved it"):
        assert email_body(plain) == (plain, {"email": False})


def test_data_clean_email_is_a_logged_step(tmp_path):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    rows = [{"text": (FIXTURES / f).read_text(), "label": "x"} for f in ("reply.eml", "html.eml")]
    rows.append({"text": "not a mail at all", "label": "y"})
    src = tmp_path / "mails.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean.jsonl"
    res = CliRunner().invoke(app, ["data", "clean", str(src), "-o", str(out), "--email", "--no-dedup",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    log = [json.loads(l) for l in (tmp_path / "clean.jsonl.log.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["reason"] == "email body"]
    assert len(steps) == 2 and steps[0]["header_lines"] == 10 and steps[0]["quoted_lines"] == 3
    kept = [json.loads(l)["text"] for l in out.read_text().splitlines()]
    assert kept[0].startswith("Subject: Re: the invoice") and "Received" not in kept[0]
    assert kept[2] == "not a mail at all"


def test_data_report_says_most_inputs_are_cut_and_offers_the_ways_out(tmp_path, smol_dir):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    src = Path(_long_mails(tmp_path / "long.jsonl", 20, 0))
    res = CliRunner().invoke(app, ["data", "report", str(src), "-o", str(tmp_path / "rep"), "--model", str(smol_dir),
                                   "--max-tokens", "32"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    li = rep["long_inputs"]
    assert li["room"] == 32 and li["cut"] == 20 and li["most_cut"] and li["evidence_past_cut"] > 0.9
    assert any("ways out:" in f and "data.long_inputs: chunk" in f for f in rep["fix_first"])


def test_chunking_refuses_what_it_cannot_train(chunk_recipe, tmp_path):
    from tuneloop.train import train_run

    r = chunk_recipe()
    r.method.name = "prompt_tuning"
    with pytest.raises(ConfigError, match="not with prompt_tuning"):
        train_run(r, tmp_path / "ws", show_progress=False)
