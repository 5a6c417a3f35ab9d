"""Check the engine on an accelerator against the CPU reference run of the same dummy model.

    python benchmarks/device_check.py benchmarks/configs/llama-3.2-1b.json

Same config, same seeded dummy weights: float32 logits on the device vs on the CPU (rmse ratio),
greedy tokens equal, and bfloat16 decode-with-cache on the device vs its own full recompute.
"""

from __future__ import annotations

import json
import sys

import torch

from dockyard import LLM, SamplingParams


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def main(config: str) -> dict:
    prompts = [[(7 * i + 13 * j) % 1000 + 10 for j in range(40 + 9 * i)] for i in range(4)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    result: dict = {"config": config}
    outs = {}
    logits = {}
    for device in ("cpu", "cuda"):
        llm = LLM(config, load_format="dummy", device=device, dtype="float32", num_kv_blocks=256)
        outs[device] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        ids = torch.tensor(prompts[0], device=llm.device)
        with torch.no_grad():
            logits[device] = llm.model.compute_logits(llm.model(ids, torch.arange(len(ids), device=llm.device)))
        del llm
    result["fp32_prefill_logits_rel_rmse_cuda_vs_cpu"] = rel_rmse(logits["cuda"], logits["cpu"])
    result["greedy_tokens_equal"] = outs["cpu"] == outs["cuda"]
    bf = LLM(config, load_format="dummy", device="cuda", dtype="bfloat16", num_kv_blocks=256)
    bf_outs = bf.generate(prompts, greedy, use_tqdm=False)
    result["bf16_greedy_first_tokens_equal_fp32"] = [
        o.outputs[0].token_ids[:4] == ref[:4] for o, ref in zip(bf_outs, outs["cpu"])
    ]
    with torch.no_grad():
        ids = torch.tensor(prompts[0], device=bf.device)
        bf_logits = bf.model.compute_logits(bf.model(ids, torch.arange(len(ids), device=bf.device)))
    result["bf16_prefill_logits_rel_rmse_vs_fp32_cpu"] = rel_rmse(bf_logits, logits["cpu"])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1])
