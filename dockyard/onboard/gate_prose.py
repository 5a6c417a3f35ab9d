"""Each gate's section of report.md: what was checked, the numbers and the verdict, in sentences and tables.

report.json keeps every gate's evidence as data; a reviewer reads this instead. Each gate has a renderer that
reads the keys it knows; any other evidence (a gate that gained a field, or one this module has no renderer
for) still appears: plain values in a two-column table, nested ones named with a pointer to report.json. No
value is ever dumped as JSON here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

GiB = 1024**3


class _Read(dict):
    """Evidence that remembers which keys a renderer read, so the rest can be listed after it."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _bytes(n: Any) -> str:
    return f"{n / GiB:.2f} GiB ({n:,} bytes)" if isinstance(n, (int, float)) else "—"


def _num(v: Any) -> str:
    """One value in words: numbers with separators, floats to 3 significant digits, lists of plain values joined."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        if _is_plain(v):
            return ", ".join(_num(x) for x in v)
        return f"{len(v)} entries (in report.json)"
    if isinstance(v, dict):
        return f"{len(v)} fields (in report.json)"
    return str(v)


def _is_plain(v: Any) -> bool:
    """A value one table cell can hold: not a mapping, nor a list of anything but plain values."""
    if isinstance(v, dict):
        return False
    return not isinstance(v, (list, tuple)) or all(isinstance(x, (str, int, float)) for x in v)


def _by_dtype(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return ""
    return "; ".join(f"{k} {_bytes(v)}" for k, v in d.items())


def _inspect(ev: _Read) -> list[str]:
    out = []
    arch, model_type = ev.get("architecture"), ev.get("model_type")
    family = ev.get("family")
    out.append(f"The config names `{arch}` (model_type `{model_type}`): "
               + (f"registered in dockyard as family `{family}`." if ev.get("registered")
                  else "not registered in dockyard."))
    if ev.get("spec_error"):
        out.append(f"The config does not validate: {ev.get('spec_error')}.")
    near = ev.get("nearest_family") or {}
    if near:
        covered, missing = near.get("covered") or [], ev.get("missing_features") or []
        out.append(f"Nearest family by features: `{near.get('family')}` ({', '.join(near.get('architectures') or [])})"
                   f", covering {len(covered)} of the config's architectural features"
                   + (f"; missing: {', '.join(missing)}." if missing else "; none missing."))
    unknown = ev.get("unrecognised_keys")
    if unknown:
        out.append(f"**Unrecognised config keys** (no dockyard code reads them, so what they change is unknown, and "
                   f"they block a native-family verdict): {', '.join(f'`{k}`' for k in unknown)}.")
    elif unknown is not None:
        out.append("Every config key is read by the spec, detected as a feature, or known not to change the "
                   "computation: no unrecognised keys.")
    source = ev.get("source") or {}
    if source:
        out.append(f"Read from a {source.get('kind')} source: `{source.get('path')}`.")
    return [" ".join(out)]


def _fit(ev: _Read) -> list[str]:
    device, name = ev.get("device"), ev.get("device_name")
    rows = [("device", f"{name or device}: {_bytes(ev.get('device_bytes'))}, from "
                       f"{ev.get('device_bytes_source')}" + ("" if ev.get("device_present", True) else
                                                            " (a device of that size, not this machine's)")),
            ("run dtype", f"{ev.get('dtype')}; weights held as {ev.get('weight_format')}"),
            ("FP8 path", ev.get("fp8_path")),
            ("quantization", "{scheme}: {handling} ({why})".format(**ev.get("quantization"))
             if isinstance(ev.get("quantization"), dict) else ev.get("quantization")),
            ("parameters", _num(ev.get("num_parameters")) + (
                f" ({_num(ev.get('active_parameters'))} active per token)"
                if ev.get("active_parameters") not in (None, ev.get("num_parameters")) else "")),
            ("checkpoint", f"{_bytes(ev.get('checkpoint_bytes'))} from {ev.get('checkpoint_bytes_source')}; "
                           + _by_dtype(ev.get("checkpoint_bytes_by_dtype"))),
            ("weights in memory", f"{_bytes(ev.get('weight_bytes'))}; " + _by_dtype(ev.get("weight_bytes_by_dtype"))),
            ("KV cache per token", f"{_num(ev.get('kv_bytes_per_token'))} bytes")]
    kv_max, layers = ev.get("kv_bytes_at_config_max_len") or {}, ev.get("kv_layers") or {}
    if kv_max:
        rows.append(("KV at the config's max length", f"engine allocates {_bytes(kv_max.get('engine_allocates'))}, "
                                                      f"model needs {_bytes(kv_max.get('model_needs'))} "
                                                      f"({kv_max.get('note')})"))
    if layers.get("sliding"):
        rows.append(("sliding-window layers", f"{layers['sliding']} of {layers.get('total')} keep "
                                              f"{_num(layers.get('window'))} tokens"))
    rows += [("activation peak", _bytes(ev.get("activation_peak_bytes"))),
             ("overhead", _bytes(ev.get("overhead_bytes"))),
             (f"needed at {_num(ev.get('min_context_tokens'))} tokens of context", _bytes(ev.get("bytes_needed"))),
             ("margin", _bytes(ev.get("margin_bytes"))),
             ("KV tokens that fit", _num(ev.get("kv_tokens_that_fit")))]
    tp = ev.get("smallest_tensor_parallel_size")
    advice = ev.get("tensor_parallel_advice")
    if tp is not None or advice:
        rows.append(("tensor parallel", f"smallest size that fits: {_num(tp)}" + (f"; {advice}" if advice else "")))
    limits = ev.get("engine_limits") or {}
    verdict = "fits" if ev.get("fits") else "does **not** fit"
    head = (f"The memory plan (from the spec and what the checkpoint stores, no weights loaded) {verdict} on this "
            f"target" + (f", planned for the engine's limits of {_num(limits.get('max_num_batched_tokens'))} batched "
                         f"tokens and {_num(limits.get('max_num_seqs'))} sequences." if limits else "."))
    return [head, "", "| quantity | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]


def _equivalence(ev: _Read) -> list[str]:
    notes = ev.get("notes") or []
    out = [f"dockyard's model and HF transformers' model were built from one shrunken copy of the config "
           f"({'; '.join(notes) or 'no change needed'}), loaded with the same weights, and compared in "
           f"{ev.get('dtype')} on {_num(ev.get('seq_len'))} tokens then {_num(ev.get('decode_steps'))} decode steps "
           f"through the paged KV cache. Error: rmse(ours − HF) / rmse(HF) per level. Outcome: "
           f"{ev.get('reason') or ev.get('status')}."]
    levels = ev.get("levels") or []
    if levels:
        out += ["", "| level | block | module | rel. error | tolerance | passed |", "|---|---|---|---|---|---|"]
        out += [f"| {lv.get('level')} | {_cell(lv.get('block'))} | `{lv.get('module')}` | {_num(lv.get('rel_err'))} | "
                f"{_num(lv.get('tolerance'))} | {'yes' if lv.get('passed') else '**no**'} |" for lv in levels]
    first = ev.get("first_failure")
    if first:
        out += ["", f"First failing level: {first.get('where')} — error {_num(first.get('rel_err'))} against "
                    f"{_num(first.get('tolerance'))}" + (f" ({first.get('detail')})" if first.get("detail") else "")
                + "."]
    out += _mutations(ev.get("mutations") or [])
    return out


def _mutations(mutations: list[dict[str, Any]]) -> list[str]:
    """The mutation check: each covered feature ablated, the level that caught it and by how much."""
    if not mutations:
        return []
    caught = sum(1 for m in mutations if m.get("caught"))
    out = ["", f"Mutation check: each covered feature was broken on purpose and the comparison rerun; "
               f"{caught} of {len(mutations)} ablations fail it (a feature whose ablation passes is not proven).", "",
           "| feature | ablation | first failing level | error | error / tolerance |", "|---|---|---|---|---|"]
    for m in mutations:
        err, tol = m.get("rel_err"), m.get("tolerance")
        factor = f"×{err / tol:,.0f}" if isinstance(err, (int, float)) and tol else "—"
        where = m.get("caught_by") if m.get("caught") else "**not caught**: the gate passes the ablation"
        out.append(f"| `{m.get('feature')}` | {_cell(m.get('what'))} | {_cell(where)} | {_num(err)} | {factor} |")
    return out


def _dummy(ev: _Read) -> list[str]:
    engine, reductions = ev.get("engine") or {}, ev.get("reductions") or []
    shapes = ("at the model's true shapes" if ev.get("true_shapes") else
              f"with reductions ({'; '.join(reductions) or 'none listed'})")
    out = [f"The engine was started with random weights {shapes}: {_num(ev.get('layers'))} of "
           f"{_num(ev.get('total_layers'))} layers, {_num(ev.get('num_parameters_run'))} parameters in "
           f"{ev.get('dtype')}, needing {_bytes(ev.get('bytes_needed'))} against a budget of "
           f"{_bytes(ev.get('budget_bytes'))} ({ev.get('budget_source')}). Engine settings: "
           + ", ".join(f"{k} {_num(v)}" for k, v in engine.items())
           + (f"; up in {ev.get('load_seconds'):.1f} s." if isinstance(ev.get("load_seconds"), (int, float)) else ".")]
    first = ev.get("first_request") or {}
    if first:
        finite = "all finite" if first.get("logits_finite") else "**not all finite**"
        out.append(f"A first request ({_num(first.get('prompt_tokens'))} prompt tokens) produced "
                   f"{len(first.get('output_token_ids') or [])} tokens in {_num(first.get('seconds'))} s; logits "
                   f"{'×'.join(str(d) for d in first.get('logits_shape') or [])}, {finite} (min "
                   f"{_num(first.get('logits_min'))}, max {_num(first.get('logits_max'))}, std "
                   f"{_num(first.get('logits_std'))}). Its text (random weights): {first.get('output_text')!r}.")
    return [" ".join(out)]


def _real(ev: _Read) -> list[str]:
    if ev.get("error"):
        return [f"The real weights did not load: {ev.get('error')}"]
    ckpt = ev.get("checkpoint") or {}
    out = [f"The checkpoint (`{ckpt.get('path')}`, {ckpt.get('kind')}) loaded in {_num(ev.get('load_seconds'))} s "
           f"as {ev.get('dtype')}: {_num(ev.get('tensors_loaded'))} tensors ({_bytes(ev.get('bytes_loaded'))}) into "
           f"{_num(ev.get('parameters'))} parameters; missing: {_num(ev.get('missing'))}; unexpected: "
           f"{_num(ev.get('unexpected'))}; ignored: {_num(ev.get('ignored'))}."]
    if ev.get("method"):
        out.append(f"Method: {ev.get('method')}.")
    ref = ev.get("reference") or {}
    if ref:
        out.append(f"Reference: {ref.get('library')} in {ref.get('dtype')} ({ref.get('source')}), loaded in "
                   f"{_num(ref.get('load_seconds'))} s.")
    if ev.get("prefill_logits_rel_err") is not None:
        out.append(f"Prefill logits against the reference: relative error {_num(ev.get('prefill_logits_rel_err'))} "
                   f"(tolerance {_num(ev.get('prefill_logits_tolerance'))}).")
    gen = ev.get("generation") or {}
    if gen:
        out.append(f"Generation: {_num(gen.get('tokens'))} tokens in {_num(gen.get('seconds'))} s = "
                   f"{_num(gen.get('tokens_per_second'))} tokens/s ({gen.get('note')}).")
    lines = [" ".join(out)]
    prompts = ev.get("prompts") or []
    if prompts:
        lines += ["", "| prompt | prompt tokens | generated | agrees | text |", "|---|---|---|---|---|"]
        for p in prompts:
            if "equal" in p:
                agrees = "token for token" if p["equal"] else f"**no**, from token {p.get('first_divergence')}"
            else:
                agrees = ("coherent" if p.get("coherent") else "**not coherent**") + (
                    f" ({p['detail']})" if p.get("detail") else "")
            lines.append(f"| {_cell(p.get('prompt'))} | {_num(p.get('prompt_tokens'))} | {len(p.get('ours') or [])} | "
                         f"{_cell(agrees)} | {_cell(p.get('text', ''))} |")
    acc = ev.get("accuracy") or {}
    if acc:
        lines += ["", f"Accuracy: {acc.get('note')} (see the Accuracy section)."]
    return lines


def _features(ev: _Read) -> list[str]:
    matrix = ev.get("matrix") or []
    counts: dict[str, int] = {}
    for row in matrix:
        counts[row.get("status")] = counts.get(row.get("status"), 0) + 1
    return [f"Each feature was tried on this machine ({len(matrix)} in all: "
            + ", ".join(f"{n} {s}" for s, n in counts.items()) + "); the Feature matrix section below has each "
            "one's result and why."]


def _capacity(ev: _Read) -> list[str]:
    base = ev.get("baseline") or {}
    out = [f"KV cache at {ev.get('dtype')}: {_num(ev.get('kv_bytes_per_token'))} bytes per token, "
           f"{_num(ev.get('kv_tokens_that_fit'))} tokens fit in {_bytes(ev.get('device_bytes'))}; the config's "
           f"maximum length is {_num(ev.get('config_max_len'))} tokens and {_num(ev.get('practical_max_len'))} is "
           f"practical here."]
    if base:
        out.append(f"Baseline {_num(base.get('sequences_wanted'))} × {_num(base.get('context_len'))} tokens: "
                   + ("fits" if base.get("fits") else f"does not fit ({_num(base.get('sequences_fit'))} do)") + ".")
    return [" ".join(out) + " The Max length and capacity section below has the table."]


def _performance(ev: _Read) -> list[str]:
    if ev.get("error"):
        return [f"The speed runs did not complete: {ev.get('error')}"]
    bandwidth, rate = ev.get("copy_bytes_per_s"), ev.get("matmul_flops_per_s")
    out = [f"On {ev.get('device')} in {ev.get('dtype')} ({ev.get('path')} path, {ev.get('layers_run')}, dummy "
           f"weights), the engine decoded and prefilled while this run measured the device's ceilings: copy bandwidth "
           f"{bandwidth / 1e9:,.1f} GB/s and matmul rate {rate / 1e12:,.2f} TFLOP/s. A decode step's floor is the "
           f"bytes it reads (weights {_bytes(ev.get('weight_read_bytes'))}, plus the batch's K/V) over the "
           f"bandwidth; a prompt's floor is its model FLOPs over the matmul rate. CUDA graphs: "
           f"{_num(ev.get('cuda_graphs')) if ev.get('cuda_graphs') else 'none (decode ran eagerly)'}."]
    if ev.get("scaled_down"):
        out.append(f"This run was {ev.get('scaled_down_note')}.")
    lines = [" ".join(out), "", "| decode batch | tokens/s | ms per step | bytes per step | roofline tokens/s | "
             "fraction |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.get('batch')} | {_num(r.get('tokens_per_s'))} | {_num(r.get('ms_per_step'))} | "
              f"{_num(r.get('bytes_per_step'))} | {_num(r.get('roofline_tokens_per_s'))} | "
              f"{_num(r.get('fraction_of_roofline'))} |" for r in ev.get("decode") or []]
    lines += ["", "| prompt tokens | time to first token | model FLOPs | TFLOP/s | MFU |", "|---|---|---|---|---|"]
    lines += [f"| {_num(r.get('input_len'))} | {_num(1e3 * r['seconds'])} ms | {r.get('model_flops'):.3g} | "
              f"{_num(r.get('tflop_per_s'))} | {_num(r.get('mfu'))} |" for r in ev.get("ttft") or []]
    warnings = ev.get("warnings") or []
    lines += [""] + ([f"**Warning**: {w}." for w in warnings] if warnings else
                     [f"No figure was under {_num(ev.get('warn_below'))} of its roofline on a GPU"
                      + (" (warnings apply to GPU runs only)." if ev.get("scaled_down") else ".")
                      + f" What the engine reports about its hot path: {'; '.join(ev.get('likely_causes') or [])}."])
    return lines


def _serve_smoke(ev: _Read) -> list[str]:
    health, port = ev.get("health"), ev.get("port")
    out = [f"The deploy command `{ev.get('deploy_command')}` was started"
           + (f" (on port {port}: {ev.get('port_note')})" if ev.get("port_note") else "")
           + (f"; it reported ready after {ev.get('startup_seconds'):.1f} s" if isinstance(
              ev.get("startup_seconds"), (int, float)) else "")
           + (f", `/health` answered {health.get('status') if isinstance(health, dict) else health!r}"
              if health else "")
           + (f", serving model id `{ev.get('model_id')}`" if ev.get("model_id") else "") + "."]
    for kind in ("chat", "completion"):
        r = ev.get(kind) or {}
        if r:
            out.append(f"The {kind} request answered HTTP {r.get('status')}: {r.get('answer')!r}.")
    if ev.get("server_exit_code") is not None:
        out.append(f"The server exited with status {ev.get('server_exit_code')} when stopped; its log: "
                   f"`{ev.get('server_log')}`.")
    return [" ".join(out)]


# Evidence a section leaves out on purpose: shown in another section of report.md, restating what the section
# says, or bulky data (every parameter's shape, the shrunken config) a reader takes from report.json.
LEFT_OUT = {
    "inspect": {"features", "spec", "supported_architectures"},
    "fit": {"tensor_parallel_sizes", "tensor_parallel_rule", "fixed_bytes"},
    "equivalence": {"status", "shrunk_config", "tolerances", "model_type", "duration_s"},
    "dummy": {"parameter_shapes"},
    "capacity": {"rows", "engine_cpu_kv_budget"},
    "performance": {"scaled_down_note"},
    "serve-smoke": {"command", "deploy_port", "curl_note"},
}
RENDERERS: dict[str, Callable[[_Read], list[str]]] = {
    "inspect": _inspect, "fit": _fit, "equivalence": _equivalence, "dummy": _dummy, "real": _real,
    "features": _features, "capacity": _capacity, "performance": _performance, "serve-smoke": _serve_smoke,
}


def gate_body(gate: dict[str, Any]) -> list[str]:
    """The prose and tables of one gate's section (after its heading and summary), from its evidence."""
    evidence = _Read(gate.get("evidence") or {})
    if not evidence:
        return []
    renderer = RENDERERS.get(gate["name"])
    lines = renderer(evidence) if renderer is not None else []
    rest = [k for k in evidence if k not in evidence.read and k not in LEFT_OUT.get(gate["name"], ())]
    plain = [k for k in rest if _is_plain(evidence[k])]
    nested = [k for k in rest if k not in plain]
    if plain:
        lines += ["", "| also measured | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_num(evidence[k]))} |" for k in plain]
    if nested:
        lines += ["", "Also in report.json: " + ", ".join(f"`{k}`" for k in nested) + "."]
    return lines
