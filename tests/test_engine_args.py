"""``EngineArgs``: one definition of the engine settings for ``LLM`` and every command, with vLLM's flags.

Parse-level checks (no model is loaded) plus small in-process engines where an effect must be seen:
``--seed`` seeding the draws of unseeded requests, ``--quantization`` checked against the checkpoint.
The server start-up with the whole flag list is ``tests/server/test_vllm_serve_flags.py``.
"""

from __future__ import annotations

import pytest
import torch

from dockyard import LLM, SamplingParams
from dockyard.cli import build_parser, main
from dockyard.engine.llm import gpu_kv_cache_budget
from dockyard.engine_args import VLLM_FLAGS_NOT_HONOURED, EngineArgs, human_readable_int
from dockyard.errors import ConfigError, DockyardError
from dockyard.model_source import resolve_model
from dockyard.server.app import engine_args_of, read_chat_template
from tests.helpers import save_tiny_hf_model

CONFIGS = "../shared/configs"
GiB = 1024**3
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 301, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32"}


def _serve_args(*argv: str) -> EngineArgs:
    return engine_args_of(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("32k", 32_000), ("32K", 32_768), ("1M", 1_048_576),
                                             ("1m", 1_000_000), ("25.6k", 25_600), ("2G", 2 * 1024**3)])
def test_max_model_len_takes_vllm_suffixes(text, value):
    assert human_readable_int(text) == value
    assert _serve_args("--max-model-len", text).max_model_len == value


@pytest.mark.parametrize("text", ["1.5K", "lots", "12q"])
def test_bad_human_readable_numbers_are_refused_by_argparse(text, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--max-model-len", text])
    assert exc.value.code == 2
    assert repr(text) in capsys.readouterr().err


@pytest.mark.parametrize(("name", "dtype"), [("half", "float16"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                                             ("float", "float32"), ("float32", "float32"), ("auto", "auto")])
def test_vllm_dtype_names(name, dtype):
    assert _serve_args("--dtype", name).dtype == dtype
    assert EngineArgs(dtype=name).dtype == dtype  # LLM(dtype="half") too


def test_positional_model_and_model_flag():
    assert _serve_args("/m/a").model == "/m/a"
    assert _serve_args("--model", "/m/a").model == "/m/a"
    assert _serve_args("/m/a", "--model", "/m/a").model == "/m/a"
    with pytest.raises(DockyardError, match="two models were given"):
        _serve_args("/m/a", "--model", "/m/b")


def test_boolean_flags_both_ways():
    assert _serve_args().enable_prefix_caching is True
    assert _serve_args("--no-enable-prefix-caching").enable_prefix_caching is False
    assert _serve_args("--enable-prefix-caching").enable_prefix_caching is True
    assert _serve_args("--enable-chunked-prefill").enable_chunked_prefill is True
    assert _serve_args().async_scheduling is None
    assert _serve_args("--no-async-scheduling").async_scheduling is False


def test_every_command_means_the_same_by_a_flag():
    """generate, serve, inspect, eval and onboard parse a shared flag into the same EngineArgs value."""
    line = ["--dtype", "half"]
    parsed = {cmd: build_parser().parse_args([cmd, *extra, *line])
              for cmd, extra in (("generate", ["hi"]), ("serve", []), ("inspect", []), ("eval", []),
                                 ("onboard", []))}
    assert {cmd: ns.dtype for cmd, ns in parsed.items()} == dict.fromkeys(parsed, "float16")
    full = ["--max-model-len", "2k", "--max-num-seqs", "3", "--max-num-batched-tokens", "256", "--seed", "9",
            "--gpu-memory-utilization", "0.5", "-tp", "2", "--no-enable-prefix-caching", "--swap-space", "4",
            "--kv-cache-memory-bytes", "1G", "--num-gpu-blocks-override", "40"]
    expected = EngineArgs(max_model_len=2000, max_num_seqs=3, max_num_batched_tokens=256, seed=9,
                          gpu_memory_utilization=0.5, tensor_parallel_size=2, enable_prefix_caching=False,
                          swap_space=4.0, kv_cache_memory_bytes=GiB, num_kv_blocks=40)
    for cmd, extra in (("generate", ["hi"]), ("serve", [])):
        assert EngineArgs.from_cli_args(build_parser().parse_args([cmd, *extra, *full])) == expected
    # eval: lm-eval's --batch-size is the engine's max_num_seqs
    eval_line = ["eval", "--batch-size", "3", *full[:2], *full[4:]]
    assert EngineArgs.from_cli_args(build_parser().parse_args(eval_line), max_num_seqs=3) == expected


def test_llm_keyword_names_are_the_engine_args_fields():
    """``LLM(model, **kwargs)`` keeps the keyword names it always had; an unknown one is a TypeError."""
    names = {"dtype", "device", "load_format", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
             "block_size", "num_kv_blocks", "kv_cache_memory_bytes", "gpu_memory_utilization",
             "enable_prefix_caching", "enforce_eager", "tensor_parallel_size", "enable_expert_parallel",
             "async_scheduling", "skip_memory_check", "num_threads"}
    assert names <= set(EngineArgs.__dataclass_fields__)
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(max_num_seq=4)


@pytest.mark.parametrize("flags", list(VLLM_FLAGS_NOT_HONOURED))
def test_vllm_flags_not_honoured_are_refused_with_the_reason(flags, capsys):
    for flag in flags:
        with pytest.raises(SystemExit) as exc:
            main(["serve", flag, "1"])
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert f"{flag} is a vLLM flag dockyard does not honour: {VLLM_FLAGS_NOT_HONOURED[flags]}" in err
        assert "unrecognized arguments" not in err


@pytest.mark.parametrize(("argv", "words"), [
    (["--kv-cache-dtype", "fp8_e5m2"], "kv_cache_dtype='fp8_e5m2' is not one of auto, fp8, fp8_e4m3"),
    (["--quantization", "bitsandbytes"], "quantization='bitsandbytes' is not supported"),
    (["--no-enable-chunked-prefill"], "raise --max-num-batched-tokens to --max-model-len"),
    (["--gpu-memory-utilization", "1.5"], "must be in (0, 1]"),
    (["--max-num-seqs", "0"], "max_num_seqs=0 must be a whole number >= 1"),
])
def test_unsupported_values_are_one_line_errors(argv, words, capsys):
    assert main(["serve", *argv, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "dockyard serve: error:" in err and words in err and "Traceback" not in err


def test_quantization_must_match_the_checkpoint():
    """As vLLM: --quantization names the checkpoint's own method; only fp8 quantizes an unquantized one on load."""
    fp8 = resolve_model(f"{CONFIGS}/Qwen--Qwen3-8B-FP8/config.json")
    plain = resolve_model(f"{CONFIGS}/Qwen--Qwen3-8B/config.json")
    EngineArgs(quantization="fp8").check_quantization(fp8.quantization, fp8.name)
    EngineArgs().check_quantization(fp8.quantization, fp8.name)
    assert not EngineArgs(quantization="fp8").quantizes_online(fp8.quantization)
    EngineArgs(quantization="fp8").check_quantization(plain.quantization, plain.name)  # online FP8
    assert EngineArgs(quantization="fp8").quantizes_online(plain.quantization)
    with pytest.raises(ConfigError, match="is not quantized; dockyard quantizes weights while loading only to fp8"):
        EngineArgs(quantization="awq").check_quantization(plain.quantization, plain.name)
    with pytest.raises(ConfigError, match="is quantized with 'fp8'"):
        EngineArgs(quantization="gptq").check_quantization(fp8.quantization, fp8.name)


def test_gpu_memory_utilization_sizes_the_kv_cache_as_vllm():
    """KV = total × utilization − weights − activation peak, whatever other processes hold, if it is free."""
    assert gpu_kv_cache_budget(80 * GiB, 70 * GiB, 0.5, 10 * GiB, 2 * GiB) == 28 * GiB
    assert gpu_kv_cache_budget(80 * GiB, 70 * GiB, 0.9, 10 * GiB, 2 * GiB) == int(72 * GiB) - 12 * GiB
    with pytest.raises(ConfigError, match=r"only 20.00 GiB are free .* lower --gpu-memory-utilization"):
        gpu_kv_cache_budget(80 * GiB, 20 * GiB, 0.9, 10 * GiB, 2 * GiB)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama with fixed weights (saved from transformers), so a seed can only change the draws."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k not in ("architectures", "model_type")}))
    return str(save_tiny_hf_model(hf, tmp_path_factory.mktemp("tiny")))


def _unseeded_draws(model: str, seed: int, rng_before: int) -> list[int]:
    torch.manual_seed(rng_before)  # the caller's RNG state before the LLM is made does not matter
    llm = LLM(model, device="cpu", dtype="float32", seed=seed, num_kv_blocks=16)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].token_ids


def test_seed_seeds_requests_without_their_own_seed(tiny_model):
    """As vLLM's --seed: the same seed gives the same unseeded random draws, another seed other draws."""
    first = _unseeded_draws(tiny_model, seed=3, rng_before=1)
    assert _unseeded_draws(tiny_model, seed=3, rng_before=2) == first
    assert _unseeded_draws(tiny_model, seed=4, rng_before=1) != first


def test_chat_template_from_a_file_or_inline(tmp_path):
    """--chat-template as vLLM reads it: an existing file's text, else Jinja text itself, else a clear error."""
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert read_chat_template(str(path)) == template
    assert read_chat_template(template) == template
    with pytest.raises(DockyardError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
