"""The OpenAI-compatible HTTP API (FastAPI): routes, authentication, errors in OpenAI's shape, SSE streams.

Routes:
  POST /v1/chat/completions     chat, streamed (SSE) or not; `aq` governance object on every answer; tool calls
                                governed by the policy's authority (serving/tools.py); `documents` (labeled
                                evidence, before the last user message; serving/context.py)
  POST /v1/completions          plain-text completion (`documents` go before the prompt)
  GET  /v1/models               the served model
  GET  /v1/sessions/{id}        the caller's session (policy fragments, turns, last audit record, tool calls)
  GET  /v1/audit/head           the audit chain's head (seq, hash) to anchor verification (admin / auditor)
  GET  /v1/audit/{record_id}    an audit record, to its own principal (admins / auditors: any)
  GET  /health                  200 when ready, 503 while starting or draining
  GET  /metrics                 Prometheus metrics

Every error is `{"error": {"message", "type", "param", "code"}}` with its status: 400 for a bad request
(validation errors included; FastAPI's 422 is never used), 401, 403, 404, 429 with Retry-After, 503 while
starting or draining. A stream that fails after it started sends an error event and then `[DONE]`.

This module only translates HTTP to `serving.service.Service` calls; threads and queues are described there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import context, tools
from serving.engine import compiler_thread
from serving.governance import Principal
from serving.schemas import ChatRequest, CompletionRequest, ErrorResponse, ResponseFormat
from serving.service import APIError, ChoiceResult, Delta, GenerationParams, Service, new_id

__all__ = ["create_app", "json_object_regex"]

log = logging.getLogger("aqjax.serving.api")

_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in (
    (400, "bad request"), (401, "missing or wrong API key"), (403, "not allowed (e.g. loosening the policy)"),
    (404, "not found"), (429, "at capacity (see Retry-After)"), (500, "internal error"),
    (503, "starting or shutting down"))}


# --------------------------------------------------------------------------------------------------------------
# Errors.


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        msg = f"unknown parameter: {param}"
        code = "unknown_parameter"
    elif kind in ("json_invalid", "model_attributes_type") or (not loc and kind == "missing"):
        msg, code, param = "the request body must be a JSON object", "invalid_json", None
    else:
        msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        code = "invalid_value"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(400, msg + more, param=param, code=code)


def _http_error(exc: StarletteHTTPException) -> APIError:
    status = exc.status_code
    codes = {404: "not_found", 405: "method_not_allowed"}
    detail = exc.detail if isinstance(exc.detail, str) else "error"
    return APIError(status, detail, code=codes.get(status), headers=dict(exc.headers or {}))


# --------------------------------------------------------------------------------------------------------------
# Request -> GenerationParams.

_JSON_STRING = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_JSON_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_WS = r"[ ]?"


def json_object_regex(depth: int = 2) -> str:
    """A regex for JSON objects nested at most `depth` levels (JSON is not regular; this bounds it)."""
    value = f"({_JSON_STRING}|{_JSON_NUMBER}|true|false|null)"

    def obj(v):
        member = f"{_JSON_STRING}{_WS}:{_WS}{v}"
        return rf"\{{{_WS}({member}({_WS},{_WS}{member})*)?{_WS}\}}"

    def arr(v):
        return rf"\[{_WS}({v}({_WS},{_WS}{v})*)?{_WS}\]"

    for _ in range(depth - 1):
        value = f"({_JSON_STRING}|{_JSON_NUMBER}|true|false|null|{obj(value)}|{arr(value)})"
    return obj(value)


def _request_fragment(policy: dict | None, response_format: ResponseFormat | None) -> dict | None:
    """The turn-level fragment: the `policy` extra field plus the structure a response_format asks for."""
    fragment = dict(policy) if policy else {}
    structure = None
    if response_format is not None and response_format.type == "json_object":
        structure = {"regex": json_object_regex()}
    elif response_format is not None and response_format.type == "json_schema":
        js = response_format.json_schema
        if js is None or js.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        structure = {"json_schema": js.schema_}
    if structure is not None:
        if "structure" in fragment:
            raise APIError(400, "give a structure either in response_format or in policy, not both",
                           param="response_format")
        fragment["structure"] = structure
    return fragment or None


def _with_documents(request_messages, messages: list[dict], text: str) -> list[dict]:
    """The chat-template messages with the documents' blocks put before the last user message's content."""
    users = [i for i, m in enumerate(request_messages) if m.role == "user"]
    if not users:
        raise APIError(400, "documents are shown before the last user message; the conversation has none",
                       param="documents")
    i = users[-1] + len(messages) - len(request_messages)  # tools.conversation may put a system message first
    out = list(messages)
    out[i] = {**out[i], "content": text + out[i]["content"]}
    return out


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


def _common_checks(svc: Service, body) -> None:
    if body.model != svc.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {svc.model_name!r}",
                       param="model", code="model_not_found")
    if body.frequency_penalty or body.presence_penalty:
        raise APIError(400, "frequency_penalty and presence_penalty are not supported", param="frequency_penalty"
                       if body.frequency_penalty else "presence_penalty", code="unsupported_parameter")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if body.seed is not None and not -(2**63) <= body.seed < 2**63:
        raise APIError(400, "seed must be a 64-bit integer", param="seed")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")


def _top_logprobs(svc: Service, top: int | None, param: str) -> int | None:
    """The alternatives per token a request asks for (None: no log-probabilities); 400 beyond the engine's K."""
    if top is None:
        return None
    eng = svc.config.engine
    if not eng.logprobs:
        raise APIError(400, "this server is configured without logprobs", param=param, code="unsupported_parameter")
    if top > eng.max_top_logprobs:
        raise APIError(400, f"{param} must be at most {eng.max_top_logprobs} on this server", param=param)
    return top


class _Logprobs:
    """OpenAI's logprobs objects for the entries of `Delta.logprobs` (tokens: the tokenizer's string for each single
    id; bytes: the raw bytes the id stands for). Log-probabilities are governed: the raw model's, renormalised over
    the tokens the gate admitted at that step; blocked tokens (or ones the gate would rewrite) never appear among
    the alternatives, a step whose token the gate forced offers none, and a token the gate forced or rewrote
    outside what it admitted has -9999.0."""

    def __init__(self, svc: Service):
        self._tok = svc.tokenizer
        self._bytes = None
        self._text: dict[int, str] = {}

    def text(self, i: int) -> str:
        if i not in self._text:
            self._text[i] = self._tok.decode([i])
        return self._text[i]

    def raw(self, i: int) -> list[int]:
        if self._bytes is None:
            self._bytes = self._tok.token_bytes()
        return list(self._bytes[i])

    def chat(self, entries) -> dict | None:
        if entries is None:
            return None
        return {"content": [
            {"token": self.text(t), "logprob": lp, "bytes": self.raw(t),
             "top_logprobs": [{"token": self.text(a), "logprob": v, "bytes": self.raw(a)} for a, v in alts]}
            for t, lp, alts in entries], "refusal": None}

    def completion(self, entries, offset: int) -> dict | None:
        """The legacy shape; text_offset counts characters from `offset` (the length of what precedes)."""
        if entries is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, alts in entries:
            text = self.text(t)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            top: dict[str, float] = {}
            for a, v in alts:
                top.setdefault(self.text(a), v)  # two ids may decode alike: keep the likelier
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _params(svc: Service, body, prompt: list[int], max_tokens: int | None, max_param: str,
            fragment: dict | None, tool_plan: tools.ToolPlan | None = None,
            top_logprobs: int | None = None, evidence: tuple[str, ...] = (), documents: tuple = (),
            withheld: tuple = (), said: tuple[str, ...] = ()) -> GenerationParams:
    return GenerationParams(
        prompt=prompt,
        max_tokens=svc.max_tokens_for(len(prompt), max_tokens, max_param),
        n=body.n,
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p),
        seed=None if body.seed is None else body.seed % 2**63,
        stop=_stops(body.stop),
        session_id=body.session_id,
        request_fragment=fragment,
        session_fragment=body.session_policy,
        tools=tool_plan,
        top_logprobs=top_logprobs,
        evidence=evidence,
        documents=documents,
        withheld=withheld,
        said=said,
    )


async def _principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer KEY` (401 otherwise)."""
    svc: Service = request.app.state.service
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
    found = svc.config.keys.authenticate(key.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise APIError(401, "incorrect API key", code="invalid_api_key")
    return found


Caller = Annotated[Principal, Depends(_principal)]


# --------------------------------------------------------------------------------------------------------------
# Responses.


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _watch_disconnect(request: Request, task: asyncio.Task) -> None:
    """Cancels `task` (a non-streamed call) when its client goes away."""
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.25)


async def _collect(svc: Service, call, request: Request) -> tuple[dict[int, str], dict[int, ChoiceResult],
                                                                 dict[int, list | None]]:
    """(text, result, log-probability entries or None) per choice."""
    texts: dict[int, list[str]] = {ch.index: [] for ch in call.choices}
    results: dict[int, ChoiceResult] = {}
    asked = call.params.top_logprobs is not None
    logprobs: dict[int, list | None] = {ch.index: [] if asked else None for ch in call.choices}

    async def consume():
        async with contextlib.aclosing(svc.events(call)) as events:
            async for kind, i, payload in events:
                if kind == "delta":
                    texts[i].append(payload.text)
                    if asked and payload.logprobs is not None:
                        logprobs[i].extend(payload.logprobs)
                else:
                    results[i] = payload

    task = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_watch_disconnect(request, task))
    try:
        await task
    finally:
        watcher.cancel()
    return {i: "".join(t) for i, t in texts.items()}, results, logprobs


def _usage(prompt_len: int, results: dict[int, ChoiceResult]) -> dict:
    completion = sum(r.completion_tokens for r in results.values())
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}


def _summary_aq(results: dict[int, ChoiceResult]) -> dict | None:
    aqs = [results[i].aq for i in sorted(results) if results[i].aq is not None]
    if not aqs:
        return None
    if len(aqs) == 1:
        return aqs[0]
    order = ["ADMIT", "DOWNGRADE", "CLARIFY", "DEFER", "REFUSE"]
    return {"verdict": max((a["verdict"] for a in aqs), key=order.index),
            "confidence": min(a["confidence"] for a in aqs),
            "rules": [r for a in aqs for r in a["rules"]], "policy_hash": aqs[0]["policy_hash"],
            "audit_id": aqs[0]["audit_id"], "audit_ids": [a["audit_id"] for a in aqs],
            "session_id": aqs[0]["session_id"]}


# --------------------------------------------------------------------------------------------------------------
# The app.


def create_app(svc: Service, *, load_in_background: bool = True) -> FastAPI:
    """The FastAPI app around a service. With `load_in_background`, startup loads the service in a thread (the
    server answers 503 meanwhile); shutdown drains it and closes it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if load_in_background and svc.engine is None:
            loader = compiler_thread(_load_quietly, "aqjax-loader", args=(svc,))  # it compiles (warm-up)
            loader.start()
        yield
        if loader is not None:
            loader.join()
        await asyncio.get_running_loop().run_in_executor(None, svc.drain, svc.config.drain_timeout)
        svc.close()

    app = FastAPI(title="aqjax", version="0.1.0", lifespan=lifespan,
                  description="Governed LLM inference: an OpenAI-compatible API whose every token passed the gate.")
    app.state.service = svc

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(_http_error(exc))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", "other")
        svc.metrics.requests.labels(label, str(response.status_code)).inc()
        return response

    # ---------------------------------------------------------------------------------------------- routes

    @app.get("/health", responses=_ERRORS)
    async def health():
        body = {"status": svc.state.value, "model": svc.model_name or None,
                "slots": svc.config.engine.slots, "governed": svc.governed}
        if svc.ready:
            return body
        err = APIError(503, f"the server is {svc.state.value}", code=f"server_{svc.state.value}",
                       headers={"Retry-After": "5"})
        out = err.body()
        out.update(body)
        return JSONResponse(out, status_code=503, headers=err.headers)

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=_ERRORS)
    async def models(who: Caller):
        svc.check_available()
        return {"object": "list", "data": [_model_card(svc)]}

    @app.get("/v1/models/{model_id}", responses=_ERRORS)
    async def model(model_id: str, who: Caller):
        svc.check_available()
        if model_id != svc.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return _model_card(svc)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatRequest, request: Request, who: Caller):
        svc.check_available()
        _common_checks(svc, body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        top = _top_logprobs(svc, (body.top_logprobs or 0) if body.logprobs else None, "top_logprobs")
        try:
            tool_req = tools.parse_request(body.tools, body.tool_choice, body.parallel_tool_calls)
        except tools.ToolRequestError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        plan = None if tool_req is None else await svc.tool_plan(who, tool_req, body.session_id)
        if plan is not None and plan.active and body.n > 1:
            raise APIError(400, "n > 1 is not supported with tool calls (each call is charged to the session)",
                           param="n", code="unsupported_parameter")
        try:
            policy = svc.book.deployment if svc.book is not None else None
            messages, specs = tools.conversation(body.messages, plan, policy, knows_tools=svc.template_knows_tools)
        except tools.ToolRequestError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        documents, withheld = svc.screen_documents(who, body.documents)
        if documents:
            messages = _with_documents(body.messages, messages, context.blocks(documents))
        prompt = svc.chat_prompt(messages, specs)
        max_tokens, param = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        fragment = _request_fragment(body.policy, body.response_format)
        evidence = tuple(m.text() for m in body.messages if m.role == "tool")  # tool results are evidence
        said = tuple(m.text() for m in body.messages if m.role in ("user", "assistant"))  # so is the conversation
        p = _params(svc, body, prompt, max_tokens, param, fragment, plan, top, evidence, documents, withheld, said)
        call = await svc.begin(who, p, route="chat")
        rid, created = new_id("chatcmpl"), int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(svc, call, rid, created, len(prompt), usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, results, lps = await _collect(svc, call, request)
        fmt = _Logprobs(svc)
        choices = [{"index": i, "message": _message(texts[i], results[i]),
                    "logprobs": None if results[i].tool_call is not None else fmt.chat(lps[i]),
                    "finish_reason": results[i].finish_reason, "aq": results[i].aq} for i in sorted(results)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": svc.model_name,
                "choices": choices, "usage": _usage(len(prompt), results), "system_fingerprint": _fingerprint(svc),
                "aq": _summary_aq(results)}

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request, who: Caller):
        svc.check_available()
        _common_checks(svc, body)
        top = _top_logprobs(svc, body.logprobs, "logprobs")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (use n)", param="best_of", code="unsupported_parameter")
        prompt_text = None
        if isinstance(body.prompt, str):
            prompt_text = body.prompt
        elif all(isinstance(x, str) for x in body.prompt):
            if len(body.prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            prompt_text = body.prompt[0]
        documents, withheld = svc.screen_documents(who, body.documents)
        if body.documents and prompt_text is None:
            raise APIError(400, "documents need a text prompt (they are shown before it)", param="documents")
        if prompt_text is not None:
            prompt = svc.text_prompt(context.blocks(documents) + prompt_text)
        else:
            prompt = [int(t) for t in body.prompt]
            vocab = svc.model.cfg.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        p = _params(svc, body, prompt, body.max_tokens if body.max_tokens is not None else 16, "max_tokens",
                    body.policy or None, top_logprobs=top, documents=documents, withheld=withheld,
                    said=() if prompt_text is None else (prompt_text,))
        call = await svc.begin(who, p, route="completions")
        rid, created = new_id("cmpl"), int(time.time())
        echo = (prompt_text if prompt_text is not None else svc.tokenizer.decode(prompt)) if body.echo else ""
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_completion_stream(svc, call, rid, created, len(prompt), usage, echo),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, results, lps = await _collect(svc, call, request)
        fmt = _Logprobs(svc)
        choices = [{"index": i, "text": echo + texts[i], "logprobs": fmt.completion(lps[i], len(echo)),
                    "finish_reason": results[i].finish_reason, "aq": results[i].aq} for i in sorted(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": svc.model_name,
                "choices": choices, "usage": _usage(len(prompt), results), "system_fingerprint": _fingerprint(svc),
                "aq": _summary_aq(results)}

    @app.get("/v1/sessions/{session_id}", responses=_ERRORS)
    async def session(session_id: str, who: Caller):
        svc.check_available()
        if svc.sessions is None:
            raise APIError(404, "this server keeps no sessions", code="not_found")
        s = await svc.get_session(who, session_id)
        if s is None:
            raise APIError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return s.public()

    @app.get("/v1/audit/head", responses=_ERRORS)
    async def audit_head(who: Caller):
        svc.check_available()
        if svc.audit is None:
            raise APIError(404, "this server keeps no audit log", code="not_found")
        if not who.can_audit:
            raise APIError(403, "exporting the audit head needs the admin or auditor role", code="forbidden")
        seq, h = svc.audit.head()
        return {"object": "aq.audit_head", "seq": seq, "hash": h, "records": seq + 1, "anchor": f"{seq}:{h}"}

    @app.get("/v1/audit/{record_id}", responses=_ERRORS)
    async def audit_record(record_id: str, who: Caller):
        svc.check_available()
        rec = None if svc.audit is None else await svc.get_record(who, record_id)
        if rec is None:  # also for someone else's record: its existence is not revealed
            raise APIError(404, f"no audit record {record_id!r}", param="record_id", code="record_not_found")
        return {"object": "aq.audit_record", **rec.to_dict()}

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _load_quietly(svc: Service) -> None:
    try:
        svc.load()
    except BaseException:  # logged by Service.load; /health reports it
        pass


def _message(text: str, r: ChoiceResult) -> dict:
    if r.tool_call is not None:  # an admitted call: no text went out
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [r.tool_call]}
    return {"role": "assistant", "content": text, "refusal": None}


def _model_card(svc: Service) -> dict:
    return {"id": svc.model_name, "object": "model", "created": int(svc.started), "owned_by": "aqjax"}


def _fingerprint(svc: Service) -> str:
    return "aqjax-" + (svc.book.deployment.hash[:12] if svc.book is not None else "none")


async def _stream(svc: Service, call, chunk_of, done_of, usage_of) -> Any:
    """SSE body: the events of a call as chunks, then [DONE]; on failure an error event, then [DONE]."""
    results: dict[int, ChoiceResult] = {}
    try:
        async with contextlib.aclosing(svc.events(call)) as events:
            async for kind, i, payload in events:
                if kind == "delta":
                    yield _sse(chunk_of(i, payload))
                else:
                    results[i] = payload
                    for chunk in done_of(i, payload):
                        yield _sse(chunk)
        if usage_of is not None:
            yield _sse(usage_of(results))
    except APIError as e:
        yield _sse(e.body())
    except Exception as e:  # noqa: BLE001 (the stream has started: report in-band)
        log.exception("stream failed")
        yield _sse(APIError(500, f"internal error: {type(e).__name__}", code="internal_error").body())
    yield _DONE


def _chat_stream(svc: Service, call, rid: str, created: int, prompt_len: int, usage: bool):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": svc.model_name,
            "system_fingerprint": _fingerprint(svc)}

    fmt = _Logprobs(svc)

    def chunk(i, d: Delta):
        return {**base, "choices": [{"index": i, "delta": {"content": d.text}, "logprobs": fmt.chat(d.logprobs),
                                     "finish_reason": None}]}

    def done(i, r: ChoiceResult):
        out = []
        if r.tool_call is not None:  # the admitted call, in one delta once the action boundary admitted it
            out.append({**base, "choices": [{"index": i, "delta": {"tool_calls": [{"index": 0, **r.tool_call}]},
                                             "logprobs": None, "finish_reason": None}]})
        out.append({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                         "finish_reason": r.finish_reason}], "aq": r.aq})
        return out

    def usage_of(results):
        return {**base, "choices": [], "usage": _usage(prompt_len, results)}

    async def gen():
        for ch in call.choices:  # the role comes first, as OpenAI sends it
            yield _sse({**base, "choices": [{"index": ch.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        async for b in _stream(svc, call, chunk, done, usage_of if usage else None):
            yield b

    return gen()


def _completion_stream(svc: Service, call, rid: str, created: int, prompt_len: int, usage: bool, echo: str):
    base = {"id": rid, "object": "text_completion", "created": created, "model": svc.model_name,
            "system_fingerprint": _fingerprint(svc)}

    fmt = _Logprobs(svc)
    offsets: dict[int, int] = {}  # characters sent so far per choice (text_offset)

    def chunk(i, d: Delta):
        lp = fmt.completion(d.logprobs, offsets.get(i, 0))
        offsets[i] = offsets.get(i, 0) + len(d.text)
        return {**base, "choices": [{"index": i, "text": d.text, "logprobs": lp, "finish_reason": None}]}

    def done(i, r: ChoiceResult):
        return [{**base, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": r.finish_reason}],
                 "aq": r.aq}]

    def usage_of(results):
        return {**base, "choices": [], "usage": _usage(prompt_len, results)}

    async def gen():
        if echo:
            for ch in call.choices:
                yield _sse(chunk(ch.index, Delta(echo)))
        async for b in _stream(svc, call, chunk, done, usage_of if usage else None):
            yield b

    return gen()
