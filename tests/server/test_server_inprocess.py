"""The app in process (no socket): readiness on warm-up failure and on a dead engine, streaming text
hold-back, the /metrics format, origins / CORS / Content-Type, and the OpenAPI schema."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import httpx2
import pytest

from dockyard.engine.model_runner import ModelRunner
from dockyard.engine.sampling_params import SamplingParams
from dockyard.server import app as app_module
from dockyard.server import serving as serving_module
from dockyard.server.app import CORSSettings, asgi_request, build_app
from dockyard.server.cli import add_serve_parser
from dockyard.server.protocol import CompletionRequest
from dockyard.server.serving import _hold_back, _TextCursor
from tests.server.conftest import free_port, http_call, parse_metrics


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
    assert "boom" not in json.dumps(h_body) + json.dumps(body)  # internal text stays in the log


def test_metrics_page_is_well_formed(reference_llm):
    app = build_app(reference_llm, "m", warm_up=False)

    async def work():
        await asgi_request(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
        return await asgi_request(app, "GET", "/metrics")

    status, raw = _run_app(app, work)
    text = raw.decode()
    assert status == 200
    metrics = parse_metrics(text)
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        buckets = [v for k, v in metrics.items() if k.startswith(f"dockyard:{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == metrics[f"dockyard:{name}_count"] > 0
        assert f'dockyard:{name}_bucket{{le="+Inf"}}' in metrics
    for line in text.splitlines():
        if line.startswith("dockyard:") and "cache_config_info" not in line:  # an info gauge, as in vLLM
            assert 'model_name="m"' in line
    assert "process_cpu_seconds_total" in metrics  # prometheus_client's process metrics


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


def _asgi_client(app) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver")


def test_engine_death_is_fatal_and_503(reference_llm, monkeypatch):
    """An exception escaping a step (here: the forward pass) kills the engine: the request in flight gets
    503, /health says dead, and on_fatal (which stops ``serve`` with exit status 1) is called once."""
    model = reference_llm.engine.runner.model

    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated fault in the forward pass")

    monkeypatch.setattr(model, "forward", broken_forward)
    fatal: list[str] = []
    app = build_app(reference_llm, "m", warm_up=False, on_fatal=fatal.append)

    async def work():
        status, body = await asgi_request(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        return status, json.loads(body), await _health(app)

    status, body, (h_status, h_body) = _run_app(app, work)
    assert status == 503 and body["error"]["code"] == "engine_unavailable"
    assert h_status == 503 and h_body["status"] == "dead"
    assert len(fatal) == 1 and "simulated fault" in fatal[0]  # the operator's log line has the reason
    assert "simulated" not in json.dumps(body) + json.dumps(h_body)  # clients do not get internals
    assert not reference_llm.engine.has_unfinished_requests()  # shutdown aborted what was left


def test_origins_cors_and_content_type(reference_llm):
    app = build_app(reference_llm, "m", warm_up=False, cors=CORSSettings(("http://ok.example",)))
    body = {"prompt": "Hi", "max_tokens": 1}

    async def work():
        async with _asgi_client(app) as client:
            page = await client.post("/v1/completions", json=body, headers={"Origin": "http://evil.example"})
            allowed = await client.post("/v1/completions", json=body, headers={"Origin": "http://ok.example"})
            preflight = await client.options("/v1/completions", headers={
                "Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization"})
            bad_preflight = await client.options("/v1/completions", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
            simple = await client.post("/v1/completions", content=json.dumps(body),
                                       headers={"Content-Type": "text/plain"})
            charset = await client.post("/v1/completions", content=json.dumps(body),
                                        headers={"Content-Type": "application/json; charset=utf-8"})
            return page, allowed, preflight, bad_preflight, simple, charset

    page, allowed, preflight, bad_preflight, simple, charset = _run_app(app, work)
    assert page.status_code == 403 and page.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in page.headers
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ok.example"
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://ok.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert bad_preflight.status_code >= 400 and "access-control-allow-origin" not in bad_preflight.headers
    assert simple.status_code == 415 and "application/json" in simple.json()["error"]["message"]
    assert charset.status_code == 200


def test_openapi_and_docs_behind_the_key_with_request_schemas(reference_llm):
    app = build_app(reference_llm, "m", api_key="k", warm_up=False)
    chat = [{"role": "user", "content": "Hi"}]
    # bodies the server refuses for their shape (400 before the engine sees them)
    refused = [("CompletionRequest", "/v1/completions", {"prompt": {"a": 1}}),
               ("CompletionRequest", "/v1/completions", {"prompt": []}),
               ("CompletionRequest", "/v1/completions", {"prompt": "x", "n": "2"}),
               ("CompletionRequest", "/v1/completions", {"prompt": "x", "stop": [1]}),
               ("ChatCompletionRequest", "/v1/chat/completions", {"messages": "Hi"}),
               ("ChatCompletionRequest", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
               ("ChatCompletionRequest", "/v1/chat/completions", {"messages": chat, "logprobs": 1})]

    async def work():
        async with _asgi_client(app) as client:
            gets = (await client.get("/openapi.json"), await client.get("/docs"),
                    await client.get("/openapi.json", headers={"Authorization": "Bearer k"}),
                    await client.get("/docs", headers={"Authorization": "Bearer k"}))
        posts = [(await asgi_request(app, "POST", path, body, {"authorization": "Bearer k"}))[0]
                 for _, path, body in refused]
        return gets, posts

    (schema_anon, docs_anon, schema, docs), refused_statuses = _run_app(app, work)
    assert schema_anon.status_code == 401 and docs_anon.status_code == 401
    assert schema.status_code == 200 and docs.status_code == 200
    spec = schema.json()
    components = spec["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert model in components
    # the schema is the request model's own (derived, not copied): its fields and what they refer to
    assert set(components["CompletionRequest"]["properties"]) == set(CompletionRequest.model_fields)
    assert "ChatMessage" in components and "/v1/models/{model_id}" in spec["paths"]
    # usable for contract testing: what it accepts and refuses agrees with the server on shapes
    jsonschema = pytest.importorskip("jsonschema")

    def conforms(model: str, body: dict) -> bool:
        root = {"$ref": f"#/components/schemas/{model}", "components": spec["components"]}
        return jsonschema.Draft202012Validator(root).is_valid(body)

    for model, body in (("CompletionRequest", {"prompt": "Hi", "max_tokens": 2, "stop": ["."]}),
                        ("CompletionRequest", {"prompt": [[1, 2], [3]], "n": 2}),
                        ("ChatCompletionRequest", {"messages": chat, "stop": "x", "logprobs": True})):
        assert conforms(model, body), body
    assert refused_statuses == [400] * len(refused)
    for model, _, body in refused:
        assert not conforms(model, body), body


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("DOCKYARD_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    assert parser.parse_args(["serve"]).api_key == "from-env"
    assert parser.parse_args(["serve", "--api-key", "flag"]).api_key == "flag"


def test_serve_exits_1_when_the_engine_dies(reference_llm, monkeypatch):
    """``serve`` (uvicorn, warm-up and all) on the session's model: once ready, a step fails in a way no
    single request explains, so the engine is dead; the request gets 503 and serve returns 1."""
    monkeypatch.setattr(app_module, "LLM", lambda *args, **kwargs: reference_llm)
    broken = threading.Event()
    real_execute = ModelRunner.execute

    def execute(self, *args, **kwargs):
        if broken.is_set():
            raise RuntimeError("simulated fault in a step")
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    port = free_port()
    args = parser.parse_args(["serve", "--port", str(port), "--api-key", "k"])
    exit_status: list[int] = []
    thread = threading.Thread(target=lambda: exit_status.append(app_module.serve(args)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not exit_status:
        try:
            if http_call(port, "GET", "/health", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    broken.set()
    status, body = http_call(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2},
                             {"Authorization": "Bearer k"})
    thread.join(timeout=60)
    assert status == 503 and body["error"]["code"] == "engine_unavailable", body
    assert exit_status == [1]
