"""The onboarding artifacts: report.json (the source of truth) and, rendered from it, report.md,
accuracy.yaml and tutorial.md.

Everything written here comes from what the gates measured on this run; where a gate did not run,
the artifacts say so instead of filling in numbers.

The verdict has three levels for a finished run (``context.EXIT_CODES`` gives each its exit status):
PASS (every gate ran and passed), PASS-PARTIAL (nothing failed, but named gates were skipped or named
parts of the model, such as a vision tower, are not run by dockyard), FAIL (a gate failed). A report
written while the run was still going says INCOMPLETE and names the gate it was in.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from dockyard import __version__
from dockyard.onboard.accuracy import not_evaluated
from dockyard.onboard.context import EXIT_CODES, GateContext, GateResult, jsonable, source_flags
from dockyard.onboard.gate_prose import gate_body
from dockyard.server.cli import DEFAULT_PORT

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
SCHEMA_VERSION = 4
GiB = 1024**3


def load_schema() -> dict[str, Any]:
    """The JSON schema report.json follows."""
    return json.loads(SCHEMA_PATH.read_text())


# ---------------------------------------------------------------- report.json
def _fallback_ladder(ctx: GateContext) -> dict[str, Any]:
    if ctx.ladder:
        return {"needed": True, "note": "a check failed in compiled/graph mode; each rung tried is listed",
                "entries": ctx.ladder}
    if ctx.machine.device == "cpu":
        note = ("not needed: on CPU there is no CUDA-graph mode, and no gate failed in compiled mode "
                "(the torch.compile trial passed, or did not run)")
    else:
        note = "not needed: no gate failed in graph/compiled mode"
    return {"needed": False, "note": note, "entries": []}


def _proof(ctx: GateContext, gates: dict[str, GateResult]) -> dict[str, list[str]]:
    dummy, real = gates.get("dummy"), gates.get("real")
    proved_dummy: list[str] = []
    if dummy is not None and dummy.status == "pass":
        ev = dummy.evidence
        shapes = "the model's true shapes" if ev.get("true_shapes") else "REDUCED shapes (see reductions)"
        proved_dummy += [
            f"the model class builds at {shapes}: {ev.get('layers')} of {ev.get('total_layers')} layers, "
            f"{ev.get('num_parameters_run', 0):,} parameters" + (f"; reductions: {'; '.join(ev['reductions'])}"
                                                                  if ev.get("reductions") else ""),
            "the strict loader fills every parameter (dummy tensors carry the model's own names and shapes)",
            f"the engine allocates its paged KV cache and runs a first request end to end (scheduler, runner, "
            f"sampler): {len(ev.get('first_request', {}).get('output_token_ids', []))} tokens, finite logits",
        ]
    else:
        if dummy is not None and dummy.status in ("pending", "running"):
            proved_dummy.append("nothing yet: the dummy gate has not finished")
        else:
            proved_dummy.append("nothing: the dummy gate did not pass" if dummy else
                                "nothing: the dummy gate did not run")
    proved_real: list[str] = []
    if real is not None and real.status == "pass":
        ev = real.evidence
        proved_real += [
            f"the checkpoint maps onto the model: {ev.get('tensors_loaded')} tensors loaded, none missing, none "
            f"unexpected ({len(ev.get('ignored') or [])} ignored buffers)",
            f"the output is right on the real weights: {ev.get('method')}",
            "the tokenizer (and chat template, where the model has one) works end to end",
        ]
        if ev.get("prefill_logits_rel_err") is not None:
            proved_real.append(f"prefill logits vs HF: rel err {ev['prefill_logits_rel_err']:.1e}")
    else:
        why = real.summary if real is not None else "the real gate did not run"
        proved_real.append(f"not proven on this run ({why}): checkpoint name/shape mapping, numerical agreement on "
                           "the real weights, tokenizer and chat template")
    return {"dummy": proved_dummy, "real": proved_real}


def _accuracy(ctx: GateContext, gates: dict[str, GateResult]) -> dict[str, Any]:
    """The accuracy run the real gate made, or why none was made."""
    if ctx.accuracy is not None:
        return ctx.accuracy
    real = gates.get("real")
    if real is None:
        why = "the real gate did not run"
    elif real.status == "skip":
        why = f"accuracy is measured on verified real weights, and the real gate did not run ({real.summary})"
    elif real.status == "fail":
        why = "accuracy is measured on verified real weights, and the real gate failed"
    else:
        why = "the model has no tokenizer, and the evaluation tasks are text"
    return not_evaluated(why)


def verdict(ctx: GateContext, results: list[GateResult]) -> dict[str, Any]:
    """The overall verdict of ``results``: its level, the exit status and what was not proven."""
    running = [r.name for r in results if r.status in ("running", "pending")]
    not_proven = [f"gate {r.name}: {r.summary}" for r in results if r.status == "skip"]
    if any(f.key == "multimodal" for f in ctx.features):
        not_proven.append("model part: the vision/audio tower (dockyard runs the language model only)")
    inspect = next((r for r in results if r.name == "inspect"), None)
    unknown = inspect.evidence.get("unrecognised_keys") if inspect is not None else None
    if unknown:  # the generic path ran it: equal to transformers' class, which may not read them either
        not_proven.append("config keys no dockyard family reads (compared only as transformers' class reads "
                          "them): " + ", ".join(unknown))
    if running:
        current = next((r.name for r in results if r.status == "running"), None)
        return {"state": "running", "verdict": "INCOMPLETE", "exit_code": None, "current_gate": current,
                "not_proven": not_proven}
    if any(r.status == "fail" for r in results):
        level = "FAIL"
    else:
        level = "PASS-PARTIAL" if not_proven else "PASS"
    return {"state": "finished", "verdict": level, "exit_code": EXIT_CODES[level], "current_gate": None,
            "not_proven": not_proven}


def build_report(ctx: GateContext, results: list[GateResult], started: float) -> dict[str, Any]:
    """report.json's content (also while the run is going: gates not reached are "pending")."""
    gates = {r.name: r for r in results}
    inspect = gates.get("inspect")
    spec = ctx.spec
    counts = {s: sum(1 for r in results if r.status == s) for s in ("pass", "fail", "skip")}
    arch_ev = inspect.evidence if inspect is not None else {}
    return jsonable({
        "schema_version": SCHEMA_VERSION,
        "dockyard_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 3),
        "options": ctx.options.to_dict(),
        "model": {
            "name": ctx.model_name,
            "argument": ctx.options.model,
            "path": str(ctx.raw.path) if ctx.raw is not None else None,
            "source_kind": ctx.source.kind if ctx.source is not None else (ctx.raw.kind if ctx.raw else None),
        },
        # The implementation that ran: "dockyard" (a native family) or "transformers" (the generic path), and why.
        "path": arch_ev.get("path") or {"impl": None, "reason": None},
        "machine": {**ctx.machine.to_dict(), "hardware": ctx.machine.hardware_line},
        "architecture": {
            "architecture": arch_ev.get("architecture"),
            "model_type": arch_ev.get("model_type"),
            "registered": bool(arch_ev.get("registered")),
            "family": arch_ev.get("family"),
            "nearest_family": arch_ev.get("nearest_family"),
            "features": arch_ev.get("features", []),
            "missing_features": arch_ev.get("missing_features", []),
            "unrecognised_keys": arch_ev.get("unrecognised_keys", []),
            "spec": spec.to_dict() if spec is not None else None,
            "num_parameters": ctx.plan.num_parameters if ctx.plan is not None else None,
            "active_parameters": ctx.plan.active_parameters if ctx.plan is not None else None,
        },
        "gates": [r.to_dict() for r in results],
        "overall": {
            **verdict(ctx, results),
            "counts": counts,
            "failed": [r.name for r in results if r.status == "fail"],
            "skipped": [r.name for r in results if r.status == "skip"],
        },
        "feature_matrix": ctx.feature_matrix,
        "max_length": ctx.capacity,
        "fallback_ladder": _fallback_ladder(ctx),
        "proof": _proof(ctx, gates),
        "serve_example": ctx.serve_example,
        "accuracy": _accuracy(ctx, gates),
    })


# ---------------------------------------------------------------- report.md
def _gib(n: Any) -> str:
    return f"{n / GiB:.2f} GiB" if isinstance(n, (int, float)) else "—"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    """report.md from report.json's content."""
    arch, spec = report["architecture"], report["architecture"]["spec"]
    overall = report["overall"]
    out = [f"# Onboarding report: {report['model']['name']}", ""]
    if overall["state"] == "running":
        out += [f"**The run has not finished: it was in gate `{overall['current_gate']}` when this report was "
                "written.** If no `dockyard onboard` process is still running, it was stopped there (killed, or "
                "out of memory); the gates before it are complete.", ""]
    exit_status = "" if overall["exit_code"] is None else f" (exit status {overall['exit_code']})"
    out += [f"**Verdict: {overall['verdict']}**{exit_status} · {overall['counts']['pass']} passed, "
           f"{report['overall']['counts']['fail']} failed, {report['overall']['counts']['skip']} skipped · "
           f"dockyard {report['dockyard_version']} · {report['created']} · {report['machine']['hardware']} · "
           f"torch {report['machine']['torch_version']}, transformers {report['machine']['transformers_version']}",
           ""]
    out += [f"- not proven: {item}" for item in overall["not_proven"]]
    out += ["", "## Architecture", ""]
    out.append(f"- architecture `{arch['architecture']}` (model_type `{arch['model_type']}`), "
               + (f"dockyard family `{arch['family']}`" if arch["registered"] else "**not registered in dockyard**"))
    if spec:
        out.append(f"- {spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}, intermediate "
                   f"{spec['intermediate_size']}, vocab {spec['vocab_size']}, heads {spec['num_attention_heads']} q / "
                   f"{spec['num_key_value_heads']} kv × {spec['head_dim']}, act {spec['hidden_act']}, tied embeddings "
                   f"{spec['tie_word_embeddings']}")
        rope = spec["rope"]
        out.append(f"- RoPE `{rope['rope_type']}` θ={rope['theta']:g}, "
                   f"max positions {spec['max_position_embeddings']:,}"
                   + (f", sliding window {spec['sliding_window']}" if spec.get("sliding_window") else ""))
    if arch.get("num_parameters"):
        active = arch.get("active_parameters")
        out.append(f"- {arch['num_parameters']:,} parameters" + (
            f" ({active:,} active per token)" if active and active != arch["num_parameters"] else ""))
    if arch["features"]:
        out += ["", "| feature | kind | detail | covered |", "|---|---|---|---|"]
        for f in arch["features"]:
            covered = {True: "yes", False: "**no**", None: "—"}[f.get("covered")]
            out.append(f"| {_cell(f['label'])} | {f['kind']} | {_cell(f['detail'])} | {covered} |")
    if arch["missing_features"]:
        near = arch.get("nearest_family") or {}
        out += ["", f"**Missing** (no dockyard implementation covers): {', '.join(arch['missing_features'])}. "
                    f"Nearest supported family: `{near.get('family')}` ({', '.join(near.get('architectures', []))})."]

    out += ["", "## Gates", "", "| # | gate | status | time | summary |", "|---|---|---|---|---|"]
    for i, g in enumerate(report["gates"], 1):
        out.append(f"| {i} | {g['name']} | **{g['status']}** | {g['duration_s']:.1f}s | {_cell(g['summary'])} |")
    for g in report["gates"]:
        out += ["", f"### {g['name']}: {g['status']}", "", g["summary"], ""]
        if g["log_path"]:
            out.append(f"Log: `{g['log_path']}`")
            out.append("")
        out += gate_body(g)

    out += ["", "## Feature matrix", ""]
    if report["feature_matrix"]:
        out += ["| feature | status | why |", "|---|---|---|"]
        out += [f"| {m['feature']} | {m['status']} | {_cell(m['why'])} |" for m in report["feature_matrix"]]
    else:
        out.append("The features gate did not run.")

    out += ["", "## Max length and capacity", ""]
    cap = report["max_length"]
    if cap:
        out.append(f"Config max length {cap['config_max_len']:,} tokens; practical maximum on "
                   f"{_gib(cap['device_bytes'])} ({cap['dtype']}): {cap['practical_max_len']:,} tokens "
                   f"({cap['kv_tokens_that_fit']:,} KV tokens fit, {cap['kv_bytes_per_token']:,} bytes each).")
        out += ["", "| context length | sequences that fit | KV per sequence |", "|---|---|---|"]
        out += [f"| {r['context_len']:,} | {r['sequences_fit']:,} | {_gib(r['kv_bytes_per_sequence'])} |"
                for r in cap["rows"]]
        b = cap["baseline"]
        out += ["", f"Baseline {b['sequences_wanted']} × {b['context_len']:,} tokens: "
                    + ("fits" if b["fits"] else f"does not fit ({b['sequences_fit']} sequences do)")
                    + f"; needs {_gib(b['kv_bytes_needed'])} of KV, {_gib(b['kv_bytes_available'])} available."]
        if cap.get("engine_cpu_kv_budget"):
            e = cap["engine_cpu_kv_budget"]
            out.append(f"Note: {e['note']} (default {_gib(e['bytes'])} = {e['tokens']:,} tokens).")
    else:
        out.append("The capacity gate did not run.")

    ladder = report["fallback_ladder"]
    out += ["", "## Fallback ladder", "", ladder["note"] + "."]
    for entry in ladder["entries"]:
        out += ["", f"- {entry['gate']} / {entry['check']}: {entry['outcome']}"]
        out += [f"  - rung `{r['mode']}`: {r['status']} ({r['detail']})" for r in entry["rungs"]]

    out += ["", "## What dummy weights proved", ""] + [f"- {p}" for p in report["proof"]["dummy"]]
    out += ["", "## What only real weights proved", ""] + [f"- {p}" for p in report["proof"]["real"]]
    out += ["", "## Accuracy", ""] + _accuracy_lines(report["accuracy"]) + ["",
            "## Artifacts", "", "`report.json` (source of truth), `report.md` (this page), `accuracy.yaml`, "
            "`tutorial.md`, `logs/` (one log per gate).", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- accuracy.yaml
def render_accuracy_yaml(report: dict[str, Any]) -> str:
    """accuracy.yaml: what the onboarding's accuracy run measured, or no numbers and why none ran."""
    import yaml

    acc = report["accuracy"]
    if acc["evaluated"]:
        data = acc["results"]
        header = (f"# Accuracy of {data['model_name']}: {acc['note']}.\n"
                  f"# Reproduce: {data['command']}   |   regression check: dockyard eval --check accuracy.yaml\n")
    else:
        data = {"model_name": report["model"]["name"], "hardware": report["machine"]["hardware"], "tasks": [],
                "num_fewshot": None, "evaluated": False, "note": acc["note"]}
        header = f"# {acc['note']}.\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def _accuracy_lines(acc: dict[str, Any]) -> list[str]:
    """The accuracy section of report.md and tutorial.md: the measured table, or why there is none."""
    if not acc["evaluated"]:
        return [acc["note"] + "; accuracy.yaml says the same."]
    data = acc["results"]
    lines = [acc["note"] + ".", "", "| task | n-shot | documents | metric | value | ± stderr |",
             "|---|---|---|---|---|---|"]
    for t in data["tasks"]:
        for m in t["metrics"]:
            stderr = f"{m['stderr']:.4f}" if isinstance(m.get("stderr"), (int, float)) else "—"
            lines.append(f"| {t['name']} | {t['num_fewshot']} | {t['samples']} | {m['name']} | {m['value']:.4f} | "
                         f"{stderr} |")
    lines += ["", f"Reproduce with `{data['command']}`; `accuracy.yaml` holds these numbers and the settings, and "
                  "`dockyard eval --check accuracy.yaml` re-runs it and fails when a metric moves by more than 5%."]
    return lines


# ---------------------------------------------------------------- tutorial.md
def _serve_command(report: dict[str, Any]) -> str:
    """The deploy command: the one serve-smoke ran (at the deploy port), else built from the run's options."""
    if report.get("serve_example"):
        return report["serve_example"]["command"]
    args = ["dockyard", "serve"]
    model = report["model"]["argument"]
    if model:
        args += ["--model", str(model)]
    args += source_flags(report["options"])
    if report["model"]["source_kind"] == "dummy" or report["options"]["weights"] == "dummy":
        args += ["--load-format", "dummy"]
    if report["machine"]["device"] != "cpu":
        args += ["--device", report["machine"]["device"]]
    if report["options"].get("dtype", "auto") != "auto":
        args += ["--dtype", report["options"]["dtype"]]
    return " ".join(shlex.quote(a) for a in args + ["--port", str(DEFAULT_PORT)])


def render_tutorial(report: dict[str, Any]) -> str:
    """tutorial.md: how to run this model with dockyard, with this run's real values."""
    name, arch, spec = report["model"]["name"], report["architecture"], report["architecture"]["spec"]
    gates = {g["name"]: g for g in report["gates"]}
    out = [f"# {name} on dockyard", "", "## Introduction", ""]
    params = f"{arch['num_parameters']:,} parameters, " if arch.get("num_parameters") else ""
    out.append(f"{name} is a `{arch['architecture']}` model ({params}"
               + (f"{spec['num_hidden_layers']} layers, context {spec['max_position_embeddings']:,} tokens"
                  if spec else "spec not validated") + "). "
               f"`dockyard onboard` checked it on {report['machine']['hardware']} on {report['created']}: "
               + ", ".join(f"{g['name']} {g['status']}" for g in report["gates"])
               + f"; verdict {report['overall']['verdict']}.")
    out += [f"- not proven: {item}" for item in report["overall"]["not_proven"]]
    out += ["", "## Supported Features", ""]
    if report["feature_matrix"]:
        out += ["| feature | status | why |", "|---|---|---|"]
        out += [f"| {m['feature']} | {m['status']} | {_cell(m['why'])} |" for m in report["feature_matrix"]]
    else:
        out.append("The features gate did not run on this onboarding.")
    m = report["machine"]
    out += ["", "## Environment Preparation", "",
            f"Checked with Python {m['python_version']}, torch {m['torch_version']}, transformers "
            f"{m['transformers_version']}, on {m['hardware']}.", "", "```bash",
            "bash scripts/quickstart.sh        # fresh machine: .venv with torch (CPU) and dockyard",
            ". .venv/bin/activate", "```", "", "## Deployment", "", "```bash", _serve_command(report), "```", "",
            "`/health` answers 503 until the server has answered a warm-up request, then 200.", "",
            "## Functional Verification", ""]
    example = report.get("serve_example")
    if example:
        chat = example.get("request") or example["chat"]  # a base model's verified request is its completion
        ran = (f" ({example['port_note']})" if example.get("port_note") else "")
        out += [f"The serve-smoke gate ran the command above and this request{ran}, and got the response "
                "below.", "", "```bash", chat["curl"], "```", "",
                "```json", json.dumps(chat["response"], indent=2, ensure_ascii=False), "```"]
    else:
        smoke = gates.get("serve-smoke")
        why = smoke["summary"] if smoke else "the gate did not run"
        out += [f"serve-smoke did not answer a request on this run ({why}), so no verified example is shown. "
                "Once the server runs, try:", "", "```bash",
                f"curl -s http://127.0.0.1:{DEFAULT_PORT}/v1/chat/completions -H 'Content-Type: application/json' \\",
                "  -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], "
                "\"max_tokens\": 24}'", "```"]
    out += ["", "## Accuracy Evaluation", ""] + _accuracy_lines(report["accuracy"]) + ["", "## Performance", ""]
    perf = []
    dummy = gates.get("dummy")
    if dummy and dummy["status"] == "pass":
        ev = dummy["evidence"]
        first = ev["first_request"]
        perf.append(f"- dummy weights ({ev.get('layers')}/{ev.get('total_layers')} layers, {ev.get('dtype')}): engine "
                    f"up in {ev.get('load_seconds', 0):.1f}s, first request ({len(first['output_token_ids'])} tokens) "
                    f"in {first['seconds']:.2f}s")
    real = gates.get("real")
    if real and real["status"] == "pass" and real["evidence"].get("generation"):
        g = real["evidence"]["generation"]
        perf.append(f"- real weights: loaded in {real['evidence']['load_seconds']:.1f}s; {g['tokens']} tokens in "
                    f"{g['seconds']:.2f}s = {g['tokens_per_second']:.1f} tokens/s ({g['note']})")
    cap = report["max_length"]
    if cap:
        b = cap["baseline"]
        perf.append(f"- capacity on {_gib(cap['device_bytes'])}: practical max length {cap['practical_max_len']:,} "
                    f"(config {cap['config_max_len']:,}); {b['sequences_fit']} sequences of {b['context_len']:,} "
                    f"tokens fit")
    fit = gates.get("fit")
    if fit and fit["evidence"].get("weight_bytes"):
        ev = fit["evidence"]
        perf.append(f"- memory: {_gib(ev['weight_bytes'])} weights ({ev['dtype']}), {ev['kv_bytes_per_token']:,} "
                    f"bytes of KV per token; smallest tensor-parallel size that fits: "
                    f"{ev.get('smallest_tensor_parallel_size')}")
    out += perf or ["No performance numbers were measured on this run."]
    out += ["", *_performance_lines(gates.get("performance")), "",
            "These are measurements from the onboarding run; `dockyard bench latency` and `bench throughput` measure "
            "the same way with more settings (`--plot` draws them).", ""]
    return "\n".join(out)


def _performance_lines(gate: dict[str, Any] | None) -> list[str]:
    """The tutorial's speed table: the performance gate's figures, each against the roofline of the same run."""
    if not gate or gate["status"] != "pass":
        return [f"Speed was not measured: the performance gate {'did not run' if not gate else gate['summary']}."]
    ev = gate["evidence"]
    out = [f"Speed on {ev['device']} ({ev['dtype']}, {ev['layers_run']}, dummy weights); the roofline is this run's "
           f"copy bandwidth ({ev['copy_bytes_per_s'] / 1e9:,.1f} GB/s) and matmul rate "
           f"({ev['matmul_flops_per_s'] / 1e12:,.2f} TFLOP/s)"
           + (f"; {ev['scaled_down_note']}." if ev.get("scaled_down") else "."), "",
           "| measurement | value | roofline | fraction |", "|---|---|---|---|"]
    out += [f"| decode, batch {r['batch']} | {r['tokens_per_s']:,.1f} tokens/s | {r['roofline_tokens_per_s']:,.1f} "
            f"tokens/s | {r['fraction_of_roofline']:.2f} |" for r in ev["decode"]]
    out += [f"| time to first token, {r['input_len']:,} tokens | {1e3 * r['seconds']:,.1f} ms | "
            f"{1e3 * r['seconds'] * r['mfu']:,.1f} ms | {r['mfu']:.2f} |" for r in ev["ttft"]]
    out += [f"- **warning**: {w}" for w in ev.get("warnings") or []]
    return out


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader (or a killed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_progress(ctx: GateContext, report: dict[str, Any]) -> None:
    """report.json and report.md as the run stands (rewritten as each gate starts and ends). report.md first: a
    process killed between the two writes never leaves report.json (what watchers read) ahead of report.md."""
    _write(ctx.out_dir / "report.md", render_markdown(report))
    _write(ctx.out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def write_artifacts(ctx: GateContext, report: dict[str, Any]) -> None:
    """report.json, report.md, accuracy.yaml and tutorial.md into the out directory."""
    write_progress(ctx, report)
    _write(ctx.out_dir / "accuracy.yaml", render_accuracy_yaml(report))
    _write(ctx.out_dir / "tutorial.md", render_tutorial(report))
