"""``LLM``: the offline Python API, shaped like vLLM's.

    from dockyard import LLM, SamplingParams
    llm = LLM()                      # the bundled SmolLM2-135M-Instruct
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=16))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import time
import weakref
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from dockyard.distributed.executor import Executor
from dockyard.distributed.sharding import check_parallel_config, parallel_config_of
from dockyard.engine.draft_model import DraftModelProposer
from dockyard.engine.llm_engine import EngineConfig, LLMEngine
from dockyard.engine.memory_check import check_memory_fits, kv_blocks_in_budget
from dockyard.engine.mtp import MTPProposer
from dockyard.engine.outputs import RequestOutput
from dockyard.engine.sampling_params import SamplingParams
from dockyard.engine.threads import configure_threads
from dockyard.engine_args import EngineArgs, model_source_kwargs
from dockyard.errors import ConfigError, DockyardError, InvalidRequestError
from dockyard.memory import plan_memory, storage_of
from dockyard.model_loader import (
    check_mtp_source,
    check_online_fp8,
    load_model,
    load_mtp,
    resolve_device,
    resolve_dtype,
)
from dockyard.model_source import ModelSource, resolve_model
from dockyard.ops.fp8_kv import latent_cache_refusal, resolve_kv_cache_dtype
from dockyard.run_plan import kept_as_stored

logger = logging.getLogger(__name__)


def gpu_kv_cache_budget(total: int, free: int, utilization: float, weights_bytes: int, activation_bytes: int) -> int:
    """Bytes for the KV cache on a GPU, as vLLM sizes it: this engine may use ``utilization`` of the device's
    ``total`` memory for its weights, activations and KV cache together (other processes' memory is not
    counted against it), so the cache gets ``total × utilization − weights − activation peak``. That must
    also be free now: a GPU shared with other processes may not have it."""
    budget = int(total * utilization) - weights_bytes - activation_bytes
    if budget > free:
        gib = 1024**3
        raise ConfigError(
            f"gpu_memory_utilization={utilization} gives the KV cache {budget / gib:.2f} GiB of the GPU's "
            f"{total / gib:.2f} GiB, but only {free / gib:.2f} GiB are free (other processes and the CUDA context hold "
            f"{(total - free - weights_bytes) / gib:.2f} GiB); lower --gpu-memory-utilization or free the GPU"
        )
    return budget



class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    ``tensor_parallel_size`` N > 1 splits the model over N processes (this one is rank 0 and runs
    the scheduler and sampler; N - 1 spawned workers, or torchrun's other ranks, run the same
    forward on their shards); ``enable_expert_parallel`` places MoE experts across those ranks
    instead of splitting each expert. Call :meth:`shutdown` (or drop the LLM) to stop the workers.
    ``async_scheduling`` (None: on for CUDA) launches each step before the previous one's tokens
    are appended on the host (see :mod:`dockyard.engine.llm_engine`); outputs are the same.
    Before anything is loaded the memory plan is checked against the device's free memory
    (:mod:`dockyard.engine.memory_check`); ``skip_memory_check`` loads anyway. ``num_threads``: torch's
    CPU threads (default: the physical cores this process may use, :mod:`dockyard.engine.threads`).
    Every keyword is a field of :class:`~dockyard.engine_args.EngineArgs` (the same settings as the
    commands' flags); ``seed`` seeds torch's RNG once the engine is up, which requests without a seed of
    their own draw from (as vLLM's ``seed``), and the dummy weights. ``model_impl`` (auto | dockyard |
    transformers) and ``trust_remote_code`` choose between a native family and transformers' own classes
    (:mod:`dockyard.model_impl`, :mod:`dockyard.models.generic`).
    """

    def __init__(self, model: str | Path | None = None, **kwargs: Any) -> None:
        """``model`` and any :class:`~dockyard.engine_args.EngineArgs` field as a keyword (``dtype``,
        ``max_model_len``, ``max_num_seqs``, ``gpu_memory_utilization``, ...: the same settings, under the
        same names, as the command-line flags)."""
        t0 = time.perf_counter()
        args = EngineArgs(model=model, **kwargs)
        configure_threads(args.num_threads)
        self.engine_args = args
        self._executor: Executor | None = None
        tensor_parallel_size = args.tensor_parallel_size
        self.source: ModelSource = resolve_model(model, args.load_format, **model_source_kwargs(args))
        if self.source.generation.sampling:
            logger.info("%s", self.source.generation.describe())
        spec = self.source.spec
        if spec.model_impl == "transformers" and (tensor_parallel_size > 1 or args.enable_expert_parallel):
            raise DockyardError(
                f"{self.source.name} runs on the generic (transformers) path ({self.source.impl_reason}), which "
                "has no tensor or expert parallelism; run it on one device (tensor_parallel_size=1), or use a model "
                "with a native dockyard family")
        args.check_quantization(self.source.quantization, self.source.name)
        max_model_len = args.max_model_len
        if max_model_len is not None and not 0 < max_model_len <= spec.max_model_len:
            raise DockyardError(
                f"max_model_len={max_model_len} must be in [1, {spec.max_model_len}] "
                f"(the model's max_position_embeddings)"
            )
        if args.swap_space is not None:
            logger.warning("swap_space=%g GiB has no effect: the KV cache lives on the device only and a "
                           "preempted sequence is recomputed, never swapped to CPU memory", args.swap_space)
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, spec.torch_dtype, self.device)
        self.spec = spec
        self.tensor_parallel_size = tensor_parallel_size
        if args.quantizes_online(self.source.quantization):  # before any worker starts
            check_online_fp8(self.source, self.device, tensor_parallel_size)
        if tensor_parallel_size > 1 or args.enable_expert_parallel:
            check_parallel_config(spec, tensor_parallel_size, args.enable_expert_parallel)
        config = EngineConfig(
            block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_model_len,
            num_kv_blocks=args.num_kv_blocks,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes or EngineConfig.kv_cache_memory_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=args.enable_prefix_caching,
            # The other ranks replay eager forwards; captured graphs would need them to replay too.
            enforce_eager=args.enforce_eager or tensor_parallel_size > 1, async_scheduling=args.async_scheduling,
            kv_cache_dtype=args.kv_cache_dtype,
            speculative_config=args.speculative_config,
        )
        if args.speculative_config is not None and args.speculative_config.method == "mtp":  # before any weight is read
            check_mtp_source(self.source, tensor_parallel_size)
        if args.kv_cache_dtype != "auto" and spec.mla is not None:  # before any weight is read
            raise latent_cache_refusal(spec.name, args.kv_cache_dtype)
        if args.kv_cache_dtype != "auto" and tensor_parallel_size > 1:
            raise ConfigError(f"kv_cache_dtype={args.kv_cache_dtype!r} with tensor_parallel_size="
                              f"{tensor_parallel_size} is not supported yet (the workers' caches are not "
                              "calibrated); run one process or use --kv-cache-dtype auto")
        self._draft_source = self._resolve_draft(config)
        if not args.skip_memory_check:  # before any worker starts or any weight is allocated
            # Weights held quantized (GGUF blocks, int4, MXFP4 experts) count at the size they are held.
            blocks, int4, mxfp4 = kept_as_stored(self.source, self.device, tensor_parallel_size)
            storage = (storage_of(self.source, gguf_blocks=blocks, int4_kept=int4, mxfp4_experts=mxfp4)
                       if blocks or int4 or mxfp4 is not None else None)
            check_memory_fits(spec, self.dtype, self.device, config, tensor_parallel_size, storage,
                              draft=None if self._draft_source is None else self._draft_source.spec)
        if tensor_parallel_size > 1:  # the workers load the snapshot found here, whatever the revision
            worker_args = (dataclasses.replace(args, model=str(self.source.path), revision=None)
                           if self.source.repo_id else args)
            self._executor = Executor.start(worker_args, self.device.type)
            self.device = self._executor.device
            # The finalizer must not hold the LLM itself: it stops the workers when the LLM is collected.
            self._finalizer = weakref.finalize(self, self._executor.shutdown)
        try:
            self._build(config, args.seed, args.enable_expert_parallel, t0)
        except BaseException:
            self.shutdown()  # no-op without workers
            raise
        # As vLLM: requests without a seed of their own draw from the process's RNG, seeded once here.
        torch.manual_seed(args.seed)
        self._request_ids = itertools.count()

    def _build(self, config: EngineConfig, seed: int, expert_parallel: bool, t0: float) -> None:
        """Load this rank's model, size the KV cache (telling the other ranks) and start the engine."""
        spec = self.spec
        self.model, self.load_report = load_model(
            self.source, self.device, self.dtype, seed, 0, self.tensor_parallel_size, expert_parallel,
            quantize_fp8=self.engine_args.quantizes_online(self.source.quantization))
        self.tokenizer = self.source.load_tokenizer()
        block_size = config.block_size
        # A draft model is loaded before the KV cache is sized: on a GPU the cache gets what its weights leave.
        draft = None
        if self._draft_source is not None:
            draft, _ = load_model(self._draft_source, self.device, self.dtype, seed)
        num_blocks = config.num_kv_blocks or self._kv_blocks_from_memory(config)
        if self._executor is not None:
            self._executor.finish_start(num_blocks, block_size)
        proposer = None
        if draft is not None:
            assert self._draft_source is not None
            proposer = DraftModelProposer(draft, self._draft_source.spec, spec, num_blocks, block_size, self.device,
                                          self.dtype, config.max_num_seqs, config.max_model_len or spec.max_model_len)
        proposer = proposer or self._mtp_proposer(config, num_blocks, seed)
        self.engine = LLMEngine(self.model, spec, self.tokenizer, config, self.device, self.dtype, num_blocks,
                                proposer=proposer)
        if self._executor is not None:
            self.engine.runner.broadcast_step = self._executor.broadcast_step
        logger.info(
            "loaded %s (%s weights, %s, %s) in %.1fs; KV cache: %d blocks × %d tokens = %d tokens",
            self.source.name, self.source.kind, self.dtype, self.device, time.perf_counter() - t0,
            num_blocks, block_size, num_blocks * block_size,
        )

    def _resolve_draft(self, config: EngineConfig) -> ModelSource | None:
        """speculative_config method draft_model: the draft's source (its config read, nothing loaded), which
        runs beside the target's with a KV cache of as many blocks; None for any other method."""
        spec_config = config.speculative_config
        if spec_config is None or spec_config.method != "draft_model":
            return None
        if self.tensor_parallel_size > 1:
            raise ConfigError("speculative_config method='draft_model' runs on one device; drop tensor parallelism "
                              "or use method 'ngram'")
        args = self.engine_args
        return resolve_model(spec_config.model, args.load_format, revision=args.revision,
                             download_dir=args.download_dir, model_impl=args.model_impl,
                             trust_remote_code=args.trust_remote_code)

    def _mtp_proposer(self, config: EngineConfig, num_blocks: int, seed: int) -> MTPProposer | None:
        """speculative_config method mtp: the checkpoint's MTP layer loaded beside the target, with a KV cache of as
        many blocks (None for any other method)."""
        spec_config = config.speculative_config
        if spec_config is None or spec_config.method != "mtp":
            return None
        mtp = load_mtp(self.source, self.model, self.device, self.dtype, seed)
        return MTPProposer(mtp, num_blocks, config.block_size, self.device, self.dtype, config.max_num_seqs,
                           config.max_model_len or self.spec.max_model_len)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave the group (no-op without tensor parallelism)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def _kv_blocks_from_memory(self, config: EngineConfig) -> int:
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        plan = plan_memory(self.spec, self.dtype, kv_cache_dtype=kv_dtype,
                           max_num_batched_tokens=config.max_num_batched_tokens,
                           max_num_seqs=config.max_num_seqs, device_type=self.device.type)
        # Each rank caches its own KV heads: the plan's bytes scaled to this rank's share of the layout.
        local, full = parallel_config_of(self.model, self.spec).kv_cache_layout(self.spec), self.spec.kv_cache_layout
        block_bytes = plan.kv_bytes_per_token * config.block_size * local[1] // full[1]
        draft_block_bytes = 0
        if self._draft_source is not None:  # one block of the draft's own cache comes with each block
            draft_plan = plan_memory(self._draft_source.spec, self.dtype, device_type=self.device.type)
            draft_block_bytes = draft_plan.kv_bytes_per_token * config.block_size
        if self.device.type == "cuda" and self.engine_args.kv_cache_memory_bytes is None:
            free, total = torch.cuda.mem_get_info(self.device)
            budget = gpu_kv_cache_budget(total, free, config.gpu_memory_utilization,
                                         torch.cuda.memory_reserved(self.device), plan.activation_peak_bytes)
        else:
            budget = config.kv_cache_memory_bytes
        blocks = kv_blocks_in_budget(budget, block_bytes, draft_block_bytes)
        if blocks < 1:
            raise DockyardError(
                f"no memory is left for the KV cache on {self.device} (budget {budget} bytes, one block "
                f"needs {block_bytes + draft_block_bytes}"
                + (" with the draft model's" if draft_block_bytes else "")
                + "); lower max_num_batched_tokens, or raise --gpu-memory-utilization (GPU) or --kv-cache-memory-bytes"
            )
        return int(blocks)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's name: ``SamplingParams()`` with the generation config's defaults (``generation_config``)."""
        return SamplingParams(**self.source.generation.sampling)

    # ---- tokenization ----
    def get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise DockyardError(
                f"model {self.source.name!r} has no tokenizer files; pass prompts as token ids "
                "or put tokenizer.json beside config.json"
            )
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The prompt text for a conversation, through the tokenizer's own chat template; ``tools`` (OpenAI's
        function definitions) and ``template_kwargs`` (e.g. ``enable_thinking``) are the template's to use."""
        tok = self.get_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise DockyardError(f"model {self.source.name!r} has no chat template; send a plain prompt")
        return tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **template_kwargs)

    def _encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.get_tokenizer().encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, Seq) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(
            f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}", param="prompt"
        )

    # ---- generation ----
    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); results in prompt order.

        A request that fails while generating comes back finished with ``error`` set (its samples'
        ``finish_reason`` "error", a warning logged); the others are as they would have been alone."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run([self._encode(p) for p in prompts], sampling_params, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        # The template already holds any BOS token: do not let the tokenizer add a second one.
        encoded = [self._encode(self.apply_chat_template(c), add_special_tokens=False) for c in conversations]
        return self._run(encoded, sampling_params, use_tqdm)

    def _run(self, encoded: list[tuple[str | None, list[int]]],
             sampling_params: SamplingParams | list[SamplingParams] | None, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(encoded)
        if len(params) != len(encoded):
            raise InvalidRequestError(
                f"got {len(params)} SamplingParams for {len(encoded)} prompts; give one, or one per prompt",
                param="sampling_params",
            )
        for p in {id(p): p for p in params}.values():  # a schema that does not compile: refused before any request
            self.engine.check_structured_outputs(p)
        ids = []
        try:
            for (text, token_ids), p in zip(encoded, params):
                rid = str(next(self._request_ids))
                self.engine.add_request(rid, token_ids, p, prompt=text)
                ids.append(rid)
        except DockyardError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", file=sys.stderr)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step(report_unfinished=False):
                if output.finished:
                    if output.error is not None:
                        logger.warning("request %s failed (finish_reason 'error', RequestOutput.error: %r); "
                                       "the other requests were not affected", output.request_id, output.error)
                    results[output.request_id] = output
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[rid] for rid in ids]

