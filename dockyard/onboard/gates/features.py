"""Gate 6, features: each serving feature tried (or said why not), one row of the feature matrix each.

Statuses: ``supported`` (tried here and it worked), ``unsupported`` (the model needs it or the
checkpoint has it, and dockyard cannot do it yet, or it was tried and failed), ``not-applicable``
(the model has no use for it), ``checkpoint-missing`` (the checkpoint carries nothing for it),
``not-run`` (it could not be tried on this machine, e.g. it needs a GPU). Nothing is called
supported without a trial on this run.

The trials run the model's own architecture at toy sizes: the equivalence gate's shrunken config
(:func:`~dockyard.onboard.equivalence.shrink_config`, every architectural flag kept) with dummy
weights, its head counts picked so that two ranks meet the same case as the real model
(:func:`trial_config`). Each greedy-decodes ``TRIAL_TOKENS`` tokens from ``len(TRIAL_PROMPTS)``
prompts, so a trial takes seconds; a trial that fails is a row with the error, never a crash.

* CUDA graph (a GPU only): the engine as it starts, whether it captured decode graphs (else its
  ``eager_reason``), and the graph's greedy tokens against ``enforce_eager=True``.
* torch.compile: a 2-layer copy at true widths where memory allows, compiled vs eager logits; the
  fallback ladder compiled → eager → ``TORCHDYNAMO_DISABLE=1``, each rung recorded on the context.
* tensor parallel / expert parallel (MoE only): the real config checked by the engine's own
  ``check_parallel_config`` (its refusal, word for word, is the unsupported row), then the trial
  model at TP=2 (and TP=2 with experts placed across ranks) against one process: tokens must be
  identical. NCCL with 2+ GPUs, else gloo on the CPU.
* FP8: the trial model's decoder projections quantized to e4m3 with 128×128 block scales
  (``weights/fp8_quantize.py``), written as an FP8 checkpoint, loaded through ``LLM``; logits against
  the unquantized model within ``FP8_LOGITS_BOUND``, and which path ran (native FP8 matmul when a
  parameter stayed ``float8_e4m3fn``, else dequantized on load). An FP8 checkpoint adds what the
  real gate showed on its own weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dockyard.onboard.config_features import is_moe
from dockyard.onboard.context import GateContext, Outcome

logger = logging.getLogger(__name__)

COMPILE_TOLERANCE = 1e-4  # compiled vs eager logits, fp32: kernels may reassociate sums
COMPILE_TOKENS = 16
COMPILE_LAYERS = 2
PARALLEL_SIZE = 2  # ranks of the tensor- and expert-parallel trials
TRIAL_TOKENS = 8  # greedy tokens per prompt in the engine trials
TRIAL_PROMPTS = (7, 12)  # prompt lengths (seeded random ids)
TRIAL_ENGINE = {"max_num_seqs": 4, "max_num_batched_tokens": 256, "block_size": 16, "num_kv_blocks": 32}
TRIAL_MAX_LEN = 256
FP8_NOISE_FACTOR = 3.0  # FP8 logits may move this many times what FP8-sized weight noise moves them ...
FP8_MAX_BOUND = 0.5  # ... but never half as much as the logits themselves (a broken path gives ~1)


def _row(feature: str, status: str, why: str, **evidence: Any) -> dict[str, Any]:
    return {"feature": feature, "status": status, "why": why, "evidence": evidence}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _dummy_model(spec: Any, device: torch.device, seed: int) -> torch.nn.Module:
    """``spec`` built in float32 on ``device`` and filled with the engine's seeded dummy weights."""
    from dockyard.registry import build_model
    from dockyard.weights.dummy import iter_dummy
    from dockyard.weights.loader import load_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(device):
            model = build_model(spec).eval()
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, iter_dummy(model, seed))
    return model


@contextlib.contextmanager
def _dynamo_disabled() -> Iterator[None]:
    """TORCHDYNAMO_DISABLE=1 for the duration (the env var and the live config switch it controls)."""
    import torch._dynamo

    previous_env = os.environ.get("TORCHDYNAMO_DISABLE")
    previous_cfg = torch._dynamo.config.disable
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = previous_cfg
        if previous_env is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous_env


def _trial_model(ctx: GateContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A COMPILE_LAYERS-layer copy of the model with dummy weights (true widths when the dummy gate had them)."""
    from dockyard.model_source import spec_for_config
    from dockyard.onboard.gates.dummy import _text, choose_config, memory_budget

    budget, _ = memory_budget(ctx)
    layers = min(COMPILE_LAYERS, ctx.spec.num_hidden_layers)
    cfg, reductions, need = choose_config(ctx.raw.config, layers, budget, torch.float32, ctx.machine.device)
    if cfg is None:
        raise MemoryError(f"even a reduced copy needs {need} bytes, over the {budget}-byte budget")
    layers = int(_text(cfg)["num_hidden_layers"])
    model = _dummy_model(spec_for_config(cfg), torch.device(ctx.machine.device), ctx.options.seed)
    true_widths = not any(r.startswith(("vocab", "width")) for r in reductions)
    return model, {"layers": layers, "true_widths": true_widths, "reductions": reductions, "dtype": "float32",
                   "tokens": COMPILE_TOKENS, "path": "uncached prefill (the engine's paged path is not compiled)"}


def _compile_trial(ctx: GateContext) -> dict[str, Any]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from dockyard.onboard.equivalence import rel_rmse

    backend = ctx.options.compile_backend or "inductor"
    model, setup = _trial_model(ctx)
    device = next(model.parameters()).device
    ids = torch.arange(COMPILE_TOKENS, device=device) % model.spec.vocab_size
    positions = torch.arange(COMPILE_TOKENS, device=device)
    with torch.no_grad():
        eager = model.compute_logits(model(ids, positions))
    rungs: list[dict[str, Any]] = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    t0 = time.perf_counter()
    error = None
    try:
        with torch.no_grad():
            out = model.compute_logits(compiled(ids, positions))
        err = rel_rmse(out, eager)
        ok = err <= COMPILE_TOLERANCE
        detail = f"rel err vs eager {err:.1e} (tolerance {COMPILE_TOLERANCE:.0e})"
    except Exception as exc:  # noqa: BLE001 - a compiler failure is the finding
        logger.exception("torch.compile trial failed")
        ok, err, error = False, None, f"{type(exc).__name__}: {str(exc)[:500]}"
        detail = error
    seconds = time.perf_counter() - t0
    graph_breaks = dict(counters.get("graph_break", {}))
    graphs = int(counters.get("stats", {}).get("unique_graphs", 0))
    rungs.append({"mode": f"torch.compile(backend={backend!r})", "status": "pass" if ok else "fail",
                  "detail": detail, "seconds": seconds})
    evidence = {"backend": backend, **setup, "rel_err": err, "compile_and_run_seconds": seconds,
                "graphs": graphs, "graph_breaks": sum(graph_breaks.values()),
                "graph_break_reasons": [str(k)[:200] for k in list(graph_breaks)[:5]], "rungs": rungs}
    if ok:
        return _row("torch.compile", "supported",
                    f"model forward compiled with backend {backend!r} matches eager ({err:.1e}); {graphs} graphs, "
                    f"{sum(graph_breaks.values())} graph breaks; the engine itself runs eagerly (no compile option "
                    "yet)", **evidence)
    # Fallback ladder: eager, then the compiled callable with dynamo disabled.
    with torch.no_grad():
        again = model.compute_logits(model(ids, positions))
    rungs.append({"mode": "eager", "status": "pass" if torch.isfinite(again).all() else "fail",
                  "detail": "same model without compile"})
    try:
        with _dynamo_disabled(), torch.no_grad():
            out = model.compute_logits(compiled(ids, positions))
        err3 = rel_rmse(out, eager)
        rungs.append({"mode": "TORCHDYNAMO_DISABLE=1", "status": "pass" if err3 <= COMPILE_TOLERANCE else "fail",
                      "detail": f"rel err vs eager {err3:.1e}"})
    except Exception as exc:  # noqa: BLE001
        rungs.append({"mode": "TORCHDYNAMO_DISABLE=1", "status": "fail", "detail": f"{type(exc).__name__}: {exc}"})
    ctx.ladder.append({"gate": "features", "check": "torch.compile", "rungs": rungs,
                       "outcome": f"compiled mode failed ({detail}); "
                                  + ("eager works" if rungs[1]["status"] == "pass" else "eager fails too")})
    return _row("torch.compile", "unsupported", f"compile failed: {detail}; fell back to eager", **evidence)


# ---------------------------------------------------------------- the engine trials' model
def _positive_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def trial_config(raw_config: dict[str, Any], parallel_size: int = PARALLEL_SIZE) -> tuple[dict[str, Any], list[str]]:
    """The config.json the engine trials run, and notes on how it differs from ``raw_config``.

    It is the equivalence gate's shrunken copy (every architectural flag kept, toy sizes) with its
    ``architectures``, and with head counts re-picked (q/kv ratio kept) so that a split over
    ``parallel_size`` ranks meets the case the real model meets: KV heads divided among the ranks
    when the real model has at least as many KV heads as ranks, one KV head replicated on several
    ranks when it has fewer. (The real config's own divisibility is checked on the real config.)
    """
    from dockyard.onboard.equivalence import shrink_config
    from dockyard.spec import language_model_config

    cfg, notes = shrink_config(raw_config)
    real = language_model_config(raw_config)
    cfg["architectures"] = real.get("architectures") or raw_config.get("architectures")
    heads = _positive_int(real.get("num_attention_heads"))
    kv = _positive_int(real.get("num_key_value_heads")) or heads
    if heads and kv and not cfg.get("kv_lora_rank"):  # MLA has no KV heads to split (nor TP yet)
        ratio = max(1, heads // kv)
        new_kv = parallel_size if kv >= parallel_size else kv
        new_heads = new_kv * ratio
        old_heads, old_kv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
        if (new_heads, new_kv) != (old_heads, old_kv):
            hidden = int(cfg["hidden_size"])
            head_dim = int(cfg.get("head_dim") or hidden // old_heads)
            if hidden == old_heads * head_dim:  # q width equals hidden, as in the real config: keep it so
                cfg["hidden_size"] = new_heads * head_dim
            elif hidden == new_heads * head_dim:  # and unequal when the real config has them unequal
                cfg["hidden_size"] = hidden + 32
            cfg["num_attention_heads"], cfg["num_key_value_heads"] = new_heads, new_kv
            case = (f"{new_kv} KV head{'s' if new_kv > 1 else ''} replicated over {parallel_size} ranks"
                    if new_kv < parallel_size else f"KV heads split over {parallel_size} ranks")
            notes.append(f"heads {old_heads}/{old_kv} → {new_heads}/{new_kv} for the parallel trials ({case}, "
                         f"as the real {heads}/{kv} would be)")
    return cfg, notes


@contextlib.contextmanager
def _worker_output_to_log() -> Iterator[None]:
    """Point file descriptors 1 and 2 at the gate's log while worker processes start, so that what they
    print lands in the log (the runner redirects only Python's sys.stdout/sys.stderr to it, and spawned
    processes inherit the descriptors, not those objects)."""
    try:
        target = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not backed by a file: nothing to point at
        target = None
    if target is None or target in (1, 2):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def _rank0_threads(ranks: int) -> Iterator[None]:
    """This process's share of the cores while ``ranks`` processes compute (the engine gives each worker
    ``threads // ranks``; all of them at once on the same cores make every small matmul crawl)."""
    saved = torch.get_num_threads()
    if ranks > 1:
        torch.set_num_threads(max(1, saved // ranks))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _first_difference(reference: list[list[int]], tokens: list[list[int]], ref_label: str,
                      label: str) -> str | None:
    """None when every prompt decoded the same tokens, else where they first differ, in words."""
    for p, (ref, got) in enumerate(zip(reference, tokens, strict=True)):
        if ref != got:
            i = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            a = ref[i] if i < len(ref) else "nothing"
            b = got[i] if i < len(got) else "nothing"
            return f"prompt {p}, token {i}: {a} {ref_label}, {b} {label}"
    return None


class _Trials:
    """The model the engine trials share (:func:`trial_config`, dummy weights, as a config.json in a
    temporary folder), their prompts, and the single-process greedy tokens each parallel trial is
    compared with (decoded once per device)."""

    def __init__(self, ctx: GateContext, workdir: Path) -> None:
        from dockyard.model_source import spec_for_config

        self.config, self.notes = trial_config(ctx.raw.config)
        self.spec = spec_for_config(self.config)
        self.workdir = workdir
        (workdir / "model").mkdir()
        self.path = workdir / "model" / "config.json"
        self.path.write_text(json.dumps(self.config))
        self.seed = ctx.options.seed
        rng = random.Random(self.seed)
        self.prompts = [[rng.randrange(self.spec.vocab_size) for _ in range(n)] for n in TRIAL_PROMPTS]
        self.max_len = min(TRIAL_MAX_LEN, self.spec.max_model_len)
        self._references: dict[tuple[str, torch.dtype], dict[str, Any]] = {}

    def setup(self) -> dict[str, Any]:
        """What each trial row records about the model that ran."""
        s = self.spec
        return {"trial_model": {"layers": s.num_hidden_layers, "hidden_size": s.hidden_size,
                                "heads": s.num_attention_heads, "kv_heads": s.num_key_value_heads,
                                "experts": s.moe.num_experts if s.moe is not None else None,
                                "vocab_size": s.vocab_size, "weights": f"dummy (seed {self.seed})",
                                "shrunk": self.notes},
                "prompts": self.prompts, "max_tokens": TRIAL_TOKENS}

    def greedy(self, device: str, dtype: torch.dtype, observe: Callable[[Any], dict[str, Any]] | None = None,
               **engine: Any) -> dict[str, Any]:
        """Start ``LLM`` on the trial model (``engine``: extra LLM arguments), greedy-decode the prompts,
        let ``observe(llm)`` add what it reads off the engine, shut it down."""
        from dockyard import LLM, SamplingParams

        ranks = int(engine.get("tensor_parallel_size", 1))
        t0 = time.perf_counter()
        with _worker_output_to_log() if ranks > 1 else contextlib.nullcontext():
            llm = LLM(str(self.path), load_format="dummy", dtype=dtype, device=device, seed=self.seed,
                      max_model_len=self.max_len, **TRIAL_ENGINE, **engine)
            try:
                started = time.perf_counter()
                params = SamplingParams(max_tokens=TRIAL_TOKENS, temperature=0.0, ignore_eos=True)
                with _rank0_threads(ranks if device == "cpu" else 1):
                    outputs = llm.generate(self.prompts, params, use_tqdm=False)
                decoded = time.perf_counter()
                seen = observe(llm) if observe is not None else {}
            finally:
                llm.shutdown()
        return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "start_seconds": started - t0,
                "decode_seconds": decoded - started, **seen}

    def reference(self, device: str, dtype: torch.dtype) -> dict[str, Any]:
        """The single-process greedy run on ``device`` (made once)."""
        key = (device, dtype)
        if key not in self._references:
            self._references[key] = self.greedy(device, dtype)
        return self._references[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- CUDA graphs
def _cuda_graph_row(ctx: GateContext, trials: _Trials | None, setup_error: str | None) -> dict[str, Any]:
    """Does the engine capture this model's decode steps, and do the graphs decode as eager does?"""
    feature = "CUDA graph"
    if ctx.machine.device != "cuda":
        return _row(feature, "not-run", "needs a GPU: the engine captures decode steps only on CUDA; whether this "
                                        "model can be captured (engine/cuda_graphs.why_not_capturable) is decided "
                                        "against a CUDA KV cache and the Triton decode kernel, so it was not "
                                        "evaluated here")
    if trials is None:
        return _row(feature, "not-run", f"trial could not be set up: {setup_error}")
    dtype = ctx.dtype or torch.float32
    evidence: dict[str, Any] = {"device": "cuda", "dtype": _dtype_name(dtype), **trials.setup()}

    def observe(llm: Any) -> dict[str, Any]:
        runner = llm.engine.runner
        graphs = getattr(runner, "graphs", None)
        return {"captured": graphs is not None, "eager_reason": getattr(runner, "eager_reason", None),
                "batch_sizes": sorted(getattr(graphs, "graphs", None) or [])}

    def fall_back(detail: str, eager: str, eager_ok: bool, outcome: str) -> None:
        ctx.ladder.append({"gate": "features", "check": "CUDA graph", "outcome": outcome, "rungs": [
            {"mode": "CUDA graphs", "status": "fail", "detail": detail},
            {"mode": "enforce_eager=True", "status": "pass" if eager_ok else "fail", "detail": eager}]})

    logger.info("CUDA graph trial: engine start (%s), %d prompts × %d tokens", _dtype_name(dtype),
                len(trials.prompts), TRIAL_TOKENS)
    try:
        graphed = trials.greedy("cuda", dtype, observe=observe)
    except Exception as exc:  # noqa: BLE001 - a capture failure is the finding
        logger.exception("CUDA graph trial failed")
        try:
            trials.greedy("cuda", dtype, enforce_eager=True)
            eager_ok, eager_detail = True, "the engine started and decoded with enforce_eager=True"
        except Exception as eager_exc:  # noqa: BLE001
            eager_ok, eager_detail = False, f"fails too: {_error(eager_exc)}"
        fall_back(_error(exc), eager_detail, eager_ok, f"graph mode failed ({_error(exc)}); "
                  + ("eager works" if eager_ok else "eager fails too"))
        return _row(feature, "unsupported", f"the engine failed to start or decode with CUDA graphs: {_error(exc)}",
                    error=_error(exc), **evidence)
    evidence["graphs"] = graphed
    if not graphed["captured"]:
        reason = graphed["eager_reason"] or "no reason given"
        fall_back(f"not captured: {reason}", "the same engine decoded eagerly", True,
                  f"decode steps run eagerly: {reason}")
        return _row(feature, "unsupported", f"the engine does not capture this model's decode steps, it runs them "
                                            f"eagerly: {reason}", **evidence)
    try:
        eager = trials.greedy("cuda", dtype, enforce_eager=True)
    except Exception as exc:  # noqa: BLE001
        logger.exception("eager run of the CUDA graph trial failed")
        return _row(feature, "unsupported", f"graphs captured, but the eager run to compare with failed: "
                                            f"{_error(exc)}", error=_error(exc), **evidence)
    diff = _first_difference(eager["tokens"], graphed["tokens"], "eager", "with graphs")
    evidence.update(eager=eager, tokens_equal=diff is None)
    what = f"{len(trials.prompts)} prompts × {TRIAL_TOKENS} greedy tokens"
    if diff is None:
        return _row(feature, "supported", f"decode graphs captured (batch sizes {graphed['batch_sizes']}); {what} "
                                          f"identical to enforce_eager=True ({_dtype_name(dtype)}, shrunken model, "
                                          "dummy weights)", **evidence)
    fall_back(f"tokens differ from eager: {diff}", "reference tokens", True, f"graphs decode differently: {diff}")
    return _row(feature, "unsupported", f"decode graphs captured, but they decode differently from "
                                        f"enforce_eager=True: {diff}", **evidence)


# ---------------------------------------------------------------- tensor / expert parallel
def _parallel_row(ctx: GateContext, trials: _Trials | None, setup_error: str | None,
                  expert_parallel: bool) -> dict[str, Any]:
    """The real config through the engine's split check, then the trial model over PARALLEL_SIZE ranks
    against one process."""
    from dockyard.distributed.sharding import check_parallel_config
    from dockyard.errors import ConfigError

    n = PARALLEL_SIZE
    feature = "expert parallel" if expert_parallel else "tensor parallel"
    mode = f"EP={n}" if expert_parallel else f"TP={n}"
    try:
        check_parallel_config(ctx.spec, n, expert_parallel)
    except ConfigError as exc:
        return _row(feature, "unsupported", f"the engine cannot split this model over {n} ranks: {exc}", size=n,
                    error=str(exc))
    if trials is None:
        return _row(feature, "not-run", f"trial could not be set up: {setup_error}", size=n)
    on_gpus = ctx.machine.device == "cuda" and ctx.machine.num_gpus >= n
    device, backend = ("cuda", "nccl") if on_gpus else ("cpu", "gloo")
    evidence: dict[str, Any] = {"size": n, "expert_parallel": expert_parallel, "device": device,
                                "backend": backend, "dtype": "float32", **trials.setup()}
    if ctx.machine.device == "cuda" and not on_gpus:
        evidence["note"] = f"{ctx.machine.num_gpus} GPU(s) here: the ranks ran on the CPU over gloo"
    if device == "cuda":
        evidence["note"] = "tensor-parallel steps run eagerly (no CUDA graphs under TP yet)"
    try:
        check_parallel_config(trials.spec, n, expert_parallel)  # the trial model splits as the real one does
        reference = trials.reference(device, torch.float32)
    except Exception as exc:  # noqa: BLE001 - no baseline: nothing was tried
        logger.exception("%s trial could not be set up", feature)
        return _row(feature, "not-run", f"trial could not be set up: {_error(exc)}", error=_error(exc), **evidence)
    evidence["one_process"] = reference
    logger.info("%s trial: %s over %s on %s, %d prompts × %d tokens", feature, mode, backend, device,
                len(trials.prompts), TRIAL_TOKENS)
    try:
        run = trials.greedy(device, torch.float32, tensor_parallel_size=n, enable_expert_parallel=expert_parallel)
    except ConfigError as exc:  # refused while cutting the model (e.g. fused projections): its words
        logger.info("%s refused: %s", mode, exc)
        return _row(feature, "unsupported", f"the engine cannot split this model over {n} ranks: {exc}",
                    error=str(exc), **evidence)
    except Exception as exc:  # noqa: BLE001 - a failing split is the finding
        logger.exception("%s trial failed", feature)
        return _row(feature, "unsupported", f"{mode} over {backend} failed: {_error(exc)}", error=_error(exc),
                    **evidence)
    diff = _first_difference(reference["tokens"], run["tokens"], "in one process", f"at {mode}")
    seconds = run["start_seconds"] + run["decode_seconds"]
    evidence.update({"parallel": run, "tokens_equal": diff is None, "seconds": seconds})
    where = f"{mode} over {backend} ({device})"
    if diff is None:
        return _row(feature, "supported", f"{where}: {len(trials.prompts)} prompts × {TRIAL_TOKENS} greedy tokens "
                                          f"identical to one process, {seconds:.1f}s with start-up (shrunken "
                                          "model, dummy weights)", **evidence)
    return _row(feature, "unsupported", f"{where} decodes differently from one process: {diff}", **evidence)


# ---------------------------------------------------------------- FP8
def _quantizable(name: str, tensor: torch.Tensor) -> bool:
    """What FP8 checkpoints quantize: the decoder's projections (embeddings, norms, routers and LM head stay)."""
    return tensor.dim() == 2 and name.startswith("model.layers.") and name.endswith("_proj.weight")


def _prefill_logits(model: torch.nn.Module, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
    """Float32 logits of each prompt's uncached prefill, concatenated, on the CPU."""
    with torch.no_grad():
        return torch.cat([model.compute_logits(model(torch.tensor(ids, device=device),
                                                     torch.arange(len(ids), device=device))).float().cpu()
                          for ids in prompts])


def _rounding_rms(weight: torch.Tensor) -> float:
    """Root mean square of what rounding ``weight`` to e4m3 changes (one scale for the whole tensor, in
    float64): the size of FP8's error, worked out apart from the quantizer the trial checks."""
    from dockyard.weights.fp8_quantize import E4M3_MAX

    w = weight.detach().double()
    scale = w.abs().max().clamp(min=1e-12) / E4M3_MAX
    rounded = (w / scale).float().to(torch.float8_e4m3fn).double() * scale
    return float((rounded - w).pow(2).mean().sqrt())


def _fp8_trial(ctx: GateContext, trials: _Trials) -> dict[str, Any]:
    """Quantize the trial model to an FP8 checkpoint, load it through ``LLM``, compare its logits with the
    unquantized model's. Raises when the checkpoint cannot be made; a failed load or forward is
    returned as ``error`` in the evidence.

    The bound: FP8_LOGITS_BOUND (tests/weights/test_fp8.py, a 2-layer Llama) where this model is as
    tolerant, else FP8_NOISE_FACTOR times what a control gives, capped at FP8_MAX_BOUND. The control is
    the unquantized model with Gaussian noise of each weight's e4m3 rounding-error rms added (computed
    apart from the quantizer, so a broken quantizer does not widen the bound): how much
    this architecture's logits move under weight noise of FP8's size (depth, experts whose routing
    flips and attention all amplify it). A broken FP8 path (a lost or misapplied scale, a wrong
    kernel) moves them by about their own size, a ratio near 1.
    """
    from safetensors.torch import save_file

    from dockyard import LLM
    from dockyard.onboard.equivalence import rel_rmse
    from dockyard.weights.fp8_quantize import (
        FP8_BLOCK,
        FP8_LOGITS_BOUND,
        fp8_quantization_config,
        quantize_fp8_blocks,
    )

    device = ctx.machine.device
    dtype = ctx.dtype if device == "cuda" and ctx.dtype is not None else torch.float32
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    reference = _dummy_model(trials.spec, cpu, trials.seed)
    control = _dummy_model(trials.spec, cpu, trials.seed)
    noisy = dict(control.named_parameters())
    generator = torch.Generator().manual_seed(trials.seed)
    tensors: dict[str, torch.Tensor] = {}
    quantized = 0
    for name, param in reference.named_parameters():
        weight = param.detach().contiguous()
        if _quantizable(name, weight):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(weight, FP8_BLOCK)
            rms = _rounding_rms(weight)
            with torch.no_grad():
                noisy[name].add_(torch.randn(weight.shape, generator=generator) * rms)
            quantized += 1
        else:
            tensors[name] = weight
    if not quantized:
        raise ValueError("the model has no decoder projection (model.layers.*_proj.weight) to quantize")
    folder = trials.workdir / "fp8"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**trials.config,
                                                    "quantization_config": fp8_quantization_config(FP8_BLOCK)}))
    save_file(tensors, str(folder / "model.safetensors"))
    expected = _prefill_logits(reference, trials.prompts, cpu)
    noise_ratio = rel_rmse(_prefill_logits(control, trials.prompts, cpu), expected)
    bound = min(FP8_MAX_BOUND, max(FP8_LOGITS_BOUND, FP8_NOISE_FACTOR * noise_ratio))
    evidence: dict[str, Any] = {"device": device, "dtype": _dtype_name(dtype), "format": "e4m3 (float8_e4m3fn)",
                                "weight_block_size": list(FP8_BLOCK), "scale_name": "weight_scale_inv",
                                "quantized_weights": quantized,
                                "reference": "the same dummy weights unquantized, float32 on the CPU",
                                "noise_control_ratio": noise_ratio, "bound": bound,
                                "bound_rule": f"max({FP8_LOGITS_BOUND}, {FP8_NOISE_FACTOR} × noise control), "
                                              f"at most {FP8_MAX_BOUND}",
                                **trials.setup()}
    logger.info("FP8 trial: %d projections quantized (e4m3, %s blocks), loading at %s on %s; noise control %.3f, "
                "bound %.3f", quantized, "x".join(map(str, FP8_BLOCK)), _dtype_name(dtype), device, noise_ratio,
                bound)
    try:
        llm = LLM(str(folder), dtype=dtype, device=device, seed=trials.seed, max_model_len=trials.max_len,
                  **TRIAL_ENGINE)
        try:
            held = [t for t in (*llm.model.parameters(), *llm.model.buffers()) if t.dtype == torch.float8_e4m3fn]
            logits = _prefill_logits(llm.model, trials.prompts, llm.device)
        finally:
            llm.shutdown()
    except Exception as exc:  # noqa: BLE001 - an FP8 load or forward failure is the finding
        logger.exception("FP8 trial failed")
        evidence.update(error=_error(exc), seconds=time.perf_counter() - t0)
        return evidence
    ratio = rel_rmse(logits, expected)
    evidence.update(path="native FP8 matmul" if held else "dequantized on load", fp8_tensors_in_memory=len(held),
                    rmse_ratio=ratio, passed=bool(0 < ratio < bound), seconds=time.perf_counter() - t0)
    return evidence


def _fp8_checkpoint(ctx: GateContext) -> tuple[str, dict[str, Any]] | None:
    """What this run showed about the onboarded checkpoint's own FP8 weights (None: it is not FP8)."""
    if not any(f.key == "quantized:fp8" for f in ctx.features):
        return None
    fp8 = getattr(ctx.source, "fp8", None)
    evidence: dict[str, Any] = {"weight_block_size": list(fp8.block) if fp8 is not None and fp8.block else None,
                                "loaded_and_checked": False}
    if fp8 is None or not ctx.source.has_real_weights:
        return ("this FP8 checkpoint's own weights were not loaded on this run (dummy weights)", evidence)
    if ctx.real.get("passed"):
        evidence["loaded_and_checked"] = True
        return ("the real gate loaded this FP8 checkpoint (every weight paired with its scale) and checked its "
                "output", evidence)
    return "the real gate did not load and check this FP8 checkpoint on this run (see its row)", evidence


def _fp8_row(ctx: GateContext, trials: _Trials | None, setup_error: str | None) -> dict[str, Any]:
    """The FP8 trial on the trial model, plus the real gate's word on an FP8 checkpoint."""
    checkpoint = _fp8_checkpoint(ctx)
    trial: dict[str, Any] | None = None
    if trials is None:
        trial_note = f"FP8 trial could not be set up: {setup_error}"
    else:
        try:
            trial = _fp8_trial(ctx, trials)
        except Exception as exc:  # noqa: BLE001 - the checkpoint could not even be made: say so
            logger.exception("FP8 trial could not be set up")
            trial_note = f"FP8 trial could not be set up: {_error(exc)}"
    if trial is not None and "error" in trial:
        trial_note = f"FP8 trial: the quantized checkpoint failed to load or run: {trial['error']}"
    elif trial is not None:
        block = "x".join(map(str, trial["weight_block_size"]))
        verdict = "<" if trial["passed"] else "NOT <"
        trial_note = (f"FP8 trial ({trial['path']}, {trial['dtype']}): the shrunken model's "
                      f"{trial['quantized_weights']} projections quantized to e4m3 with {block} block scales; "
                      f"logits vs the unquantized model's: rmse ratio {trial['rmse_ratio']:.3f} {verdict} bound "
                      f"{trial['bound']:.3f} ({trial['bound_rule']}; noise control "
                      f"{trial['noise_control_ratio']:.3f})")
    checkpoint_ok = checkpoint is not None and checkpoint[1]["loaded_and_checked"]
    if (trial is not None and trial.get("passed")) or checkpoint_ok:
        status = "supported"
    else:
        status = "unsupported" if trial is not None else "not-run"
    checkpoint_note = checkpoint[0] if checkpoint is not None else "the checkpoint itself is not FP8"
    return _row("FP8", status, f"{trial_note}; {checkpoint_note}", trial=trial,
                checkpoint=checkpoint[1] if checkpoint is not None else None)


def _guarded(feature: str, trial: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``trial()``'s row; a trial that raises (a bug in the trial itself) still gives a row, saying so."""
    try:
        return trial()
    except Exception as exc:  # noqa: BLE001 - the gate reports every row, whatever one trial does
        logger.exception("%s trial crashed", feature)
        return _row(feature, "not-run", f"the trial itself crashed: {_error(exc)}", error=_error(exc))


def run(ctx: GateContext) -> Outcome:
    if ctx.spec is None:
        return Outcome("skip", "no validated spec (inspect did not pass)", hard=False)
    keys = {f.key for f in ctx.features}
    with tempfile.TemporaryDirectory(prefix="dockyard-features-") as tmp:
        trials, setup_error = None, None
        try:
            trials = _Trials(ctx, Path(tmp))
            for note in trials.notes:
                logger.info("trial model: %s", note)
        except Exception as exc:  # noqa: BLE001 - every trial row then says why it did not run
            logger.exception("the trial model could not be set up")
            setup_error = _error(exc)
        rows = [_guarded("CUDA graph", lambda: _cuda_graph_row(ctx, trials, setup_error))]
        try:
            rows.append(_compile_trial(ctx))
        except Exception as exc:  # noqa: BLE001 - the trial could not even be set up: say so, do not crash
            logger.exception("torch.compile trial could not be set up")
            rows.append(_row("torch.compile", "not-run", f"trial could not be set up: {type(exc).__name__}: {exc}"))
        rows.append(_guarded("tensor parallel", lambda: _parallel_row(ctx, trials, setup_error, False)))
        if is_moe(ctx.features):
            rows.append(_guarded("expert parallel", lambda: _parallel_row(ctx, trials, setup_error, True)))
        else:
            rows.append(_row("expert parallel", "not-applicable", "dense model: the config has no experts"))
        rows.append(_guarded("FP8", lambda: _fp8_row(ctx, trials, setup_error)))
    quant = sorted(k.split(":", 1)[1] for k in keys if k.startswith("quantized:"))
    for method in (m for m in quant if m != "fp8"):
        rows.append(_row(f"quantization ({method})", "unsupported", f"quant_method {method!r} is not implemented"))
    if ctx.source is not None and ctx.source.kind == "gguf":
        real_ok = bool(ctx.real.get("passed"))
        rows.append(_row("GGUF dequantization", "supported" if real_ok else "not-run",
                         "the real gate loaded this GGUF (dequantized on load) and checked its output" if real_ok
                         else "the real gate did not pass on this GGUF"))
    if "mtp" in keys:
        rows.append(_row("MTP", "unsupported", "the checkpoint has MTP layers (num_nextn_predict_layers > 0); "
                                               "dockyard has no speculative decoding yet"))
    else:
        rows.append(_row("MTP", "checkpoint-missing", "no MTP / speculative-decoding heads in the checkpoint "
                                                      "(num_nextn_predict_layers absent or 0)"))
    if "multimodal" in keys:
        rows.append(_row("multimodal", "unsupported", "the config has a vision tower; dockyard serves text only"))
    else:
        rows.append(_row("multimodal", "not-applicable", "text-only model (no vision_config)"))
    ctx.feature_matrix = rows
    for row in rows:
        logger.info("%-22s %-18s %s", row["feature"], row["status"], row["why"])
    summary = "; ".join(f"{r['feature']}: {r['status']}" for r in rows)
    return Outcome("pass", summary, {"matrix": rows}, hard=False)
