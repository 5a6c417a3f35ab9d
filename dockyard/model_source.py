"""Resolve what the user named as MODEL into a spec, a weights source and a tokenizer.

MODEL may be: nothing (the bundled SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a directory
with ``config.json`` (+ safetensors, FP8 ones dequantized on load or kept FP8 on capable GPUs, else
dummy weights), a ``config.json`` file (dummy weights at true shapes), or a Hugging Face repo id
found in (or downloaded into) the HF cache (:mod:`dockyard.hub`), which then names the model.
The model's ``generation_config.json`` (:mod:`dockyard.generation_config`) adds its end-of-sequence
ids to the spec's and gives request defaults; ``tokenizer`` names another tokenizer source.

Resolving reads metadata only, without torch (``dockyard inspect`` answers before torch loads): the config, a
GGUF file's metadata (:mod:`dockyard.weights.gguf_metadata`), the checkpoint's file list and its
``quantization_config`` (:mod:`dockyard.weights.quant_config`). The weights are read by
:func:`dockyard.weights.checkpoint.iter_weights`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockyard.engine_args import INT4_METHODS, QUANTIZATION_METHODS
from dockyard.errors import ConfigError, DockyardError, UnsupportedArchitectureError, WeightsError
from dockyard.generation_config import GenerationDefaults, load_generation_config
from dockyard.hub import locate_model as hub_locate
from dockyard.model_impl import MODEL_IMPLS, ImplChoice, choose_model_impl
from dockyard.model_path import locate_model
from dockyard.spec import ModelSpec, read_config_json
from dockyard.tokenizer import TOKENIZER_FILES, load_tokenizer
from dockyard.weights.gguf_metadata import GGUFFile
from dockyard.weights.quant_config import FP8Config, Int4Config
from dockyard.weights.safetensors_dir import safetensors_files

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


@dataclass
class ModelSource:
    """A resolved model: its spec and where its weights and tokenizer come from."""

    name: str
    spec: ModelSpec
    kind: str  # "gguf" | "safetensors" | "dummy"
    path: Path
    gguf: GGUFFile | None = None  # for a .gguf file (kind "gguf", or "dummy" with --load-format dummy)
    fp8: FP8Config | None = None  # when quantization_config is fp8 (see weights/fp8.py)
    int4: Int4Config | None = None  # for AWQ / GPTQ / compressed-tensors int4 checkpoints (see weights/int4.py)
    quantization: str | None = None  # quantization_config.quant_method, as the config names it
    generation: GenerationDefaults = dataclasses.field(default_factory=GenerationDefaults)
    tokenizer_path: Path | None = None  # a separate tokenizer source (--tokenizer); None: the model's own
    repo_id: str | None = None  # the Hugging Face repo id MODEL named (then path is its cache snapshot)
    impl_reason: str = "a native dockyard family"  # why spec.model_impl runs it (dockyard.model_impl)

    @property
    def has_real_weights(self) -> bool:
        return self.kind != "dummy"

    def load_tokenizer(self) -> Any:
        """The HF tokenizer for this model (cached conversion for GGUF); None if it ships none."""

        if self.tokenizer_path is not None:
            return load_tokenizer(self.tokenizer_path)
        if self.gguf is not None:
            return load_tokenizer(self.path.parent, gguf_file=self.path.resolve())  # absolute: not joined again
        if not any((self.path / f).exists() for f in TOKENIZER_FILES):
            logger.warning("%s has no tokenizer files (%s): prompts must be token ids",
                           self.path, ", ".join(TOKENIZER_FILES))
            return None
        return load_tokenizer(self.path)


def _spec_for(choice: ImplChoice, config: dict[str, Any], name: str) -> ModelSpec:
    """The spec of ``config`` for the implementation ``choice`` names."""
    if choice.impl == "transformers":
        try:
            # optional: transformers 5's modeling internals (and model modules load lazily, the registry's rule)
            from dockyard.models.generic import generic_spec
        except ImportError as exc:  # its loading helpers are transformers 5's
            import transformers

            raise UnsupportedArchitectureError(
                f"{choice.reason}; but the generic path needs transformers 5 (tested with 5.24), and "
                f"transformers {transformers.__version__} lacks what it uses ({exc}); upgrade transformers") from exc
        return generic_spec(config, name, choice.remote_code_dir)
    return ModelSpec.from_hf_config(config, name=name)


def spec_for_config(config: dict[str, Any], name: str | None = None, model_impl: str = "auto") -> ModelSpec:
    """The spec of a config dict alone on the path ``model_impl`` names (``auto``: the one it chooses; no model
    directory, so no remote code): what sizing a reduced copy of a model needs."""
    return _spec_for(choose_model_impl(config, model_impl), config,
                     name or str(config.get("_name_or_path") or "model"))


def resolve_model(model: str | Path | None = None, load_format: str = "auto", *, revision: str | None = None,
                  download_dir: str | Path | None = None, tokenizer: str | Path | None = None,
                  generation_config: str = "auto", model_impl: str = "auto",
                  trust_remote_code: bool = False) -> ModelSource:
    """Turn a MODEL argument into a :class:`ModelSource`, or a DockyardError saying what is wrong.

    ``revision`` / ``download_dir``: of a repo id (:func:`dockyard.hub.locate_model`); ``tokenizer``: a
    path or repo id to take the tokenizer from; ``generation_config``: auto | vllm | a folder
    (:mod:`dockyard.generation_config`); ``model_impl`` / ``trust_remote_code``: which implementation runs
    it (:mod:`dockyard.model_impl`; a GGUF file's tensors come dequantized under HF names on either path)."""
    if model_impl not in MODEL_IMPLS:
        raise DockyardError(f"model_impl={model_impl!r} is not one of {', '.join(MODEL_IMPLS)}")
    source = _resolve(model, load_format, revision, download_dir, model_impl, trust_remote_code)
    if tokenizer is not None:
        source.tokenizer_path = hub_locate(tokenizer, download_dir=download_dir).path
    has_config_dir = source.gguf is None and (source.path / "config.json").is_file()
    generation = load_generation_config(generation_config, source.path if has_config_dir else None)
    extra = [t for t in generation.eos_token_ids if t not in source.spec.eos_token_ids]
    bad = [t for t in extra if t >= source.spec.vocab_size]
    if bad:
        raise ConfigError(f"{generation.source}: eos_token_id {bad} outside the vocabulary [0, "
                          f"{source.spec.vocab_size}); fix the file or pass --generation-config vllm")
    if extra:
        source.spec = dataclasses.replace(source.spec, eos_token_ids=(*source.spec.eos_token_ids, *extra))
    source.generation = generation
    return source


def _resolve(model: str | Path | None, load_format: str, revision: str | None,
             download_dir: str | Path | None, model_impl: str, trust_remote_code: bool) -> ModelSource:
    if load_format not in LOAD_FORMATS:
        raise DockyardError(f"load_format={load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    location = locate_model(model, revision, download_dir)
    path, repo_id = location.path, location.repo_id
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFFile(path)
        name = repo_id or path.stem
        choice = choose_model_impl(gguf.hf_config(), model_impl)
        spec = _spec_for(choice, gguf.hf_config(), name)
        kind = "dummy" if load_format == "dummy" else "gguf"
        return ModelSource(name=name, spec=spec, kind=kind, path=path, gguf=gguf, repo_id=repo_id,
                           impl_reason=choice.reason)
    if path.is_file():
        config_file, model_dir = path, path.parent
    else:
        config_file, model_dir = path / "config.json", path
    config = read_config_json(config_file)
    # A cache snapshot is named by its repo id, never by the commit hash of its folder.
    name = repo_id or (model_dir.resolve().name if config_file.name == "config.json" else config_file.stem)
    choice = choose_model_impl(config, model_impl, model_dir if path.is_dir() else None, trust_remote_code)
    spec = _spec_for(choice, config, name)
    kind, fp8, int4 = "dummy", None, None
    quant = config.get("quantization_config")
    method = None
    if isinstance(quant, dict):
        method = str(quant.get("quant_method") or quant.get("fmt") or "unknown")
    if load_format == "auto" and path.is_dir():
        if safetensors_files(model_dir):
            kind = "safetensors"
            if method in INT4_METHODS:
                int4 = Int4Config.from_quantization_config(quant, model_dir)
            elif method is not None and method not in QUANTIZATION_METHODS:
                raise WeightsError(
                    f"{model_dir} holds a quantized checkpoint (quantization_config.quant_method={method!r}), "
                    f"which dockyard cannot load yet (it reads {', '.join(QUANTIZATION_METHODS)}); "
                    "use an unquantized (bf16/fp16/fp32) checkpoint, or --load-format dummy to run the architecture "
                    "on dummy weights"
                )
    if method == "fp8":
        try:
            fp8 = FP8Config.from_quantization_config(quant, model_dir)
        except WeightsError:
            if kind == "safetensors":
                raise
            # Dummy weights do not read the checkpoint's scales: the FP8 settings only matter to the plan.
            logger.info("quantization_config is fp8 with settings the loader refuses; dummy weights ignore it")
    return ModelSource(name=name, spec=spec, kind=kind, path=model_dir, fp8=fp8, int4=int4, quantization=method,
                       repo_id=repo_id, impl_reason=choice.reason)
