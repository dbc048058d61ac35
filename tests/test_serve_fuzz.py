"""Schemathesis against `/openapi.json`: whatever it sends, the server never answers with a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tiny_llama_dir, tmp_path_factory):
    from tuneloop.feedback import FeedbackStore
    from tuneloop.serve.app import ServeSettings, create_app
    from tuneloop.serve.engine import Engine

    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_batch=8, max_queue=8, max_new_tokens=8,
                    max_prompt_tokens=128)
    store = FeedbackStore(tmp_path_factory.mktemp("fuzz") / "feedback.db")
    app = create_app(engine, ServeSettings(max_new_tokens=8, max_prompt_tokens=128), store)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.close()


@pytest.mark.fuzz
def test_no_server_errors(api_schema):
    # Driven by hypothesis directly (schemathesis' pytest plugin does not load under this pytest):
    # every operation in the spec, generated bodies/params, only the "no 5xx" check.
    from hypothesis import given

    seen: dict[str, set[int]] = {}
    for result in api_schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            try:
                r = case.call_and_validate(checks=[not_a_server_error])
            except Exception as e:  # name the request, so a rare failure can be replayed
                raise AssertionError(f"{op.method.upper()} {op.path} body={case.body!r} query={case.query!r}: "
                                     f"{e!r}") from e
            seen.setdefault(f"{op.method.upper()} {op.path}", set()).add(r.status_code)

        run()
    assert len(seen) >= 9, seen  # every operation was exercised
    assert any(s < 300 for v in seen.values() for s in v) and any(400 <= s < 500 for v in seen.values() for s in v)
