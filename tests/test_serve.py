"""The server: official `openai` client, mixed-adapter batching, hot-swap, limits, errors, feedback.

A tiny 2-layer Llama (conftest) is the base; two LoRA adapters with randomised lora_B sit in run folders of
the training contract, plus a classification run. A live uvicorn server on loopback serves them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tuneloop.errors import ConfigError, NotFoundError
from tuneloop.feedback import FeedbackStore
from tuneloop.serve.app import ServeSettings, create_app
from tuneloop.serve.engine import Engine, GenRequest, SamplingParams, validate_name
from tuneloop.serve.launch import build_engine, is_loopback, parse_models, serve

CHAT = [{"role": "user", "content": "Name a fruit."}]


def _write_run(base_dir: Path, run: Path, task: str, labels: list[str] | None = None) -> None:
    """The run files a finished run has, written the way the recipes write them (runs.py)."""
    from tuneloop.config import recipe_from_dict
    from tuneloop.runs import Fingerprints, finish_run, write_recipe

    recipe = recipe_from_dict({"name": run.name, "task": task, "model": str(base_dir),
                               "data": {"train": str(run / "train.jsonl")}})
    write_recipe(run, recipe)
    finish_run(run, recipe, {"task": task, "method": "lora", "base_model": str(base_dir),
                             "model_path": str(base_dir), "dtype": "float32"},
               model_path=str(base_dir), labels=labels, fingerprints=Fingerprints())


def _lora_run(base_dir: Path, run: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # fresh LoRA is a no-op (B = 0); random B makes the adapters really differ
            p.data = torch.randn(p.shape, generator=g) * 2
    pm.save_pretrained(run / "model")
    _write_run(base_dir, run, "sft")
    return run


def _classify_run(base_dir: Path, run: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    labels = ["great", "other"]
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=2, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model.config.pad_token_id = 0
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"]))
    pm.save_pretrained(run / "model")
    _write_run(base_dir, run, "classify", labels)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-ws")
    return {
        "root": root,
        "ra": _lora_run(tiny_llama_dir, root / "runs" / "ra", 101),
        "rb": _lora_run(tiny_llama_dir, root / "runs" / "rb", 202),
        "clf": _classify_run(tiny_llama_dir, root / "runs" / "clf"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, engine: Engine, settings: ServeSettings, store: FeedbackStore | None):
        import uvicorn

        self.engine, self.store = engine, store
        self.app = create_app(engine, settings, store)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


@pytest.fixture(scope="module")
def live(runs, tiny_llama_dir):
    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_batch=64, max_queue=256, max_new_tokens=64)
    for name in ("ra", "rb", "clf"):
        engine.load_adapter(name, runs[name]).result()
    srv = LiveServer(engine, ServeSettings(max_new_tokens=64, max_prompt_tokens=256, workspace=runs["root"]),
                     FeedbackStore.for_workspace(runs["root"]))
    yield srv
    srv.close()


@pytest.fixture()
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key="unused-on-loopback", max_retries=0)


def _chat(client, model: str, content: str = "Name a fruit.", n: int = 12) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       max_tokens=n, temperature=0)
    return r.choices[0].message.content


# ------------------------------------------------------------------------------ the openai client
@pytest.mark.slow
def test_openai_client_models_chat_stream_completions(client):
    assert {m.id for m in client.models.list().data} >= {"tiny", "ra", "rb", "clf"}

    a, b, base = _chat(client, "ra"), _chat(client, "rb"), _chat(client, "tiny")
    assert a != b and a != base and b != base  # the adapters' weights differ, so do their answers

    r = client.chat.completions.create(model="ra", messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0

    stream = client.chat.completions.create(model="ra", messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    c1 = client.completions.create(model="rb", prompt="Once upon a time", max_tokens=6, temperature=0.9, seed=7)
    c2 = client.completions.create(model="rb", prompt="Once upon a time", max_tokens=6, temperature=0.9, seed=7)
    assert c1.choices[0].text == c2.choices[0].text  # a seed makes sampling reproducible
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="rb", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed == client.completions.create(model="rb", prompt="Once upon a time", max_tokens=6,
                                                 temperature=0).choices[0].text


def test_greedy_matches_transformers_generate(live, runs, tiny_llama_dir, client):
    """Parity with the reference: the engine's greedy answers are what `generate` gives, base and adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = live.engine.tok
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

    def hf(model) -> str:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert _chat(client, "tiny") == hf(base)
    assert _chat(client, "rb") == hf(PeftModel.from_pretrained(base, runs["rb"] / "model").eval())

    # A plain PEFT folder (not a run) loads too, and min_tokens (vLLM's extension) holds off end-of-sequence.
    live.engine.load_adapter("plain", runs["rb"] / "model").result()
    assert _chat(client, "plain") == _chat(client, "rb")
    r = client.chat.completions.create(model="plain", messages=CHAT, max_tokens=7, temperature=0,
                                       extra_body={"min_tokens": 7})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    live.engine.unload_adapter("plain").result()


def test_odd_sampling_values_do_not_break_a_batch(client):
    for t in (1e-30, 1e-6, 2.0):
        r = client.chat.completions.create(model="ra", messages=CHAT, max_tokens=4, temperature=t, top_p=1e-9, seed=1)
        assert r.choices[0].finish_reason == "length"
    greedy = client.chat.completions.create(model="ra", messages=CHAT, max_tokens=4, temperature=0)
    tiny_t = client.chat.completions.create(model="ra", messages=CHAT, max_tokens=4, temperature=1e-30)
    assert tiny_t.choices[0].message.content == greedy.choices[0].message.content


def test_stop_strings_cut_the_answer(client):
    full = _chat(client, "ra", n=16)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = client.chat.completions.create(model="ra", messages=CHAT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


# ------------------------------------------------------------------------------ batching
@pytest.mark.slow
def test_64_concurrent_requests_match_one_by_one_and_batch(live, client):
    models = ["tiny", "ra", "rb"]
    jobs = [(models[i % 3], f"Request {i}: " + "tell me more " * (i % 5), 4 + i % 9) for i in range(64)]
    one_by_one = [_chat(client, m, c, n) for m, c, n in jobs]

    before = dict(live.engine.stats["batch_sizes"])

    async def all_at_once():
        from openai import AsyncOpenAI

        ac = AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*[
            ac.chat.completions.create(model=m, messages=[{"role": "user", "content": c}], max_tokens=n,
                                       temperature=0) for m, c, n in jobs])
        await ac.close()
        return [r.choices[0].message.content for r in rs]

    together = asyncio.run(all_at_once())
    assert together == one_by_one
    after = live.engine.stats["batch_sizes"]
    grown = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
    assert max(grown) > 1, grown  # the engine really decoded several requests per step


def test_every_request_in_a_batch_streams(live, client):
    jobs = [(["tiny", "ra", "rb"][i % 3], f"Stream {i} " * (1 + i % 4)) for i in range(12)]
    want = [_chat(client, m, c) for m, c in jobs]

    async def streams():
        from openai import AsyncOpenAI

        ac = AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)

        async def one(m, c):
            s = await ac.chat.completions.create(model=m, messages=[{"role": "user", "content": c}], max_tokens=12,
                                                 temperature=0, stream=True)
            parts = [ch.choices[0].delta.content or "" async for ch in s if ch.choices]
            return len(parts), "".join(parts)

        out = await asyncio.gather(*[one(m, c) for m, c in jobs])
        await ac.close()
        return out

    before = dict(live.engine.stats["batch_sizes"])
    got = asyncio.run(streams())
    after = live.engine.stats["batch_sizes"]
    assert max(k for k in after if after[k] > before.get(k, 0)) > 1  # the streams shared decode steps
    assert [text for _, text in got] == want
    assert all(n > 3 for n, _ in got)  # really token by token, not one lump at the end


def test_client_disconnect_frees_the_slot(live):
    with httpx.Client(base_url=live.url, timeout=30) as h:
        with h.stream("POST", "/v1/chat/completions", json={"model": "ra", "messages": CHAT, "max_tokens": 64,
                                                             "temperature": 0, "stream": True}) as r:
            next(r.iter_lines())
    deadline = time.time() + 10
    while live.engine.running() or live.engine.queue_depth():
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.02)


def test_client_disconnect_without_streaming_frees_the_slot(tiny_llama_dir):
    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_new_tokens=100_000)
    srv = LiveServer(engine, ServeSettings(max_new_tokens=100_000), None)
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/chat/completions", timeout=0.1, json={
                "model": "tiny", "messages": CHAT, "max_tokens": 100_000, "min_tokens": 100_000})
        deadline = time.time() + 10
        while engine.running() or engine.stats["cancelled"] < 1:
            assert time.time() < deadline, "the slot was not freed"
            time.sleep(0.02)
        assert engine.stats["tokens"] < 505  # stopped by the disconnect, not by the 512-position limit
    finally:
        srv.close()


# ------------------------------------------------------------------------------ hot-swap
@pytest.mark.slow
def test_hot_swap_under_load_and_rollback(live, runs, client):
    e = live.engine
    old_ra, rb_answer = _chat(client, "ra", n=40), _chat(client, "rb", n=40)
    admin = httpx.Client(base_url=live.url, timeout=30)
    results: list[str] = []

    def ask():
        results.append(_chat(client, "ra", n=40))

    # Slow the engine a little so requests are surely in flight when the swap lands.
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while e.running() < 1:
        assert time.time() < deadline
        time.sleep(0.001)
    in_flight = e.running() + e.queue_depth()
    r = admin.post("/admin/adapters", json={"action": "load", "name": "ra", "path": str(runs["rb"])})
    assert r.status_code == 200, r.text
    after_swap = _chat(client, "ra", n=40)
    for t in threads:
        t.join()
    assert in_flight >= 1
    # Every request admitted before the swap finished on the old weights; new ones get the new ones.
    assert results.count(old_ra) >= 1 and set(results) <= {old_ra, rb_answer}
    assert after_swap == rb_answer
    # The old weights are deleted once nobody holds them: ra (new), rb are the LoRA adapters left.
    assert len([a for a in e.peft.peft_config]) == 2

    # Rollback is loading the previous version again.
    assert admin.post("/admin/adapters", json={"name": "ra", "path": str(runs["ra"])}).status_code == 200
    assert _chat(client, "ra", n=40) == old_ra

    # Unload, then the name is gone (404), and loading it back works.
    assert admin.post("/admin/adapters", json={"action": "unload", "name": "ra"}).status_code == 200
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "ra", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert admin.post("/admin/adapters", json={"name": "ra", "path": str(runs["ra"])}).status_code == 200
    bad = admin.post("/admin/adapters", json={"name": "x", "path": str(runs["root"])})
    assert bad.status_code == 404 and "neither a run folder" in bad.json()["error"]["message"]
    admin.close()


def test_a_bad_adapter_is_refused_and_the_served_one_stays(live, runs, client):
    """An adapter whose shapes do not fit the base: 400 naming the path, and `rb` keeps its weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    before = _chat(client, "rb")
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    pm = get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    pm.peft_config["default"].base_model_name_or_path = str(live.engine.base_path)
    wide_dir = runs["root"] / "wide"  # inside the workspace: /admin loads nothing from elsewhere
    pm.save_pretrained(wide_dir)
    n_adapters = len(live.engine.peft.peft_config)
    r = httpx.post(live.url + "/admin/adapters", json={"name": "rb", "path": str(wide_dir)}, timeout=30)
    assert r.status_code == 400 and str(wide_dir) in r.json()["error"]["message"], r.text
    assert len(live.engine.peft.peft_config) == n_adapters and _chat(client, "rb") == before


# ------------------------------------------------------------------------------ classify + feedback
def test_classify_and_feedback_store(live, client, runs):
    r = httpx.post(live.url + "/v1/classify", json={"model": "clf", "input": ["good food", "bad service"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and data[0]["label"] in ("great", "other")
    assert abs(sum(data[0]["probabilities"].values()) - 1) < 1e-4
    one = httpx.post(live.url + "/v1/classify", json={"model": "clf", "texts": ["good food"]}).json()["data"][0]
    # Batched or alone, the same probabilities.
    assert one["probabilities"] == pytest.approx(data[0]["probabilities"], abs=1e-4)
    r = httpx.post(live.url + "/v1/classify", json={"model": "ra", "input": "x"})
    assert r.status_code == 400 and "not a classification run" in r.json()["error"]["message"]

    resp = client.chat.completions.create(model="ra", messages=CHAT, max_tokens=5, temperature=0)
    fb = httpx.post(live.url + "/v1/feedback", json={"response_id": resp.id, "rating": 2, "correction": "A pear."})
    assert fb.status_code == 201, fb.text
    # Durable: a fresh store on the same file sees the response and the feedback.
    rows = FeedbackStore.for_workspace(runs["root"]).feedback(resp.id)
    assert rows[0]["correction"] == "A pear." and rows[0]["output"] == resp.choices[0].message.content
    assert rows[0]["prompt"][0]["content"] == CHAT[0]["content"]
    assert httpx.post(live.url + "/v1/feedback", json={"response_id": "nope", "rating": 3}).status_code == 404
    assert httpx.post(live.url + "/v1/feedback", json={"response_id": resp.id}).status_code == 400


# ------------------------------------------------------------------------------ errors and limits
@pytest.mark.parametrize("body, status, param", [
    ({"model": "../../etc/passwd", "messages": CHAT}, 400, "model"),
    ({"model": "nope", "messages": CHAT}, 404, "model"),
    ({"model": "ra", "messages": []}, 400, "messages"),
    ({"model": "ra", "messages": CHAT, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "ra", "messages": CHAT, "temperature": 5}, 400, "temperature"),
    ({"model": "ra", "messages": CHAT, "n": 3}, 400, "n"),
    ({"model": "ra", "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "messages"),
    ({"model": "ra", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "ra"}, 400, "messages"),
    ({"model": "clf", "messages": CHAT}, 400, "model"),
    ({"model": "ra", "messages": CHAT, "seed": 2**70}, 400, "seed"),
    ({"model": "ra", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_openai_shaped_4xx(live, body, status, param):
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


def test_malformed_json_is_400(live):
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_metrics_health_openapi(live, client):
    _chat(client, "rb", n=3)
    m = httpx.get(live.url + "/metrics").text
    for name in ("tuneloop_requests_total", "tuneloop_request_latency_seconds_bucket", "tuneloop_tokens_per_second",
                 "tuneloop_queue_depth", "tuneloop_generated_tokens_total"):
        assert name in m
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    paths = httpx.get(live.url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/classify", "/v1/feedback",
            "/admin/adapters"} <= set(paths)


def test_api_keys_and_full_queue(tiny_llama_dir, runs):
    from fastapi.testclient import TestClient

    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_batch=1, max_queue=1, batch_window_ms=0)
    try:
        app = create_app(engine, ServeSettings(api_keys=["k1", "k2"], max_new_tokens=8), None)
        with TestClient(app) as tc:
            body = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
            assert tc.post("/v1/chat/completions", json=body).status_code == 401
            r = tc.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert tc.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
            assert tc.get("/v1/models").status_code == 401 and tc.get("/health").status_code == 200
            assert tc.get("/admin/adapters", headers={"Authorization": "Bearer k1"}).status_code == 200

            # Fill the one slot and the one queue place with long requests: the next is turned away.
            hold = threading.Event()
            long = [GenRequest(prompt_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=100_000, temperature=0),
                               on_token=lambda t: hold.wait(0.01), on_finish=lambda r: None) for _ in range(2)]
            engine.submit(long[0], "tiny")
            deadline = time.time() + 10
            while engine.running() < 1:
                assert time.time() < deadline
                time.sleep(0.005)
            engine.submit(long[1], "tiny")
            r = tc.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k1"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            for g in long:
                engine.cancel(g)
    finally:
        engine.close()


# ------------------------------------------------------------------------------ names and launch rules
@pytest.mark.parametrize("name, ok", [
    ("reviews", True), ("reviews@production", True), ("run-2026.01_x", True), ("../x", False), ("/etc", False),
    ("a/b", False), ("", False), ("x" * 129, False), ("a..b", False), (".hidden", False),
])
def test_model_names_are_validated(name, ok):
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(ConfigError):
            validate_name(name)


def test_admin_key_is_separate_when_set(tiny_llama_dir):
    from fastapi.testclient import TestClient

    engine = Engine(str(tiny_llama_dir), base_name="tiny")
    try:
        app = create_app(engine, ServeSettings(api_keys=["user"], admin_keys=["root"]), None)
        with TestClient(app) as tc:
            assert tc.get("/admin/adapters", headers={"Authorization": "Bearer user"}).status_code == 401
            assert tc.get("/admin/adapters", headers={"Authorization": "Bearer root"}).status_code == 200
            assert tc.get("/v1/models", headers={"Authorization": "Bearer user"}).status_code == 200
    finally:
        engine.close()


def test_loopback_and_key_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNELOOP_API_KEYS", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(ConfigError, match="needs API keys"):
        serve(["whatever"], "0.0.0.0", 8000, [], tmp_path)


def test_parse_models(runs, tiny_llama_dir):
    base, adapters = parse_models(["ra", f"second={runs['rb']}", str(runs["ra"] / "model")], runs["root"])
    assert base is None and [n for n, _ in adapters] == ["ra", "second", "model"]
    base, adapters = parse_models([f"tiny={tiny_llama_dir}"], None)
    assert base == ("tiny", str(tiny_llama_dir)) and adapters == []
    with pytest.raises(ConfigError, match="used twice"):
        parse_models(["ra", str(runs["ra"])], runs["root"])
    with pytest.raises(NotFoundError):
        parse_models(["no-such-run"], runs["root"])
    engine = build_engine(["ra"], runs["root"], dtype="float32")  # the base comes from the run
    try:
        assert engine.base_path == str(tiny_llama_dir) and "ra" in engine.adapters
    finally:
        engine.close()


def test_a_receiver_that_fails_drops_only_its_own_row(tiny_llama_dir):
    engine = Engine(str(tiny_llama_dir), base_name="tiny", batch_window_ms=50)
    try:
        def boom(t):
            raise RuntimeError("event loop is closed")

        done = threading.Event()
        got: list[int] = []
        reasons: list[str] = []
        params = SamplingParams(max_new_tokens=6, temperature=0)
        engine.submit(GenRequest(prompt_ids=[1, 2, 3], params=params, on_token=boom, on_finish=boom), "tiny")
        engine.submit(GenRequest(prompt_ids=[4, 5], params=params, on_token=got.append,
                                 on_finish=lambda r: (reasons.append(r), done.set())), "tiny")
        assert done.wait(30)
        assert reasons == ["length"] and len(got) == 6 and engine.stats["cancelled"] == 1
    finally:
        engine.close()


# ------------------------------------------------------------------------------ what /admin may read
def test_admin_loads_only_inside_the_workspace(live, runs, tmp_path):
    import shutil

    outside = tmp_path / "elsewhere"
    shutil.copytree(runs["rb"], outside)  # a perfectly good run, but not in the workspace
    link = runs["root"] / "runs" / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    before = {m["id"]: m["version"] for m in live.engine.list_models()}
    admin = httpx.Client(base_url=live.url, timeout=30)
    try:
        for path in (str(outside), str(runs["root"] / ".." / outside.parent.name / "elsewhere"), "link-out",
                     str(link), "../../etc", "/etc"):
            r = admin.post("/admin/adapters", json={"name": "x", "path": path})
            err = r.json()["error"]
            assert r.status_code == 403 and err["param"] == "path" and err["code"] == "path_not_allowed", (path, r.text)
            assert set(err) == {"message", "type", "param", "code"} and "outside the workspace" in err["message"]
        # Nothing was loaded by the refusals.
        assert {m["id"]: m["version"] for m in live.engine.list_models()} == before
        # A run's name, a relative path and an absolute path inside the workspace are fine.
        for path in ("rb", "runs/rb", str(runs["rb"])):
            r = admin.post("/admin/adapters", json={"name": "x", "path": path})
            assert r.status_code == 200 and r.json()["version"] == "rb", r.text
        assert admin.post("/admin/adapters", json={"name": "x", "path": "no-such-run"}).status_code == 404
        assert admin.post("/admin/adapters", json={"action": "unload", "name": "x"}).status_code == 200
    finally:
        admin.close()
        link.unlink()

    # A server without a workspace loads nothing while serving.
    from fastapi.testclient import TestClient

    tc = TestClient(create_app(live.engine, ServeSettings(), None))
    r = tc.post("/admin/adapters", json={"name": "x", "path": str(runs["rb"])})
    assert r.status_code == 403 and r.json()["error"]["param"] == "path"


# ------------------------------------------------------------------------------ body limit
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/classify", "/v1/feedback", "/admin/adapters",
                                   "/no/such/route"])
def test_a_body_over_the_limit_is_413_before_it_is_parsed(live, route):
    limit = ServeSettings().max_body_bytes
    big = b'{"model": "ra", "messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
    r = httpx.post(live.url + route, content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunks(n: int):  # no Content-Length: the server must count
        for _ in range(n):
            yield b" " * 65536

    r = httpx.post(live.url + route, content=chunks(limit // 65536 + 2), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_chunked_body_under_the_limit_is_served(live):
    def chunks():
        yield b'{"model": "clf", '
        yield b'"input": ["good food"]}'

    r = httpx.post(live.url + "/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["data"][0]["label"] in ("great", "other"), r.text


# ------------------------------------------------------------------------------ version names
def test_every_answer_names_its_version(live, client, runs):
    models = {m.id: m for m in client.models.list().data}
    assert models["rb"].version == "rb" and models["clf"].version == "clf" and models["tiny"].version

    raw = client.chat.completions.with_raw_response.create(model="rb", messages=CHAT, max_tokens=3, temperature=0)
    resp = raw.parse()
    assert resp.system_fingerprint == "rb" and raw.headers["x-tuneloop-version"] == "rb"
    stream = list(client.chat.completions.create(model="rb", messages=CHAT, max_tokens=3, stream=True))
    assert {c.system_fingerprint for c in stream} == {"rb"}
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert done.system_fingerprint == models["tiny"].version

    r = httpx.post(live.url + "/v1/classify", json={"model": "clf", "input": "good food"})
    assert r.json()["version"] == "clf" and r.headers["x-tuneloop-version"] == "clf"

    # The feedback store ties the answer to its version.
    store = FeedbackStore.for_workspace(runs["root"])
    assert store.get_response(resp.id)["model_version"] == "rb"
    assert httpx.post(live.url + "/v1/feedback", json={"response_id": resp.id, "rating": 4}).status_code == 201
    assert store.feedback(resp.id)[0]["model_version"] == "rb"

    # An unknown model or version is 404, as an unknown model always was.
    for name in ("rb:7", "reviews@production"):
        r = httpx.post(live.url + "/v1/chat/completions", json={"model": name, "messages": CHAT})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_review_page_is_mounted_and_served_answers_are_queued(live, tmp_path):
    from fastapi.testclient import TestClient

    # A workspace of its own, so the answers other tests logged do not mix in; on loopback, without a key,
    # the reviewer is `local`.
    store = FeedbackStore.for_workspace(tmp_path)
    tc = TestClient(create_app(live.engine, ServeSettings(workspace=tmp_path), store), client=("127.0.0.1", 5000))
    page = tc.get("/review/")
    assert page.status_code == 200 and "tuneloop review" in page.text
    prompt = [{"role": "user", "content": "Review me."}]
    served = tc.post("/v1/chat/completions", json={"model": "ra", "messages": prompt, "max_tokens": 4,
                                                   "temperature": 0}).json()
    nx = tc.post("/review/api/next", json={})
    assert nx.status_code == 200, nx.text
    item = nx.json()["item"]
    assert item["queue"] == "served" and item["prompt"] == prompt
    assert item["answer"] == served["choices"][0]["message"]["content"]
    r = tc.post(f"/review/api/items/{item['id']}/review", json={"rating": 4, "criteria": {"tone": True}})
    assert r.status_code == 201, r.text
    rows = FeedbackStore.for_workspace(tmp_path).reviews(queue="served")
    assert [(x["response_id"], x["rating"], x["criteria"], x["reviewer"]) for x in rows] == \
        [(served["id"], 4, {"tone": True}, "local")]


def test_a_feedback_db_from_before_model_version_keeps_working(tmp_path):
    import sqlite3

    db = tmp_path / "feedback.db"
    # The schema feedback.py created before `model_version` existed, with one answer and its rating.
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE responses (id VARCHAR(64) NOT NULL, created FLOAT NOT NULL, model VARCHAR(128) NOT NULL,
            endpoint VARCHAR(32) NOT NULL, prompt JSON NOT NULL, output TEXT NOT NULL,
            finish_reason VARCHAR(32) NOT NULL, PRIMARY KEY (id));
        CREATE INDEX ix_responses_model ON responses (model);
        CREATE TABLE feedback (id INTEGER NOT NULL, response_id VARCHAR(64) NOT NULL, created FLOAT NOT NULL,
            rating INTEGER, correction TEXT, comment TEXT, user VARCHAR(128), PRIMARY KEY (id),
            FOREIGN KEY(response_id) REFERENCES responses (id));
        INSERT INTO responses VALUES ('old-1', 1.0, 'ra', 'chat', '"hi"', 'hello', 'stop');
        INSERT INTO feedback (response_id, created, rating) VALUES ('old-1', 2.0, 5);
    """)
    con.commit()
    con.close()

    store = FeedbackStore(db)
    assert store.get_response("old-1")["model_version"] is None  # its version was never known
    store.log_response("new-1", "ra", "chat", [{"role": "user", "content": "hi"}], "hey", "stop", "reviews:2")
    store.add_feedback("old-1", correction="Hello there.")
    store.add_feedback("new-1", rating=1)
    rows = store.feedback()
    assert [(r["response_id"], r["model_version"]) for r in rows] == [("old-1", None), ("old-1", None),
                                                                     ("new-1", "reviews:2")]
    store.close()
    # Opening it again finds the column there and changes nothing.
    again = FeedbackStore(db)
    assert again.get_response("new-1")["model_version"] == "reviews:2"
    cols = [c[1] for c in sqlite3.connect(db).execute("PRAGMA table_info(responses)")]
    assert cols.count("model_version") == 1
    again.close()
