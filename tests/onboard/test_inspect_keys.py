"""Inspect reads every config key: consumed by the spec, known not to change compute, or reported as unrecognised.

Real configs from ../shared/configs plus configs built here for architectures outside the registry
(StarCoder2, MiniCPM3, Command-R, GPT-NeoX, Falcon in their published shape) and a supported config with one
key nobody reads, through the functions and through the ``dockyard inspect`` command.
"""

from __future__ import annotations

import json

import pytest

from dockyard.cli import main
from dockyard.onboard import OnboardOptions, run_onboard
from dockyard.onboard.config_features import detect_features, nearest_family, unrecognised_keys
from dockyard.registry import MODEL_REGISTRY
from tests.shared_configs import CONFIGS_DIR, SHARED_CONFIGS, shared_config

STARCODER2 = {  # bigcode/starcoder2-7b's config.json
    "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "attention_dropout": 0.1,
    "residual_dropout": 0.1, "embedding_dropout": 0.1, "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu_pytorch_tanh", "hidden_size": 4608, "initializer_range": 0.018042, "intermediate_size": 18432,
    "max_position_embeddings": 16384, "mlp_type": "default", "norm_epsilon": 1e-05, "norm_type": "layer_norm",
    "num_attention_heads": 36, "num_hidden_layers": 32, "num_key_value_heads": 4, "rope_theta": 1000000,
    "sliding_window": 4096, "torch_dtype": "bfloat16", "transformers_version": "4.37.0.dev0", "use_bias": True,
    "use_cache": True, "vocab_size": 49152,
}
MINICPM3 = {  # openbmb/MiniCPM3-4B's config.json (rope factor lists shortened)
    "architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3", "auto_map": {"AutoConfig": "x"},
    "bos_token_id": 1, "eos_token_id": [2, 73440], "hidden_act": "silu", "initializer_range": 0.1,
    "hidden_size": 2560, "num_hidden_layers": 62, "intermediate_size": 6400, "max_position_embeddings": 32768,
    "num_attention_heads": 40, "num_key_value_heads": 40, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
    "q_lora_rank": 768, "kv_lora_rank": 256, "rms_norm_eps": 1e-05, "rope_scaling": {
        "type": "longrope", "long_factor": [1.0] * 16, "short_factor": [1.0] * 16,
        "original_max_position_embeddings": 32768}, "torch_dtype": "bfloat16", "transformers_version": "4.41.0",
    "use_cache": True, "vocab_size": 73448, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4,
}

COMMAND_R = {  # CohereForAI/c4ai-command-r-v01's shape
    "architectures": ["CohereForCausalLM"], "model_type": "cohere", "hidden_size": 8192, "num_attention_heads": 64,
    "num_key_value_heads": 64, "logit_scale": 0.0625, "use_qk_norm": False, "layer_norm_eps": 1e-05,
    "hidden_act": "silu", "vocab_size": 256000, "intermediate_size": 22528, "num_hidden_layers": 40,
    "rope_theta": 8000000.0, "max_position_embeddings": 8192, "use_cache": True, "bos_token_id": 5,
    "eos_token_id": 255001, "pad_token_id": 0, "tie_word_embeddings": True, "torch_dtype": "float16",
    "attention_bias": False,
}
GPT_NEOX = {  # EleutherAI/pythia-160m's config.json
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "num_attention_heads": 12, "num_hidden_layers": 12,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
}
FALCON = {  # tiiuae/falcon-7b's config.json
    "architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": False,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "bias": False, "bos_token_id": 11,
    "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71,
    "num_hidden_layers": 32, "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.27.4",
    "use_cache": True, "vocab_size": 65024,
}
LLAMA_WITH_UNKNOWN_KEY = {  # every feature covered by the llama family, plus one key no code reads
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": True,
    "residual_gate_scale": 0.5,
}
# Configs of architectures outside the registry (and one inside it with an unknown key), with the keys that change
# the computation and that dockyard does not read, as a reader of the HF modeling files names them.
BUILT_CONFIGS = {
    "starcoder2": (STARCODER2, ["norm_epsilon"]),
    "minicpm3": (MINICPM3, []),  # its scaling constants are read as features (missing, not unrecognised)
    "command-r": (COMMAND_R, ["layer_norm_eps"]),
    "gpt-neox": (GPT_NEOX, ["layer_norm_eps", "rotary_emb_base", "use_parallel_residual"]),
    "falcon": (FALCON, ["alibi", "apply_residual_connection_post_layernorm", "multi_query",
                        "new_decoder_architecture", "parallel_attn"]),
    "llama + unknown key": (LLAMA_WITH_UNKNOWN_KEY, ["residual_gate_scale"]),
}


def _keys(config):
    return {f.key for f in detect_features(config)}


@pytest.mark.skipif(not SHARED_CONFIGS, reason="../shared/configs is not present")
def test_every_shared_config_key_is_read_or_listed():
    for name in SHARED_CONFIGS:
        config = shared_config(name)
        unknown = unrecognised_keys(config)
        if config["architectures"][0] in MODEL_REGISTRY:
            assert unknown == [], (name, unknown)
    # The configs of unsupported architectures really have keys nobody reads, and they are named.
    assert "kv_channels" in unrecognised_keys(shared_config("THUDM--glm-4-9b"))
    assert "gegelu_limit" in unrecognised_keys(shared_config("microsoft--Phi-3-small-8k-instruct"))


def test_starcoder2_biases_plain_gelu_mlp_and_layernorm_are_seen():
    keys = _keys(STARCODER2)
    assert {"attention_bias", "mlp_bias", "plain_mlp", "layernorm", "activation:gelu_pytorch_tanh", "gqa",
            "sliding_window"} <= keys
    near = nearest_family(detect_features(STARCODER2), "starcoder2")
    # Llama covers the biases, GQA and rope; no alphabetical tie-break toward an MoE/MLA family.
    assert near.family == "llama" and near.architectures == ["LlamaForCausalLM"]
    assert {"plain_mlp", "layernorm"} <= {f.key for f in near.missing}
    assert unrecognised_keys(STARCODER2) == ["norm_epsilon"]  # StarCoder2's own name for the norm epsilon


def test_minicpm3_scaling_constants_are_missing_not_covered():
    near = nearest_family(detect_features(MINICPM3), "minicpm3")
    missing = {f.key for f in near.missing}
    assert {"scale_emb", "logit_scale_dim_model_base", "residual_scale"} <= missing
    # The nearest family covers the most features (longrope, SiLU, tied embeddings: phi3), MLA then missing.
    assert near.family == "phi3" and "mla" in missing
    assert "embedding_scale" not in {f.key for f in near.covered}  # scale_emb is not Gemma's √hidden


@pytest.mark.skipif(not SHARED_CONFIGS, reason="../shared/configs is not present")
def test_internlm2_grouped_wqkv_is_a_missing_feature():
    near = nearest_family(detect_features(shared_config("internlm--internlm2-7b")), "internlm2")
    assert "fused_qkv_grouped" in {f.key for f in near.missing}


def test_one_unknown_key_blocks_the_native_verdict(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA_WITH_UNKNOWN_KEY))
    run = run_onboard(OnboardOptions(model=str(tmp_path / "m"), out=tmp_path / "out", weights="dummy",
                                     device="cpu", skip=("features", "performance", "serve-smoke")))
    inspect = run.gate("inspect")
    # No native verdict: the generic path (transformers' own LlamaForCausalLM) runs it, and says why.
    assert inspect.status == "pass" and "residual_gate_scale" in inspect.summary
    assert inspect.evidence["path"]["impl"] == "transformers"
    assert inspect.evidence["unrecognised_keys"] == ["residual_gate_scale"]
    assert not inspect.evidence["missing_features"]  # every known feature is covered; the unknown key decides
    assert run.report["overall"]["verdict"] == "PASS-PARTIAL" and run.exit_code == 3
    assert any("residual_gate_scale" in item for item in run.report["overall"]["not_proven"])
    assert run.report["architecture"]["unrecognised_keys"] == ["residual_gate_scale"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "`residual_gate_scale`" in md.split("**Unrecognised config keys**", 1)[1].split("\n", 1)[0]


class _Recording(dict):
    """A config dict that remembers every key looked up in it."""

    def __init__(self, data, seen):
        super().__init__(data)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


@pytest.mark.skipif(not SHARED_CONFIGS, reason="../shared/configs is not present")
def test_spec_config_keys_lists_every_key_the_spec_reads(monkeypatch):
    import dockyard.spec as spec_module

    seen: set[str] = set()
    original = spec_module.language_model_config
    monkeypatch.setattr(spec_module, "language_model_config", lambda config: _Recording(original(config), seen))
    for name in SHARED_CONFIGS:
        config = shared_config(name)
        if config["architectures"][0] in MODEL_REGISTRY:
            spec_module.ModelSpec.from_hf_config(config)
    assert {"hidden_size", "rope_scaling", "n_group", "query_pre_attn_scalar"} <= seen  # the recording works
    assert seen - spec_module.SPEC_CONFIG_KEYS == set()


def test_cohere_logit_scale_and_layernorm_are_missing():
    near = nearest_family(detect_features(COMMAND_R), "cohere")
    assert {"logit_scale", "layernorm"} <= {f.key for f in near.missing}
    assert unrecognised_keys(COMMAND_R) == ["layer_norm_eps"]  # Cohere's spelling of the epsilon: not read


def _inspect(path, capsys) -> tuple[int, str, str]:
    rc = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.skipif(not SHARED_CONFIGS, reason="../shared/configs is not present")
def test_inspect_command_names_unrecognised_keys_of_every_config(tmp_path, capsys):
    # `dockyard inspect` as a user runs it, on every shared config and on the configs built above.
    for name in SHARED_CONFIGS:
        config = shared_config(name)
        rc, out, err = _inspect(CONFIGS_DIR / name, capsys)
        assert "Traceback" not in err and rc in (0, 2), (name, rc, err)
        lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
        entry = MODEL_REGISTRY.get(config["architectures"][0])
        if entry is not None:  # a supported architecture: planned, its own family, nothing unread
            assert rc == 0, (name, err)
            assert lines["unrecognised"] == "unrecognised none", name
            assert lines["family"].startswith(f"family       {entry.family} ("), (name, lines["family"])
        elif rc == 0:  # no family, but transformers implements it: the generic path, said so
            assert lines["path"].startswith("path         transformers: generic path"), (name, lines["path"])
            assert lines["unrecognised"].startswith("unrecognised "), name
        else:  # refused with one line, after what the config asks for and the keys nobody reads
            assert rc == 2 and err.count("dockyard inspect: error:") == 1, (name, err)
            assert lines["unrecognised"].startswith("unrecognised "), name
    _, out, _ = _inspect(CONFIGS_DIR / "THUDM--glm-4-9b", capsys)
    assert "kv_channels" in out.split("unrecognised ", 1)[1]
    for name, (config, expected) in BUILT_CONFIGS.items():
        path = tmp_path / name.replace(" ", "_") / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(config))
        rc, out, err = _inspect(path, capsys)
        assert "Traceback" not in err, (name, err)
        line = next(line for line in out.splitlines() if line.startswith("unrecognised "))
        if expected:
            assert line == f"unrecognised {', '.join(expected)}  (no native family verdict: dockyard cannot tell " \
                           "what they do)", (name, line)
        else:
            assert line == "unrecognised none", (name, line)
