"""dockyard as an lm-eval model: ``--model dockyard`` runs the harness on the engine, in process.

:class:`DockyardLM` follows lm-eval's ``TemplateLM`` conventions, so its scores match
``--model hf`` on the same weights:

- tokenization: ``tok_encode`` uses the tokenizer's own default for special tokens, except that a
  string that already starts with the BOS text (a chat-templated prompt) gets none added, so BOS
  never appears twice; context and continuation are split by lm-eval's ``_encode_pair`` (encode the
  whole, take the context's length), and an empty context becomes ``prefix_token_id`` (BOS, else EOS);
- ``loglikelihood``: each (context, continuation) is one engine request whose prompt is the last
  ``max_length + 1`` tokens (the window HF scores), run with ``prompt_logprobs=1``; the score is
  the sum of the continuation tokens' prompt logprobs, and it is greedy when every continuation
  token's logprob equals the top-1 logprob at its position. One-token continuations of a shared
  context (MMLU's letters) come from one request with ``prompt_logprobs=20`` when they are among
  its top 20 at the last position (like HFLM's one-token logits cache); identical windows run once;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens;
- ``generate_until``: lm-eval's normalization of generation kwargs, EOS added to the stop
  sequences, the context left-truncated to ``max_length - max_gen_toks``, greedy unless the task
  samples, and the text cut at the first stop sequence.

Requests are submitted to ``LLM.generate`` in large chunks; the engine batches them continuously.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dockyard.dtypes import dtype_name
from dockyard.engine.llm import LLM
from dockyard.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Generation kwargs lm-eval tasks use that map onto SamplingParams fields of the same meaning.
_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "seed": "seed", "repetition_penalty": "repetition_penalty",
                  "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


# Top-k asked for at the last position of a context whose one-token continuations are read off one request.
ONE_TOKEN_TOP_K = 20


class PromptLogprobsMissingError(RuntimeError):
    """The engine returned no prompt logprob where a continuation token needs one (an engine bug)."""


@register_model("dockyard")
class DockyardLM(TemplateLM):
    """An lm-eval model backed by a dockyard :class:`~dockyard.LLM` (loaded here, or passed in as ``llm``)."""

    def __init__(self, pretrained: str | None = None, *, llm: Any = None, dtype: str = "auto",
                 device: str = "auto", batch_size: int | str | None = 64, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, show_progress: bool | None = None,
                 progress_label: str = "", engine: dict[str, Any] | None = None, revision: str | None = None,
                 download_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            logger.info("DockyardLM ignores model args %s", sorted(kwargs))
        seqs = int(batch_size) if isinstance(batch_size, int) or str(batch_size).isdigit() else 64
        if llm is None:
            source = {name: value for name, value in (("revision", revision), ("download_dir", download_dir)) if value}
            llm = LLM(pretrained,
                      **{**(engine or {}), **source, "dtype": dtype, "device": device, "max_num_seqs": seqs})
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.batch_size_per_chunk = max(4 * seqs, 256)  # requests per LLM.generate call
        model_len = llm.engine.max_model_len
        # A prompt must leave room for one generated token, and a scored window is max_length + 1 tokens.
        self._max_length = min(max_length, model_len - 2) if max_length else model_len - 2
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.progress_label = progress_label
        self.name = llm.source.name

    # ---- what lm-eval asks of a model ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", None) or self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string``: special tokens as the tokenizer adds them, none after a leading BOS."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.decode(self.prefix_token_id)
            if has_bos_prefix(string, bos):
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's own chat template as text (its BOS included, so ``tok_encode`` adds none)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.name, "model_source": str(self.llm.source.path),
                "model_dtype": dtype_name(self.llm.dtype), "engine": "dockyard"}

    # ---- running requests on the engine ----
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm-eval's tokenizing bar is noise (tokenizing takes no time); the engine's bar is ours.
        return super().loglikelihood(requests, disable_tqdm=True)

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], what: str) -> list[Any]:
        from tqdm import tqdm

        outputs: list[Any] = []
        bar = tqdm(total=len(prompts), desc=f"{self.progress_label} {what}".strip(), unit="req", file=sys.stderr,
                   disable=not self.show_progress, dynamic_ncols=True)
        try:
            for start in range(0, len(prompts), self.batch_size_per_chunk):
                end = start + self.batch_size_per_chunk
                outputs += self.llm.generate(prompts[start:end], params[start:end], use_tqdm=False)
                bar.update(min(end, len(prompts)) - start)
        finally:
            bar.close()
        return outputs

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        windows: list[tuple[int, ...]] = []
        n_cont: list[int] = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("lm-eval sent an empty continuation to score")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens does not fit the model's "
                                 f"{self.max_length}-token scoring window")
            windows.append(tuple((context_enc + continuation_enc)[-(self.max_length + 1):]))
            n_cont.append(len(continuation_enc))
        # One-token continuations of one context (MMLU's " A".." D") are read off one request's last
        # position when they are among its top ONE_TOKEN_TOP_K; identical windows are scored once.
        scores = self._score_one_token_groups(windows, n_cont)
        todo = sorted({w for i, w in enumerate(windows) if i not in scores})
        entries = dict(zip(todo, self._prompt_logprobs(todo, 1)))
        results = []
        for i, ((request, _, _), window, n) in enumerate(zip(requests, windows, n_cont)):
            if i not in scores:
                total, greedy = 0.0, True
                for pos in range(len(window) - n, len(window)):
                    logprob, top = _lookup(entries[window], window, pos)
                    total += logprob
                    greedy = greedy and top
                scores[i] = (total, greedy)
            results.append(scores[i])
            self.cache_hook.add_partial("loglikelihood", request, scores[i])
        return results

    def _prompt_logprobs(self, windows: list[tuple[int, ...]], k: int) -> list[list[dict[int, float] | None]]:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        outputs = self._run([list(w) for w in windows], [params] * len(windows), "loglikelihood")
        return [out.prompt_logprobs or [] for out in outputs]

    def _score_one_token_groups(self, windows: list[tuple[int, ...]], n_cont: list[int]
                                ) -> dict[int, tuple[float, bool]]:
        """{request index: (logprob, greedy)} for single-token continuations sharing a context.

        The logprob of token t after a context is the same number whether t ends the prompt or another
        token does, so one request per context gives every choice that is among its top-k at that position
        (k = ONE_TOKEN_TOP_K); the others are scored on their own by the caller. The same trick as HFLM's
        one-token-continuation logits cache, which saves ``len(choices) - 1`` prefills per question.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (window, n) in enumerate(zip(windows, n_cont)):
            if n == 1 and len(window) >= 2:
                groups.setdefault(window[:-1], []).append(i)
        groups = {ctx: members for ctx, members in groups.items() if len({windows[i][-1] for i in members}) > 1}
        if not groups:
            return {}
        reps = [windows[members[0]] for members in groups.values()]
        scores: dict[int, tuple[float, bool]] = {}
        for rep, members, entries in zip(reps, groups.values(), self._prompt_logprobs(reps, ONE_TOKEN_TOP_K)):
            last = entries[-1] if entries else None
            if not last:
                raise PromptLogprobsMissingError(f"the engine returned no prompt logprob for the last token of a "
                                                 f"{len(rep)}-token prompt")
            best = max(last.values())
            for i in members:
                token = windows[i][-1]
                if token in last:
                    scores[i] = (last[token], last[token] >= best)
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        flat: list[tuple[Any, list[int], list[int]]] = []
        counts = []
        for (string,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            flat += [(None, ctx, cont) for ctx, cont in windows]
            counts.append(len(windows))
        scores = self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm)
        out, pos = [], 0
        for req, count in zip(requests, counts):
            total = sum(score for score, _ in scores[pos:pos + count])
            pos += count
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    def _sampling_params(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str], int]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id],
                                                                                   skip_special_tokens=False))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        fields: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in _SAMPLING_KEYS and value is not None:
                fields[_SAMPLING_KEYS[key]] = value
            else:
                logger.warning("generation kwarg %s=%r has no dockyard equivalent; ignored", key, value)
        if not do_sample:
            fields["temperature"] = 0.0
        params = SamplingParams(max_tokens=max_gen_toks, stop=[s for s in until if s], **fields)
        return params, until, max_gen_toks

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        stops: list[list[str]] = []
        cache: dict[str, tuple[SamplingParams, list[str], int]] = {}
        for context, gen_kwargs in [req.args for req in requests]:
            key = repr(sorted(gen_kwargs.items()))
            if key not in cache:
                cache[key] = self._sampling_params(gen_kwargs)
            p, until, max_gen_toks = cache[key]
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
                                 f"{self.max_length} tokens")
            prompts.append(self.tok_encode(context, left_truncate_len=max_ctx_len))
            params.append(p)
            stops.append(until)
        outputs = self._run(prompts, params, "generate_until")
        results = []
        for req, out, until in zip(requests, outputs, stops):
            text = self.tok_decode(out.outputs[0].token_ids)
            text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results


def _lookup(entries: list[dict[int, float] | None], window: tuple[int, ...], pos: int) -> tuple[float, bool]:
    """(logprob of window[pos], whether it is the top-1 token there) from a request's prompt logprobs."""
    entry = entries[pos] if pos < len(entries) else None
    if not entry or window[pos] not in entry:
        raise PromptLogprobsMissingError(f"the engine returned no prompt logprob for token {window[pos]} at position "
                                         f"{pos} of a {len(window)}-token prompt")
    logprob = entry[window[pos]]
    return logprob, logprob >= max(entry.values())
