"""Numerical equivalence with HF transformers on a shrunken copy of a model's config.

:func:`shrink_config` keeps every architectural flag of the real config (rope type and scaling,
q/kv head ratio, biases, tied embeddings, sliding window, layer types, expert routing) at toy
sizes. :func:`check_equivalence` builds the HF reference for it (fp32, seeded, weights at
unit scale so attention is sharp and every block matters, norms and biases perturbed so they
are tested), saves it with ``save_pretrained`` and loads that directory through dockyard's own
loader, so the checkpoint-name mapping is part of what is compared. It then compares, in order:

1. each block of the first layer of every layer type (input norm, attention, MLP), fed the same
   random hidden states; HF's blocks get the rotary ``position_embeddings`` and attention mask that
   its own model computes (captured by hooks during a full forward);
2. each layer type (a whole decoder layer);
3. the full model's prefill logits;
4. chunked prefill and decode steps through the paged KV cache against HF's full recompute.

Error metric: rmse(ours − ref) / rmse(ref) per level. The first level over its tolerance is the
verdict's ``first_failure`` (e.g. "attention of layer 0"), which says where to look.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dockyard.engine.llm import LLM
from dockyard.errors import CheckpointConversionError, DockyardError
from dockyard.model_impl import choose_model_impl
from dockyard.model_loader import load_model
from dockyard.model_source import resolve_model
from dockyard.onboard.config_surgery import SEQ_LEN, SPECIAL_TOKEN_REPLACEMENTS, shrink_config
from dockyard.spec import is_number, language_model_config
from dockyard.testing import paged_logits, rel_rmse

if TYPE_CHECKING:
    from dockyard.onboard.ablations import Ablation

logger = logging.getLogger(__name__)

DECODE_STEPS = 4
# rmse(ours − ref) / rmse(ref) allowed per level. fp32 must agree to rounding; the bf16 bars are
# the usual ones for comparing a bf16 engine with an fp32 reference.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"norm": 1e-5, "attention": 1e-5, "mlp": 1e-5, "moe": 1e-5, "layer": 1e-5, "model": 1e-5,
                "decode": 1e-5},
    "bfloat16": {"norm": 0.02, "attention": 0.10, "mlp": 0.05, "moe": 0.02, "layer": 0.05, "model": 0.05,
                 "decode": 0.05},
}
# (block kind, attribute of a decoder layer) in the order they are compared.
BLOCKS = (("norm", "input_layernorm"), ("attention", "self_attn"), ("mlp", "mlp"))


# ---------------------------------------------------------------- the HF reference
def transformers_support(model_type: str) -> str | None:
    """None when the installed transformers implements ``model_type`` as a causal LM, else why not."""
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return "transformers is not installed"
    if model_type not in CONFIG_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return (f"the installed transformers {transformers.__version__} has no causal-LM implementation of "
                f"model_type {model_type!r} (it may exist only as remote code)")
    return None


def build_reference(cfg: dict[str, Any], seed: int = 0) -> nn.Module:
    """The HF model for a (shrunken) config dict: fp32, eval, seeded, eager attention.

    Weights are redrawn at unit scale (std 1/sqrt(fan-in)) so attention is sharp and position
    matters; norm weights and biases, which HF initialises to 1 and 0, are perturbed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(cfg["model_type"], **kwargs)
    for key, replacement in SPECIAL_TOKEN_REPLACEMENTS.items():  # defaults of the config class, too
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value >= hf_config.vocab_size:
            setattr(hf_config, key, replacement)
        elif isinstance(value, list):
            setattr(hf_config, key, [v for v in value if v < hf_config.vocab_size] or [replacement])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif name.endswith("sinks"):  # per-head logits: at the size of the scores, so they matter
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


# ---------------------------------------------------------------- results
@dataclass
class LevelResult:
    """One comparison: which level and block, its error and the bar it had to clear."""

    level: str  # block | layer | model | decode | load
    block: str  # norm | attention | mlp | decoder layer | prefill logits | ...
    module: str  # where it lives, e.g. model.layers.0.self_attn
    rel_err: float | None
    tolerance: float
    passed: bool
    detail: str = ""

    @property
    def where(self) -> str:
        return f"{self.level} '{self.block}' ({self.module})"


@dataclass
class MutationResult:
    """One ablated feature: what was broken and the first level that noticed (None: the gate passed it)."""

    feature: str
    what: str
    caught_by: LevelResult | None

    @property
    def caught(self) -> bool:
        return self.caught_by is not None

    def margin(self) -> float | None:
        """The catching level's error over its tolerance (None when caught by a crash or a load failure)."""
        lv = self.caught_by
        if lv is None or lv.rel_err is None or not lv.tolerance:
            return None
        return lv.rel_err / lv.tolerance


@dataclass
class EquivalenceResult:
    """The equivalence verdict with every level compared."""

    status: str  # pass | fail | skip
    reason: str = ""
    model_type: str = ""
    dtype: str = "float32"
    seq_len: int = SEQ_LEN
    decode_steps: int = DECODE_STEPS
    shrunk_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    levels: list[LevelResult] = field(default_factory=list)
    tolerances: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    mutations: list[MutationResult] = field(default_factory=list)
    path: str = ""  # the implementation compared: "dockyard" (native family) or "transformers" (generic path)

    @property
    def first_failure(self) -> LevelResult | None:
        return next((lv for lv in self.levels if not lv.passed), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        first = self.first_failure
        out["first_failure"] = None if first is None else {**asdict(first), "where": first.where}
        out["mutations"] = [{"feature": m.feature, "what": m.what, "caught": m.caught,
                             "caught_by": None if m.caught_by is None else m.caught_by.where,
                             "rel_err": None if m.caught_by is None else m.caught_by.rel_err,
                             "tolerance": None if m.caught_by is None else m.caught_by.tolerance}
                            for m in self.mutations]
        return out


# ---------------------------------------------------------------- the comparison
def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _layer_type_indices(hf_model: nn.Module) -> list[tuple[int, str]]:
    """(first layer index, kind) of every kind of layer in the reference model.

    A kind is the attention type (``layer_types``: sliding / full) and the MLP class (dense or MoE),
    each named only where the model has more than one; a uniform model has the one kind 'decoder'.
    """
    types = getattr(hf_model.config, "layer_types", None)
    layers = list(getattr(getattr(hf_model, "model", None), "layers", []))
    if not isinstance(types, list) or len(types) != len(layers):
        types = [""] * len(layers)
    mlps = [type(getattr(layer, "mlp", None)).__name__ for layer in layers]
    keys = [(str(t) if len(set(types)) > 1 else "", m if len(set(mlps)) > 1 else "") for t, m in zip(types, mlps)]
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(keys):
        seen.setdefault(key, i)
    if not seen:
        return [(0, "decoder")]
    return [(i, ", ".join(part for part in key if part) or "decoder") for key, i in seen.items()]


def _capture_kwargs(hf_model: nn.Module, ids: torch.Tensor, paths: list[str]) -> dict[str, dict[str, Any]]:
    """The keyword arguments HF's own forward passes to each module in ``paths``."""
    captured: dict[str, dict[str, Any]] = {}
    handles = []
    for path in paths:
        module = _module(hf_model, path)
        if module is None:
            continue

        def hook(_mod: nn.Module, _args: tuple, kwargs: dict[str, Any], path: str = path) -> None:
            captured.setdefault(path, dict(kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hf_model(ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _clean(kwargs: dict[str, Any]) -> dict[str, Any]:
    drop = {"hidden_states", "past_key_values", "past_key_value", "use_cache", "cache_position"}
    return {k: v for k, v in kwargs.items() if k not in drop}


class _FirstFailure(Exception):
    """Raised inside :func:`compare_models` to stop at the first level that fails, when asked to."""


def compare_models(ours: nn.Module, hf_model: nn.Module, seq_len: int = SEQ_LEN, decode_steps: int = DECODE_STEPS,
                   dtype: str = "float32", seed: int = 1, stop_at_first_failure: bool = False) -> list[LevelResult]:
    """Every level of the comparison between our loaded model and the HF reference, in order (up to the first
    failing one with ``stop_at_first_failure``)."""
    results: list[LevelResult] = []
    try:
        _compare_levels(ours, hf_model, seq_len, decode_steps, dtype, seed, stop_at_first_failure, results)
    except _FirstFailure:
        pass
    return results


def _compare_levels(ours: nn.Module, hf_model: nn.Module, seq_len: int, decode_steps: int, dtype: str, seed: int,
                    stop: bool, results: list[LevelResult]) -> None:
    tol = TOLERANCES[dtype]
    vocab = hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (seq_len,), generator=gen)
    positions = torch.arange(seq_len)
    hidden_size = hf_model.config.hidden_size
    x = torch.randn(1, seq_len, hidden_size, generator=gen)
    # The generic path runs HF's own blocks: only what dockyard adds (paged attention, decode) is compared.
    generic = getattr(getattr(ours, "spec", None), "model_impl", "dockyard") == "transformers"
    layer_types = [] if generic else _layer_type_indices(hf_model)
    paths = []
    for i, _ in layer_types:
        paths += [f"model.layers.{i}", f"model.layers.{i}.self_attn"]
    captured = _capture_kwargs(hf_model, ids, paths)

    def compare(level: str, block: str, module: str, run_ours: Callable[[], torch.Tensor],
                run_ref: Callable[[], torch.Tensor], bar: float) -> None:
        try:
            with torch.no_grad():
                a, b = run_ours(), run_ref()
            a = a.reshape(b.shape)
            err = rel_rmse(a, b)
            ok = err <= bar and torch.isfinite(a).all().item()
            results.append(LevelResult(level, block, module, err, bar, bool(ok)))
        except Exception as exc:  # noqa: BLE001 - a crash in one level is that level's failure
            logger.exception("equivalence level %s/%s crashed", level, block)
            results.append(LevelResult(level, block, module, None, bar, False, f"{type(exc).__name__}: {exc}"))
        if stop and not all(r.passed for r in results):  # also the missing-module failures recorded directly
            raise _FirstFailure

    x2d = x[0]
    for i, kind in layer_types:
        prefix = f"model.layers.{i}"
        for block, attr in BLOCKS:
            mine, ref = _module(ours, f"{prefix}.{attr}"), _module(hf_model, f"{prefix}.{attr}")
            if mine is None and ref is None:  # neither has it (OLMo 2 has no input norm)
                continue
            if mine is None or ref is None:
                side = "dockyard" if mine is None else "HF"
                results.append(LevelResult("block", block, f"{prefix}.{attr}", None, tol.get(block, 1e-5), False,
                                           f"{side} model has no module {prefix}.{attr}"))
                continue
            bar = tol["moe"] if block == "mlp" and "moe" in type(ref).__name__.lower() else tol.get(block, 1e-5)
            label = block if kind == "decoder" else f"{block} [{kind}]"
            if block == "attention":
                kwargs = _clean(captured.get(f"{prefix}.self_attn", {}))
                compare("block", label, f"{prefix}.{attr}", lambda m=mine: m(positions, x2d),
                        lambda r=ref, kw=kwargs: _first(r(hidden_states=x, **kw)), bar)
            else:
                compare("block", label, f"{prefix}.{attr}", lambda m=mine: _first(m(x2d)),
                        lambda r=ref: _first(r(x)), bar)
    for i, kind in layer_types:
        prefix = f"model.layers.{i}"
        mine, ref = _module(ours, prefix), _module(hf_model, prefix)
        kwargs = _clean(captured.get(prefix, {}))
        label = "decoder layer" if kind == "decoder" else f"decoder layer [{kind}]"
        if mine is None or ref is None:
            results.append(LevelResult("layer", label, prefix, None, tol["layer"], False, "layer missing"))
            continue
        compare("layer", label, prefix, lambda m=mine: m(positions, x2d),
                lambda r=ref, kw=kwargs: _first(r(x, **kw)), tol["layer"])

    with torch.no_grad():
        ref_logits = hf_model(ids[None], use_cache=False).logits[0].float()
    compare("model", "prefill logits", "whole model",
            lambda: ours.compute_logits(ours(ids, positions)), lambda: ref_logits, tol["model"])
    head = seq_len - decode_steps
    chunks = [head // 2, head - head // 2] + [1] * decode_steps
    paged: dict[str, torch.Tensor] = {}

    def run_paged() -> torch.Tensor:
        paged["logits"] = paged_logits(ours, ids.tolist(), chunks)
        return paged["logits"]

    compare("decode", "chunked prefill + decode (paged KV cache)", f"chunks {chunks}", run_paged,
            lambda: ref_logits, tol["decode"])
    compare("decode", "decode steps only", f"last {decode_steps} positions",
            lambda: paged["logits"][-decode_steps:], lambda: ref_logits[-decode_steps:], tol["decode"])


def _run_ablation(ablation: Ablation, checkpoint: str, hf_model: nn.Module, seq_len: int, decode_steps: int,
                  seed: int, model_impl: str = "auto") -> MutationResult:
    """Load ``checkpoint`` with one feature broken and compare up to the first level that fails."""
    source = resolve_model(checkpoint, model_impl=model_impl)
    try:
        source = dataclasses.replace(source, spec=ablation.ablated_spec(source.spec))
        model, _ = load_model(source, torch.device("cpu"), torch.float32)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built or loaded is caught at loading
        return MutationResult(ablation.feature, ablation.what, LevelResult(
            "load", "weights saved by HF", "checkpoint", None, 0.0, False, f"{type(exc).__name__}: {exc}"))
    if ablation.model is not None:
        ablation.model(model)
    with ablation.patched():
        levels = compare_models(model, hf_model, seq_len, decode_steps, seed=seed, stop_at_first_failure=True)
    return MutationResult(ablation.feature, ablation.what, next((lv for lv in levels if not lv.passed), None))


def check_equivalence(config: dict[str, Any], workdir: str | Path | None = None, seq_len: int = SEQ_LEN,
                      decode_steps: int = DECODE_STEPS, seed: int = 0,
                      ablations: Sequence[Ablation] = (), model_impl: str = "auto") -> EquivalenceResult:
    """Shrink ``config``, build the HF reference, load it through dockyard, compare every level.

    Then, if every level passed, the mutation check: each of ``ablations`` (``dockyard.onboard.ablations``)
    loaded from the same checkpoint and compared up to the first level that fails
    (``EquivalenceResult.mutations``); an ablation no level catches is a feature the gate cannot vouch for.
    ``model_impl`` picks the implementation loaded (``dockyard.model_impl``); on the generic path the blocks
    and layers are HF's own, so prefill logits and the paged decode are the levels compared."""
    t0 = time.perf_counter()
    model_type = str(language_model_config(config).get("model_type") or "")
    result = EquivalenceResult(status="skip", model_type=model_type, tolerances=TOLERANCES["float32"],
                               seq_len=seq_len, decode_steps=decode_steps)
    why_not = transformers_support(model_type)
    if why_not is not None:
        result.reason = why_not
        return result
    if model_impl == "auto":  # decided on the real config: the saved checkpoint's config.json has more keys
        try:
            model_impl = choose_model_impl(config).impl
        except DockyardError:
            pass  # the load below fails with the same refusal, recorded as the verdict
    cfg, notes = shrink_config(config, seq_len)
    max_pos = cfg.get("max_position_embeddings")
    if is_number(max_pos) and max_pos < seq_len:
        seq_len = result.seq_len = int(max_pos)
        decode_steps = result.decode_steps = min(decode_steps, max(1, seq_len // 4))
    result.shrunk_config, result.notes = cfg, notes
    try:
        hf_model = build_reference(cfg, seed)
    except Exception as exc:  # noqa: BLE001 - no reference means nothing is proven: say why
        logger.exception("building the HF reference failed")
        result.status = "fail"
        result.levels.append(LevelResult("reference", "HF reference model", model_type, None, 0.0, False,
                                         f"{type(exc).__name__}: {exc}"))
        result.reason = f"transformers could not build the reference for the shrunken config: {exc}"
        result.duration_s = time.perf_counter() - t0
        return result
    with tempfile.TemporaryDirectory(prefix="dockyard-equiv-", dir=workdir) as tmp:
        hf_model.save_pretrained(tmp)

        try:
            llm = LLM(tmp, dtype="float32", device="cpu", num_kv_blocks=64, model_impl=model_impl)
        except CheckpointConversionError as exc:  # nothing to compare: not proven, and said so
            result.status = "skip"
            result.reason = (f"not measured: the generic (transformers) path cannot load the checkpoint transformers "
                             f"saves for this architecture ({exc})")
            result.duration_s = time.perf_counter() - t0
            return result
        except Exception as exc:  # noqa: BLE001 - a load failure is the verdict, named
            result.status = "fail"
            result.levels.append(LevelResult("load", "weights saved by HF", tmp, None, 0.0, False,
                                             f"{type(exc).__name__}: {exc}"))
            result.reason = f"dockyard could not load the reference checkpoint: {exc}"
            result.duration_s = time.perf_counter() - t0
            return result
        result.path = llm.spec.model_impl
        result.levels = compare_models(llm.model, hf_model, seq_len, decode_steps, seed=seed + 1)
        del llm
        if result.first_failure is None:  # a mutation check means something only where the intact model passes
            result.mutations = [_run_ablation(a, tmp, hf_model, seq_len, decode_steps, seed + 1, model_impl)
                                for a in ablations]
    first = result.first_failure
    result.status = "pass" if first is None else "fail"
    if first is not None:
        err = "crashed" if first.rel_err is None else f"rel err {first.rel_err:.2e} > {first.tolerance:.0e}"
        result.reason = f"first mismatch at {first.where}: {err}" + (f" ({first.detail})" if first.detail else "")
    else:
        worst = max(lv.rel_err or 0.0 for lv in result.levels)
        result.reason = f"{len(result.levels)} levels agree; worst rel err {worst:.2e}"
    result.duration_s = time.perf_counter() - t0
    return result
