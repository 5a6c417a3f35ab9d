"""int4 checkpoints dequantized on load on a GPU: correctness against the float64 reference, and load cost.

    PYTHONPATH=. python benchmarks/int4_load.py > int4_load.json

(a) A shrunken Llama (2 layers, hidden 256) written as a GPTQ checkpoint with ``desc_act`` (a permutation)
    and as an AWQ one by the tests' independent packers (``tests/weights/int4_packers.py``), loaded by ``LLM``
    on the GPU in float32 twice: dequantized on load (``DOCKYARD_QUANT_NATIVE=0``: every projection must equal
    the float64 reference rounded to float32) and kept quantized (the CUDA default: the Triton kernels); each
    path's logits are compared with the same weights dense (float64 reference rounded to float32) on the GPU.
(b) One Llama-3.1-8B down_proj (4096 x 14336, GPTQ, group 128, desc_act) converted to ``Int4Weight`` and
    dequantized to bfloat16 (``weights.int4.to_int4`` + ``dequantize_int4``), timed on the host and on the
    GPU (the loader converts where the model lives).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dockyard import LLM  # noqa: E402
from dockyard.ops.quant_format import dequantize_int4  # noqa: E402
from dockyard.ops.quant_linear import QUANT_NATIVE_ENV, uses_quantized_weights  # noqa: E402
from dockyard.weights.int4 import to_int4  # noqa: E402
from dockyard.weights.quant_config import Int4Config  # noqa: E402
from tests.helpers import rel_rmse, save_tiny_hf_model, unit_scale_llama  # noqa: E402
from tests.weights.int4_packers import draw_int4, gptq_tensors, write_int4  # noqa: E402

PROMPTS = [[1, 17, 300, 42, 7, 511, 256, 3], [5, 9, 2, 88, 101, 400, 33, 12, 64, 128, 200, 6]]


def logits(llm: LLM) -> torch.Tensor:
    dev = llm.device
    with torch.no_grad():
        return torch.cat([llm.model.compute_logits(llm.model(torch.tensor(ids, device=dev),
                                                             torch.arange(len(ids), device=dev))).double().cpu()
                          for ids in PROMPTS])


def correctness(root: Path) -> dict:
    from safetensors.torch import load_file

    src = save_tiny_hf_model(unit_scale_llama(intermediate_size=384), root / "fp32")
    state, config = load_file(str(src / "model.safetensors")), json.loads((src / "config.json").read_text())
    out = {}
    for variant in ("gptq-asym-desc_act-g64", "awq-g64"):
        refs = write_int4(root / variant, config, state, variant, torch.Generator().manual_seed(1))
        dense = root / f"{variant}-dense"
        dense.mkdir()
        (dense / "config.json").write_text(json.dumps(config))
        save_file(dict(state, **{n: r.float() for n, r in refs.items()}), str(dense / "model.safetensors"))
        kwargs = dict(device="cuda", dtype="float32", num_kv_blocks=16, max_num_seqs=2, enforce_eager=True)
        ref = logits(LLM(dense, **kwargs))
        row = {}
        for path, native in (("dequantized_on_load", "0"), ("kept_quantized", "auto")):
            os.environ[QUANT_NATIVE_ENV] = native
            llm = LLM(root / variant, **kwargs)
            params = dict(llm.model.named_parameters())
            row[path] = {"kept_quantized": uses_quantized_weights(llm.model),
                         "logits_rel_rmse_vs_dense": rel_rmse(logits(llm), ref)}
            if native == "0":
                row[path]["weights_equal_float64_reference"] = all(
                    torch.equal(params[n].detach().cpu(), r.float()) for n, r in refs.items() if n in params)
            del llm
        os.environ.pop(QUANT_NATIVE_ENV)
        out[variant] = row
        print(variant, out[variant], file=sys.stderr, flush=True)
    return out


def timing() -> dict:
    n, k, group = 4096, 14336, 128
    d = draw_int4(n, k, group, False, True, torch.Generator().manual_seed(0), min_zero=1)
    config = Int4Config.from_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": group,
                                                  "sym": False, "desc_act": True}, "benchmark")
    out = {}
    for device in ("cpu", "cuda"):
        parts = {name: t.to(device) for name, t in gptq_tensors(d).items()}
        for _ in range(2):  # the second is timed (the first warms up the device)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            w = dequantize_int4(to_int4(config, "down_proj", parts), torch.bfloat16)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        out[device] = {"seconds": seconds, "equal_reference": torch.equal(w.float().cpu(), d.ref.bfloat16().float())}
        print(device, out[device], file=sys.stderr, flush=True)
    return {"shape": [n, k], "group_size": group, "threads": torch.get_num_threads(), **out}


def main() -> None:
    if not torch.cuda.is_available():
        print("int4_load.py needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="dockyard-int4-") as tmp:
        report["correctness"] = correctness(Path(tmp))
    report["dequantize_one_8b_down_proj"] = timing()
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
