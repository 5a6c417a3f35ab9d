"""A model named by its Hugging Face repo id, found in an HF cache built here, and its generation_config.json.

The cache is laid out as ``huggingface_hub`` lays it out (``hub/models--org--tiny/snapshots/<hash>/`` with
``refs/main``): a tiny random Llama saved with transformers' ``save_pretrained`` at two commits, a word-level
tokenizer, and a ``generation_config.json`` whose end-of-sequence list holds a token that ``config.json`` does
not: the token the model greedily produces third (found with transformers' own ``generate``), so greedy
decoding must stop there. One ``dockyard serve --model org/tiny`` process is shared by the server checks and
talked to with the official ``openai`` client; ``/metrics`` is read with ``prometheus_client``'s parser.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from dockyard.engine.sampling_params import SamplingParams
from dockyard.errors import ConfigError, ModelNotFoundError
from dockyard.model_source import resolve_model
from dockyard.onboard.gates.real import PLAIN_PROMPTS
from tests.server.conftest import free_port, http_call

REPO = "org/tiny"
COMMIT_MAIN = "a" * 40
COMMIT_OLD = "b" * 40
VOCAB = 96
# The words of the onboarding real gate's prompts have ids of their own; the rest are fillers.
_WORDS = ["<unk>", "<s>", "</s>", *dict.fromkeys(" ".join(PLAIN_PROMPTS).split())]
TOKENS = _WORDS + [f"w{i}" for i in range(len(_WORDS), VOCAB)]
PROMPT_IDS = [TOKENS.index(w) for w in PLAIN_PROMPTS[0].split()]  # the real gate's first prompt
ROOT = Path(__file__).resolve().parents[1]


def _words(ids: list[int]) -> list[str]:
    return [TOKENS[t] for t in ids]


def _tokenizer(directory: Path) -> None:
    vocab = {w: i for i, w in enumerate(TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(directory)


def _model(layers: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(layers)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> dict:
    """An HF_HOME whose hub cache holds org/tiny at two commits (main: 2 layers; the other: 1 layer)."""
    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / "models--org--tiny"
    main_model = _model(2)
    # transformers' greedy continuation, ignoring every end-of-sequence id.
    with torch.no_grad():
        out = main_model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    greedy = out[0, len(PROMPT_IDS):].tolist()
    stop_at = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i] and greedy[i] != 2)
    for commit, model in ((COMMIT_MAIN, main_model), (COMMIT_OLD, _model(1))):
        snap = repo / "snapshots" / commit
        model.save_pretrained(snap, safe_serialization=True)
        _tokenizer(snap)
        (snap / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [2, greedy[stop_at]], "temperature": 0.6, "top_p": 0.9, "bos_token_id": 1}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    return {"home": home, "greedy": greedy, "stop_at": stop_at}


@pytest.fixture()
def hub_env(hf_home, monkeypatch) -> dict:
    monkeypatch.setenv("HF_HOME", str(hf_home["home"]))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def _env(hf_home: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    return {**env, "HF_HOME": str(hf_home["home"]), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _cli(hf_home: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockyard.cli", *args], env=_env(hf_home), cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


def test_repo_id_resolves_to_its_snapshot_and_is_its_name(hub_env):
    source = resolve_model(REPO)
    assert source.name == REPO and source.repo_id == REPO
    assert source.path == hub_env["home"] / "hub" / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    assert source.spec.num_hidden_layers == 2 and source.kind == "safetensors"
    old = resolve_model(REPO, revision=COMMIT_OLD)
    assert old.path.name == COMMIT_OLD and old.spec.num_hidden_layers == 1 and old.name == REPO


def test_tokenizer_from_another_source(hub_env, tmp_path):
    other = tmp_path / "tok"
    _tokenizer(other)
    (other / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((other / "tokenizer_config.json").read_text()), "model_max_length": 77}))
    assert resolve_model(REPO, tokenizer=str(other)).load_tokenizer().model_max_length == 77
    assert resolve_model(REPO).load_tokenizer().model_max_length != 77
    with pytest.raises(ModelNotFoundError, match="nope"):
        resolve_model(REPO, tokenizer=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="--generation-config"):
        resolve_model(REPO, generation_config=str(tmp_path))


def test_inspect_at_a_revision(hub_env, capsys):
    from dockyard.cli import main

    assert main(["inspect", REPO, "--json", "--revision", COMMIT_OLD]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["spec"]["num_hidden_layers"] == 1 and data["source"]["path"].endswith(COMMIT_OLD)


def test_missing_repo_id_says_where_it_looked(hub_env):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("org/absent")
    message = str(err.value)
    assert str(hub_env["home"] / "hub") in message and "models--org--absent" in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_model(REPO, revision="c" * 40)


def test_generation_config_defaults_and_eos(hub_env):
    source = resolve_model(REPO)
    stop_token = hub_env["greedy"][hub_env["stop_at"]]
    assert source.spec.eos_token_ids == (2, stop_token)  # config.json's, then the file's extra one
    assert source.generation.sampling == {"temperature": 0.6, "top_p": 0.9}
    vllm = resolve_model(REPO, generation_config="vllm")
    assert vllm.generation.sampling == {} and vllm.spec.eos_token_ids == (2, stop_token)
    folder = hub_env["home"] / "gc"
    folder.mkdir(exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps({"top_k": 7, "max_new_tokens": 5}))
    assert resolve_model(REPO, generation_config=str(folder)).generation.sampling == {"top_k": 7, "max_tokens": 5}


def test_generate_cli_resolves_the_repo_id_at_a_revision(hub_env):
    greedy, stop_at = hub_env["greedy"], hub_env["stop_at"]
    prompt = PLAIN_PROMPTS[0]
    out = _cli(hub_env, "generate", "--model", REPO, prompt, "--max-tokens", "8", "--revision", COMMIT_OLD)
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        ref = _model(1).generate(torch.tensor([PROMPT_IDS]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=[2, greedy[stop_at]], pad_token_id=0)[0, len(PROMPT_IDS):].tolist()
    ends = [i for i, t in enumerate(ref) if t in (2, greedy[stop_at])]
    ref = ref[:ends[0]] if ends else ref  # the text ends before an EOS (HF pads after it)
    assert out.stdout.split() == _words(ref)


def test_onboard_names_the_report_after_the_repo_id_and_compares_with_eos(hub_env, tmp_path):
    out = _cli(hub_env, "onboard", REPO, "--skip", "equivalence", "--skip", "dummy", "--skip", "features",
               "--skip", "capacity", "--skip", "serve-smoke", cwd=tmp_path)
    report = json.loads((tmp_path / "reports" / "org" / "tiny" / "report.json").read_text())
    assert report["model"]["name"] == REPO, out.stderr
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["inspect"]["status"] == "pass" and gates["real"]["status"] == "pass", out.stderr
    # The real gate's first prompt stops at the generation_config-only EOS, on both sides.
    first = gates["real"]["evidence"]["prompts"][0]
    greedy, stop_at = hub_env["greedy"], hub_env["stop_at"]
    assert first["ours"] == first["reference"] == greedy[:stop_at + 1]
    assert first["text"].split() == _words(greedy[:stop_at])
    # The terminal saw the real gate's sub-steps with their times, not minutes of silence.
    steps = [ln for ln in out.stderr.splitlines() if ln.startswith("[5/9] real …")]
    assert any("loading the real weights" in ln for ln in steps), out.stderr
    assert any("transformers reference" in ln for ln in steps) and all(ln.endswith("s)") for ln in steps)


def test_onboard_revision_reaches_every_gate_and_the_serve_command(hub_env, tmp_path):
    from dockyard.onboard.context import GateContext, OnboardOptions
    from dockyard.onboard.gates.serve_smoke import serve_command
    from dockyard.onboard.machine import detect_machine

    out = _cli(hub_env, "onboard", REPO, "--revision", COMMIT_OLD, "--weights", "real", "--skip", "equivalence",
               "--skip", "features", "--skip", "capacity", "--skip", "performance", "--skip", "serve-smoke",
               cwd=tmp_path)
    report = json.loads((tmp_path / "reports" / "org" / "tiny" / "report.json").read_text())
    gates = {g["name"]: g for g in report["gates"]}
    assert report["options"]["revision"] == COMMIT_OLD and report["model"]["path"].endswith(COMMIT_OLD), out.stderr
    # The old commit has 1 layer (main has 2): inspect, the dummy engine and the real weights all read it.
    assert report["architecture"]["spec"]["num_hidden_layers"] == 1
    dummy = gates["dummy"]["evidence"]
    assert gates["dummy"]["status"] == "pass" and dummy["layers"] == 1, gates["dummy"]["summary"]
    assert dummy["num_parameters_run"] == sum(p.numel() for p in _model(1).parameters())  # the engine it built
    real = gates["real"]
    assert real["status"] == "pass" and real["evidence"]["checkpoint"]["path"].endswith(COMMIT_OLD), real["summary"]
    with torch.no_grad():  # the 1-layer model's own greedy tokens, computed by transformers
        ref = _model(1).generate(torch.tensor([PROMPT_IDS]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(PROMPT_IDS):].tolist()
    assert real["evidence"]["prompts"][0]["reference"][:4] == ref
    # The commands it prints and runs (the tutorial's deploy line, serve-smoke's server) name the revision too.
    tutorial = (tmp_path / "reports" / "org" / "tiny" / "tutorial.md").read_text()
    assert f"dockyard serve --model {REPO} --revision {COMMIT_OLD}" in tutorial
    ctx = GateContext(OnboardOptions(model=REPO, revision=COMMIT_OLD), detect_machine("cpu", None), tmp_path)
    assert serve_command(ctx)[:5] == ["serve", "--model", REPO, "--revision", COMMIT_OLD]


def test_default_sampling_params_follow_the_generation_config(hub_env):
    from dockyard import LLM

    llm = LLM(REPO, device="cpu", kv_cache_memory_bytes=1 << 20)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.6, top_p=0.9)
    plain = LLM(REPO, device="cpu", kv_cache_memory_bytes=1 << 20, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(hf_home, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dockyard.cli", "serve", "--model", REPO, "--port", str(port), "--device", "cpu",
             "--metrics-prefix", "vllm", "--enable-log-requests"],
            env={**_env(hf_home), "DOCKYARD_LOG_STATS_INTERVAL": "0.5"}, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if http_call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server not ready: " + log.read_text())
        yield {"port": port, "log": log, **hf_home}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _metrics(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_call(port, "GET", "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict, family: str, name: str, **labels: str) -> float:
    values = [s.value for s in families[family].samples
              if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(values) == 1, (family, name, labels, families[family].samples)
    return values[0]


def test_served_under_the_repo_id_with_generation_config(server):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [REPO]
    greedy, stop_at = server["greedy"], server["stop_at"]
    before = _metrics(server["port"])
    out = client.completions.create(model=REPO, prompt=PROMPT_IDS, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == stop_at + 1  # the EOS token counts, its text does not show
    assert out.choices[0].text.split() == _words(greedy[:stop_at])
    # A request that sets no temperature / top_p gets the file's (the request log shows them).
    two = client.completions.create(model=REPO, prompt=PROMPT_IDS, max_tokens=3, n=2, extra_body={"ignore_eos": True})
    log = server["log"].read_text()
    lines = [ln for ln in log.splitlines() if "Received request" in ln]
    assert len(lines) >= 2 and "temperature=0.6" in lines[-1] and "top_p=0.9" in lines[-1], log
    assert "temperature=0.0" in lines[-2]
    after = _metrics(server["port"])
    # vLLM's names under the vllm: prefix; requests counted as requests (n=2 is one success).
    success = "vllm:request_success"
    stops = (_sample(after, success, success + "_total", finished_reason="stop")
             - _sample(before, success, success + "_total", finished_reason="stop"))
    lengths = (_sample(after, success, success + "_total", finished_reason="length")
               - _sample(before, success, success + "_total", finished_reason="length"))
    assert (stops, lengths) == (1, 1)
    gen = "vllm:generation_tokens"
    assert (_sample(after, gen, gen + "_total") - _sample(before, gen, gen + "_total")
            == out.usage.completion_tokens + two.usage.completion_tokens)
    prompt = "vllm:prompt_tokens"
    assert _sample(after, prompt, prompt + "_total") - _sample(before, prompt, prompt + "_total") == 2 * len(PROMPT_IDS)
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_inference_time_seconds", "vllm:iteration_tokens_total",
                 "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_n"):
        assert after[name].type == "histogram"
        assert _sample(after, name, name + "_count") >= _sample(before, name, name + "_count") + 1, name
    n_hist = "vllm:request_params_n"
    assert _sample(after, n_hist, n_hist + "_bucket", le="2.0") - _sample(before, n_hist, n_hist + "_bucket",
                                                                           le="2.0") == 2
    assert _sample(after, n_hist, n_hist + "_bucket", le="1.0") - _sample(before, n_hist, n_hist + "_bucket",
                                                                           le="1.0") == 1
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert after[gauge].type == "gauge" and after[gauge].samples[0].labels == {"model_name": REPO, "engine": "0"}
    assert "vllm:prefix_cache_queries" in after and "vllm:num_preemptions" in after
    assert "process_resident_memory_bytes" in after and "process_cpu_seconds" in after
    assert not [f for f in after if f.startswith("dockyard:")]


def test_start_up_and_stats_log_lines(server):
    log = server["log"].read_text()
    assert "maximum concurrency for 128 tokens per request" in log
    assert "sampling defaults from" in log and "temperature=0.6" in log
    deadline = time.monotonic() + 10
    while "Avg generation throughput" not in log and time.monotonic() < deadline:
        time.sleep(0.2)
        log = server["log"].read_text()
    line = next(ln for ln in log.splitlines() if "Avg generation throughput" in ln)
    assert "Running:" in line and "KV cache usage:" in line and "Prefix cache hit rate:" in line


def test_eval_model_resolves_the_repo_id(hub_env):
    from lm_eval.api.instance import Instance

    from dockyard.eval.lm import DockyardLM

    lm = DockyardLM(REPO, device="cpu", batch_size=2)
    assert lm.name == REPO and lm.llm.source.path.name == COMMIT_MAIN
    old = DockyardLM(REPO, device="cpu", batch_size=2, revision=COMMIT_OLD)  # lm-eval's model_args revision=
    assert old.llm.source.path.name == COMMIT_OLD and old.llm.spec.num_hidden_layers == 1
    # lm-eval's loglikelihood through the resolved model: greedy flags agree with transformers' argmax.
    context, continuation = PLAIN_PROMPTS[0], " " + " ".join(_words(hub_env["greedy"][:2]))
    (logprob, is_greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    assert is_greedy and logprob < 0


def test_bench_serve_against_the_server(server, tmp_path):
    port = server["port"]
    before = _metrics(port)
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": PLAIN_PROMPTS[1]},
                                                       {"from": "gpt", "value": "w10 w11"}]}]))
    result = tmp_path / "result.json"
    out = _cli(server, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}/v1", "--num-prompts", "4",
               "--random-input-len", "6", "--random-output-len", "3", "--random-vocab-size", str(VOCAB),
               "--max-concurrency", "2", "--save-result", str(result))
    assert out.returncode == 0, out.stderr
    assert "Serving Benchmark Result" in out.stdout and "P99 TTFT (ms):" in out.stdout, out.stdout
    data = json.loads(result.read_text())
    assert data["completed"] == 4 and data["failed"] == 0 and data["model_id"] == REPO
    assert data["output_lens"] == [3] * 4 and data["total_output_tokens"] == 12 and data["total_input_tokens"] == 24
    assert all(0 < t <= e for t, e in zip(data["ttfts"], [data["p99_e2el_ms"] / 1000] * 4))
    assert data["median_ttft_ms"] <= data["p99_ttft_ms"] and len(data["itls"][0]) == 2
    after = _metrics(port)
    # The server's own counters agree with what the client measured.
    gen, success = "vllm:generation_tokens", "vllm:request_success"
    assert _sample(after, gen, gen + "_total") - _sample(before, gen, gen + "_total") == 12
    assert (_sample(after, success, success + "_total", finished_reason="length")
            - _sample(before, success, success + "_total", finished_reason="length")) == 4
    plot, saved = tmp_path / "serve.png", tmp_path / "rates.json"
    out = _cli(server, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}/v1", "--dataset-name", "sharegpt",
               "--dataset-path", str(sharegpt), "--num-prompts", "1", "--sharegpt-output-len", "2",
               "--request-rate", "50", "inf", "--plot", str(plot), "--save-result", str(saved))
    assert out.returncode == 0 and "Successful requests:" in out.stdout and " 1\n" in out.stdout, out.stdout
    runs = json.loads(saved.read_text())  # one result per rate, in order
    assert [r["request_rate"] for r in runs] == [50, float("inf")] and all(r["completed"] == 1 for r in runs)
    assert matplotlib.image.imread(plot).shape[0] > 200


def test_serve_refuses_bad_log_and_metrics_settings_before_loading(monkeypatch, capsys):
    from dockyard.cli import main

    assert main(["serve", "--metrics-prefix", "vllm:x", "--port", "0"]) == 2
    assert "--metrics-prefix 'vllm:x' is not a Prometheus name" in capsys.readouterr().err
    monkeypatch.setenv("DOCKYARD_LOG_STATS_INTERVAL", "soon")
    assert main(["serve", "--port", "0"]) == 2
    assert "DOCKYARD_LOG_STATS_INTERVAL='soon' must be a number of seconds > 0" in capsys.readouterr().err


def test_tensor_parallel_ranks_load_the_same_revision(hub_env):
    """The other ranks resolve the repo id with rank 0's engine arguments: at another revision (1 layer instead
    of main's 2) TP=2 still equals transformers' greedy continuation of that revision's model."""
    from dockyard import LLM

    with torch.no_grad():
        ref = _model(1).generate(torch.tensor([PROMPT_IDS]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(PROMPT_IDS):].tolist()
    llm = LLM(REPO, revision=COMMIT_OLD, device="cpu", dtype="float32", num_kv_blocks=16, tensor_parallel_size=2,
              generation_config="vllm")
    try:
        out = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
    finally:
        llm.shutdown()
    assert out[0].outputs[0].token_ids == ref
