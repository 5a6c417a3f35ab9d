"""OpenAI completions and chat completions on top of :class:`~dockyard.engine.async_engine.AsyncLLM`.

A request becomes prompt token ids plus one :class:`SamplingParams` (whose own checks produce the
400 messages), then one engine request per prompt. Non-streamed responses wait for the final
outputs while watching for the client to go away; streamed ones turn each engine output into a
Server-Sent Event carrying only the text not sent yet.

Streamed text is held back where it could still change: the last ``len(longest stop string) - 1``
characters (a stop string may be completing there, and then the text is cut before it) and any
trailing U+FFFD (an incomplete UTF-8 character whose remaining bytes come with the next token).
So the concatenation of the deltas always equals the non-streamed text.

Completions with ``echo`` and ``logprobs`` (the legacy API's way to score a text, which lm-eval's
``local-completions`` uses for loglikelihood): the engine computes the prompt's logprobs
(``SamplingParams.prompt_logprobs``), and the choice's ``logprobs`` cover the prompt tokens (the
first one with null ``token_logprobs`` / ``top_logprobs`` entries) followed by the generated ones.
``max_tokens: 0`` is allowed with ``echo``: one token is generated and dropped, so the answer is the
prompt alone (``finish_reason: "length"``, no completion tokens).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dockyard.engine.async_engine import AsyncLLM, EngineDeadError, RequestStream
from dockyard.engine.llm import LLM
from dockyard.engine.outputs import CompletionOutput, RequestOutput
from dockyard.engine.sampling_params import SamplingParams
from dockyard.errors import DockyardError, InvalidRequestError, RequestFailedError
from dockyard.reasoning import ReasoningParser, reasoning_parser_class
from dockyard.server.chat_output import ChoiceOutputParser
from dockyard.server.errors import INTERNAL_ERROR_MESSAGE, APIError, ClientDisconnected
from dockyard.server.metrics import ServerStats
from dockyard.server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from dockyard.server.structured_outputs import check_compiles, structured_outputs_of
from dockyard.structured_output.params import StructuredOutputsParams
from dockyard.tool_parsers import (
    NamedToolParser,
    RequiredToolParser,
    ToolParser,
    get_tool_parser,
    named_call_schema,
    required_calls_schema,
)

logger = logging.getLogger(__name__)
# The request log (--enable-log-requests): its own logger, so that it shows whatever --log-level says.
request_logger = logging.getLogger("dockyard.requests")

MAX_SEQUENCES_PER_REQUEST = 4096  # prompts x n of one HTTP request
_MIN_LOGPROB = -9999.0  # JSON has no -inf
# SamplingParams fields a request may set directly (None = keep the default).
_PASSTHROUGH = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
                "skip_special_tokens", "include_stop_str_in_output", "logit_bias")

# Fill-in-the-middle token sets (prefix, suffix, middle) as the code models' tokenizers name them:
# StarCoder / SantaCoder / DeepSeek-Coder-style and Qwen2.5-Coder / CodeGemma-style.
FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))



def fim_tokens(tokenizer: Any) -> tuple[str, str, str] | None:
    """The fill-in-the-middle tokens (prefix, suffix, middle) of ``tokenizer``, if it has one of the known sets."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    return next((t for t in FIM_TOKENS if all(x in vocab for x in t)), None)


def fim_prompt(tokens: tuple[str, str, str], prefix: str, suffix: str) -> str:
    """The prompt asking for the text between ``prefix`` and ``suffix`` (prefix-suffix-middle order)."""
    return f"{tokens[0]}{prefix}{tokens[1]}{suffix}{tokens[2]}"


Disconnected = Callable[[], Awaitable[None]]  # returns when the client has gone away


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One Server-Sent Event."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several request streams as they come, tagged with the stream's index.

    Leaving early (an exception, cancellation, or closing this generator) closes every stream,
    which aborts the requests that have not finished.
    """
    pending: dict[asyncio.Future[RequestOutput], int] = {}
    try:
        pending = {asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(streams[i].__anext__())] = i
                yield i, out
    finally:
        for fut in pending:
            fut.cancel()
        for s in streams:
            s.close()


class EventStream:
    """A streamed response's SSE lines; closing it, even before the first line, aborts its requests."""

    def __init__(self, lines: AsyncIterator[str], streams: list[RequestStream]) -> None:
        self._lines = lines
        self._streams = streams

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> str:
        return await self._lines.__anext__()

    async def aclose(self) -> None:
        try:
            await self._lines.aclose()  # type: ignore[attr-defined]
        finally:
            for s in self._streams:
                s.close()


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


class _TextCursor:
    """What of a sample's text and tokens has been streamed already."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.chars = 0
        self.tokens = 0
        self.done = False

    def text_delta(self, text: str, finished: bool) -> str:
        end = len(text)
        if not finished:
            end -= self.hold
            while end > self.chars and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.chars:
            return ""
        delta, self.chars = text[self.chars:end], end
        return delta

    def new_tokens(self, out: CompletionOutput) -> range:
        r = range(self.tokens, len(out.token_ids))
        self.tokens = len(out.token_ids)
        return r


def _hold_back(params: SamplingParams) -> int:
    """Characters to hold back while streaming (a stop string that kept in the text needs none)."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop) - 1


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(self, llm: LLM, engine: AsyncLLM, served_model_names: list[str], stats: ServerStats,
                 log_requests: bool = False, tool_call_parser: str | None = None,
                 enable_auto_tool_choice: bool = False, reasoning_parser: str | None = None) -> None:
        if tool_call_parser is not None:
            get_tool_parser(tool_call_parser)  # an unknown name fails here, naming the known ones
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.reasoning_parser: type[ReasoningParser] | None = (
            reasoning_parser_class(reasoning_parser) if reasoning_parser is not None else None)
        self.llm = llm
        self.engine = engine
        self.model_names = served_model_names
        self.stats = stats
        self.max_model_len = llm.engine.max_model_len
        self.default_sampling = dict(llm.source.generation.sampling)
        self.log_requests = log_requests
        self._token_strs: dict[int, str] = {}
        # The reasoning parser's (start, end) markers as token ids, once the tokenizer is first asked.
        self._reasoning_marker_ids: tuple[list[int] | None, list[int]] | None = None
        # Chat templating and tokenization run here, off the event loop; one thread, because a fast
        # (Rust) tokenizer may refuse concurrent use ("Already borrowed"), as vLLM found.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="dockyard-tokenize")

    def close(self) -> None:
        """Stop the tokenizer thread (requests still queued there are dropped)."""
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, arg)

    # ------------------------------------------------------------ shared
    def check_model(self, name: str | None) -> str:
        """The served name to answer with; 404 for a name this server does not serve."""
        if name is None or name in self.model_names:
            return self.model_names[0] if name is None else name
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{', '.join(repr(n) for n in self.model_names)} (see GET /v1/models)",
                       param="model", code="model_not_found")

    def _check_common(self, req: SamplingFields) -> None:
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def _sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                         max_tokens_param: str, prompt_logprobs: int | None = None,
                         max_tokens_hint: str = "", logprobs_param: str = "logprobs",
                         structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
            raise APIError(400, f"{max_tokens_param} must be >= 1{max_tokens_hint}, got {max_tokens}",
                           param=max_tokens_param, code="invalid_value")
        # What the request leaves unset comes from the generation config (vLLM's default_sampling_params).
        kwargs = {**self.default_sampling,
                  **{name: getattr(req, name) for name in _PASSTHROUGH if getattr(req, name) is not None}}
        if max_tokens is None:
            max_tokens = kwargs.pop("max_tokens", None)
        kwargs.pop("max_tokens", None)
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                  structured_outputs=structured_outputs, **kwargs)
        except InvalidRequestError as exc:
            # Name the field as this request spelled it (chat: max_completion_tokens, top_logprobs).
            wire = {"max_tokens": max_tokens_param, "logprobs": logprobs_param}.get(exc.param or "", exc.param)
            message = str(exc)
            if wire != exc.param and exc.param and message.startswith(exc.param):
                message = wire + message[len(exc.param):]
            raise APIError(400, message, param=wire, code="invalid_value") from None

    def _check_lengths(self, prompts: list[_Prompt], max_tokens: int | None, prompt_param: str,
                       max_tokens_param: str) -> None:
        limit = self.max_model_len
        for p in prompts:
            n = len(p.token_ids)
            if n == 0:
                raise APIError(400, f"the {prompt_param} is empty after tokenization; give at least one token",
                               param=prompt_param, code="invalid_value")
            if n >= limit:
                raise APIError(400, f"the {prompt_param} has {n} tokens, but this model's maximum length is "
                                    f"{limit} tokens (prompt plus at least one generated token); shorten it",
                               param=prompt_param, code="context_length_exceeded")
            if max_tokens is not None and n + max_tokens > limit:
                raise APIError(400, f"the {prompt_param} ({n} tokens) plus {max_tokens_param} ({max_tokens}) is "
                                    f"{n + max_tokens} tokens, over this model's maximum length of {limit} "
                                    f"tokens; shorten the {prompt_param} or lower {max_tokens_param}",
                               param=max_tokens_param, code="context_length_exceeded")

    async def _start(self, request_id: str, prompts: list[_Prompt], params: SamplingParams,
                     endpoint: str) -> list[RequestStream]:
        if len(prompts) * params.n > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"{len(prompts)} prompts x n={params.n} is {len(prompts) * params.n} sequences; "
                                f"one request may ask for at most {MAX_SEQUENCES_PER_REQUEST}", param="n")
        streams: list[RequestStream] = []
        if self.log_requests:
            for i, p in enumerate(prompts):
                request_logger.info("Received request %s-%d: prompt: %r, params: %s, prompt_token_ids: %s",
                                    request_id, i, p.text, params, p.token_ids)
        try:
            for i, p in enumerate(prompts):
                streams.append(await self.engine.add_request(p.token_ids, params, f"{request_id}-{i}", p.text))
        except BaseException:
            for s in streams:
                s.close()
            raise
        self.stats.requests_received[endpoint] += 1
        return streams

    async def _collect(self, streams: list[RequestStream], disconnected: Disconnected | None) -> list[RequestOutput]:
        """The final output of every stream; ClientDisconnected (requests aborted) if the client left."""

        async def run() -> list[RequestOutput]:
            final: list[RequestOutput | None] = [None] * len(streams)
            async for i, out in merge_streams(streams):
                final[i] = out
            return final  # type: ignore[return-value]

        task = asyncio.ensure_future(run())
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            waiting = {task} if watcher is None else {task, watcher}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise ClientDisconnected()
        finally:
            for t in (task, watcher):
                if t is not None and not t.done():
                    t.cancel()
            for s in streams:
                s.close()  # aborts whatever has not finished

    def token_str(self, token_id: int) -> str:
        """A token's text as logprobs show it (special tokens included)."""
        s = self._token_strs.get(token_id)
        if s is None:
            tok = self.llm.tokenizer
            s = tok.decode([token_id], skip_special_tokens=False) if tok is not None else f"token_id:{token_id}"
            self._token_strs[token_id] = s
        return s

    @staticmethod
    def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        items = list(entry.items())  # the sampled token first, then the top-k alternatives
        if len(items) > k:
            items = items[1:]  # the sampled token is not among the top k
        return sorted(items, key=lambda kv: -kv[1])[:k]

    # ------------------------------------------------------------ chat
    def _chat_prompt(self, req: ChatCompletionRequest) -> _Prompt:
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", param="messages", code="invalid_value")
        text = self._render_chat(req)
        return _Prompt(text, self.llm.get_tokenizer().encode(text, add_special_tokens=False))

    def _render_chat(self, req: ChatCompletionRequest | TokenizeRequest, add_generation_prompt: bool = True) -> str:
        """The request's messages (and tools) through the chat template."""
        conversation = [_template_message(i, m) for i, m in enumerate(req.messages or [])]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        kwargs = _template_kwargs(req)
        try:
            return self.llm.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                                                **kwargs)
        except DockyardError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 - a template that raises (e.g. role order) is the request's fault
            raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from None

    def _tool_parser(self, req: ChatCompletionRequest) -> ToolParser | None:
        """The parser of this request's tool calls (None: no tool calls are looked for)."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools; send the functions in tools, or leave tool_choice out",
                               param="tool_choice")
            return None
        names = [t.function.name for t in req.tools]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise APIError(400, f"tools[{i}]: the function name {name!r} is used twice; give each function its "
                                    "own name", param=f"tools.{i}.function.name")
        if choice is None or choice == "auto":
            if not (self.enable_auto_tool_choice and self.tool_call_parser):
                raise APIError(400, 'tool_choice "auto" (the default with tools) needs the server started with '
                                    "--enable-auto-tool-choice and --tool-call-parser NAME; otherwise send "
                                    'tool_choice "none", "required" or a named function', param="tool_choice")
            return get_tool_parser(self.tool_call_parser)
        if choice == "none":
            return None
        if choice == "required":
            return RequiredToolParser()
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not among "
                                f"tools ({', '.join(repr(n) for n in names)})", param="tool_choice.function.name")
        return NamedToolParser(choice.function.name)

    @staticmethod
    def _tool_constraint(req: ChatCompletionRequest, tool_parser: ToolParser | None) -> StructuredOutputsParams | None:
        """The grammar that makes a required / named tool choice's output valid calls (None for the others)."""
        if not isinstance(tool_parser, RequiredToolParser | NamedToolParser):
            return None
        functions = [(t.function.name, t.function.parameters) for t in req.tools or []]
        if isinstance(tool_parser, RequiredToolParser):
            schema = required_calls_schema(functions, parallel=req.parallel_tool_calls is not False)
        else:
            schema = named_call_schema(dict(functions)[tool_parser.name])
        # No free whitespace: a small model could otherwise fill max_tokens with it.
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)

    def _output_parsers(self, req: ChatCompletionRequest, tool_parser: ToolParser | None, prompt: _Prompt,
                        params: SamplingParams) -> list[ChoiceOutputParser] | None:
        """One parser per choice, or None when the text is passed through as it is."""
        if tool_parser is None and self.reasoning_parser is None:
            return None
        parallel = req.parallel_tool_calls is not False
        reasoning = self.reasoning_parser
        return [ChoiceOutputParser(reasoning(prompt.text or "") if reasoning else None, tool_parser, parallel)
                for _ in range(params.n)]

    def _after_reasoning(self, structured: StructuredOutputsParams) -> StructuredOutputsParams:
        """``structured`` starting where the reasoning parser's section ends (the markers' token ids)."""
        if self.reasoning_parser is None:
            return structured
        if self._reasoning_marker_ids is None:
            tok = self.llm.get_tokenizer()
            cls = self.reasoning_parser
            self._reasoning_marker_ids = (tok.encode(cls.START, add_special_tokens=False) if cls.START else None,
                                          tok.encode(cls.END, add_special_tokens=False))
        start, end = self._reasoning_marker_ids
        return dataclasses.replace(structured, reasoning_start_token_ids=start, reasoning_end_token_ids=end)

    def _check_chat(self, req: ChatCompletionRequest) -> None:
        self._check_common(req)
        if req.functions or req.function_call is not None:
            raise APIError(400, "functions / function_call (deprecated by OpenAI) are not supported; send tools "
                                "and tool_choice instead", param="functions", code="unsupported_parameter")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    async def chat(self, req: ChatCompletionRequest,
                   disconnected: Disconnected | None = None) -> ChatCompletionResponse | EventStream:
        """A chat completion, or (stream=true) its SSE lines."""
        model = self.check_model(req.model)
        self._check_chat(req)
        if req.max_completion_tokens is not None:
            max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_param = req.max_tokens, "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        structured, structured_param = structured_outputs_of(req)
        tool_parser = self._tool_parser(req)
        constraint = self._tool_constraint(req, tool_parser)
        if constraint is not None:
            if structured is not None:
                raise APIError(400, f"a required or named tool_choice already constrains the output; leave out "
                                    f"{structured_param}", param="tool_choice")
            structured, structured_param = constraint, "tools"
        if structured is not None:
            structured = self._after_reasoning(structured)
        params = self._sampling_params(req, max_tokens, logprobs, max_param, logprobs_param="top_logprobs",
                                       structured_outputs=structured)
        if structured is not None:
            await check_compiles(self.llm, structured, structured_param)
        markers_special = (tool_parser is not None and tool_parser.needs_special_tokens) or (
            self.reasoning_parser is not None and self.reasoning_parser.needs_special_tokens)
        if markers_special and req.skip_special_tokens is None:
            params.skip_special_tokens = False  # the parser must see the format's markers
        # Templating and tokenizing take milliseconds each: off the event loop, so a burst of requests
        # does not hold up /health or other connections.
        prompt = await self._off_loop(self._chat_prompt, req)
        self._check_lengths([prompt], max_tokens, "messages", max_param)
        parsers = self._output_parsers(req, tool_parser, prompt, params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._start(request_id, [prompt], params, "chat")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            lines = self._chat_stream(request_id, model, streams, params, len(prompt.token_ids), include_usage,
                                      parsers)
            return EventStream(lines, streams)
        (final,) = await self._collect(streams, disconnected)
        choices = []
        for c in final.outputs:
            message = AssistantMessage(content=c.text)
            finish_reason = c.finish_reason
            if parsers is not None:
                parsed = parsers[c.index].update(c.text, final=True)
                message = AssistantMessage(content=parsed.content or None, reasoning_content=parsed.reasoning or None,
                                           tool_calls=parsed.tool_calls())
                finish_reason = _finish_reason(finish_reason, parsers[c.index])
            choices.append(ChatCompletionChoice(
                index=c.index, message=message, logprobs=self._chat_logprobs(c, range(len(c.token_ids)), params),
                finish_reason=finish_reason, stop_reason=c.stop_reason,
            ))
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=_usage(len(prompt.token_ids), completion_tokens))

    def _chat_logprobs(self, out: CompletionOutput, positions: range, params: SamplingParams) -> ChoiceLogprobs | None:
        if params.logprobs is None or out.logprobs is None:
            return None
        content = []
        for j in positions:
            tid = out.token_ids[j]
            entry = out.logprobs[j]
            token = self.token_str(tid)
            top = [TopLogprob(token=self.token_str(t), logprob=max(lp, _MIN_LOGPROB),
                              bytes=list(self.token_str(t).encode("utf-8")))
                   for t, lp in self._top(entry, params.logprobs)]
            content.append(TokenLogprob(token=token, logprob=max(entry[tid], _MIN_LOGPROB),
                                        bytes=list(token.encode("utf-8")), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    async def _chat_stream(self, request_id: str, model: str, streams: list[RequestStream], params: SamplingParams,
                           prompt_tokens: int, include_usage: bool,
                           parsers: list[ChoiceOutputParser] | None = None) -> AsyncIterator[str]:
        created = int(time.time())
        cursors = [_TextCursor(_hold_back(params)) for _ in range(params.n)]
        texts = [""] * params.n  # what each choice's cursor has let through
        last: RequestOutput | None = None

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]))

        try:
            for i in range(params.n):
                yield chunk(ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            async for _, out in merge_streams(streams):
                last = out
                for c in out.outputs:
                    cur = cursors[c.index]
                    if cur.done:
                        continue
                    finished = c.finish_reason is not None
                    delta = cur.text_delta(c.text, finished)
                    logprobs = self._chat_logprobs(c, cur.new_tokens(c), params)
                    message, finish_reason, news = DeltaMessage(content=delta), c.finish_reason, bool(delta)
                    if parsers is not None:
                        texts[c.index] += delta
                        parsed = parsers[c.index].update(texts[c.index], finished)
                        message = DeltaMessage(content=parsed.content or None,
                                               reasoning_content=parsed.reasoning or None,
                                               tool_calls=parsed.tool_call_deltas())
                        news = bool(parsed.content or parsed.reasoning or parsed.calls)
                        if finished:
                            finish_reason = _finish_reason(finish_reason, parsers[c.index])
                    if not (news or finished or (logprobs and logprobs.content)):
                        continue
                    cur.done = finished
                    yield chunk(ChatCompletionStreamChoice(
                        index=c.index, delta=message, logprobs=logprobs,
                        finish_reason=finish_reason, stop_reason=c.stop_reason if finished else None,
                    ))
            if include_usage and last is not None:
                completion_tokens = sum(len(c.token_ids) for c in last.outputs)
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                              usage=_usage(prompt_tokens, completion_tokens)))
        except Exception as exc:  # noqa: BLE001 - the stream ends with an error event, whatever failed
            yield sse(error_body(exc))
        finally:
            for s in streams:
                s.close()
        yield SSE_DONE

    # ------------------------------------------------------------ tokenize / detokenize
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """vLLM's ``/tokenize``: a prompt's token ids, or a chat's after its template."""
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt (a text) or messages (a chat), not both and not neither",
                           param="prompt")
        return await self._off_loop(self._tokenize, req)

    def _tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        tok = self.llm.get_tokenizer()
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            text = self._render_chat(req, add_generation_prompt=req.add_generation_prompt)
            ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's ``/detokenize``: token ids back to text."""
        self.check_model(req.model)
        tok = self.llm.get_tokenizer()
        vocab = len(tok)
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise APIError(400, f"tokens[{i}] = {t} is not a token id of this tokenizer (ids are 0 to {vocab - 1})",
                               param=f"tokens.{i}", code="invalid_value")
        return DetokenizeResponse(prompt=await self._off_loop(tok.decode, req.tokens))

    # ------------------------------------------------------------ completions
    def _completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        prompt = req.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        out = []
        fim = self._fim_tokens() if req.suffix is not None else None
        for item in items:
            if isinstance(item, str):
                if fim is not None:
                    item = fim_prompt(fim, item, req.suffix or "")
                try:
                    ids = self.llm.get_tokenizer().encode(item)
                except DockyardError as exc:
                    raise APIError(400, str(exc), param="prompt") from None
                out.append(_Prompt(item, ids))
            else:
                out.append(_Prompt(None, list(item)))
        return out

    def _check_completion(self, req: CompletionRequest) -> None:
        self._check_common(req)
        if req.suffix is not None and self._fim_tokens() is None:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model: its tokenizer has none "
                                f"of the FIM token sets ({'; '.join(' '.join(t) for t in FIM_TOKENS)}); leave suffix "
                                "out", param="suffix", code="unsupported_parameter")
        if req.suffix is not None and not (isinstance(req.prompt, str) or all(isinstance(p, str) for p in req.prompt)):
            raise APIError(400, "suffix needs the prompt as text (the prefix), not token ids", param="suffix")
        if req.suffix is not None and req.echo:
            raise APIError(400, "echo cannot be combined with suffix (as in OpenAI's API); leave one out", param="echo")
        n = 1 if req.n is None else req.n
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, f"best_of={req.best_of} is not supported (only best_of == n, here {n})",
                           param="best_of", code="unsupported_parameter")

    def _fim_tokens(self) -> tuple[str, str, str] | None:
        return fim_tokens(self.llm.tokenizer)

    def _echo_text(self, prompt: _Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tok = self.llm.tokenizer
        return tok.decode(prompt.token_ids) if tok is not None else ""

    async def completions(self, req: CompletionRequest,
                          disconnected: Disconnected | None = None) -> CompletionResponse | EventStream:
        """A completion, or (stream=true) its SSE lines."""
        model = self.check_model(req.model)
        self._check_completion(req)
        # max_tokens=0 with echo: score the prompt only (one token is generated, then dropped).
        prompt_only = bool(req.echo) and req.max_tokens == 0
        prompt_logprobs = req.logprobs if req.echo else None
        structured, structured_param = structured_outputs_of(req)
        params = self._sampling_params(req, 1 if prompt_only else req.max_tokens, req.logprobs, "max_tokens",
                                       prompt_logprobs=prompt_logprobs, max_tokens_hint=" (or 0 with echo=true)",
                                       structured_outputs=structured)
        if structured is not None:
            await check_compiles(self.llm, structured, structured_param)
        prompts = await self._off_loop(self._completion_prompts, req)  # off the event loop, as for chat
        self._check_lengths(prompts, req.max_tokens, "prompt", "max_tokens")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._start(request_id, prompts, params, "completions")
        echo = [self._echo_text(p) if req.echo else "" for p in prompts]
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            lines = self._completion_stream(request_id, model, streams, params, prompts, echo, prompt_only,
                                            prompt_tokens, include_usage)
            return EventStream(lines, streams)
        finals = await self._collect(streams, disconnected)
        choices = []
        for i, final in enumerate(finals):
            echo_lp = self._echo_logprobs(prompts[i], final, params)
            for c in final.outputs:
                if prompt_only:
                    choices.append(CompletionChoice(index=i * params.n + c.index, text=echo[i], logprobs=echo_lp,
                                                    finish_reason="length"))
                    continue
                logprobs = self._completion_logprobs(c, range(len(c.token_ids)), params, len(echo[i]))
                choices.append(CompletionChoice(
                    index=i * params.n + c.index, text=echo[i] + c.text, logprobs=_join_logprobs(echo_lp, logprobs),
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                ))
        completion_tokens = 0 if prompt_only else sum(len(c.token_ids) for f in finals for c in f.outputs)
        return CompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=_usage(prompt_tokens, completion_tokens))

    def _echo_logprobs(self, prompt: _Prompt, out: RequestOutput, params: SamplingParams) -> CompletionLogprobs | None:
        """The prompt tokens' part of an echoed choice's logprobs (None unless logprobs were asked for)."""
        k = params.prompt_logprobs
        if k is None:
            return None
        entries = out.prompt_logprobs
        if entries is None or len(entries) != len(prompt.token_ids):
            raise RuntimeError(f"request {out.request_id}: the engine returned no complete prompt logprobs")
        lp = CompletionLogprobs()
        offset = 0
        for tid, entry in zip(prompt.token_ids, entries):
            offset = self._append_logprob(lp, tid, entry, k, offset)
        return lp

    def _append_logprob(self, lp: CompletionLogprobs, tid: int, entry: dict[int, float] | None, k: int,
                        offset: int) -> int:
        """Append one token (``entry`` None: the first prompt token, which has no logprob); the next offset."""
        token = self.token_str(tid)
        lp.tokens.append(token)
        lp.text_offset.append(offset)
        if entry is None:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
        else:
            lp.token_logprobs.append(max(entry[tid], _MIN_LOGPROB))
            top = {self.token_str(t): max(v, _MIN_LOGPROB) for t, v in self._top(entry, k)}
            top.setdefault(token, max(entry[tid], _MIN_LOGPROB))
            lp.top_logprobs.append(top)
        return offset + len(token)

    def _completion_logprobs(self, out: CompletionOutput, positions: range, params: SamplingParams,
                             offset: int) -> CompletionLogprobs | None:
        if params.logprobs is None or out.logprobs is None:
            return None
        lp = CompletionLogprobs()
        for j in positions:
            offset = self._append_logprob(lp, out.token_ids[j], out.logprobs[j], params.logprobs, offset)
        return lp

    async def _completion_stream(self, request_id: str, model: str, streams: list[RequestStream],
                                 params: SamplingParams, prompts: list[_Prompt], echo: list[str], prompt_only: bool,
                                 prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        n = params.n
        cursors = [_TextCursor(_hold_back(params)) for _ in range(len(streams) * n)]
        offsets = [len(echo[i // n]) for i in range(len(streams) * n)]
        last: list[RequestOutput | None] = [None] * len(streams)
        # With prompt logprobs the echo goes out with them, once the engine has them.
        echo_pending = [params.prompt_logprobs is not None] * len(streams)

        def chunk(choice: CompletionChoice) -> str:
            return sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice]))

        try:
            for i, text in enumerate(echo):
                if text and not echo_pending[i]:
                    for k in range(n):
                        yield chunk(CompletionChoice(index=i * n + k, text=text))
            async for i, out in merge_streams(streams):
                last[i] = out
                if echo_pending[i]:
                    if out.prompt_logprobs is None:
                        continue  # later outputs carry the whole text so far: nothing is lost
                    echo_pending[i] = False
                    echo_lp = self._echo_logprobs(prompts[i], out, params)
                    for k in range(n):
                        yield chunk(CompletionChoice(index=i * n + k, text=echo[i], logprobs=echo_lp))
                for c in out.outputs:
                    index = i * n + c.index
                    cur = cursors[index]
                    if cur.done:
                        continue
                    if prompt_only:  # the generated token is dropped: only say that the choice ended
                        if c.finish_reason is not None:
                            cur.done = True
                            yield chunk(CompletionChoice(index=index, text="", finish_reason="length"))
                        continue
                    finished = c.finish_reason is not None
                    delta = cur.text_delta(c.text, finished)
                    logprobs = self._completion_logprobs(c, cur.new_tokens(c), params, offsets[index])
                    if logprobs is not None:
                        offsets[index] += sum(len(t) for t in logprobs.tokens)
                    if not (delta or finished or (logprobs and logprobs.tokens)):
                        continue
                    cur.done = finished
                    yield chunk(CompletionChoice(index=index, text=delta, logprobs=logprobs,
                                                 finish_reason=c.finish_reason,
                                                 stop_reason=c.stop_reason if finished else None))
            if include_usage:
                completion_tokens = 0 if prompt_only else sum(
                    len(c.token_ids) for f in last if f is not None for c in f.outputs)
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                             usage=_usage(prompt_tokens, completion_tokens)))
        except Exception as exc:  # noqa: BLE001 - the stream ends with an error event, whatever failed
            yield sse(error_body(exc))
        finally:
            for s in streams:
                s.close()
        yield SSE_DONE


def _finish_reason(reason: str | None, parser: ChoiceOutputParser) -> str | None:
    """``tool_calls`` for a choice that ended by itself after calling tools (OpenAI's reason)."""
    return "tool_calls" if reason == "stop" and parser.called else reason


def _content_text(i: int, m: ChatMessage) -> str:
    """A message's content as one text: a string, or its text parts joined (the kinds OpenAI defines for text)."""
    content = m.content
    if content is None:
        if m.role != "assistant":
            raise APIError(400, f"messages[{i}] ({m.role}) has no content", param=f"messages.{i}.content")
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if part.type == "text" and part.text is not None:
            texts.append(part.text)
        elif part.type == "refusal" and m.role == "assistant" and part.refusal is not None:
            texts.append(part.refusal)
        elif part.type in ("text", "refusal"):
            field = part.type
            raise APIError(400, f"messages[{i}].content[{j}] is a {field} part without its {field!r} string"
                           + ("" if field == "text" or m.role == "assistant" else
                              " (refusal parts belong to assistant messages)"), param=where, code="invalid_value")
        else:
            raise APIError(400, f"messages[{i}].content[{j}] is of type {part.type!r}; only text parts "
                                "({\"type\": \"text\", \"text\": ...}, and \"refusal\" in assistant messages) "
                                "are supported", param=where, code="unsupported_content")
    return "\n".join(texts)


def _template_message(i: int, m: ChatMessage) -> dict[str, Any]:
    """One request message as the chat template takes it (tool-call arguments as objects, as HF's templates
    expect them)."""
    message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _content_text(i, m)}
    if m.name is not None:
        message["name"] = m.name
    if m.reasoning_content is not None:
        message["reasoning_content"] = m.reasoning_content
    if m.role == "tool":
        if m.tool_call_id is None:
            raise APIError(400, f"messages[{i}] (tool) needs tool_call_id: the id of the assistant's tool call it "
                                "answers", param=f"messages.{i}.tool_call_id")
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(400, f"messages[{i}] ({m.role}) has tool_calls; only assistant messages make calls",
                           param=f"messages.{i}.tool_calls")
        calls = []
        for j, call in enumerate(m.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: "
                                    f"{call.function.arguments[:80]!r}", param=f"messages.{i}.tool_calls.{j}.function."
                                                                               "arguments") from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        message["tool_calls"] = calls
    return message


_TEMPLATE_OWN = frozenset({"messages", "conversation", "tools", "tokenize", "add_generation_prompt", "chat_template",
                           "return_dict", "documents", "continue_final_message"})


def _template_kwargs(req: Any) -> dict[str, Any]:
    """``chat_template_kwargs`` and ``reasoning_effort``, the extras a request gives the chat template."""
    kwargs = dict(req.chat_template_kwargs or {})
    taken = sorted(_TEMPLATE_OWN.intersection(kwargs))
    if taken:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(taken)}: the server sets those",
                       param="chat_template_kwargs")
    if getattr(req, "reasoning_effort", None) is not None:
        kwargs["reasoning_effort"] = req.reasoning_effort
    return kwargs


def _join_logprobs(head: CompletionLogprobs | None, tail: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """The prompt's logprobs followed by the generated tokens' (either may be None)."""
    if head is None or tail is None:
        return tail if head is None else head
    return CompletionLogprobs(text_offset=head.text_offset + tail.text_offset,
                              token_logprobs=head.token_logprobs + tail.token_logprobs,
                              tokens=head.tokens + tail.tokens, top_logprobs=head.top_logprobs + tail.top_logprobs)


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def to_api_error(exc: BaseException) -> APIError:
    """The APIError a failure maps to (InvalidRequestError → 400 with its param, engine gone → 503)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestFailedError):  # failed alone while generating
        if isinstance(exc.cause, InvalidRequestError):
            return APIError(400, str(exc), param=exc.cause.param, code="invalid_value")
        if not isinstance(exc.cause, DockyardError):
            return APIError(500, f"request {exc.request_id} failed while generating: {INTERNAL_ERROR_MESSAGE}; "
                                 "other requests are not affected", code="request_failed")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, DockyardError):
        return APIError(400, str(exc))
    logger.error("internal error answered as 500", exc_info=exc)
    return APIError(500, INTERNAL_ERROR_MESSAGE)


def error_body(exc: BaseException) -> dict[str, Any]:
    """The OpenAI error body for any exception."""
    return to_api_error(exc).body()
