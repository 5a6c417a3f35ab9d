"""Model loading: resolve the device and dtype, build the model, cut it to this rank, load its weights.

``load_model`` is the one way a dockyard model comes to life, used by ``LLM`` (rank 0), the
tensor-parallel workers (ranks 1..N-1) and onboarding:

1. build the model from its spec on the target device in the target dtype, without random
   initialization (every parameter is overwritten by the strict load);
2. with tensor parallelism, cut it in place to this rank's shard (:mod:`dockyard.distributed.sharding`)
   and read only this rank's slices of the checkpoint;
3. for an FP8 checkpoint, choose between native FP8 matmuls and dequantizing on load
   (:func:`dockyard.weights.fp8.choose_fp8_path`); for a GGUF or int4 checkpoint, between keeping the
   projections' weights quantized and dequantizing on load (:func:`dockyard.ops.quant_linear.choose_quant_path`);
   for an MXFP4 checkpoint (gpt-oss), between MXFP4 experts in the fused MoE kernel and dequantizing on load
   (:func:`dockyard.weights.mxfp4.choose_mxfp4_path`, decided before building: the experts are built as stored);
   then load the weights; FP8 KV-cache scales (``…self_attn.k_scale`` / ``v_scale``) go to the attention
   layers (:mod:`dockyard.ops.fp8_kv`);
4. with ``quantize_fp8`` (online FP8, ``--quantization fp8`` on an unquantized checkpoint), turn the loaded
   projections into FP8 ones (:func:`dockyard.weights.fp8_quantize.quantize_linears_fp8`);
5. on CUDA, fuse projections and route single-row matmuls to the GEMV kernel.

:func:`load_mtp` loads a DeepSeek-V3 checkpoint's MTP layer beside its target (speculative decoding's
``mtp`` method): built like the target, only its tensors read from the same checkpoint (or dummy ones).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dockyard.distributed.sharding import lazy_cutter, shard_model, shard_weights
from dockyard.dtypes import RUN_DTYPES
from dockyard.errors import ConfigError, DockyardError
from dockyard.model_source import ModelSource
from dockyard.models.deepseek import DeepseekForCausalLM
from dockyard.models.deepseek_mtp import DeepseekMTP
from dockyard.ops.fp8_kv import apply_kv_scales, split_kv_scales
from dockyard.ops.fp8_linear import native_fp8_unavailable
from dockyard.ops.linear import use_gemv_for_single_rows
from dockyard.ops.moe import mxfp4_expert_banks
from dockyard.ops.quant_linear import GGUFLinear, Int4Linear, choose_quant_path, convert_to_quant_linears
from dockyard.registry import build_model
from dockyard.weights.checkpoint import iter_weights
from dockyard.weights.fp8 import checkpoint_fp8_weights, choose_fp8_path, convert_to_fp8_linears
from dockyard.weights.fp8_quantize import quantize_linears_fp8
from dockyard.weights.loader import load_weights
from dockyard.weights.mxfp4 import source_mxfp4_path
from dockyard.weights.safetensors_dir import iter_safetensors, tensor_names

logger = logging.getLogger(__name__)

_DTYPES = {name: getattr(torch, name) for name in RUN_DTYPES}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; an unavailable device is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DockyardError(f"device={device!r} was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """'auto' → float32 on CPU; the checkpoint's dtype on GPU (bfloat16 for float32 checkpoints)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(checkpoint_dtype, torch.bfloat16) if checkpoint_dtype != "float32" else torch.bfloat16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise DockyardError(f"dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


@contextlib.contextmanager
def _skip_parameter_init() -> Iterator[None]:
    """Build nn.Linear / nn.Embedding without their random initialization (memory left as allocated)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0,
               tp_rank: int = 0, tp_size: int = 1, expert_parallel: bool = False,
               quantize_fp8: bool = False) -> tuple[nn.Module, Any]:
    """Build ``source``'s model on ``device`` in ``dtype`` and load its weights → (model, load report).

    With ``tp_size`` > 1 the model is cut to rank ``tp_rank``'s shard first and only that rank's
    slices are loaded (``dockyard.distributed.sharding``). ``quantize_fp8``: online FP8 (one process; on a
    CUDA GPU with FP8 tensor cores, or on a CPU with the reference math)."""
    if quantize_fp8:
        check_online_fp8(source, device, tp_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Every parameter is overwritten by the strict load below, so random init is skipped:
        # on a CPU it costs as much as the load itself.
        with torch.device(device), _skip_parameter_init(), _mxfp4_experts(source, device, tp_size):
            model = build_model(source.spec)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if tp_size > 1:
        shard_model(model, tp_rank, tp_size, expert_parallel)
        _native_fp8(model, source, device, dtype, tp_size)  # logs that FP8 is dequantized under TP (for now)
        if source.kind == "safetensors" and source.fp8 is None and source.int4 is None:  # only this rank's slices
            weights = iter_safetensors(source.path, cut=lazy_cutter(model))
        else:  # dummy, GGUF, FP8 and int4 (dequantized whole): sliced after reading
            weights = shard_weights(model, iter_weights(source, model, dtype, seed))
    else:
        native_fp8 = _native_fp8(model, source, device, dtype, tp_size)
        keep = _keep_quantized(model, source, device, tp_size)
        weights = iter_weights(source, model, dtype, seed, native_fp8=native_fp8,
                               **({"keep_quantized": keep} if keep else {}))
    kv_scales: dict[str, dict[str, float]] = {}
    # Dummy weights are finite by construction (weights/dummy.py): the NaN/inf pass over each tensor would cost
    # as much as drawing them.
    report = load_weights(model, split_kv_scales(weights, kv_scales),
                          check_finite=False if source.kind == "dummy" else None)
    if kv_scales:
        logger.info("FP8 KV-cache scales from the checkpoint for %d attention layers (used with --kv-cache-dtype fp8)",
                    apply_kv_scales(model, kv_scales))
    if quantize_fp8:
        quantize_linears_fp8(model)
        if device.type == "cuda":  # the replaced Linears' memory goes back (the KV cache is sized from it)
            torch.cuda.empty_cache()
        else:
            logger.info("online FP8 on the CPU: the FP8 projections compute with PyTorch reference math (slow)")
    if device.type == "cuda" and hasattr(model, "fuse_projections"):
        model.fuse_projections()
    if device.type == "cuda":
        use_gemv_for_single_rows(model)
    return model, report


def check_online_fp8(source: ModelSource, device: torch.device, tp_size: int = 1) -> None:
    """Refuse (ConfigError) online FP8 where the FP8 projections cannot run: a GPU without FP8 tensor cores, tensor
    parallelism (the FP8 layers are single-process), or a checkpoint that is already quantized (a GGUF file
    included: re-quantizing its dequantized blocks would add FP8's error to theirs)."""
    why = None
    if source.quantization is not None:
        why = f"the checkpoint is already quantized ({source.quantization!r}); drop --quantization or pass that method"
    elif source.gguf is not None:
        why = (f"the GGUF file's weights are already quantized ({source.gguf.quantization_name()}); drop "
               "--quantization (they are dequantized on load)")
    elif tp_size > 1:
        why = f"FP8 layers run in one process (tensor_parallel_size={tp_size}); drop --quantization or run on one GPU"
    elif device.type == "cuda":
        why = native_fp8_unavailable(device)
        why = why and f"{why}; drop --quantization, or use a GPU with FP8 tensor cores (Ada, Hopper)"
    if why:
        raise ConfigError(f"--quantization fp8 (online FP8 of {source.name}) cannot run: {why}")


def _native_fp8(model: nn.Module, source: ModelSource, device: torch.device, dtype: torch.dtype,
                tp_size: int) -> set[str]:
    """For an FP8 checkpoint on a device with FP8 matmuls: turn the model's FP8 projections into Fp8Linear
    modules and return their checkpoint weight names (loaded as stored); else nothing changes (dequantize
    on load). ``DOCKYARD_FP8_NATIVE`` overrides the choice (``weights.fp8.choose_fp8_path``)."""
    if source.fp8 is None or source.kind != "safetensors":
        return set()
    native, why = choose_fp8_path(source.fp8, device, tp_size)
    if not native:
        logger.info("FP8 checkpoint: weights dequantized on load to %s (%s)", dtype, why)
        return set()
    fp8_weights = checkpoint_fp8_weights(source.path)
    converted = convert_to_fp8_linears(model, fp8_weights, source.fp8, dtype)
    if device.type == "cuda":  # the replaced Linears' memory goes back to the device (the KV cache is sized from it)
        torch.cuda.empty_cache()
    logger.info("FP8 checkpoint: %d of %d FP8 weights kept FP8 for native matmuls (%s); the rest dequantized "
                "on load to %s", len(converted), len(fp8_weights), why, dtype)
    return converted


def _mxfp4_experts(source: ModelSource, device: torch.device, tp_size: int) -> contextlib.AbstractContextManager:
    """For an MXFP4 checkpoint (gpt-oss, on dockyard's classes) where the fused MoE kernel reads MXFP4: build its
    experts as MXFP4 blocks (``ops.moe.mxfp4_expert_banks``; the loader then yields them as stored); else nothing
    changes (dequantize on load). ``DOCKYARD_QUANT_NATIVE`` overrides the choice
    (``weights.mxfp4.source_mxfp4_path``)."""
    path = source_mxfp4_path(source, device, tp_size)
    if path is None:
        return contextlib.nullcontext()
    keep, why = path
    logger.info("MXFP4 checkpoint: experts %s (%s)", "kept MXFP4" if keep else "dequantized on load", why)
    return mxfp4_expert_banks() if keep else contextlib.nullcontext()


def _keep_quantized(model: nn.Module, source: ModelSource, device: torch.device, tp_size: int) -> set[str]:
    """For a GGUF or int4 checkpoint on a device with the quantized-weight kernels: turn the model's projections
    whose checkpoint weights are in a format kept quantized there into :class:`GGUFLinear` / :class:`Int4Linear`
    and return those weight names (the source yields them quantized); else nothing changes (dequantize on load).
    The formats kept: ``ops.quant_linear.choose_quant_path`` (``DOCKYARD_QUANT_NATIVE`` overrides it)."""
    gguf = source.gguf if source.kind == "gguf" else None
    if gguf is not None:
        cls, what = GGUFLinear, "GGUF"
    elif getattr(source, "int4", None) is not None and source.kind == "safetensors":
        cls, what = Int4Linear, "int4"
    else:
        return set()
    formats, why = choose_quant_path(device, tp_size)
    candidates = {f"{name}.weight" for name in getattr(model, "fp8_linear_names", lambda: [])()}
    # GGUF: those stored in a block type kept; int4: all (the reader keeps those it holds as int4).
    if gguf is not None:
        names = {n for n, qtype in gguf.kernel_quantized_weights(candidates).items() if qtype in formats} & candidates
    else:
        names = candidates if "int4" in formats else set()
    if not names:
        logger.info("%s checkpoint: weights dequantized on load (%s)", what, why)
        return set()
    converted = convert_to_quant_linears(model, names, cls)
    if device.type == "cuda":  # the replaced Linears' memory goes back to the device (the KV cache is sized from it)
        torch.cuda.empty_cache()
    logger.info("%s checkpoint: %d projection weights kept quantized (%s); the rest dequantized on load",
                what, len(converted), why)
    return converted


def load_mtp(source: ModelSource, target: nn.Module, device: torch.device, dtype: torch.dtype,
             seed: int = 0) -> DeepseekMTP:
    """The first MTP layer of ``source``'s checkpoint, beside its loaded ``target`` (whose embedding and, unless
    the checkpoint stores ``shared_head.head``, LM head it uses): built in ``dtype`` on ``device`` and loaded
    strictly (a missing tensor is named); dummy weights for a dummy source. FP8 and int4 weights are
    dequantized on load. ConfigError when the model has no MTP layer or dockyard cannot read it."""
    check_mtp_source(source)
    spec = source.spec
    if not isinstance(target, DeepseekForCausalLM):
        raise ConfigError(f"speculative_config method='mtp' runs DeepSeek-V3-style MTP layers; {spec.architecture} "
                          f"({spec.model_impl} implementation) has none dockyard can build; use method 'ngram' or "
                          "'draft_model'")
    index = spec.num_hidden_layers
    own_head = (source.kind == "safetensors"
                and f"model.layers.{index}.shared_head.head.weight" in tensor_names(source.path))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _skip_parameter_init():
            mtp = DeepseekMTP(target, own_head).eval()
    finally:
        torch.set_default_dtype(previous)
    load_weights(mtp, iter_weights(source, mtp, dtype, seed, only=mtp.reads))
    return mtp


def check_mtp_source(source: ModelSource, tp_size: int = 1) -> None:
    """Refuse (ConfigError) speculative_config method 'mtp' where it cannot run, before any weight is read: a model
    without MTP layers, a checkpoint other than safetensors (or dummy weights), tensor parallelism."""
    spec, instead = source.spec, "use method 'ngram', or 'draft_model' with a smaller model of the same tokenizer"
    if spec.num_nextn_predict_layers < 1:
        raise ConfigError(f"speculative_config method='mtp' needs the checkpoint's MTP layers, but {source.name} has "
                          f"none (num_nextn_predict_layers={spec.num_nextn_predict_layers} in its config); {instead}")
    if source.kind not in ("safetensors", "dummy"):
        raise ConfigError(f"speculative_config method='mtp' reads the MTP layer from a safetensors checkpoint, and "
                          f"{source.name} is a {source.kind} file; {instead}")
    if tp_size > 1:
        raise ConfigError(f"speculative_config method='mtp' runs on one device (tensor_parallel_size={tp_size}); drop "
                          "tensor parallelism or use method 'ngram'")
