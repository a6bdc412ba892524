"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

FastAPI validates every request against these before a handler runs, so handlers see only
well-typed values. The models are strict (no "0.5" for a number, no 1.0 for an integer) and
forbid unknown fields: OpenAI itself rejects unrecognised arguments, and silently ignoring,
say, `tools` or `response_format` would hand an app a reply it did not ask for. Ranges follow
OpenAI's documented ones; `top_k`, `min_p` and `repetition_penalty` are the usual local-server
extensions (llama.cpp, vLLM). Fields OpenAI accepts that change nothing here (`user`,
`metadata`, `store`, `service_tier`) are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 16


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Lenient(BaseModel):
    """Response models: built by the server, never validated from clients."""

    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message. Extra keys (`tool_calls`, `refusal`, ...) pass through to the template."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template reads it: content as one string, no None values,
        and OpenAI's `developer` role (its newer name for `system`) as `system`, the role
        templates know."""
        data = self.model_dump(exclude_none=True)
        if data["role"] == "developer":
            data["role"] = "system"
        if isinstance(self.content, list):
            data["content"] = "\n".join(part.text for part in self.content)
        return data


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class SamplingFields(Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted for compatibility; they change nothing on a local server.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_16_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # A length limit inside the union would be reported as "Input should be a valid string".
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        return stop


class ResponseFormat(Strict):
    """Only plain text is produced; the handler refuses the JSON modes in one line."""

    type: str


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Accepted at the values that ask for nothing (what SDKs send by default); the handler
    # refuses any other value: no tools, no JSON mode here.
    response_format: ResponseFormat | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


# ------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------


class PromptTokensDetails(Lenient):
    cached_tokens: int = 0


class Usage(Lenient):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(Lenient):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(Lenient):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Lenient):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(Lenient):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(Lenient):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None


class Response(Lenient):
    """What every generation response carries besides its choices."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class ChatCompletion(Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Lenient):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Lenient):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Lenient):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Lenient):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class Completion(Response):
    """A text completion, and (object unchanged, as OpenAI does) each chunk of a streamed one."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Lenient):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-llama"


class ModelList(Lenient):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Lenient):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Lenient):
    error: ErrorDetail


class Health(Lenient):
    status: Literal["ok"] = "ok"
    model: str
    busy: bool
    waiting: int
