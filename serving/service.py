"""The generation service behind the HTTP API: model, engine, policies, sessions and audit.

Threads and queues (see also serving/engine.py):

* The asyncio thread (uvicorn's event loop) runs the HTTP handlers and `Service.run`: it renders and encodes
  the prompt, builds the effective policy (merging and compiling run in the default executor: compiling a new
  policy is CPU work), submits one engine request per choice, and consumes the engine's events from an
  `asyncio.Queue` that the engine thread feeds through `loop.call_soon_threadsafe`.
* The engine thread owns the device state (serving/engine.py).
* The persistence thread (a one-worker executor) does every write: audit records (fsync'd), session rows
  (SQLite, WAL, synchronous=FULL). A choice's final event reaches the client only after its audit record and
  session row are committed, so whatever a client has received in full survives a crash.
* The loader thread builds everything at startup while the server already answers (503 until ready).

A session's turns run one at a time (an asyncio lock per (principal, session)); the phrase gate resumes from
the state the previous turn left when the effective policy is the same (a state belongs to one compiled
policy). With n > 1 the session continues from choice 0.

Tool calls (serving/tools.py): a turn with tools gets its authority state from the session's ledger when it is
admitted (under the session lock); when its choice finishes, the action boundary (`tools.decide`) admits or
refuses the proposed call on the asyncio thread, and the persistence thread writes the decision into the audit
record and the admitted call into the ledger, in the same commit as the turn.

Session-aware gates (serving/context.py): when a turn is admitted (under the session lock) it gets its
escalation state (which rules the session's counters activated), its protected spans (the session's, with those
of this request's labeled documents, which are saved to the session at once), its evidence trie and its evidence
budget, and installs them with its engine requests; when choice 0 finishes, the session's counters advance in
the same commit as the turn. The `aq` object reports the documents used and withheld, the protected spans, the
counters and active rules, the budget and what was spent; the audit record notes them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import re
import secrets
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aqjax.sampling import SamplingConfig
from gate import authority as A
from gate.audit import AuditRecord, state_hash
from gate.core import Verdict
from gate.policy import Policy, PolicyError, load_policy, parse_policy
from gate.turn import audit_events
from serving import context, gating, tools
from serving.config import ServerConfig
from serving.engine import Draining, Engine, EngineRequest, Failed, Finished, QueueFull, SlotResult, Tokens
from serving.governance import AuditTrail, PolicyBook, Principal, SessionStore, is_loosening
from serving.metrics import Metrics

__all__ = ["APIError", "ChoiceResult", "Delta", "GenerationParams", "Service", "StopScanner"]

log = logging.getLogger("aqjax.serving")

_EMPTY_POLICY = "aqjax_policy: 1\nname: none\n"
# how a gate-ended turn is reported, by verdict (OpenAI's finish_reason is then "content_filter")
_GATE_FINISH = {Verdict.REFUSE: "refused", Verdict.DEFER: "deferred", Verdict.CLARIFY: "clarify",
                Verdict.DOWNGRADE: "gate", Verdict.ADMIT: "gate"}
_NO_TOOL = tools.ToolOutcome()
_NO_CONTEXT = context.TurnContext()


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or self.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """What a call asks for, validated (the HTTP layer builds it from the request body)."""

    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    session_id: str | None = None
    request_fragment: dict | None = None
    session_fragment: dict | None = None
    tools: tools.ToolPlan | None = None
    top_logprobs: int | None = None  # None: no log-probabilities; else alternatives per token
    evidence: tuple[str, ...] = ()  # evidence texts in the context (tool results)
    documents: tuple = ()  # the request's documents the principal may read (context.Document), in the prompt
    withheld: tuple = ()  # those it may not (context.Withheld)
    said: tuple[str, ...] = ()  # the conversation's texts that are evidence for grounding (user, assistant)


@dataclasses.dataclass
class ChoiceResult:
    """One finished choice: its OpenAI finish_reason, token count and `aq` governance object (the text went out
    in the "delta" events before it), and the admitted tool call in OpenAI's shape (then no text went out)."""

    index: int
    finish_reason: str
    completion_tokens: int
    aq: dict | None
    tool_call: dict | None = None


@dataclasses.dataclass(frozen=True)
class Delta:
    """Text that went out, and (when asked for) the log-probabilities of the tokens behind it: one
    (id, logprob, ((id, logprob), ...)) per token. A token whose text is held back (a possible stop string, a
    possible tool call) has its entry sent with the text that follows it; the entries of text that never goes out
    (after a stop string, a tool call's text) are never sent."""

    text: str
    logprobs: tuple | None = None


class StopScanner:
    """Finds stop strings in streamed text, holding back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found: then nothing after it is emitted)."""
        self._buf += text
        if not self.stops:
            out, self._buf = self._buf, ""
            return out, False
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buf = self._buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), hold, -1):
                if s.startswith(self._buf[-k:]):
                    hold = k
                    break
        cut = len(self._buf) - hold
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


@dataclasses.dataclass(eq=False)
class _Choice:
    index: int
    req: EngineRequest
    decoder: Any
    stopper: StopScanner
    tokens: int = 0
    stopped: bool = False  # a stop string ended it (its engine request was cancelled)
    done: bool = False
    last_event: float = 0.0
    hold: tools.CallHold | None = None  # a tool turn: text that may be a call waits for the action boundary
    logprobs: list | None = None  # entries of tokens whose text has not gone out yet (None: not asked for)

    def delta(self, text: str) -> Delta:
        entries = None
        if self.logprobs is not None:
            entries, self.logprobs = tuple(self.logprobs), []
        return Delta(text, entries)


@dataclasses.dataclass(eq=False)
class _Call:
    principal: Principal
    params: GenerationParams
    policy: Policy | None
    slot_policy: gating.SlotPolicy | None
    queue: asyncio.Queue
    choices: list[_Choice]
    lock: asyncio.Lock | None
    route: str
    results: dict = dataclasses.field(default_factory=dict)
    ledger: tuple = ()  # the session's tool calls before this turn
    turn: context.TurnContext = _NO_CONTEXT  # what the session and the request gave the turn's gates


class Service:
    """Everything a server process holds; `load()` builds it (blocking), `run()` serves one call."""

    def __init__(self, config: ServerConfig, *, model: Any = None):
        self.config = config
        self.state = State.STARTING
        self.error: str | None = None
        self.model = model
        self.engine: Engine | None = None
        self.book: PolicyBook | None = None
        self.sessions: SessionStore | None = None
        self.audit: AuditTrail | None = None
        self.model_name = config.model_name
        self.metrics = Metrics(self)
        self.persist = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aqjax-persist")
        self._session_locks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.started = time.time()

    # ---------------------------------------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        if self.state is State.READY and self.engine is not None and not self.engine.healthy:
            self.state, self.error = State.FAILED, "the engine thread stopped"
        return self.state is State.READY

    @property
    def governed(self) -> bool:
        return self.config.governed

    def load(self) -> None:
        """Loads the model, policies, state and engine, warms up and starts the engine (blocking)."""
        try:
            self._load()
        except BaseException as e:
            log.exception("startup failed")
            self.error = f"{type(e).__name__}: {e}"
            self.state = State.FAILED
            raise

    def _load(self) -> None:
        import os

        c = self.config
        if self.model is None:
            if c.model == "mock":
                from serving.mock import load_mock

                self.model = load_mock()
            else:
                from models.loader import load_model

                self.model = load_model(c.model or None, packed=True)
        m = self.model
        if m.tokenizer is None:
            raise ValueError(f"{m.source} carries no tokenizer; the server needs one")
        if not self.model_name:
            self.model_name = m.cfg.name if c.model not in ("", None) else "SmolLM2-135M-Instruct"
        tok = m.tokenizer
        deployment = load_policy(c.policy) if c.policy else parse_policy(_EMPTY_POLICY, source="<none>")
        self.book = PolicyBook(deployment, tok, vocab_size=m.cfg.vocab_size)
        engine_cfg = dataclasses.replace(c.engine, governed=c.governed)
        engine = Engine(m.cfg, m.params, engine_cfg, stop_ids=tok.stop_ids, eos_id=tok.eos_id,
                        vocab_size=m.cfg.vocab_size)
        if c.governed:
            engine.fit_policy(self.book.compile(deployment))
            # room for a request's substitute or refuse phrase with one of the deployment's messages
            longest = max((len(tok.encode(m, parse_special=False)) for m in deployment.messages.values()), default=0)
            engine.reserve(phrase_factor=c.reserve_phrase_factor, structure_states=c.reserve_structure_states,
                           structure_edges=c.reserve_structure_edges, message_tokens=longest)
            state_dir = os.path.expanduser(c.state_dir)
            os.makedirs(state_dir, exist_ok=True)
            self.audit = AuditTrail(os.path.join(state_dir, "audit.jsonl"))
            if self.audit.repaired:
                log.warning("audit log: dropped a torn last line (%d bytes) left by a crash", self.audit.repaired)
            self.sessions = SessionStore(os.path.join(state_dir, "sessions.sqlite3"))
        if c.warmup:
            t = time.monotonic()
            engine.warmup()
            log.info("warm-up compiled every shape in %.1f s", time.monotonic() - t)
        self.engine = engine.start()
        self.state = State.READY
        log.info("ready: %s, %d slots x %d positions, %s", self.model_name, c.engine.slots, c.engine.max_len,
                 "governed" if c.governed else "UNGOVERNED")

    def begin_drain(self) -> None:
        """New calls get 503 from now on; running ones go on."""
        if self.state in (State.READY, State.STARTING):
            self.state = State.DRAINING

    def drain(self, timeout: float | None = None) -> bool:
        """Waits for running calls and flushes the persistence thread (blocking). True when all finished."""
        self.begin_drain()
        ok = True if self.engine is None else self.engine.drain(timeout)
        # every commit queued so far has run once this no-op has
        self.persist.submit(lambda: None).result(timeout=timeout)
        return ok

    def close(self) -> None:
        """Stops the engine and closes the state (call after `drain`)."""
        self.state = State.STOPPED
        if self.engine is not None:
            self.engine.stop()
        self.persist.shutdown(wait=True)
        if self.sessions is not None:
            self.sessions.close()
        if self.audit is not None:
            self.audit.close()

    def check_available(self) -> None:
        self.ready  # noqa: B018 (notices a dead engine thread)
        if self.state is State.STARTING:
            raise APIError(503, "the server is starting (loading and compiling the model)",
                           code="server_starting", headers={"Retry-After": "5"})
        if self.state is State.FAILED:
            raise APIError(503, f"the server failed: {self.error}", code="server_failed")
        if self.state is not State.READY:
            raise APIError(503, "the server is shutting down", code="server_draining", headers={"Retry-After": "30"})

    # ---------------------------------------------------------------------------------------------- prompts

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def template_knows_tools(self) -> bool:
        """The chat template renders tools itself (else serving/tools.py describes them in the system prompt)."""
        return "tools" in (getattr(self.tokenizer, "chat_template", None) or "")

    def chat_prompt(self, messages: list[dict], tool_specs: list[dict] | None = None) -> list[int]:
        """Renders the chat template and encodes it; message contents can never become control tokens.

        The template is rendered around sentinels; its own text is encoded with special tokens parsed, every
        message content without (a user who writes "<|im_end|>" gets those characters, not the marker).
        `tool_specs` (from the policy, never from the request) go to a template that knows tools.
        """
        tok = self.tokenizer
        nonce = secrets.token_hex(8)
        contents = [m["content"] for m in messages]
        marked = [dict(m, content=f"\x00{nonce}:{i}\x00") for i, m in enumerate(messages)]
        extra = {} if tool_specs is None else {"tools": tool_specs}
        try:
            text = tok.apply_chat_template(marked, add_generation_prompt=True, **extra)
        except Exception as e:
            raise APIError(400, f"cannot render the conversation: {e}", param="messages") from None
        ids: list[int] = []
        pos = 0
        for m in re.finditer(f"\x00{nonce}:(\\d+)\x00", text):
            if m.start() > pos:
                ids += tok.encode(text[pos: m.start()], parse_special=True)
            ids += tok.encode(contents[int(m.group(1))], parse_special=False)
            pos = m.end()
        if pos < len(text):
            ids += tok.encode(text[pos:], parse_special=True)
        if tok.add_bos_default and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id, *ids]
        return ids

    def text_prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        return tok.encode(text, add_bos=tok.add_bos_default, parse_special=False)

    def max_tokens_for(self, prompt_len: int, requested: int | None, param: str = "max_tokens") -> int:
        """The completion budget; 400 when the prompt (plus the requested tokens) exceeds the context."""
        ctx = self.config.engine.max_len
        if prompt_len >= ctx:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server's context is {ctx} tokens",
                           param="messages", code="context_length_exceeded")
        if requested is None:
            return min(self.config.default_max_tokens, ctx - prompt_len)
        if prompt_len + requested > ctx:
            raise APIError(400, f"this server's context is {ctx} tokens, but {prompt_len} prompt tokens + "
                                f"{requested} completion tokens were requested", param=param,
                           code="context_length_exceeded")
        return requested

    # ---------------------------------------------------------------------------------------------- policy

    def _session_lock(self, principal: Principal, session_id: str) -> asyncio.Lock:
        key = (principal.name, session_id)
        lock = self._session_locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._session_locks[key] = lock
        return lock

    async def _effective_policy(self, principal: Principal, p: GenerationParams):
        """(policy, slot policy, session) for a call; 403 (audited) when a fragment loosens the policy."""
        loop = asyncio.get_running_loop()
        session = None
        if p.session_id is not None:
            session = await loop.run_in_executor(self.persist, self.sessions.get, principal.name, p.session_id)
        fragments = list(session.fragments) if session is not None else []
        if p.session_fragment:
            fragments.append(p.session_fragment)
        try:
            policy = await loop.run_in_executor(None, self.book.effective, principal, fragments, p.request_fragment)
        except PolicyError as e:
            if is_loosening(e):
                base = self.book.deployment
                await loop.run_in_executor(self.persist, self.audit.rejection, principal, p.session_id, base,
                                           f"policy loosening: {e}")
                self.metrics.rejections.inc()
                raise APIError(403, f"a request can only tighten the policy: {e}", param=_policy_param(p),
                               code="policy_loosening") from None
            raise APIError(400, f"invalid policy fragment: {e}", param=_policy_param(p),
                           code="invalid_policy") from None
        try:
            slot_policy = await loop.run_in_executor(None, self.book.compile, policy)
        except PolicyError as e:
            raise APIError(400, f"the policy cannot be compiled for this model: {e}", param=_policy_param(p),
                           code="invalid_policy") from None
        except gating.UnsupportedPolicy as e:  # a gate kind the slots lack (none today): never drop a rule
            raise APIError(500, str(e), code="unsupported_policy") from None
        if p.session_fragment:
            session = await loop.run_in_executor(self.persist, self.sessions.add_fragment, principal.name,
                                                 p.session_id, p.session_fragment)
        return policy, slot_policy, session

    def screen_documents(self, principal: Principal, documents) -> tuple[tuple, tuple]:
        """(documents the principal may read, those withheld) under the deployment's classification and roles
        (document-level sections, the same in every effective policy); 400 for an unknown label."""
        if not documents:
            return (), ()
        if not self.governed:
            raise APIError(400, "this server runs without a gate: documents are not available", param="documents",
                           code="unsupported_parameter")
        try:
            return context.screen(self.book.deployment, principal.name, documents)
        except context.ContextError as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None

    async def tool_plan(self, principal: Principal, req: tools.ToolRequest, session_id: str | None) -> tools.ToolPlan:
        """The tools a call may use (serving/tools.py); 403 (audited) when a required call cannot be satisfied."""
        self.check_available()
        if not self.governed:
            raise APIError(400, "this server runs without a gate: tool calls are not available", param="tools",
                           code="unsupported_parameter")
        try:
            return tools.plan(self.book.deployment, principal.name, req)
        except tools.ToolNotPermitted as e:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.persist, self.audit.rejection, principal, session_id, self.book.deployment,
                                       f"tool not permitted: {e}")
            self.metrics.rejections.inc()
            raise APIError(403, str(e), param="tool_choice", code="tool_not_permitted") from None

    # ---------------------------------------------------------------------------------------------- running

    async def begin(self, principal: Principal, p: GenerationParams, *, route: str = "chat") -> _Call:
        """Admits one call: policy, session and engine submission. Raises APIError (bad request, policy, capacity).

        Then iterate `events(call)`.
        """
        self.check_available()
        if p.session_fragment and not p.session_id:
            raise APIError(400, "session_policy needs a session_id", param="session_policy")
        if (p.session_id or p.session_fragment or p.request_fragment) and not self.governed:
            raise APIError(400, "this server runs without a gate: sessions and policies are not available",
                           param="session_id" if p.session_id else "policy")
        lock = self._session_lock(principal, p.session_id) if p.session_id else None
        if lock is not None:
            await lock.acquire()
        try:
            policy = slot_policy = session = None
            if self.governed:
                policy, slot_policy, session = await self._effective_policy(principal, p)
            phrase_state = None
            if session is not None and session.phrase_state is not None and session.state_policy_hash == policy.hash:
                phrase_state = session.phrase_state
            ledger = session.ledger if session is not None else ()
            turn = context.TurnContext()
            if self.governed:
                try:
                    turn = context.prepare(
                        slot_policy, principal.name, documents=p.documents, withheld=p.withheld, evidence=p.evidence,
                        said=p.said, counters=session.counters if session is not None else context.FRESH_COUNTERS,
                        protected=session.protected if session is not None else (), tokenizer=self.tokenizer,
                        tool_mode=p.tools.mode if p.tools is not None else A.NONE, sizes=self.engine.sizes)
                except context.ContextError as e:
                    raise APIError(400, str(e), param=e.param, code=e.code) from None
                if p.session_id is not None and turn.new_spans:  # protected from now on, whatever this turn does
                    await asyncio.get_running_loop().run_in_executor(
                        self.persist, self.sessions.add_protected, principal.name, p.session_id, turn.new_spans)
                if p.tools is not None and set(turn.forbidden) & set(p.tools.offered):
                    p = dataclasses.replace(p, tools=tools.forbid(p.tools, turn.forbidden, "forbidden by escalation"))
            authority_state = None
            if p.tools is not None and p.tools.active:
                if slot_policy.structure is not None:
                    raise APIError(400, "a tool call cannot be combined with a structure constraint "
                                        "(response_format, or a structure in the policy)", param="tools")
                if slot_policy.authority is None:  # plans come from the same tools section: cannot happen
                    raise APIError(500, "the effective policy lost its tools", code="internal_error")
                authority_state = tools.turn_state(slot_policy, p.tools, ledger)
            call = self._submit(principal, p, policy, slot_policy, phrase_state, lock, route, authority_state, turn)
            call.ledger = ledger
            return call
        except BaseException:
            if lock is not None and lock.locked():
                lock.release()
            raise

    async def events(self, call: _Call) -> AsyncIterator[tuple]:
        """Yields ("delta", index, Delta) and ("done", index, ChoiceResult) until every choice is done.

        Raises APIError when the engine fails. Closing the iterator early (the client went away) cancels the
        call's engine requests; what they emitted is still audited, in the background.
        """
        finished = False
        try:
            async for event in self._events(call):
                yield event
            finished = True
        finally:
            if not finished:
                self._abandon(call)

    def _submit(self, principal, p: GenerationParams, policy, slot_policy, phrase_state, lock, route,
                authority_state=None, turn: context.TurnContext = _NO_CONTEXT) -> _Call:
        from models.tokenizer import StreamDecoder

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        call = _Call(principal, p, policy, slot_policy, queue, [], lock, route, turn=turn)
        base_seed = p.seed if p.seed is not None else secrets.randbits(62)
        for i in range(p.n):
            def sink(event, i=i):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, event))
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass

            sampling = SamplingConfig(temperature=p.temperature, top_p=p.top_p, seed=(base_seed + i) % 2**63)
            req = EngineRequest(prompt=p.prompt, max_new=p.max_tokens, sink=sink, sampling=sampling,
                                policy=slot_policy, phrase_state=phrase_state if i == 0 else None,
                                authority_state=authority_state, escalation_state=turn.escalation_state,
                                disclosure_state=turn.disclosure_state, grounding_state=turn.grounding_state,
                                evidence_state=turn.evidence_state, top_logprobs=p.top_logprobs)
            hold = tools.CallHold() if authority_state is not None else None
            call.choices.append(_Choice(i, req, StreamDecoder(self.tokenizer), StopScanner(p.stop), hold=hold,
                                        logprobs=None if p.top_logprobs is None else []))
        submitted = []
        try:
            for ch in call.choices:
                self.engine.submit(ch.req)
                submitted.append(ch)
        except (QueueFull, Draining, ValueError) as e:
            # the choices already admitted are dropped (they run without the session lock, which the caller
            # releases, and nothing of them reaches a client)
            call.choices, call.lock = submitted, None
            for ch in submitted:
                self.engine.cancel(ch.req)
            self._settle_later(call)
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), code="rate_limit_exceeded",
                               headers={"Retry-After": str(e.retry_after)}) from None
            if isinstance(e, Draining):
                raise APIError(503, "the server is shutting down", code="server_draining",
                               headers={"Retry-After": "30"}) from None
            raise APIError(400, str(e)) from None
        self.metrics.prompt_tokens.inc(len(p.prompt) * len(submitted))
        now = time.monotonic()
        for ch in call.choices:
            ch.last_event = now
        return call

    async def _events(self, call: _Call) -> AsyncIterator[tuple]:
        pending = {ch.index for ch in call.choices}
        by_index = {ch.index: ch for ch in call.choices}
        try:
            while pending:
                i, event = await call.queue.get()
                ch = by_index[i]
                if isinstance(event, Tokens):
                    now = time.monotonic()
                    if ch.tokens and event.tokens:
                        gap = (now - ch.last_event) / len(event.tokens)
                        for _ in event.tokens:
                            self.metrics.itl.observe(gap)
                    ch.last_event = now
                    ch.tokens += len(event.tokens)
                    self.metrics.completion_tokens.inc(len(event.tokens))
                    if ch.stopped:
                        continue
                    if ch.logprobs is not None and event.logprobs is not None:
                        ch.logprobs.extend((t, lp, alts) for t, (lp, alts) in
                                           zip(event.tokens, event.logprobs, strict=True))
                    text = ch.decoder.push(event.tokens)
                    if ch.hold is not None:
                        text = ch.hold.push(text)
                    text, hit = ch.stopper.push(text)
                    if hit:
                        ch.stopped = True
                        self.engine.cancel(ch.req)
                    if text:
                        yield ("delta", i, ch.delta(text))
                elif isinstance(event, Finished):
                    pending.discard(i)
                    ch.done = True
                    if not ch.stopped:
                        tail = ch.decoder.flush()
                        if ch.hold is not None:
                            tail = ch.hold.push(tail)
                        text, hit = ch.stopper.push(tail)
                        ch.stopped = ch.stopped or hit
                        text += "" if hit else ch.stopper.flush()
                        if ch.hold is not None and ch.hold.held:
                            ch.logprobs = None if ch.logprobs is None else []  # held text never goes out
                        if text or ch.logprobs:
                            yield ("delta", i, ch.delta(text))
                    result = await self._commit(call, ch, event.result)
                    if ch.hold is not None and ch.hold.held and result.tool_call is None:
                        # a call that was not admitted: the client gets the refusal, never the call's text
                        yield ("delta", i, Delta(call.slot_policy.compiled.policy.messages["refusal"],
                                                 None if ch.logprobs is None else ()))
                    yield ("done", i, result)
                elif isinstance(event, Failed):
                    pending.discard(i)
                    ch.done = True
                    raise APIError(500, f"generation failed: {event.message}", code="engine_error")
        finally:
            if not pending:
                self._release(call)

    def _abandon(self, call: _Call) -> None:
        """The consumer went away: cancel what still runs, settle and commit it in the background."""
        for ch in call.choices:
            if not ch.done:
                self.engine.cancel(ch.req)
        self._settle_later(call)

    def _settle_later(self, call: _Call) -> None:
        """Consumes the remaining events of a call nobody reads any more (committing what was emitted)."""
        if all(ch.done for ch in call.choices):
            self._release(call)
            return

        async def settle():
            try:
                async for _ in self._events(call):
                    pass
            except Exception:
                log.exception("settling an abandoned call")
            finally:
                self._release(call)

        asyncio.get_running_loop().create_task(settle())

    def _release(self, call: _Call) -> None:
        if call.lock is not None and call.lock.locked():
            call.lock.release()
            call.lock = None

    # ---------------------------------------------------------------------------------------------- results

    async def _commit(self, call: _Call, ch: _Choice, result: SlotResult) -> ChoiceResult:
        """Audits the choice and saves the session (persistence thread), then builds its result."""
        m = self.metrics
        m.latency.labels(call.route).observe(result.total_s)
        m.queue_wait.observe(result.queued_s)
        if result.first_token_s is not None:
            m.ttft.observe(result.first_token_s)
        if ch.stopped:
            finish, aq_finish = "stop", "stop"
        elif result.finish_reason == "gate":
            finish, aq_finish = "content_filter", _GATE_FINISH[Verdict(result.verdict)]
        else:
            finish = aq_finish = result.finish_reason
        if not self.governed:
            return ChoiceResult(ch.index, finish, len(result.tokens), None)
        outcome = tools.ToolOutcome()
        if call.params.tools is not None and result.finish_reason != "cancelled":
            outcome = tools.decide(call.slot_policy.compiled.policy, call.params.tools,
                                   self.tokenizer.decode(result.tokens),
                                   None if result.gate_state is None else gating.authority_state_of(result.gate_state),
                                   result.verdict, call.ledger)
        if outcome.call is not None:
            finish, aq_finish = "tool_calls", "tool_call"
        elif outcome.reason is not None or (outcome.began and ch.hold is not None and ch.hold.held):
            finish, aq_finish = "content_filter", "refused"  # the refusal replaces the call (see _events)
        record = None
        if result.tokens or result.finish_reason != "cancelled":
            loop = asyncio.get_running_loop()
            record = await loop.run_in_executor(self.persist, self._persist, call, ch, result, aq_finish, outcome)
        aq = self._aq(call, result, aq_finish, record, outcome)
        m.verdicts.labels(aq["verdict"]).inc()
        for r in aq["rules"]:
            m.rules.labels(r["level"], r["kind"], r["text"][:60], r["action"]).inc(r["events"])
        return ChoiceResult(ch.index, finish, len(result.tokens), aq,
                            None if outcome.call is None else tools.openai_call(outcome.call))

    @staticmethod
    def _verdict(result: SlotResult, finish: str) -> Verdict:
        return Verdict.REFUSE if finish == "refused" else Verdict(result.verdict)

    def _persist(self, call: _Call, ch: _Choice, result: SlotResult, finish: str,
                 outcome: tools.ToolOutcome = _NO_TOOL) -> AuditRecord:
        compiled = call.slot_policy.compiled
        events = context.audit_events(call.turn, call.slot_policy)
        events += audit_events(compiled, self.tokenizer, result)
        events += tools.audit_events(compiled, call.params.tools, outcome, len(result.tokens))
        record = self.audit.append({
            "policy_hash": compiled.policy_hash,
            "state_hash_before": state_hash(result.gate_state_before if result.gate_state_before is not None else ()),
            "state_hash_after": state_hash(result.gate_state if result.gate_state is not None else ()),
            "principal": call.principal.name,
            "session": call.params.session_id,
            "events": events,
            "final_verdict": self._verdict(result, finish).name,
            "confidence": result.confidence,
            "finish_reason": finish,
        })
        if call.params.session_id is not None and ch.index == 0:
            phrase_state = None if result.gate_state is None else gating.phrase_state_of(result.gate_state)
            spent = None if outcome.call is None else (outcome.call.name, outcome.amount)
            counters = context.next_counters(compiled, call.turn.counters, verdict=record.final_verdict,
                                             rules=[e["rule"] for e in events],
                                             boundary_refused=outcome.reason is not None)
            self.sessions.commit_turn(call.principal.name, call.params.session_id, call.policy.hash, phrase_state,
                                      record.record_id, record.final_verdict, spent, counters)
        return record

    def _aq(self, call: _Call, result: SlotResult, finish: str, record: AuditRecord | None,
            outcome: tools.ToolOutcome = _NO_TOOL) -> dict:
        compiled = call.slot_policy.compiled
        counts: dict[int, int] = {}
        for e in result.events:
            if e.rule >= 0:
                counts[e.rule] = counts.get(e.rule, 0) + 1
        if result.rule >= 0:
            counts.setdefault(result.rule, 1)
        for e in tools.audit_events(compiled, call.params.tools, outcome, len(result.tokens)):
            if e["rule"] >= 0:
                counts[e["rule"]] = counts.get(e["rule"], 0) + 1
        rules = []
        for rid, n in sorted(counts.items()):
            info = compiled.rules.get(rid)
            if info is None:
                continue
            rules.append({"id": rid, "level": info.level, "kind": info.kind, "text": info.text,
                          "action": info.action, "events": n})
        out = {
            "verdict": self._verdict(result, finish).name,
            "confidence": round(float(result.confidence), 6),
            "finish": finish,
            "rules": rules,
            "policy_hash": compiled.policy_hash,
            "audit_id": None if record is None else record.record_id,
            "session_id": call.params.session_id,
        }
        out.update(context.public(call.turn, call.slot_policy, result.gate_state))
        if call.params.tools is not None:
            out["tools"] = {**call.params.tools.public(),
                            "call": None if outcome.call is None else {"name": outcome.call.name,
                                                                       "arguments": outcome.call.arguments},
                            "refusal_reason": outcome.reason}
        return out

    # ---------------------------------------------------------------------------------------------- reads

    async def get_session(self, principal: Principal, session_id: str):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.persist, self.sessions.get, principal.name, session_id)

    async def get_record(self, principal: Principal, record_id: str):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.audit.get, record_id, principal)


def _policy_param(p: GenerationParams) -> str:
    if p.session_fragment and not p.request_fragment:
        return "session_policy"
    return "policy" if p.request_fragment else "response_format"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"

