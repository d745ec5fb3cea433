"""The OpenAI wire format: request and response models for the HTTP API (pydantic; they also make /openapi.json).

Field names and meanings follow OpenAI's chat/completions API plus the extras vLLM accepts (top_k, min_p,
repetition_penalty, chat_template_kwargs, ...) and Moonshot's `partial` assistant prefix; see
../shared/reference/serving.md §2 and k2.md §7. Requests accept and ignore unknown fields, as vLLM does.
Values are range-checked here (400 with the field's name); the conversation itself is checked by
kimi.tokenizer.chat when it is rendered.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TextPart(Request):
    type: Literal["text"] = "text"
    text: str


class ImagePart(Request):
    type: Literal["image_url", "image"]


class FunctionCall(Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    partial: bool = Field(False, description="Moonshot: on the last assistant message, continue it")


class FunctionDef(Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Request):
    include_usage: bool = False


class SamplingFields(Request):
    """Sampling fields shared by chat and completions (OpenAI ranges; vLLM extras)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[int] = Field(description="one prompt: text or token ids")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class TokenizeRequest(Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int]


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(Response):
    content: list[TokenLogprob] | None = None


class ResponseFunction(Response):
    name: str | None = None
    arguments: str | None = None


class ResponseToolCall(Response):
    id: str | None = None
    type: Literal["function"] | None = None
    index: int | None = None
    function: ResponseFunction


class InvalidToolCall(Response):
    """A call the model made whose arguments do not parse or validate (k2.md §9.7): reported, never passed on."""

    index: int
    id: str
    name: str
    arguments: str
    error: str


class ResponseMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    invalid_tool_calls: list[InvalidToolCall] | None = None


class ChatChoice(Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    invalid_tool_calls: list[InvalidToolCall] | None = None


class ChatChunkChoice(Response):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kimi"
    max_model_len: int | None = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(Response):
    prompt: str


class Health(Response):
    status: str
