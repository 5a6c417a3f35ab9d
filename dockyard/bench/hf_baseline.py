"""HF transformers as the baseline of the speed benchmarks: the same config, random weights, ``generate``.

``hf_generate_rate`` times greedy ``model.generate`` of a batch of equal-length random prompts
(no padding, so nothing is wasted on it) with every sequence producing exactly ``output_len``
tokens, and reports generated tokens per second. The model is built directly on the device in
the benchmark's dtype, with HF's own initialization (weights are random either way).
"""

from __future__ import annotations

import time

import torch


def build_hf_model(config_path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.inference_mode()
def hf_generate_rate(model: torch.nn.Module, batch: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """Generated tokens/s of greedy ``generate`` on ``batch`` random prompts of ``input_len`` tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, input_len), generator=gen).to(device)
    kwargs = dict(do_sample=False, min_new_tokens=output_len, max_new_tokens=output_len,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    model.generate(ids[:, :16], **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4,
                                   "attention_mask": torch.ones_like(ids[:, :16])})  # warm-up
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    seconds = time.perf_counter() - t
    generated = (out.shape[1] - input_len) * batch
    return {"batch": batch, "input_len": input_len, "output_len": output_len, "seconds": round(seconds, 3),
            "output_tokens_per_s": round(generated / seconds, 1)}

