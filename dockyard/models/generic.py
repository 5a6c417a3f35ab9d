"""The generic path: any decoder transformers implements, run by its own classes on dockyard's engine.

The idea is vLLM's Transformers backend: build the model with the installed transformers
(``AutoModelForCausalLM.from_config(config, attn_implementation="dockyard")``), keep every module as HF
wrote it, and route only attention to the engine's paged KV cache
(:mod:`dockyard.models.transformers_attention`). Scheduling, prefix caching, chunked prefill, preemption
and continuous batching are the engine's, unchanged: a step's tokens reach the HF model as one row of
``input_ids`` with their own ``position_ids``, and each attention call finds its sequences in the
step's metadata.

Parameter names are HF's (the HF model's children are this module's children), so safetensors
checkpoints load by their own names and dummy weights are drawn at the true shapes. Logits are the HF
class's own: :meth:`TransformersForCausalLM.compute_logits` runs the HF ``ForCausalLM`` head on given
hidden states, so logit scaling and soft-capping stay HF's code.

Refused, by name: classes whose attention does not go through transformers' attention interface
(``_supports_attention_backend`` false: BLOOM and MPT with ALiBi, Falcon, StableLM), models whose number of
attention modules is not their number of layers (hybrids with state-space or recurrent layers),
tensor and expert parallelism.

On CUDA, decode steps replay CUDA graphs as on the native path: the attention call reads the step's slots,
block tables and lengths from the metadata the graph runner keeps in static buffers, transformers builds no
mask for the ``"dockyard"`` implementation, and no cache object exists (``use_cache=False``), so a decoder
whose own modules make no host synchronization (rotary from ``position_ids``, norms, MLPs) captures.
Whether HF's modules do is known only by trying (``capture_by_trial``): a capture that fails (dynamic rotary
reading the largest position, an expert loop counting tokens on the host, ...) leaves the model eager with
the failure as the runner's ``eager_reason``.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from dockyard.errors import CheckpointConversionError, ConfigError, UnsupportedArchitectureError
from dockyard.models.transformers_attention import ATTN_IMPLEMENTATION, PagedAttentionSlot
from dockyard.spec import ModelSpec, RopeSpec

# The spec fields a run may change from the config (the dummy gate's reductions, the memory plan's one
# layer of each kind), each set on the transformers config under the same standard name.
_RESIZABLE = ("num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "max_position_embeddings")
# Where configs keep the MLP width when they do not call it intermediate_size (OPT, GPT-2/J, CodeGen, ...).
_MLP_WIDTH_NAMES = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")


def load_transformers_config(config: dict[str, Any], remote_code_dir: str | None = None) -> PretrainedConfig:
    """The transformers config object of a config.json dict: its own class for its ``model_type``, or, with
    ``remote_code_dir``, the class of the modeling code in that directory (``auto_map``; read locally)."""
    if remote_code_dir is not None:
        return AutoConfig.from_pretrained(remote_code_dir, trust_remote_code=True, local_files_only=True)
    model_type = config.get("model_type")
    try:
        return AutoConfig.for_model(str(model_type), **{k: v for k, v in config.items()
                                                        if k not in ("model_type", "auto_map")})
    except (ValueError, KeyError, TypeError) as exc:
        raise UnsupportedArchitectureError(
            f"transformers cannot build a config for model_type={model_type!r} ({exc}); the generic path "
            "needs a model_type the installed transformers implements") from exc


def config_sizes(config: PretrainedConfig) -> dict[str, int]:
    """The engine's sizes of a transformers config, read through its standard attribute names."""
    text = config.get_text_config()
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    kv_heads = 1 if getattr(text, "multi_query", False) else getattr(text, "num_key_value_heads", None) or heads
    width = next((getattr(text, n) for n in _mlp_width_names(text) if isinstance(getattr(text, n, None), int)),
                 4 * hidden)
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
    return {
        "num_hidden_layers": int(text.num_hidden_layers), "vocab_size": int(text.vocab_size),
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": int(kv_heads),
        "head_dim": int(getattr(text, "head_dim", None) or hidden // heads),
        "intermediate_size": int(width), "max_position_embeddings": int(positions),
    }


def _mlp_width_names(text: PretrainedConfig) -> list[str]:
    """The MLP-width names the config class itself takes (a stray ``intermediate_size`` on a GPT-2 config is
    not its width: ``n_inner`` is, and None there means 4 × hidden)."""
    own = inspect.signature(type(text).__init__).parameters
    return [n for n in _MLP_WIDTH_NAMES if n in own] or list(_MLP_WIDTH_NAMES)


def causal_lm_class(config: PretrainedConfig) -> type[nn.Module]:
    """The transformers ``ForCausalLM`` class of ``config``, or the reason the generic path cannot run it."""
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], config._name_or_path,
                                            local_files_only=True)
    else:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if cls is None:
            raise UnsupportedArchitectureError(
                f"transformers has no causal-LM class for model_type={config.model_type!r}; the generic path "
                "runs decoders that AutoModelForCausalLM builds")
    if not getattr(cls, "_supports_attention_backend", False):
        raise UnsupportedArchitectureError(
            f"{cls.__name__} does not route attention through transformers' attention interface "
            "(_supports_attention_backend is false: it computes attention itself, e.g. with ALiBi), so dockyard "
            "cannot give it the paged KV cache; the generic path cannot run it")
    return cls


def generic_spec(config: dict[str, Any], name: str, remote_code_dir: str | None = None) -> ModelSpec:
    """A ModelSpec for the generic path: the engine's sizes and token ids, plus the config handed to
    transformers whole. The spec's family fields keep their defaults: nothing on this path reads them."""
    hf = load_transformers_config(config, remote_code_dir)
    causal_lm_class(hf)
    sizes = config_sizes(hf)
    eos = getattr(hf.get_text_config(), "eos_token_id", None)
    eos_ids = (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos or ())
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    archs = config.get("architectures") or [type(hf).__name__.replace("Config", "ForCausalLM")]

    def token(key: str) -> int | None:
        value = getattr(hf.get_text_config(), key, None)
        return value if isinstance(value, int) and 0 <= value < sizes["vocab_size"] else None

    spec = ModelSpec(
        architecture=str(archs[0]), model_type=str(hf.model_type), **sizes,
        rms_norm_eps=1e-6, hidden_act="silu", rope=RopeSpec(),
        tie_word_embeddings=bool(getattr(hf.get_text_config(), "tie_word_embeddings", False)),
        bos_token_id=token("bos_token_id"), pad_token_id=token("pad_token_id"),
        eos_token_ids=tuple(e for e in eos_ids if 0 <= e < sizes["vocab_size"]),
        torch_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32", name=name,
        transformers_config=json.dumps(config, sort_keys=True), remote_code_dir=remote_code_dir,
    )
    spec.validate()
    return spec


def build_transformers_config(spec: ModelSpec) -> PretrainedConfig:
    """The transformers config of a generic spec, with the sizes the spec changed (a reduced model) set on it
    under their standard names; a size the config class does not take that way is a ConfigError."""
    assert spec.transformers_config is not None
    config = load_transformers_config(json.loads(spec.transformers_config), spec.remote_code_dir)
    text = config.get_text_config()
    original = config_sizes(config)
    wanted = {k: getattr(spec, k) for k in _RESIZABLE}
    changed = {k: v for k, v in wanted.items() if original[k] != v}
    for key, value in changed.items():
        if key == "intermediate_size":
            key = next(iter(_mlp_width_names(text)), key)
        setattr(text, key, value)
    if changed and "layer_types" in text.to_dict() and isinstance(text.layer_types, list):
        text.layer_types = text.layer_types[:spec.num_hidden_layers]
    pad = getattr(text, "pad_token_id", None)
    if isinstance(pad, int) and not 0 <= pad < text.vocab_size:  # past a reduced vocabulary: no padding row
        text.pad_token_id = None
    got = config_sizes(config)
    wrong = [k for k in changed if got[k] != wanted[k]]
    if wrong:
        raise ConfigError(f"the generic path cannot set {', '.join(wrong)} on a {type(config).__name__} "
                          f"(asked {[wanted[k] for k in wrong]}, the config gives {[got[k] for k in wrong]})")
    return config


class _GivenHiddenStates:
    """What the HF decoder's forward returns while its head turns given hidden states into logits: the hidden
    states, and None for any other output a ``ForCausalLM`` forward reads (attentions, router logits, ...)."""

    def __init__(self, hidden_states: torch.Tensor) -> None:
        self.last_hidden_state = hidden_states

    def __getattr__(self, name: str) -> None:  # only reached for outputs this stand-in does not have
        return None

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.last_hidden_state,)[index]


def _buffers_to_parameters(model: nn.Module) -> None:
    """Turn the floating-point buffers a checkpoint stores (persistent ones, e.g. a learned activation's
    constants) into frozen parameters, so the strict loader fills and accounts for them like any weight."""
    for module in model.modules():
        for name in [n for n, b in module._buffers.items() if b is not None and b.is_floating_point()
                     and n not in module._non_persistent_buffers_set]:
            module.register_parameter(name, nn.Parameter(module._buffers.pop(name), requires_grad=False))


class TransformersForCausalLM(nn.Module):
    """A transformers ``ForCausalLM`` on dockyard's engine: ``forward(input_ids, positions)`` → hidden states,
    ``compute_logits(hidden)`` → logits, attention on the paged KV cache."""

    # Its modules are HF's: whether its decode forward captures is decided by trying (engine/cuda_graphs.py).
    capture_by_trial = True

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        config = build_transformers_config(spec)
        cls = causal_lm_class(config)
        with no_init_weights():  # every weight is overwritten by the strict load (or dummy weights)
            hf = cls._from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.get_default_dtype())
        hf.tie_weights()
        _buffers_to_parameters(hf)
        for child_name, child in hf.named_children():
            self.add_module(child_name, child)
        object.__setattr__(self, "hf", hf)  # not registered again: its children are this module's
        self.base_name = hf.base_model_prefix
        scale = spec.head_dim ** -0.5  # each call passes the module's own scaling
        attentions = [m for m in hf.modules() if type(m).__name__.endswith("Attention")]
        if len(attentions) != spec.num_hidden_layers:
            raise UnsupportedArchitectureError(
                f"{cls.__name__} has {len(attentions)} attention modules for {spec.num_hidden_layers} layers "
                "(a hybrid with recurrent or state-space layers, or nested attention); the generic path runs "
                "decoders with one attention module per layer")
        for module in attentions:
            module.dockyard_attention = PagedAttentionSlot(spec.num_attention_heads, spec.head_dim,
                                                           spec.num_key_value_heads, scale)
        # transformers renames some published checkpoint names on load (GPT-NeoX's embed_out → lm_head, ...);
        # the same rules map them here. A converter (tensors merged or split) is refused by name on use.
        transforms = get_model_conversion_mapping(hf)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._own_names = dict.fromkeys(name for name, _ in hf.named_parameters(remove_duplicate=False))

    def map_checkpoint_name(self, name: str) -> str | None:
        """A published checkpoint name → the parameter name (transformers' own renaming rules)."""
        if name in self._own_names:
            return name
        renamed, converter = rename_source_key(name, self._renamings, self._converters, self.base_name,
                                               self._own_names)
        if converter is not None:
            raise CheckpointConversionError(
                f"checkpoint tensor {name} needs transformers' conversion {converter!r} (tensors merged or split on "
                "load, e.g. per-expert MoE weights fused), which the generic path does not apply yet; run the "
                "architecture with --load-format dummy, or use a model with a native dockyard family")
        return renamed

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        base = getattr(self.hf, self.base_name)
        out = base(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return out[0][0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The HF ``ForCausalLM`` forward with its decoder standing aside: its own head, scaling and capping."""
        decoder = self.hf.get_decoder()
        given = _GivenHiddenStates(hidden_states[None])
        decoder.forward = lambda *args, **kwargs: given
        try:
            out = self.hf(inputs_embeds=hidden_states[None], use_cache=False)
        finally:
            del decoder.forward
        return out.logits[0]
