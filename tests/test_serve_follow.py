"""Serving follows the registry: a live server on loopback serving `NAME@production` switches versions after
a promotion and back after a rollback, with no restart and no failed request under concurrent load.

Tiny models (test_serve.py's run folders over the 2-layer Llama) registered in a temporary workspace: a
classifier (`reviews`, asked through /v1/classify with httpx) and a chat LoRA (`chat`, asked through the
official `openai` client), so both kinds of hot-swap are exercised.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

import httpx
import pytest
import torch

from tuneloop import registry
from tuneloop.feedback import FeedbackStore
from tuneloop.serve.app import ServeSettings
from tuneloop.serve.launch import build_engine

from test_serve import CHAT, LiveServer, _classify_run, _lora_run


@pytest.fixture()
def workspace(tmp_path, tiny_llama_dir):
    ws = tmp_path / "ws"
    for i in (1, 2, 3):
        torch.manual_seed(i)  # the classification head starts random: each run's answers differ
        run = _classify_run(tiny_llama_dir, ws / "runs" / f"reviews-{i}")
        assert registry.register(ws, run, name="reviews").ref == f"reviews:{i}"
    for i in (1, 2):
        run = _lora_run(tiny_llama_dir, ws / "runs" / f"chat-{i}", 100 + i)
        assert registry.register(ws, run, name="chat").ref == f"chat:{i}"
    registry.promote(ws, "reviews:1")  # the first holder of an alias needs no gate
    registry.promote(ws, "chat:1")
    return ws


class Load:
    """Client threads asking both served names over and over; every answer is kept with its version."""

    def __init__(self, url: str, threads: int = 4):
        from openai import OpenAI

        self.url, self.stop = url, threading.Event()
        self.openai = OpenAI(base_url=url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)
        self.seen: list[tuple[str, str, str]] = []  # (served name, version, answer)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._ask, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _ask(self, i: int) -> None:
        http = httpx.Client(base_url=self.url, timeout=60)
        while not self.stop.is_set():
            try:
                if i % 2:
                    r = http.post("/v1/classify", json={"model": "reviews@production", "input": "good food"})
                    if r.status_code != 200:
                        self.failures.append(f"classify {r.status_code}: {r.text}")
                        continue
                    probs = r.json()["data"][0]["probabilities"]
                    assert r.headers["x-tuneloop-version"] == r.json()["version"]
                    self.seen.append(("reviews@production", r.json()["version"],
                                      ",".join(f"{p:.4f}" for p in probs.values())))
                else:
                    c = self.openai.chat.completions.create(model="chat@production", messages=CHAT, max_tokens=4,
                                                            temperature=0)
                    self.seen.append(("chat@production", c.system_fingerprint, c.choices[0].message.content))
            except Exception as e:  # any failed request fails the test
                self.failures.append(f"{type(e).__name__}: {e}")
        http.close()

    def answers(self, name: str, version: str) -> set[str]:
        return {a for n, v, a in list(self.seen) if n == name and v == version}

    def wait_for(self, versions: dict[str, str], timeout: float = 60.0) -> None:
        """Until answers of these versions arrive (the alias moved and the server followed)."""
        start = len(self.seen)
        deadline = time.time() + timeout
        while time.time() < deadline:
            recent = self.seen[start:]
            if all(any(n == name and v == ver for n, v, _ in recent) for name, ver in versions.items()):
                return
            time.sleep(0.05)
        raise AssertionError(f"no answers from {versions} within {timeout}s; failures: {self.failures[:3]}")

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.mark.slow
def test_serving_follows_promotion_and_rollback_under_load(workspace, caplog):
    caplog.set_level(logging.INFO, logger="tuneloop.serve")
    engine = build_engine(["reviews@production", "chat@production"], workspace, dtype="float32",
                          max_batch=16, max_queue=256, max_new_tokens=16)
    srv = LiveServer(engine, ServeSettings(max_new_tokens=16, workspace=workspace, follow_interval=0.2),
                     FeedbackStore.for_workspace(workspace))
    load = None
    try:
        models = {m["id"]: m for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert models["reviews@production"]["version"] == "reviews:1"
        assert models["chat@production"]["follows"] == "chat@production"

        load = Load(srv.url)
        load.wait_for({"reviews@production": "reviews:1", "chat@production": "chat:1"})

        registry.promote(workspace, "reviews:2", force=True, why="test: follow a promotion")
        registry.promote(workspace, "chat:2", force=True, why="test: follow a promotion")
        load.wait_for({"reviews@production": "reviews:2", "chat@production": "chat:2"})

        # A version that does not load (its weights are gone) leaves the current one serving.
        shutil.rmtree(registry.resolve(workspace, "reviews:3").run_dir / "model")
        registry.promote(workspace, "reviews:3", force=True, why="test: a broken version")
        deadline = time.time() + 60
        while "did not load" not in caplog.text:
            assert time.time() < deadline, "the failed load was not logged"
            time.sleep(0.05)
        load.wait_for({"reviews@production": "reviews:2"})

        registry.rollback(workspace, "reviews")  # reviews:3 → reviews:2 (which is what serves already)
        registry.rollback(workspace, "reviews")  # → reviews:1
        registry.rollback(workspace, "chat")
        load.wait_for({"reviews@production": "reviews:1", "chat@production": "chat:1"})
        load.close()

        assert not load.failures, load.failures[:5]
        for name, (one, two) in {"reviews@production": ("reviews:1", "reviews:2"),
                                 "chat@production": ("chat:1", "chat:2")}.items():
            a, b = load.answers(name, one), load.answers(name, two)
            # Each version always gives its own one answer (greedy; the same text): the version a response
            # names is the one that produced it, and the two versions really differ.
            assert len(a) == 1 and len(b) == 1 and a != b, (name, a, b)
        assert not load.answers("reviews@production", "reviews:3")
        assert "moved from reviews:1 to reviews:2" in caplog.text and "moved from chat:2 to chat:1" in caplog.text
        # The replaced LoRA weights were deleted once no request held them: one chat adapter is left.
        assert len(engine.peft.peft_config) == 1
        models = {m["id"]: m for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert models["reviews@production"]["version"] == "reviews:1"
        assert models["chat@production"]["version"] == "chat:1"

        # /admin loads registered versions too: a pinned one stays put, an alias is followed.
        admin = httpx.Client(base_url=srv.url, timeout=60)
        r = admin.post("/admin/adapters", json={"name": "pinned", "path": "reviews:2"})
        assert r.status_code == 200 and r.json()["version"] == "reviews:2" and r.json()["follows"] is None, r.text
        r = admin.post("/admin/adapters", json={"name": "staged", "path": "chat@production"})
        assert r.status_code == 200 and r.json()["follows"] == "chat@production", r.text
        for ref in ("reviews:9", "reviews@staging", "nobody:1"):
            r = admin.post("/admin/adapters", json={"name": "x", "path": ref})
            assert r.status_code == 404 and r.json()["error"]["param"] == "path", r.text
        admin.close()
    finally:
        if load is not None:
            load.close()
        srv.close()
