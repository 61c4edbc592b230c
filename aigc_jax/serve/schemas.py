"""OpenAI's request and response bodies (the subset served), as pydantic models.

Requests are strict: a string where a number belongs is a 400, not a silent conversion (pydantic's default would
turn "0.7" into 0.7 and `true` into 1). Unknown fields are ignored, as OpenAI-compatible servers do, except the
ones whose meaning this server cannot honour (`suffix`, `best_of`, penalties, `logit_bias`, forced tool calls,
JSON modes, the legacy `functions`): those are declared here and refused in handlers.py rather than quietly
dropped. Fields that change a chat prompt (`tools`, `documents`, `chat_template_kwargs`) are rendered by the
template, as `apply_chat_template` renders them.

Responses carry `seed`, an extension: the seed a sampled request used (drawn fresh when the request gave none),
so any sample can be reproduced by sending it back; null for greedy requests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampled(_Request):
    model: str | None = None
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM's): 0 or -1 = off
    ignore_eos: bool = False  # an extension (vLLM's): generate max_tokens tokens whatever comes
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # OpenAI's default: 16
    logprobs: int | None = None  # how many alternatives per token (0..5)
    echo: bool = False  # return the prompt too (with logprobs: the prompt's token log-probabilities)
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Sampled):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template (HF's apply_chat_template(tools=…))
    documents: list[dict[str, Any]] | None = None  # likewise (retrieval-augmented templates)
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables (vLLM's), e.g. enable_thinking
    tool_choice: str | dict[str, Any] | None = None  # only "auto"/"none": forcing a call is not supported
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated form of tools: refused, naming `tools`
    function_call: str | dict[str, Any] | None = None
    max_tokens: int | None = None  # default: whatever the context leaves
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


# ------------------------------------------------------------------------------------------------ responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class _Response(BaseModel):
    """What every completion response and chunk carries besides its choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    seed: int | None = None  # the sampling seed used (an extension; null when greedy)


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _ChatChoice(BaseModel):
    index: int
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChoice(_ChatChoice):
    message: ChatMessage


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage  # always present here


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_ChatChoice):
    delta: Delta


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aigc_jax"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
