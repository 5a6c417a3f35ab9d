"""The app in process (no socket): readiness on warm-up failure and on a dead engine, streaming text
hold-back, and the /metrics format."""

from __future__ import annotations

import asyncio
import json

import pytest

from dockyard.engine.sampling_params import SamplingParams
from dockyard.server import serving as serving_module
from dockyard.server.app import asgi_request, build_app
from dockyard.server.serving import _hold_back, _TextCursor
from tests.server.conftest import parse_metrics


def _run_app(app, work):
    async def main():
        async with app.router.lifespan_context(app):
            return await work()

    return asyncio.run(main())


async def _health(app) -> tuple[int, dict]:
    status, body = await asgi_request(app, "GET", "/health")
    return status, json.loads(body)


def test_failed_warm_up_is_fatal_and_never_ready(reference_llm, monkeypatch):
    async def broken_chat(self, req, disconnected=None):
        raise RuntimeError("simulated failure in the chat path")

    monkeypatch.setattr(serving_module.OpenAIServing, "chat", broken_chat)
    fatal: list[str] = []
    ready: list[float] = []
    app = build_app(reference_llm, "m", on_fatal=fatal.append, on_ready=ready.append)

    async def work():
        for _ in range(600):
            if fatal:
                break
            await asyncio.sleep(0.05)
        return await _health(app)

    status, body = _run_app(app, work)
    assert fatal and "simulated failure" in fatal[0] and not ready
    assert status == 503 and body["status"] == "failed" and "warm-up failed" in body["message"]


def test_dead_engine_is_503(reference_llm):
    app = build_app(reference_llm, "m", warm_up=False)

    async def work():
        assert (await _health(app))[0] == 200
        app.state.serving.engine.dead = RuntimeError("boom")
        health = await _health(app)
        status, body = await asgi_request(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        return health, status, json.loads(body)

    (h_status, h_body), status, body = _run_app(app, work)
    assert h_status == 503 and h_body["status"] == "dead"
    assert status == 503 and "engine failed" in body["error"]["message"]


def test_metrics_page_is_well_formed(reference_llm):
    app = build_app(reference_llm, "m", warm_up=False)

    async def work():
        await asgi_request(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
        return await asgi_request(app, "GET", "/metrics")

    status, raw = _run_app(app, work)
    text = raw.decode()
    assert status == 200
    metrics = parse_metrics(text)
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        buckets = [v for k, v in metrics.items() if k.startswith(f"dockyard:{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == metrics[f"dockyard:{name}_count"] > 0
        assert f'dockyard:{name}_bucket{{le="+Inf"}}' in metrics
    for line in text.splitlines():
        if not line.startswith("#"):
            assert 'model_name="m"' in line


@pytest.mark.parametrize("stop, include, hold", [(None, False, 0), (["\n\n"], False, 1), (["a", "xyz"], False, 2),
                                                 (["xyz"], True, 0)])
def test_hold_back(stop, include, hold):
    assert _hold_back(SamplingParams(stop=stop, include_stop_str_in_output=include)) == hold


def test_text_cursor_holds_back_what_may_change():
    cur = _TextCursor(hold=1)  # stop string "\n\n"
    assert cur.text_delta("Hello", False) == "Hell"
    assert cur.text_delta("Hello\n", False) == "o"
    assert cur.text_delta("Hello", True) == ""  # the stop string arrived: its first "\n" was never sent
    cur = _TextCursor(hold=0)
    assert cur.text_delta("caf\ufffd", False) == "caf"  # an incomplete UTF-8 character waits
    assert cur.text_delta("café", False) == "é"
    assert cur.text_delta("café \ufffd", True) == " \ufffd"  # at the end, everything goes out
