"""``dockyard serve`` started the way a vLLM user would start ``vllm serve``: a positional model and the
vLLM flags of issue 21, each checked for an effect a client or an operator can see. One start-up on the
bundled model; the flags that need no server (refusals, value parsing, --seed, the KV-cache formula of
--gpu-memory-utilization) are checked in ``tests/test_engine_args.py``."""

from __future__ import annotations

import re

import jinja2
import openai
import pytest

from dockyard.model_path import bundled_model_path
from dockyard.model_source import resolve_model
from tests.server.conftest import ServerProcess, ready_server

KEY = "vllm-style-key"
NAMES = ("first-name", "second-name")
MAX_LEN = 1000  # --max-model-len 1k
BATCH_TOKENS = 256
TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}ANSWER:"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory) -> ServerProcess:
    with ready_server(tmp_path_factory, "vllm-flags", "--host", "127.0.0.1",
                      "--served-model-name", *NAMES, "--api-key", KEY, "--max-model-len", "1k",
                      "--dtype", "float", "--seed", "5", "--max-num-seqs", "3",
                      "--max-num-batched-tokens", str(BATCH_TOKENS), "--enable-chunked-prefill",
                      "--no-enable-prefix-caching", "--kv-cache-dtype", "auto", "--swap-space", "2",
                      "--gpu-memory-utilization", "0.8", "--tensor-parallel-size", "1", "--disable-log-stats",
                      "--uvicorn-log-level", "info", "--chat-template", TEMPLATE, model_positional=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(vllm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_server.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return resolve_model(bundled_model_path()).load_tokenizer()


def test_served_model_name_api_key_host_and_port(vllm_server, client):
    assert [m.id for m in client.models.list().data] == list(NAMES)
    for name in NAMES:  # every served name is accepted in requests
        out = client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert out.model == name
    status, _ = vllm_server.call("GET", "/v1/models", auth=False)
    assert status == 401


def test_max_model_len_1k_refuses_a_longer_request(client, tokenizer):
    words = "one two three four five six seven eight nine ten " * 120
    ids = tokenizer.encode(words, add_special_tokens=False)[:MAX_LEN]
    assert len(ids) == MAX_LEN
    with pytest.raises(openai.BadRequestError, match=str(MAX_LEN)):
        client.completions.create(model=NAMES[0], prompt=ids, max_tokens=1)
    # Just inside the limit and longer than one step's token budget: prefilled in chunks and answered.
    out = client.completions.create(model=NAMES[0], prompt=ids[:MAX_LEN - 2], max_tokens=1)
    assert out.usage.prompt_tokens == MAX_LEN - 2 > BATCH_TOKENS and out.choices[0].finish_reason == "length"


def test_prefix_caching_off(vllm_server, client):
    prompt = "The same long prompt, sent twice, would hit the prefix cache if it were on. " * 4
    for _ in range(2):
        client.completions.create(model=NAMES[0], prompt=prompt, max_tokens=1)
    metrics = vllm_server.metrics()
    assert metrics["dockyard:prefix_cache_hits_total"] == 0


def test_chat_template_inline(client, tokenizer):
    messages = [{"role": "user", "content": "Say hi"}]
    text = jinja2.Environment().from_string(TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert text == "<<user>> Say hi\nANSWER:"
    out = client.chat.completions.create(model=NAMES[0], messages=messages, max_tokens=1)
    assert out.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def test_start_up_log_shows_the_settings_and_uvicorn(vllm_server, client):
    client.models.list()
    log = vllm_server.log()
    engine = re.search(r"engine: (\w+) on cpu; KV cache (\d+) blocks x 16 = \d+ tokens; max_model_len (\d+); "
                       r"max_num_seqs (\d+); max_num_batched_tokens (\d+); prefix caching (\w+)", log)
    assert engine is not None, log[-3000:]
    assert engine.group(1) == "float32"  # --dtype float
    assert (int(engine.group(3)), int(engine.group(4)), int(engine.group(5)), engine.group(6)) == (
        MAX_LEN, 3, BATCH_TOKENS, "off")
    # --gpu-memory-utilization applies to GPUs; on the CPU the pool is --kv-cache-memory-bytes (1 GiB by default)
    assert "swap_space=2 GiB has no effect" in log
    assert "Application startup complete" in log  # --uvicorn-log-level info: uvicorn's own lines
    assert '"GET /v1/models HTTP/1.1" 200' in log  # ... and its access log
