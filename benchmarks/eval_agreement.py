"""dockyard's lm-eval scores against lm-eval's ``--model hf`` and against its own server route.

On the bundled SmolLM2-135M-Instruct (GGUF, fp32, CPU), one lm-eval task (default ARC-Easy, first
``--limit`` validation questions, 0-shot) is evaluated three ways with the same rendered task files:

1. in process: lm-eval's ``dockyard`` model (``dockyard.eval.lm.DockyardLM``);
2. reference: lm-eval's ``HFLM`` on transformers' own load of the same GGUF (same tokenizer);
3. server (``--server``): lm-eval's ``local-completions`` model against ``dockyard serve`` on loopback.

It prints per-request log-likelihood agreement (max relative difference, greedy flags) and the
task metrics of each route, and exits 1 when they disagree beyond the bars (1e-4 relative per
request, one question per metric). Usage::

    python benchmarks/eval_agreement.py --limit 200 --server
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _evaluate(lm: Any, manager: Any, task: str, limit: int) -> dict[str, Any]:
    from lm_eval.evaluator import evaluate

    t0 = time.perf_counter()
    out = evaluate(lm=lm, task_dict=manager.load([task]), limit=limit, bootstrap_iters=0, log_samples=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def _lls(out: dict[str, Any], task: str) -> list[tuple[float, bool]]:
    return [r[0] for doc in out["samples"][task] for r in doc["resps"]]


def _metrics(out: dict[str, Any], task: str) -> dict[str, float]:
    return {k.split(",")[0]: v for k, v in out["results"][task].items() if k.endswith(",none") and "stderr" not in k}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_route(manager: Any, task: str, limit: int, tokenizer_dir: str) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dockyard.cli", "serve", "--port", str(port), "--dtype", "float32",
                             "--device", "cpu", "--served-model-name", "smol"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("dockyard serve did not become healthy")
        lm = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{port}/v1/completions", model="smol",
                                 tokenizer_backend="huggingface", tokenizer=tokenizer_dir, tokenized_requests=True,
                                 num_concurrent=4, max_retries=1)
        return _evaluate(lm, manager, task, limit)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--server", action="store_true", help="also score through dockyard serve (local-completions)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from dockyard import LLM
    from dockyard.eval.lm import DockyardLM
    from dockyard.eval.tasks import task_manager
    from dockyard.model_path import bundled_model_path

    gguf = bundled_model_path()
    llm = LLM(None, dtype="float32", device="cpu")
    manager = task_manager([args.task])
    ours = _evaluate(DockyardLM(llm=llm), manager, args.task, args.limit)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                 dtype=torch.float32).eval()
    ref = _evaluate(HFLM(pretrained=hf_model, tokenizer=llm.get_tokenizer(), device="cpu", batch_size=16),
                    manager, args.task, args.limit)
    a, b = _lls(ours, args.task), _lls(ref, args.task)
    rel = max(abs(x[0] - y[0]) / max(abs(y[0]), 1e-9) for x, y in zip(a, b, strict=True))
    greedy_diff = sum(x[1] != y[1] for x, y in zip(a, b, strict=True))
    report: dict[str, Any] = {
        "task": args.task, "limit": args.limit, "requests": len(a), "max_rel_ll_diff": rel,
        "greedy_flag_differences": greedy_diff,
        "dockyard": {**_metrics(ours, args.task), "seconds": round(ours["seconds"], 1)},
        "hf": {**_metrics(ref, args.task), "seconds": round(ref["seconds"], 1)},
    }
    ok = rel <= 1e-4 and all(abs(report["dockyard"][m] - report["hf"][m]) <= 1 / args.limit + 1e-9
                             for m in ("acc", "acc_norm") if m in report["hf"])
    if args.server:
        tokenizer_dir = str(Path(llm.get_tokenizer().name_or_path))
        served = _server_route(manager, args.task, args.limit, tokenizer_dir)
        c = _lls(served, args.task)
        report["server"] = {**_metrics(served, args.task), "seconds": round(served["seconds"], 1),
                            "max_rel_ll_diff_vs_in_process": max(abs(x[0] - y[0]) / max(abs(y[0]), 1e-9)
                                                                 for x, y in zip(c, a, strict=True))}
        ok = ok and all(report["server"][m] == report["dockyard"][m] for m in ("acc", "acc_norm")
                        if m in report["dockyard"])
    report["agree"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
