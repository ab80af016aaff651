"""Request and response bodies of the OpenAI-compatible API (pydantic; unknown request fields are rejected).

The aqjax extensions are extra body fields (`extra_body=` in the openai client):

  session_id       a session of the calling principal: its policy fragments apply, the phrase gate resumes
                   from the state the session's last turn left, and its admitted tool calls count against the
                   tool quotas.
  policy           a turn-level policy fragment ({phrases, structure, messages}); it may only tighten.
  session_policy   a session-level fragment added to the session for this and every later turn (needs
                   session_id); it may only tighten.
  documents        documents and tool results for this turn's context: [{"text", "label", "kind", "spans"}].
                   `label` is one of the policy's classification labels (default "public"); a document the
                   principal may not read is withheld (`aq.documents.withheld`); the others are shown to the
                   model before the last user message (or the prompt) and are evidence: for the evidence budget,
                   for grounding, and their protected spans (`spans`, default: figures of 4+ digits) join the
                   session's protected set (serving/context.py).

Tools (`tools`, `tool_choice`, `parallel_tool_calls` false) are governed by the policy's authority: see
serving/tools.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "DocumentIn", "ErrorBody", "ErrorResponse",
           "ResponseFormat", "ToolCall", "ToolSpec"]

SessionId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCall(_Strict):
    """A tool call in the history (an earlier assistant reply)."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"]
    function: FunctionCall


class FunctionSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Strict):
    """An entry of `tools` (the policy, not `parameters`, decides what a call may contain: serving/tools.py)."""

    type: Literal["function"]
    function: FunctionSpec


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages
    refusal: str | None = None  # an assistant message sent back as it came

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class DocumentIn(_Strict):
    """An entry of `documents` (see the module docstring)."""

    text: str = Field(min_length=1)
    label: str | None = Field(default=None, min_length=1, max_length=64)
    kind: Literal["document", "tool_result"] = "document"
    spans: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] | None = Field(default=None,
                                                                                              max_length=64)


class JsonSchemaFormat(_Strict):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class _Generation(_Strict):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # aqjax extensions (extra body fields)
    session_id: SessionId | None = None
    policy: dict[str, Any] | None = None
    session_policy: dict[str, Any] | None = None
    documents: list[DocumentIn] | None = Field(default=None, max_length=64)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolSpec], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=8)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
