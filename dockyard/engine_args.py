"""``EngineArgs``: every engine setting, defined once, for the Python API and every command.

One dataclass field per setting carries its default, its type and (in ``metadata``) its flag's help
text and argument group; ``EngineArgs.add_cli_args(parser)`` turns the fields into flags and
``EngineArgs.from_cli_args(args)`` turns parsed flags back into the dataclass. ``LLM(model, **kwargs)``
takes the same names as keywords, so ``--max-num-seqs 8`` on any command and ``LLM(max_num_seqs=8)``
mean the same thing. The names and meanings follow vLLM's ``EngineArgs`` where vLLM has the
setting; a vLLM flag dockyard does not honour is refused with a sentence saying why and what to use
instead (``VLLM_FLAGS_NOT_HONOURED``), not argparse's "unrecognized arguments".

Adding a setting: one field here (default, ``_flag(help, group)``), then read it where it acts.
Kept free of torch imports: parsers are built before any command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockyard.engine.speculative_config import SpeculativeConfig
from dockyard.errors import ConfigError

# Argument groups, in the order ``--help`` shows them (vLLM's names).
MODEL_GROUP = "ModelConfig"
LOAD_GROUP = "LoadConfig"
CACHE_GROUP = "CacheConfig"
SCHEDULER_GROUP = "SchedulerConfig"
PARALLEL_GROUP = "ParallelConfig"
OBSERVABILITY_GROUP = "ObservabilityConfig"
RUNTIME_GROUP = "dockyard runtime"
GROUP_DESCRIPTIONS = {
    MODEL_GROUP: "the model, its dtype and length",
    LOAD_GROUP: "where the weights come from",
    CACHE_GROUP: "the paged KV cache",
    SCHEDULER_GROUP: "continuous batching",
    PARALLEL_GROUP: "tensor and expert parallelism",
    OBSERVABILITY_GROUP: "logs and statistics",
    RUNTIME_GROUP: "the process dockyard runs in",
}

# vLLM's dtype names → the dtype dockyard runs ("auto": see dockyard.model_loader.resolve_dtype).
DTYPE_ALIASES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16",
                 "float": "float32", "float32": "float32"}
# quantization_config.quant_method values of int4 weight-only checkpoints (dockyard.weights.int4 reads them)
INT4_METHODS = ("awq", "gptq", "compressed-tensors")
MXFP4_METHOD = "mxfp4"  # quantization_config.quant_method of gpt-oss's published checkpoints (weights/mxfp4.py)
# What --quantization accepts: the checkpoint formats the loader reads; fp8 also quantizes an unquantized one.
QUANTIZATION_METHODS = ("fp8", *INT4_METHODS, MXFP4_METHOD)
# --kv-cache-dtype: auto holds K and V in the model's dtype; fp8 / fp8_e4m3 as e4m3 with per-tensor scales.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def human_readable_int(text: str) -> int:
    """``32k`` → 32,000, ``1K`` → 1,024, ``1M`` → 1,048,576, ``25.6k`` → 25,600, ``4096`` → 4096.

    vLLM's convention: lower-case suffixes are powers of 1,000, upper-case ones powers of 1,024
    (whole numbers only)."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG])", value)
    if match is None:
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number (examples: 4096, 32k = 32,000, 32K = 32,768, 1M = 1,048,576)"
            ) from None
    number, suffix = match.groups()
    if suffix.islower():
        return int(float(number) * 1000 ** ("kmg".index(suffix) + 1))
    if "." in number:
        raise argparse.ArgumentTypeError(f"{text!r}: a binary suffix ({suffix}) takes a whole number; "
                                         f"write e.g. {int(float(number))}{suffix} or {number}{suffix.lower()}")
    return int(number) * 1024 ** ("KMG".index(suffix) + 1)


def dtype_name(text: str) -> str:
    """A vLLM dtype name (``half``, ``float``, ...) → the name dockyard runs (``float16``, ``float32``, ...)."""
    try:
        return DTYPE_ALIASES[text]
    except KeyError:
        raise ConfigError(f"dtype {text!r} is not one of {', '.join(DTYPE_ALIASES)}") from None


def _dtype_arg(text: str) -> str:
    try:
        return dtype_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def field_help(name: str) -> str:
    """The help text of ``EngineArgs``' field ``name`` (for a command that declares that flag its own way, as
    a positional)."""
    return next(f.metadata["help"] for f in dataclasses.fields(EngineArgs) if f.name == name)


def _flag(help_text: str, group: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """A field's metadata: its flag's help and group, plus argparse keywords (``type``, ``choices``,
    ``flags`` for extra spellings, ``action``)."""
    return {"help": help_text, "group": group, **argparse_kwargs}


@dataclass
class EngineArgs:
    """Every engine setting; the keyword names of ``LLM`` and the flags of every command."""

    model: str | Path | None = field(default=None, metadata=_flag(
        "a directory with config.json (+ safetensors), a config.json (dummy weights), a .gguf file or a Hugging "
        "Face repo id (from the HF cache, which then names the model); default: the bundled SmolLM2-135M-Instruct",
        MODEL_GROUP))
    dtype: Any = field(default="auto", metadata=_flag(
        "weights and activations: auto (float32 on CPU, the checkpoint's dtype on a GPU, bfloat16 for a float32 "
        "checkpoint), half / float16, bfloat16, float / float32", MODEL_GROUP, type=_dtype_arg,
        choices=tuple(DTYPE_ALIASES)))
    max_model_len: int | None = field(default=None, metadata=_flag(
        "cap on prompt + generated tokens per request (default: the model's max_position_embeddings); "
        "32k = 32,000, 32K = 32,768, 1M = 1,048,576", MODEL_GROUP, type=human_readable_int))
    seed: int = field(default=0, metadata=_flag(
        "seeds the random draws of requests that give no seed of their own (as vLLM: the process's RNG is "
        "seeded once at start-up) and the dummy weights", MODEL_GROUP, type=int))
    quantization: str | None = field(default=None, metadata=_flag(
        "fp8: the checkpoint's FP8 weights (block-scaled e4m3, quantization_config quant_method fp8), or on an "
        "unquantized checkpoint its projections quantized to FP8 while loading (online FP8); awq, gptq, "
        "compressed-tensors: the checkpoint's int4 weights; the default reads the method from the checkpoint",
        MODEL_GROUP, flags=("--quantization", "-q")))
    revision: str | None = field(default=None, metadata=_flag(
        "of a Hugging Face repo id: the branch, tag or commit to use (default: main)", LOAD_GROUP))
    download_dir: str | None = field(default=None, metadata=_flag(
        "the Hugging Face cache to find (or download) repo ids in (default: $HF_HUB_CACHE, else $HF_HOME/hub)",
        LOAD_GROUP, metavar="DIR"))
    tokenizer: str | None = field(default=None, metadata=_flag(
        "take the tokenizer from this path or repo id instead of the model's", MODEL_GROUP))
    generation_config: str = field(default="auto", metadata=_flag(
        "request defaults and end-of-sequence ids: auto = the model's generation_config.json; vllm = vLLM's "
        "defaults (the file's end-of-sequence ids still apply); PATH = a folder holding a generation_config.json",
        MODEL_GROUP, metavar="auto|vllm|PATH"))
    model_impl: str = field(default="auto", metadata=_flag(
        "auto: the native dockyard family when one covers the config, else transformers' own classes (the generic "
        "path); dockyard / transformers: insist on one", MODEL_GROUP, choices=("auto", "dockyard", "transformers")))
    trust_remote_code: bool = field(default=False, metadata=_flag(
        "run the modeling code a config's auto_map names from the model directory (never downloaded)", MODEL_GROUP,
        action="store_true"))
    load_format: str = field(default="auto", metadata=_flag(
        "auto: the checkpoint's weights; dummy: random weights at the true shapes", LOAD_GROUP,
        choices=("auto", "dummy")))
    block_size: int = field(default=16, metadata=_flag("tokens per KV-cache block", CACHE_GROUP, type=int))
    gpu_memory_utilization: float = field(default=0.9, metadata=_flag(
        "GPU: the fraction of the device's total memory this engine may use for weights, activations and the "
        "KV cache together; the KV cache gets what the weights and the activation peak leave (as vLLM)",
        CACHE_GROUP, type=float))
    kv_cache_memory_bytes: int | None = field(default=None, metadata=_flag(
        "the KV cache's size in bytes (e.g. 4G), instead of sizing it from --gpu-memory-utilization; "
        "default on CPU: 1 GiB", CACHE_GROUP, type=human_readable_int))
    num_kv_blocks: int | None = field(default=None, metadata=_flag(
        "the KV cache's size in blocks, overriding both memory budgets", CACHE_GROUP, type=int,
        flags=("--num-kv-blocks", "--num-gpu-blocks-override")))
    kv_cache_dtype: str = field(default="auto", metadata=_flag(
        "auto: K and V cached in the model's dtype; fp8 / fp8_e4m3: cached as float8 e4m3 (1 byte per value, "
        "twice the tokens in the same memory) with one scale per layer for K and one for V, from the checkpoint "
        "(k_scale / v_scale) when it has them, else calibrated at start-up", CACHE_GROUP,
        metavar="|".join(KV_CACHE_DTYPES)))
    enable_prefix_caching: bool = field(default=True, metadata=_flag(
        "reuse the KV blocks of a prompt prefix already computed (on by default)", CACHE_GROUP,
        action=argparse.BooleanOptionalAction))
    swap_space: float | None = field(default=None, metadata=_flag(
        "accepted for vLLM compatibility, no effect: a preempted sequence is recomputed, never swapped to CPU "
        "memory (the log says so)", CACHE_GROUP, type=float, metavar="GiB"))
    max_num_seqs: int = field(default=64, metadata=_flag("sequences decoded together in one step",
                                                         SCHEDULER_GROUP, type=int))
    max_num_batched_tokens: int = field(default=2048, metadata=_flag(
        "token budget of one step; a longer prompt is prefilled in chunks of it", SCHEDULER_GROUP, type=int))
    enable_chunked_prefill: bool = field(default=True, metadata=_flag(
        "split long prompts into chunks of --max-num-batched-tokens (always on: the scheduler has no other mode)",
        SCHEDULER_GROUP, action=argparse.BooleanOptionalAction))
    async_scheduling: bool | None = field(default=None, metadata=_flag(
        "launch each step before the host has appended the previous one's tokens (default: on for CUDA); "
        "outputs are the same", SCHEDULER_GROUP, action=argparse.BooleanOptionalAction))
    enforce_eager: bool = field(default=False, metadata=_flag(
        "CUDA: run every step eagerly (no CUDA graphs for decode steps)", SCHEDULER_GROUP, action="store_true"))
    tensor_parallel_size: int = field(default=1, metadata=_flag(
        "split the model over N processes (one per GPU; gloo on CPU); past one host, start every rank with "
        "torchrun (docs/ARCHITECTURE.md, Parallelism)", PARALLEL_GROUP, type=int,
        flags=("--tensor-parallel-size", "-tp")))
    enable_expert_parallel: bool = field(default=False, metadata=_flag(
        "MoE: place whole experts across the tensor-parallel ranks instead of splitting each", PARALLEL_GROUP,
        action="store_true"))
    disable_log_stats: bool = field(default=False, metadata=_flag(
        "no periodic engine-statistics log line (throughput, running/waiting, KV usage, prefix-cache hit rate)",
        OBSERVABILITY_GROUP, action="store_true"))
    device: str = field(default="auto", metadata=_flag("auto (cuda when present, else cpu) | cpu | cuda",
                                                       RUNTIME_GROUP))
    num_threads: int | None = field(default=None, metadata=_flag(
        "torch CPU threads (default: the physical cores this process may use, or $OMP_NUM_THREADS)", RUNTIME_GROUP,
        type=int, metavar="N"))
    skip_memory_check: bool = field(default=False, metadata=_flag(
        "load even when the memory plan says the model does not fit the device's free memory", RUNTIME_GROUP,
        action="store_true"))
    speculative_config: Any = field(default=None, metadata=_flag(
        "speculative decoding, as JSON: {\"method\": \"ngram\" | \"draft_model\" | \"mtp\", "
        "\"num_speculative_tokens\": k, ...} (ngram: prompt_lookup_min / prompt_lookup_max; draft_model: "
        "model; mtp: the checkpoint's MTP layer)",
        SCHEDULER_GROUP, metavar="JSON"))

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            self.dtype = dtype_name(self.dtype)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            _check_positive(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory_bytes"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]: the "
                              "fraction of the GPU's total memory this engine may use (e.g. 0.9)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)} "
                              "(auto: the model's dtype; fp8 / fp8_e4m3: float8 e4m3 with per-tensor scales)")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"quantization={self.quantization!r} is not supported: dockyard runs unquantized "
                              f"checkpoints and those quantized with {', '.join(QUANTIZATION_METHODS)}; use such a "
                              "checkpoint and drop --quantization")
        if not self.enable_chunked_prefill:
            raise ConfigError("enable_chunked_prefill=False is not supported: the scheduler always prefills a "
                              "prompt longer than max_num_batched_tokens in chunks; to prefill whole prompts "
                              "in one step raise --max-num-batched-tokens to --max-model-len instead")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.swap_space is not None and self.swap_space < 0:
            raise ConfigError(f"swap_space={self.swap_space} must be >= 0 (GiB)")

    def check_quantization(self, checkpoint_method: str | None, model_name: str) -> None:
        """``quantization``, when given, must be the checkpoint's own method (as vLLM requires), except ``fp8``
        on an unquantized checkpoint, which is quantized to FP8 while loading (:meth:`quantizes_online`)."""
        if self.quantization is None or self.quantization == checkpoint_method \
                or self.quantizes_online(checkpoint_method):
            return
        stored = f"is quantized with {checkpoint_method!r}" if checkpoint_method else "is not quantized"
        raise ConfigError(f"quantization={self.quantization!r} was asked for but model {model_name!r} {stored}; "
                          "dockyard quantizes weights while loading only to fp8, from an unquantized checkpoint: "
                          "drop --quantization, or pass the checkpoint's own method")

    def quantizes_online(self, checkpoint_method: str | None) -> bool:
        """Whether this run quantizes an unquantized checkpoint to FP8 while loading (``--quantization fp8``)."""
        return self.quantization == "fp8" and checkpoint_method is None

    # ---- command line ----
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                     skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        """Add a flag per field (``only`` those fields, none of ``skip``), in vLLM's argument groups."""
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            if (only is not None and f.name not in only) or f.name in skip:
                continue
            meta = dict(f.metadata)
            group_name = meta.pop("group")
            if group_name not in groups:
                groups[group_name] = parser.add_argument_group(group_name, GROUP_DESCRIPTIONS[group_name])
            flags = meta.pop("flags", ("--" + f.name.replace("_", "-"),))
            default = f.default
            help_text = meta.pop("help")
            if default not in (None, False) and meta.get("action") != "store_true":
                help_text += f" (default: {default})"
            groups[group_name].add_argument(*flags, dest=f.name, default=default, help=help_text, **meta)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineArgs:
        """The settings a parsed command line gives (fields it has no flag for keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})

    def to_kwargs(self) -> dict[str, Any]:
        """The settings as ``LLM`` keywords (``model`` apart)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


# The settings that say where the model, tokenizer and generation defaults come from (dockyard.hub) and which
# implementation runs it (dockyard.model_impl): resolve_model's keywords.
MODEL_SOURCE_FIELDS = ("revision", "download_dir", "tokenizer", "generation_config", "model_impl", "trust_remote_code")


def model_source_kwargs(args: argparse.Namespace | EngineArgs) -> dict[str, Any]:
    """``resolve_model``'s keywords from a command line with :data:`MODEL_SOURCE_FIELDS`' flags (or EngineArgs)."""
    return {name: getattr(args, name) for name in MODEL_SOURCE_FIELDS}


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a whole number >= 1")


# vLLM flags dockyard does not honour: flag(s) → why, and what to use instead. A flag here is
# answered with that sentence (exit 2) rather than argparse's "unrecognized arguments".
VLLM_FLAGS_NOT_HONOURED: dict[tuple[str, ...], str] = {
    ("--pipeline-parallel-size", "-pp"): "dockyard has no pipeline parallelism; split the model with "
                                         "--tensor-parallel-size (also across hosts, through torchrun)",
    ("--data-parallel-size", "-dp"): "dockyard runs one engine per server; start one `dockyard serve` per replica "
                                     "behind a load balancer",
    ("--distributed-executor-backend",): "tensor-parallel ranks are processes on one host (or torchrun's across "
                                         "hosts); drop the flag",
    ("--cpu-offload-gb",): "weights are never offloaded to CPU memory; use --tensor-parallel-size or a smaller dtype",
    ("--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank"): "LoRA adapters are not supported; merge "
                                                                           "the adapter into the weights first",
    ("--guided-decoding-backend", "--structured-outputs-config"): "structured output is not implemented yet; "
                                                                  "drop the flag",
    ("--limit-mm-per-prompt", "--mm-processor-kwargs"): "dockyard serves the text model only (vision towers are "
                                                        "not loaded); drop the flag",
    ("--compilation-config", "-O"): "decode steps use CUDA graphs unless --enforce-eager; there is no "
                                    "torch.compile configuration",
    ("--hf-overrides",): "the config is read as published; edit a copy of config.json instead",
    ("--rope-scaling", "--rope-theta"): "rope settings come from config.json; edit a copy of it instead",
    ("--tokenizer-mode",): "the tokenizer is the checkpoint's (a fast tokenizer); drop the flag",
    ("--enable-sleep-mode",): "sleep mode is not implemented; stop and restart the server instead",
    ("--kv-transfer-config",): "disaggregated prefill is not implemented; drop the flag",
    ("--ssl-keyfile", "--ssl-certfile"): "the server speaks plain HTTP; terminate TLS in a reverse proxy",
    ("--max-logprobs",): "the limit on logprobs is fixed by the server; drop the flag",
}


class _RefuseVllmFlag(argparse.Action):
    """A vLLM flag dockyard does not honour: stop parsing with the sentence saying why."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is a vLLM flag dockyard does not honour: {self.help_text}")

    def __init__(self, option_strings: list[str], dest: str, help_text: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.help_text = help_text


def add_vllm_refusals(parser: argparse.ArgumentParser) -> None:
    """Make each of ``VLLM_FLAGS_NOT_HONOURED`` an error that says why (hidden from ``--help``)."""
    for flags, why in VLLM_FLAGS_NOT_HONOURED.items():
        parser.add_argument(*flags, action=_RefuseVllmFlag, help_text=why, dest="_refused_" + flags[0].strip("-"))
