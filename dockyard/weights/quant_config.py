"""What a checkpoint's ``quantization_config`` says, read and validated without torch.

The resolved model (:mod:`dockyard.model_source`) keeps these settings as metadata: ``dockyard inspect`` and the
memory plan read them before anything imports torch. The tensor side of each format (pairing, unpacking,
dequantizing) lives in :mod:`dockyard.weights.fp8` and :mod:`dockyard.weights.int4`, which take these
configs.

- **fp8** (:class:`FP8Config`): the scale layout (``weight_block_size``), the storage format (``fmt``; the torch
  dtype is named here and produced by ``weights.fp8.storage_dtype``), the modules kept unquantized.
- **int4** (:class:`Int4Config`): AWQ, GPTQ and compressed-tensors ``pack-quantized`` schemes (group size,
  zero points, activation order) per group of target modules.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockyard.engine_args import INT4_METHODS
from dockyard.errors import WeightsError

FP8_FORMATS = {"e4m3": "float8_e4m3fn"}  # quantization_config.fmt -> the torch dtype its weights are stored in
GPTQ_FORMATS = ("gptq", "gptq_v2")  # checkpoint_format: v1 stores zero - 1, v2 the zero point itself
CT_FORMAT = "pack-quantized"


@dataclass(frozen=True)
class FP8Config:
    """What an fp8 ``quantization_config`` says about its weights."""

    block: tuple[int, int] | None = None  # weight_block_size; None: per-tensor or per-channel scales
    fmt: str = "e4m3"
    # Module name patterns the checkpoint keeps unquantized: ``modules_to_not_convert`` (transformers) or
    # ``ignored_layers`` (vLLM's FP8 configs), matched as transformers matches them (:meth:`keeps_unquantized`).
    unquantized: tuple[str, ...] = ()

    @property
    def storage_dtype_name(self) -> str:
        """The torch dtype (its attribute name) the quantized weights are stored in."""
        return FP8_FORMATS[self.fmt]

    def keeps_unquantized(self, module: str) -> bool:
        """Whether the module named ``module`` (checkpoint naming, e.g. ``model.layers.3.self_attn.q_proj``) is
        stored unquantized: a pattern matches it from the start up to a module boundary (as a regular
        expression, so ``model.layers.*.self_attn`` covers every layer's attention), or as a suffix."""
        return any(p.match(module) or module.endswith(suffix) for p, suffix in _unquantized_patterns(self.unquantized))

    @classmethod
    def from_quantization_config(cls, quant: dict[str, Any], where: str | Path) -> FP8Config:
        """Validate an fp8 ``quantization_config``; refuse what dequantize-on-load cannot honour."""
        fmt = quant.get("fmt") or "e4m3"
        if fmt not in FP8_FORMATS:
            raise WeightsError(
                f"{where}: quantization_config.fmt={fmt!r} is not supported; dockyard loads FP8 checkpoints "
                f"stored as {', '.join(FP8_FORMATS)} ({', '.join(f'torch.{d}' for d in FP8_FORMATS.values())}); "
                "use such a checkpoint, an unquantized one, or --load-format dummy"
            )
        scheme = quant.get("activation_scheme") or "dynamic"
        if scheme != "dynamic":
            raise WeightsError(
                f"{where}: quantization_config.activation_scheme={scheme!r} is not supported; dockyard "
                "keeps activations in the model dtype (dequantize on load) or scales them per token (native "
                "FP8), which honours only 'dynamic' activation scaling (static input scales would be "
                "ignored); use a checkpoint "
                "with activation_scheme 'dynamic', an unquantized one, or --load-format dummy"
            )
        unquantized = _module_patterns(quant, where)
        block = quant.get("weight_block_size")
        if block is None:
            return cls(None, fmt, unquantized)
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise WeightsError(
                f"{where}: quantization_config.weight_block_size={block!r} must be two positive integers "
                "[rows, cols] (or absent for per-tensor / per-channel scales); fix config.json"
            )
        return cls((block[0], block[1]), fmt, unquantized)


def _module_patterns(quant: dict[str, Any], where: str | Path) -> tuple[str, ...]:
    """The ``modules_to_not_convert`` and ``ignored_layers`` of a quantization config, validated."""
    patterns: list[str] = []
    for key in ("modules_to_not_convert", "ignored_layers"):
        value = quant.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise WeightsError(f"{where}: quantization_config.{key}={value!r} must be a list of module names; "
                               "fix config.json")
        for v in value:
            try:
                re.compile(v)
            except re.error as exc:
                raise WeightsError(f"{where}: quantization_config.{key} entry {v!r} is not a valid module "
                                   f"pattern ({exc}); fix config.json") from None
        patterns.extend(value)
    return tuple(dict.fromkeys(patterns))


@functools.lru_cache(maxsize=16)
def _unquantized_patterns(patterns: tuple[str, ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    # The boundary keeps "layers.1" from matching "layers.11" and "mlp.gate" from matching "mlp.gate_proj".
    return tuple((re.compile(rf"(?:{p})(?:(?<=\.)|(?=\.|$))"), p) for p in patterns)


@dataclass(frozen=True)
class Int4Scheme:
    """How one group of modules is quantized: group size (None: one group per row), zero points, act order."""

    group_size: int | None
    symmetric: bool
    act_order: bool  # g_idx carries a permutation (GPTQ desc_act, compressed-tensors actorder "group")


@dataclass(frozen=True)
class Int4Config:
    """What an AWQ / GPTQ / compressed-tensors int4 ``quantization_config`` says about its weights."""

    method: str
    schemes: tuple[tuple[tuple[str, ...], Int4Scheme], ...]  # (targets, scheme); AWQ/GPTQ: one, targets ()
    zeros_minus_one: bool = False  # GPTQ v1 checkpoints store each zero point minus one

    @property
    def pieces(self) -> tuple[str, ...]:
        """The tensor suffixes a quantized module of this method may carry."""
        if self.method == "compressed-tensors":
            return ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
        return ("qweight", "qzeros", "scales", "g_idx")

    def scheme_for(self, module: str) -> Int4Scheme:
        """The scheme of the quantized module ``module`` (checkpoint naming), or WeightsError naming it."""
        for targets, scheme in self.schemes:
            if not targets or any(_target_matches(t, module) for t in targets):
                return scheme
        raise WeightsError(f"quantized module {module} matches no config_groups target of its quantization_config "
                           f"({[list(t) for t, _ in self.schemes]}); fix config.json's config_groups")

    @classmethod
    def from_quantization_config(cls, quant: dict[str, Any], where: str | Path) -> Int4Config:
        """Validate an int4 ``quantization_config``; refuse, naming the key and value, what is not int4 or
        is packed in a layout this reader does not know."""
        method = str(quant.get("quant_method"))
        if method == "compressed-tensors":
            return _compressed_tensors_config(quant, where)
        # AutoAWQ's own quant_config names them w_bit / q_group_size; config.json's quantization_config bits /
        # group_size.
        bits_key = "bits" if "bits" in quant or "w_bit" not in quant else "w_bit"
        group_key = "group_size" if "group_size" in quant or "q_group_size" not in quant else "q_group_size"
        _check_bits(quant.get(bits_key), bits_key, where)
        group = _group_size(quant.get(group_key, 128), group_key, where)
        if method == "awq":
            version = str(quant.get("version", "gemm")).lower()
            if version != "gemm":
                raise WeightsError(f"{where}: quantization_config.version={quant.get('version')!r}: dockyard reads AWQ "
                                   "checkpoints packed for the GEMM kernels (version 'gemm'); re-export with "
                                   "AutoAWQ's default version='gemm'")
            if quant.get("zero_point", True) is not True:
                raise WeightsError(f"{where}: quantization_config.zero_point={quant.get('zero_point')!r}: AWQ's GEMM "
                                   "packing stores zero points, so dockyard reads zero_point: true checkpoints only")
            return cls("awq", (((), Int4Scheme(group, symmetric=False, act_order=False)),))
        if method == "gptq":
            fmt = str(quant.get("checkpoint_format", "gptq"))
            if fmt not in GPTQ_FORMATS:
                raise WeightsError(f"{where}: quantization_config.checkpoint_format={fmt!r} is not one of "
                                   f"{', '.join(GPTQ_FORMATS)}; dockyard reads GPTQ checkpoints as AutoGPTQ and "
                                   "GPTQModel save them (not repacked for a kernel such as marlin)")
            scheme = Int4Scheme(group, symmetric=bool(quant.get("sym", True)), act_order=bool(quant.get("desc_act")))
            return cls("gptq", (((), scheme),), zeros_minus_one=fmt == "gptq")
        raise WeightsError(f"{where}: quantization_config.quant_method={method!r} is not an int4 method "
                           f"({', '.join(INT4_METHODS)})")


def _check_bits(bits: Any, key: str, where: str | Path) -> None:
    if bits != 4:
        raise WeightsError(f"{where}: quantization_config.{key}={bits!r}: dockyard reads 4-bit weights only; use a "
                           "4-bit (w4a16) checkpoint or an unquantized one")


def _group_size(value: Any, key: str, where: str | Path) -> int | None:
    if value == -1 or value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise WeightsError(f"{where}: quantization_config.{key}={value!r} must be a positive integer (or -1: one "
                           "group per output row); fix config.json")
    return value


def _compressed_tensors_config(quant: dict[str, Any], where: str | Path) -> Int4Config:
    fmt = quant.get("format")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise WeightsError(f"{where}: quantization_config.config_groups={groups!r} must map group names to schemes; "
                           "fix config.json")
    schemes = []
    for name, group in groups.items():
        key = f"config_groups.{name}"
        group_fmt = group.get("format") or fmt
        if group_fmt != CT_FORMAT:
            fmt_key = "format" if group.get("format") is None else key + ".format"
            raise WeightsError(f"{where}: quantization_config.{fmt_key}={group_fmt!r}: dockyard reads "
                               "compressed-tensors int4 checkpoints in the "
                               f"{CT_FORMAT!r} format (w4a16); use such a checkpoint or an unquantized one")
        weights = group.get("weights") or {}
        if group.get("input_activations") is not None:
            raise WeightsError(f"{where}: quantization_config.{key}.input_activations={group['input_activations']!r}: "
                               "dockyard runs weight-only int4 (w4a16) compressed-tensors checkpoints; activations "
                               "stay in the model dtype")
        _check_bits(weights.get("num_bits"), f"{key}.weights.num_bits", where)
        if weights.get("type", "int") != "int":
            raise WeightsError(f"{where}: quantization_config.{key}.weights.type={weights.get('type')!r}: only integer "
                               "int4 weights are read here")
        strategy = weights.get("strategy")
        if strategy == "group":
            group_size = _group_size(weights.get("group_size"), f"{key}.weights.group_size", where)
        elif strategy == "channel":
            group_size = None
        else:
            raise WeightsError(f"{where}: quantization_config.{key}.weights.strategy={strategy!r}: dockyard reads the "
                               "'group' and 'channel' strategies of int4 weights")
        actorder = weights.get("actorder")
        if actorder not in (None, "group", "weight", "static", "dynamic"):
            raise WeightsError(f"{where}: quantization_config.{key}.weights.actorder={actorder!r} is not a "
                               "compressed-tensors activation order (group, weight or null)")
        targets = tuple(group.get("targets") or ())
        # "dynamic" is compressed-tensors' alias of "group": g_idx reorders the input rows.
        act_order = actorder in ("group", "dynamic")
        schemes.append((targets, Int4Scheme(group_size, bool(weights.get("symmetric", True)), act_order)))
    return Int4Config("compressed-tensors", tuple(schemes))


def _target_matches(target: str, module: str) -> bool:
    """compressed-tensors' targets: ``re:<pattern>`` matched against the module name, a class name (every
    quantized module here is a Linear), or the module's own name or name suffix."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or module == target or module.endswith("." + target)
