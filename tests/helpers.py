"""Shared test helpers: error metric, paged single-sequence driver, tiny HF reference models, transformers'
load of a real GGUF (saved once per file and library versions), Triton kernel modules in the interpreter's
mode, requests poisoned past validation, a dummy-weight chat model for machines without the bundled GGUF."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import gguf
import safetensors.torch
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The metric and the paged driver are library code now (the onboarding equivalence gate uses them).
from dockyard.engine.sampling_params import SamplingParams
from dockyard.testing import paged_logits, rel_rmse
from dockyard.tokenizer import cache_root

__all__ = ["dummy_chat_model_dir", "finish_gguf", "hf_gguf_reference", "import_kernels", "init_unit_scale_",
           "interpreter_loop_bounds_fix", "paged_logits", "poison", "rel_rmse", "save_tiny_hf_model",
           "unit_scale_llama", "unit_scale_state"]

# ChatML as SmolLM2's template writes it, its default system message included (so prompts are as long).
CHAT_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful AI assistant named "
                 "SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}"
                 "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def dummy_chat_model_dir(directory: Path, corpus: list[str]) -> Path:
    """A Llama-shaped config.json (run with dummy weights) and a byte-level BPE tokenizer with a ChatML template:
    the stand-in for the bundled SmolLM2 where its GGUF is not installed (the GPU machine). The BPE merges are
    learned from ``corpus`` (the tests' own prompts), so those encode to about as many tokens as SmolLM2's
    tokenizer gives them; every byte is a token too, so any text encodes and decodes exactly."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocab),
              "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "bos_token_id": vocab["<|im_start|>"], "eos_token_id": vocab["<|im_end|>"],
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def save_tiny_hf_model(hf_model: torch.nn.Module, directory: Path) -> Path:
    """Save an HF model (config + safetensors) so dockyard loads it through its own loader."""
    hf_model.save_pretrained(directory, safe_serialization=True)
    return directory


def finish_gguf(writer: gguf.GGUFWriter) -> Path:
    """Write what ``writer`` was given (header, metadata, tensors) to its file, close it, and return the path."""
    path = Path(writer.path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_REFERENCE_MARKER = "reference.json"  # written last: its presence marks a complete entry


@functools.cache
def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def hf_gguf_reference(gguf_path: Path) -> torch.nn.Module:
    """transformers' own load of ``gguf_path`` in float32 on the CPU (``from_pretrained(dir, gguf_file=name)``):
    the reference of the real-model tests.

    transformers' GGUF loader parses every metadata value of the file twice (with ``gguf.GGUFReader``, a numpy
    view per token) and dequantizes every tensor with numpy: tens of CPU seconds per load. So the loaded model
    is saved the first time (config, generation config, weights as safetensors; the config without the GGUF
    quantization marker that keeps transformers from saving it) under ``$DOCKYARD_CACHE/test-references/``,
    keyed by the file's content (sha256, so a reinstalled copy of the same file hits) and the versions of
    transformers, gguf and torch; a later session loads that copy (identical tensors, the same model class).
    Entries are written to a temporary folder and renamed into place; older entries of the same file are removed.
    """
    ident = (f"{_file_sha256(gguf_path)}|transformers={transformers.__version__}|gguf="
             f"{importlib.metadata.version('gguf')}|torch={torch.__version__}")
    root = cache_root() / "test-references"
    entry = root / f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
    if (entry / _REFERENCE_MARKER).is_file():
        return transformers.AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:  # a tied weight is saved once, under its first name
                seen.add(tensor.data_ptr())
                tensors[name] = tensor.contiguous()
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / _REFERENCE_MARKER).write_text(json.dumps({"source": str(gguf_path), "key": ident}))
        for old in root.glob(f"{gguf_path.stem}-*"):
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, entry)
    except OSError:  # another process wrote the entry first (or the disk is full): this session has its model
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def init_unit_scale_(model: torch.nn.Module) -> torch.nn.Module:
    """Redraw an HF model's Linear weights with std 1/sqrt(fan-in) and embeddings with std 1, in place: a
    unit-scale signal through the layers, so the logits depend on every weight."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0, 1)
    return model


def unit_scale_llama(intermediate_size: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer HF Llama (hidden 256, 4 heads, 2 KV heads, vocab 512) at unit signal scale
    (:func:`init_unit_scale_`), in float32."""
    import transformers  # heavy; only the weights tests build HF models here

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=intermediate_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    return init_unit_scale_(transformers.LlamaForCausalLM(config))


def unit_scale_state(config: dict, directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights at unit signal scale (std 1/sqrt(fan-in), norm weights 1) for every parameter of
    dockyard's model of ``config`` (its config.json is written to ``directory`` to build the shapes)."""
    from dockyard.engine.llm import LLM  # the engine is heavy; only the tests that build checkpoints need it

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    shapes = LLM(directory / "config.json", load_format="dummy", device="cpu", dtype="float32",
                 num_kv_blocks=4, max_num_seqs=1)
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
            for name, p in shapes.model.state_dict().items()}


def import_kernels(module_name: str, interpret: bool) -> ModuleType:
    """Import a Triton kernel module; with ``interpret`` (no CUDA) in Triton's interpreter mode, which
    Triton fixes when a kernel is decorated, so the module is reloaded with TRITON_INTERPRET=1 set."""
    previous = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(module_name)
        return importlib.reload(module) if interpret else module
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def poison(p: SamplingParams, kind: str) -> None:
    """Set a value the door refuses on a request the engine already holds (standing in for any bug
    that lets a bad value through): each kind fails inside a step, in a different stage."""
    if kind == "mask":  # the min_tokens stop mask indexes the logits with it (IndexError)
        p.stop_token_ids = [10**9]
    elif kind == "sampler":  # the sampler's tensors cannot hold it (overflow)
        p.top_k, p.temperature = 2**63, 0.7
    elif kind == "after-draw":  # the top-logprobs stage, after the batch's random draw (TypeError)
        p.logprobs = 2.5  # type: ignore[assignment]
    elif kind == "stop-check":  # the stop-string search after the token is appended (TypeError)
        p.stop = 5  # type: ignore[assignment]


def interpreter_loop_bounds_fix(monkeypatch) -> None:  # noqa: ANN001 - pytest's MonkeyPatch
    """Triton 3.6's interpreter turns a scalar kernel argument (a 1-element array there) into a loop bound
    with ``int(array)``, which numpy 2.4 refuses; this takes the element explicitly (upstream in later
    Triton). For kernels with loops bounded by a runtime argument."""
    import numpy as np  # numpy and Triton's interpreter: only the interpreted tests need them
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):  # noqa: ANN001, ANN202 - Triton's internal signature
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor)


def llama_parameters(c: dict) -> int:
    """Llama's parameter count from its config's numbers (no bias), counted by hand from the HF layout."""
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    head = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    embeddings = (1 if c.get("tie_word_embeddings") else 2) * v * h
    return embeddings + h + n * (h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h)
