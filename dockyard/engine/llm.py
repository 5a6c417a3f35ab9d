"""``LLM``: the offline Python API, shaped like vLLM's.

    from dockyard import LLM, SamplingParams
    llm = LLM()                      # the bundled SmolLM2-135M-Instruct
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=16))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

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
from dockyard.engine.llm_engine import EngineConfig, LLMEngine
from dockyard.engine.memory_check import check_memory_fits
from dockyard.engine.outputs import RequestOutput
from dockyard.engine.sampling_params import SamplingParams
from dockyard.engine.threads import configure_threads
from dockyard.errors import DockyardError, InvalidRequestError
from dockyard.memory import plan_memory
from dockyard.model_loader import load_model, resolve_device, resolve_dtype
from dockyard.model_source import ModelSource, resolve_model

logger = logging.getLogger(__name__)


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
    """

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "auto",
                 device: str = "auto", load_format: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 enforce_eager: bool = False, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, async_scheduling: bool | None = None,
                 skip_memory_check: bool = False, num_threads: int | None = None) -> None:
        t0 = time.perf_counter()
        configure_threads(num_threads)
        self._executor: Executor | None = None
        self.source: ModelSource = resolve_model(model, load_format)
        spec = self.source.spec
        if max_model_len is not None and not 0 < max_model_len <= spec.max_model_len:
            raise DockyardError(
                f"max_model_len={max_model_len} must be in [1, {spec.max_model_len}] "
                f"(the model's max_position_embeddings)"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, spec.torch_dtype, self.device)
        self.spec = spec
        self.tensor_parallel_size = tensor_parallel_size
        if tensor_parallel_size > 1 or enable_expert_parallel:
            check_parallel_config(spec, tensor_parallel_size, enable_expert_parallel)
        config = EngineConfig(
            block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes or EngineConfig.kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            # The other ranks replay eager forwards; captured graphs would need them to replay too.
            enforce_eager=enforce_eager or tensor_parallel_size > 1, async_scheduling=async_scheduling,
        )
        if not skip_memory_check:  # before any worker starts or any weight is allocated
            check_memory_fits(spec, self.dtype, self.device, config, tensor_parallel_size)
        if tensor_parallel_size > 1:
            self._executor = Executor.start(model, load_format=load_format, dtype=dtype, device_type=self.device.type,
                                            seed=seed, tensor_parallel_size=tensor_parallel_size,
                                            expert_parallel=enable_expert_parallel)
            self.device = self._executor.device
            # The finalizer must not hold the LLM itself: it stops the workers when the LLM is collected.
            self._finalizer = weakref.finalize(self, self._executor.shutdown)
        try:
            self._build(config, seed, enable_expert_parallel, t0)
        except BaseException:
            self.shutdown()  # no-op without workers
            raise
        self._request_ids = itertools.count()

    def _build(self, config: EngineConfig, seed: int, expert_parallel: bool, t0: float) -> None:
        """Load this rank's model, size the KV cache (telling the other ranks) and start the engine."""
        spec = self.spec
        self.model, self.load_report = load_model(self.source, self.device, self.dtype, seed, 0,
                                                  self.tensor_parallel_size, expert_parallel)
        self.tokenizer = self.source.load_tokenizer()
        block_size = config.block_size
        num_blocks = config.num_kv_blocks or self._kv_blocks_from_memory(config)
        if self._executor is not None:
            self._executor.finish_start(num_blocks, block_size)
        self.engine = LLMEngine(self.model, spec, self.tokenizer, config, self.device, self.dtype, num_blocks)
        if self._executor is not None:
            self.engine.runner.broadcast_step = self._executor.broadcast_step
        logger.info(
            "loaded %s (%s weights, %s, %s) in %.1fs; KV cache: %d blocks × %d tokens = %d tokens",
            self.source.name, self.source.kind, self.dtype, self.device, time.perf_counter() - t0,
            num_blocks, block_size, num_blocks * block_size,
        )

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave the group (no-op without tensor parallelism)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def _kv_blocks_from_memory(self, config: EngineConfig) -> int:
        plan = plan_memory(self.spec, self.dtype, max_num_batched_tokens=config.max_num_batched_tokens,
                           max_num_seqs=config.max_num_seqs, device_type=self.device.type)
        # Each rank caches its own KV heads: the plan's bytes scaled to this rank's share of the layout.
        local, full = parallel_config_of(self.model, self.spec).kv_cache_layout(self.spec), self.spec.kv_cache_layout
        block_bytes = plan.kv_bytes_per_token * config.block_size * local[1] // full[1]
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * config.gpu_memory_utilization) - used - plan.activation_peak_bytes
        else:
            budget = config.kv_cache_memory_bytes
        blocks = budget // block_bytes
        if blocks < 1:
            raise DockyardError(
                f"no memory is left for the KV cache on {self.device} (budget {budget} bytes, one block "
                f"needs {block_bytes}); lower max_num_batched_tokens or raise the memory budget"
            )
        return int(blocks)

    # ---- tokenization ----
    def get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise DockyardError(
                f"model {self.source.name!r} has no tokenizer files; pass prompts as token ids "
                "or put tokenizer.json beside config.json"
            )
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, through the tokenizer's own chat template."""
        tok = self.get_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise DockyardError(f"model {self.source.name!r} has no chat template; send a plain prompt")
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

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
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(encoded)
        if len(params) != len(encoded):
            raise InvalidRequestError(
                f"got {len(params)} SamplingParams for {len(encoded)} prompts; give one, or one per prompt",
                param="sampling_params",
            )
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

