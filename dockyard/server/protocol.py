"""OpenAI wire format: request and response models for /v1/completions and /v1/chat/completions.

Field names follow OpenAI's API, plus the sampling extras vLLM accepts (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ...). The models check
*types* only; value ranges are checked once, by :class:`~dockyard.engine.sampling_params.SamplingParams`,
so the server and the Python API reject the same values with the same messages. Unknown request
fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_serializer


class OpenAIModel(BaseModel):
    """Base of every wire model: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """Base of request models: JSON types are strict (``true`` is not 1, ``"2"`` is not 2), and the
    ``NaN`` / ``Infinity`` literals Python's JSON parsers accept are refused, naming the field."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------- errors
class ErrorInfo(OpenAIModel):
    """The body of an OpenAI error: ``{"error": {"message", "type", "param", "code"}}``."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    """An error response body."""

    error: ErrorInfo


# ---------------------------------------------------------------- shared request parts
class JsonSchemaFormat(RequestModel):
    """``response_format.json_schema``: a named JSON schema (``strict`` accepted: the schema is always
    enforced, extra properties never allowed)."""

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """``response_format``: ``text``, ``json_object``, ``json_schema`` (with ``json_schema``) or vLLM's
    ``structural_tag`` (its ``structures`` and ``triggers``, or a ``format``)."""

    type: str
    json_schema: JsonSchemaFormat | None = None
    structures: list[Any] | None = None
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None


class StreamOptions(RequestModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    include_usage: bool | None = False


# Fields checked by a validator (for OpenAI-style messages) whose accepted forms the schema states.
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
StopField = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                                     {"type": "null"}]})]
PromptField = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    {**_TOKEN_IDS, "minItems": 1}, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]})]


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("stop must be a string or a list of strings")


class SamplingFields(RequestModel):
    """Sampling fields shared by completions and chat completions (None = the default)."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: StopField = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    # (server/serving.structured_outputs_of turns them into one StructuredOutputsParams).
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        return _check_stop(value)


# ---------------------------------------------------------------- completions
class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids or lists of them."""

    prompt: PromptField
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        def token_ids(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value) or token_ids(value):
                return value
            if all(token_ids(p) for p in value):
                return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of "
                         "token-id lists (and not empty)")


class CompletionLogprobs(OpenAIModel):
    """Legacy completions logprobs: parallel lists over the tokens (with echo: the prompt's, then the generated)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    """One choice of a completion, or of a streamed completion chunk."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token id that ended it


class UsageInfo(OpenAIModel):
    """Token counts of one response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(OpenAIModel):
    """A completion (``object: text_completion``); streamed chunks use the same shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- chat completions
class ContentPart(RequestModel):
    """One part of a message's content: the text kinds OpenAI defines (``text``; ``refusal`` in an
    assistant's history), each checked in serving; other kinds (images, audio, files) are refused there."""

    type: str
    text: str | None = None
    refusal: str | None = None


class FunctionCallParam(RequestModel):
    """A function call in the history: its name and its arguments as a JSON text."""

    name: str
    arguments: str


class ToolCallParam(RequestModel):
    """An assistant's tool call in the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(RequestModel):
    """One message of the conversation (``tool`` messages answer an assistant's ``tool_calls`` by id)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier answer's reasoning (Qwen3's template reads it)


class FunctionDefinition(RequestModel):
    """A function the model may call; ``parameters`` is its arguments' JSON schema."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(RequestModel):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    """The function a named ``tool_choice`` forces."""

    name: str


class NamedToolChoice(RequestModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # vLLM extras: keyword arguments for the chat template (e.g. {"enable_thinking": false}).
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None


class TopLogprob(OpenAIModel):
    """One alternative token at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """The chosen token at a position, with the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    """Chat logprobs of one choice."""

    content: list[TokenLogprob] | None = None


class FunctionCall(OpenAIModel):
    """A generated function call: the name and the arguments' JSON text."""

    name: str
    arguments: str


class ToolCall(OpenAIModel):
    """A generated tool call."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(OpenAIModel):
    """The generated message (``reasoning_content``: vLLM's extra, with a reasoning parser)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(OpenAIModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    """A chat completion (``object: chat.completion``)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaFunctionCall(OpenAIModel):
    """A piece of a streamed function call: the name in the first piece, then pieces of the arguments."""

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIModel):
    """A piece of a streamed tool call (``id`` and ``type`` in its first piece)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(OpenAIModel):
    """What a streamed chunk adds to a choice's message (unset fields are left out, as OpenAI does)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    """A streamed chat chunk (``object: chat.completion.chunk``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- models list
class ModelCard(OpenAIModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dockyard"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- tokenize / detokenize (vLLM's extras)
class TokenizeRequest(RequestModel):
    """``POST /tokenize``: a ``prompt`` (``add_special_tokens`` default true) or chat ``messages`` rendered
    through the chat template (``add_special_tokens`` default false, as the template holds them)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[ToolDefinition] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(OpenAIModel):
    """The token ids (and, when asked for, each token's text)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    """``POST /detokenize``: token ids back to text."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    """The text of the token ids."""

    prompt: str
