"""Faults under load: 64 streams in flight while poisoned requests arrive.

The app runs under uvicorn in this process (on a free loopback port) so that some requests can be
poisoned once the engine holds them (values set past validation, standing in for any bug that lets
one through: see ``tests.helpers.poison``); the official ``openai`` client drives it. Every healthy
stream must give the text the same request gives alone (greedy, the in-process engine with nothing
else running: the reference); the poisoned ones fail alone, with an error and no internal text;
the requests refused at the door get 400; afterwards nothing is held and /health is 200.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import openai
import pytest
import uvicorn

from dockyard import SamplingParams
from dockyard.engine.async_engine import AsyncLLM
from dockyard.server.app import build_app
from tests.helpers import poison
from tests.server.conftest import free_port, http_call

NUM_STREAMS = 64
MAX_TOKENS = 4
MARK = "POISON-"


def _requests() -> list[dict]:
    """Distinct greedy requests: even ones chat, odd ones completions."""
    out = []
    for i in range(NUM_STREAMS):
        if i % 2:
            out.append({"prompt": f"Item {i}: the list of {i * 3} things starts with"})
        else:
            out.append({"messages": [{"role": "user", "content": f"Write the number {i} in words."}]})
    return out


def _alone(llm, req: dict) -> str:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    if "messages" in req:
        return llm.chat(req["messages"], params, use_tqdm=False)[0].outputs[0].text
    return llm.generate(req["prompt"], params, use_tqdm=False)[0].outputs[0].text


@pytest.fixture()
def poisoning_server(reference_llm, monkeypatch):
    """The app on a free port; a request whose prompt holds ``POISON-<kind>`` is poisoned once added."""
    original = AsyncLLM.add_request

    async def add_request(self, prompt_token_ids, params, request_id=None, prompt=None):
        stream = await original(self, prompt_token_ids, params, request_id, prompt)
        if prompt is not None and MARK in prompt:
            poison(params, prompt.split(MARK, 1)[1].split()[0])
        return stream

    monkeypatch.setattr(AsyncLLM, "add_request", add_request)
    port = free_port()
    app = build_app(reference_llm, "m", warm_up=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(timeout=60)


def test_64_streams_survive_poisoned_requests(reference_llm, poisoning_server):
    requests = _requests()
    expected = [_alone(reference_llm, r) for r in requests]  # each alone, before the server runs anything
    port = poisoning_server
    in_flight = asyncio.Event()

    async def healthy(client: openai.AsyncOpenAI, req: dict) -> str:
        kw = dict(model="m", max_tokens=MAX_TOKENS, temperature=0, stream=True)
        if "messages" in req:
            stream = await client.chat.completions.create(messages=req["messages"], **kw)
            parts = []
            async for c in stream:
                in_flight.set()
                parts.append((c.choices[0].delta.content or "") if c.choices else "")
            return "".join(parts)
        stream = await client.completions.create(prompt=req["prompt"], **kw)
        parts = []
        async for c in stream:
            in_flight.set()
            parts.append(c.choices[0].text)
        return "".join(parts)

    async def poisoned(client: openai.AsyncOpenAI, kind: str, chat: bool, stream: bool) -> Exception | str:
        await in_flight.wait()
        # min_tokens > 0: the "mask" poison fails where stop tokens are masked until then.
        kw = dict(model="m", max_tokens=MAX_TOKENS, temperature=0, stream=stream, extra_body={"min_tokens": 2})
        text = f"Say hello. {MARK}{kind} please."
        try:
            if chat:
                resp = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **kw)
            else:
                resp = await client.completions.create(prompt=text, **kw)
            if stream:
                async for _ in resp:
                    pass
            return "no error"
        except openai.APIError as exc:
            return exc

    async def refused(client: openai.AsyncOpenAI, extra: dict) -> Exception | str:
        await in_flight.wait()
        try:
            await client.completions.create(model="m", prompt="Hi", max_tokens=2, extra_body=extra)
            return "no error"
        except openai.APIError as exc:
            return exc

    poisons = [(kind, chat, stream) for kind in ("mask", "sampler") for chat in (True, False)
               for stream in (True, False)]
    table = [{"top_k": 2**63}, {"top_k": 2**64, "temperature": 0}, {"stop_token_ids": [49152], "min_tokens": 2},
             {"stop_token_ids": [10**9], "min_tokens": 2}, {"stop_token_ids": [2**63], "min_tokens": 1}]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                      timeout=600) as client:
            return await asyncio.gather(
                asyncio.gather(*(healthy(client, r) for r in requests)),
                asyncio.gather(*(poisoned(client, *p) for p in poisons)),
                asyncio.gather(*(refused(client, t) for t in table)))

    got, poison_results, refusals = asyncio.run(main())
    mismatches = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mismatches, mismatches[:5]
    assert len(set(got)) > NUM_STREAMS * 3 // 4  # distinct answers: a mix-up could not go unseen
    for (kind, chat, stream), result in zip(poisons, poison_results):
        assert isinstance(result, openai.APIError), (kind, chat, stream, result)
        body = json.dumps(result.body)
        assert "failed while generating" in body and "other requests are not affected" in body, body
        assert "IndexError" not in body and "Overflow" not in body  # internal text stays in the log
        if not stream:
            assert isinstance(result, openai.InternalServerError) and result.status_code == 500
    for extra, result in zip(table, refusals):
        assert isinstance(result, openai.BadRequestError), (extra, result)
    engine = reference_llm.engine
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    assert http_call(port, "GET", "/health")[0] == 200
