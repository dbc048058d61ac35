"""The review page in a real browser: Playwright driving Debian's Chromium (never a downloaded browser).

A reviewer signs in with a key, rates three answers by keyboard (one of them corrected in the correction
box), picks A on a blind pair; the store then holds exactly that. A second reviewer signed in at the same
time (another browser context) holds a different item. A screenshot of the page is kept (path printed).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tuneloop.feedback import FeedbackStore
from tuneloop.serve.app import create_review_app
from tuneloop.serve.routers.review import ReviewSettings

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    import uvicorn

    store = FeedbackStore(tmp_path / "feedback.db")
    keys = {name: store.add_reviewer(name) for name in ("alice", "bob")}
    store.enqueue_answers("answers", [
        {"prompt": [{"role": "user", "content": f"How long does concrete take to cure, case {i}?"}],
         "answer": f"About {7 * (i + 1)} days.", "source": "faq-sft/tuned", "response_id": None,
         "example_id": f"{i}-a", "reference": "Around 28 days for full strength."} for i in range(4)])
    store.enqueue_pairs("pairs", [{"prompt": "Who signs the site safety plan?", "answer_a": "The contractor.",
                                   "source_a": "faq-sft/base", "answer_b": "The site manager and the owner.",
                                   "source_b": "faq-sft/tuned", "example_id": "0-p"}])
    # No anonymous `local` reviewer: the browser is on loopback, and this test signs in with keys.
    app = create_review_app(store, ReviewSettings(local_reviewer=False))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}/review/", "keys": keys, "store": store}
    srv.should_exit = True
    thread.join(timeout=10)
    store.close()


@pytest.fixture()
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (make browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def _sign_in(browser, url: str, key: str):
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1366, "height": 800})  # a laptop screen
    page = ctx.new_page()
    page.set_default_timeout(10_000)
    page.goto(url)
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#key", key)
    page.press("#key", "Enter")
    expect(page.locator("#item")).to_be_visible()
    return page


def test_review_by_keyboard_lands_exactly_in_the_store(server, browser, tmp_path):
    from playwright.sync_api import expect

    alice = _sign_in(browser, server["url"], server["keys"]["alice"])
    expect(alice.locator("#who")).to_contain_text("alice")
    first = alice.locator("#item-id").inner_text()
    # two reviewers at once: bob's reserved item is never alice's
    bob = _sign_in(browser, server["url"], server["keys"]["bob"])
    bob_item = bob.locator("#item-id").inner_text()
    assert bob_item != first

    def submitted(item_id: str) -> None:
        expect(alice.locator("#status")).to_contain_text(f"saved (review")
        expect(alice.locator("#status")).to_contain_text(f"item {item_id}")
        expect(alice.locator("#item-id")).not_to_have_text(item_id)

    kb = alice.keyboard
    answers = {}
    # 1: a rating alone
    answers[first] = alice.locator("#answer").inner_text()
    kb.press("4")
    expect(alice.locator('[data-rating="4"]')).to_have_attribute("aria-pressed", "true")
    kb.press("Enter")
    submitted(first)
    # 2: a rating and a correction; Enter in the correction box is a new line, Ctrl+Enter submits
    second = alice.locator("#item-id").inner_text()
    assert second != bob_item
    answers[second] = alice.locator("#answer").inner_text()
    kb.press("2")
    kb.press("c")
    expect(alice.locator("#correction")).to_be_focused()
    kb.type("About 28 days to full strength.")
    kb.press("Enter")
    kb.type("Keep it moist.")
    # still typing: nothing of this item was sent (the status still names the item saved before)
    expect(alice.locator("#status")).not_to_contain_text(f"item {second}")
    assert len(server["store"].reviews()) == 1
    kb.press("Control+Enter")
    submitted(second)
    # 3: a rating and a thumb up
    third = alice.locator("#item-id").inner_text()
    answers[third] = alice.locator("#answer").inner_text()
    kb.press("5")
    kb.press("u")
    kb.press("Enter")
    submitted(third)
    # the pair: sources hidden until judged, then revealed
    expect(alice.locator("#pair")).to_be_visible()
    assert alice.locator("#source-a").inner_text() == "" and alice.locator("#source-b").inner_text() == ""
    shown_a = alice.locator("#answer-a").inner_text()
    kb.press("a")
    kb.press("Enter")
    expect(alice.locator("#status")).to_contain_text("saved")
    expect(alice.locator("#source-a")).not_to_have_text("")
    revealed_a = alice.locator("#source-a").inner_text().strip("()")
    shot = tmp_path / "review-page.png"
    alice.screenshot(path=str(shot), full_page=True)
    bob_shot = tmp_path / "review-page-answer.png"
    bob.screenshot(path=str(bob_shot), full_page=True)
    print(f"\nscreenshots: {shot} {bob_shot}")
    assert shot.stat().st_size > 10_000 and bob_shot.stat().st_size > 10_000
    # J: nothing left for alice (bob holds the last answer)
    kb.press("j")
    expect(alice.locator("#empty")).to_be_visible()
    # K: back to what she reviewed
    kb.press("k")
    expect(alice.locator("#item")).to_be_visible()

    # the progress and agreement views read the same store
    alice.click('.tab[data-view="progress"]')
    expect(alice.locator("#progress-table")).to_contain_text("alice")
    alice.click('.tab[data-view="agreement"]')
    expect(alice.locator("#agreement-table")).to_contain_text("items")

    rows = server["store"].reviews()
    assert {r["reviewer"] for r in rows} == {"alice"} and len(rows) == 4
    by_answer = {r["answer"]: r for r in rows if r["kind"] == "answer"}
    assert set(by_answer) == {answers[first], answers[second], answers[third]}
    got = {k: (r["rating"], r["thumb"], r["correction"], r["criteria"], r["choice"]) for k, r in by_answer.items()}
    assert got == {answers[first]: (4, None, None, None, None),
                   answers[second]: (2, None, "About 28 days to full strength.\nKeep it moist.", None, None),
                   answers[third]: (5, 1, None, None, None)}
    [pair] = [r for r in rows if r["kind"] == "pair"]
    assert pair["choice"] == "A" and pair["rating"] is None and pair["correction"] is None
    assert revealed_a == pair["source_a"]
    assert shown_a == pair["answer_a"]
    prog = {p["reviewer"]: p for p in server["store"].progress()}
    assert prog["alice"]["reviewed"] == 4 and prog["bob"]["reserved"] == 1 and prog["bob"]["reviewed"] == 0
