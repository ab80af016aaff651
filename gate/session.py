"""Governed multi-turn sessions: restore the session state, run a governed turn, check the action, save the state.

`Governor.run(requests)` serves a batch of requests in one compiled loop; each row is its own (principal,
session) with its own gate state, so rows with different principals, quotas, protected spans, evidence and
escalation levels share one compiled loop. Per row, a turn is:

1. **Restore** the session's `SessionRecord` from the store (`gate.store`), or start a fresh one.
   *Policy change rule*: a record saved under another policy (its `policy_hash` differs) is never used as it
   is. With `on_policy_change="rebuild"` (the default) the gate state is rebuilt under the current policy from
   the record's policy-independent facts (the ledger of executed calls gives the quotas spent, the counters
   carry over, the protected spans keep their labels; a span whose label the new policy lacks is protected
   under its first protecting label), and an audit record (finish_reason "state_rebuilt") says so before the
   turn. With "refuse" the turn raises `PolicyChanged`; a callable `migrate(record, compiled) -> SessionRecord`
   is used instead when given.
2. **Context**: documents whose label the principal's roles may not read (`data_classes`) are withheld (a note
   in the reply). Tools: a chat template with a tool convention renders the principal's granted tools itself
   (`authority.tool_specs`); otherwise (SmolLM2) the system prompt describes them and the call format
   (`authority.tool_prompt`). The protected spans of labeled documents join the session's protected set
   (`gate.disclosure`); they stay protected in later turns though the document is gone from the prompt.
3. **Gate state for the turn**, per gate: phrases carry over; structure starts afresh; authority gets the
   principal, the tool mode (`tool_choice`) and the tools escalation forbids, its quotas carry over;
   escalation gets the counters and its active topic rules; disclosure gets the session's spans, active where
   the principal lacks the clearance; grounding gets a trie of the turn's evidence (the documents, all user
   messages and the assistant's earlier replies, with the spans protected from this principal blanked out so
   that they cannot even be started); the evidence budget gets base + per evidence token + role limit, times
   the escalation scale (off for REQUIRED tool turns, which the authority gate governs).
4. **Generate** under the compiled policy (`gate.turn.finish_turn` turns the loop's log into events).
5. **Action boundary**: a reply that is (or began) a tool call is parsed and checked once more on the host
   against the policy and the session's ledger (`gate.authority.check_call`); an admissible call is returned as
   `Reply.tool_call` and charged to the quota (state and ledger), an inadmissible one becomes a refusal: the
   reply text is the refusal message, the verdict REFUSE, and an event names the reason.
6. **Escalation counters** advance (`gate.escalation.record_turn`): refusals, blocked actions, violations.
7. **Audit** (when an `AuditLog` is given): one hash-chained record per row, with the boundary event.
8. **Save** the new record atomically, expecting the turn it was restored at (a concurrent writer fails).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gate import authority as A
from gate import disclosure as D
from gate import escalation as X
from gate import evidence as EV
from gate import grounding as G
from gate.audit import AuditLog, AuditRecord, state_hash
from gate.policy import CompiledPolicy
from gate.store import SessionRecord, StateStore
from gate.turn import finish_turn

__all__ = ["Document", "Governor", "PolicyChanged", "Reply", "Request", "SessionError", "describe", "fresh_facts"]

DEFAULT_SYSTEM = "You are a careful assistant of a retail bank. Answer briefly, using only the documents given."
_CONTENT_KINDS = {"phrase", "disclosure", "grounding", "escalation"}
_ACTION_KINDS = {"authority", "quota", "tool_call"}


class SessionError(ValueError):
    """A request that cannot be served (unknown principal, unknown label, a session twice in one batch, ...)."""


class PolicyChanged(SessionError):
    """The saved state was computed under another policy and the governor was told to refuse it."""


@dataclasses.dataclass(frozen=True)
class Document:
    """A document or tool result in the context.

    Attributes:
      text: its text.
      label: a classification label of the policy ("public" when the policy has no classification).
      kind: "document" or "tool_result" (both count as evidence).
      spans: the spans to protect when the label protects; None: the figures of the text.
    """

    text: str
    label: str = "public"
    kind: str = "document"
    spans: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """One turn of one session.

    Attributes:
      principal / session_id: whose session.
      message: the user's message.
      documents: documents and tool results for this turn.
      tool_choice: "none", "auto" (the reply may be one call), "required" (it must be), or a tool name (it must
        be a call of that tool).
      max_new_tokens: the reply's limit.
    """

    principal: str
    session_id: str
    message: str
    documents: tuple[Document, ...] = ()
    tool_choice: str = "none"
    max_new_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class Reply:
    """The governed answer to a `Request`.

    Attributes:
      text: the reply (the refusal message when the action boundary refused a call).
      verdict / finish_reason / confidence: as in `gate.turn.TurnResult` (finish "refused" after a boundary
        refusal, "tool_call" for an admitted call).
      tool_call: the admitted call, or None.
      refusal_reason: why the action boundary refused, or None.
      events: audit events (the boundary's included).
      notes: what the host did besides generating (documents withheld, state rebuilt, ...).
      record: the saved session record; audit: the audit record (None without an audit log).
    """

    text: str
    verdict: str
    finish_reason: str
    confidence: float
    tool_call: A.ToolCall | None
    refusal_reason: str | None
    events: tuple[dict, ...]
    notes: tuple[str, ...]
    record: SessionRecord
    audit: AuditRecord | None = None


def fresh_facts() -> dict:
    """The facts of a new session."""
    return {"history": [], "protected": [], "ledger": [], "counters": [0, 0, 0], "notes": []}


def _row(tree, i: int):
    return jax.tree.map(lambda x: np.asarray(x)[i:i + 1], tree)


def _stack(rows: list):
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate([np.asarray(x) for x in xs])), *rows)


@dataclasses.dataclass
class _Row:
    req: Request
    record: SessionRecord
    facts: dict
    notes: list[str]
    restored_turn: int = 0  # the stored turn the save expects (a concurrent writer makes the save fail)
    rebuilt_from: SessionRecord | None = None  # the record saved under another policy
    documents: list[Document] = dataclasses.field(default_factory=list)


class Governor:
    """Runs governed turns of sessions under one compiled policy, with a state store and an optional audit log.

    Args:
      gen: the `aqjax.engine.Generator`.
      tokenizer: the model's tokenizer.
      compiled: the `CompiledPolicy` (principals, tools, labels ... from its policy).
      store: a `gate.store.StateStore`.
      audit: an `AuditLog`, or None.
      on_policy_change: "rebuild" (default), "refuse", or a callable migrate(record, compiled) -> SessionRecord.
      system: the system prompt.
      sampling: the `SamplingConfig` (default greedy).
    """

    def __init__(self, gen, tokenizer, compiled: CompiledPolicy, store: StateStore, *, audit: AuditLog | None = None,
                 on_policy_change: str | Callable = "rebuild", system: str = DEFAULT_SYSTEM, sampling=None):
        self.gen, self.tok, self.compiled, self.store, self.audit = gen, tokenizer, compiled, store, audit
        self.on_policy_change, self.system, self.sampling = on_policy_change, system, sampling
        p = compiled.policy
        self.policy = p
        self.principals = {q.name: i for i, q in enumerate(p.principals)}
        self.tools = [t.name for t in p.tools]
        self.labels = {lb.name: i for i, lb in enumerate(p.labels)}
        self.roles = {r.name: r for r in p.roles}
        if isinstance(on_policy_change, str) and on_policy_change not in ("rebuild", "refuse"):
            raise ValueError(f"on_policy_change must be 'rebuild', 'refuse' or a callable, got {on_policy_change!r}")

    # ------------------------------------------------------------------------------------------ principals

    def _roles_of(self, principal: str):
        spec = self.policy.principals[self.principals[principal]]
        return [self.roles[r] for r in spec.roles]

    def clearances(self, principal: str) -> set[str]:
        return {c for r in self._roles_of(principal) for c in r.clearances}

    def readable(self, principal: str) -> set[str] | None:
        """Labels the principal may have in its context (None: every label)."""
        out: set[str] = set()
        for r in self._roles_of(principal):
            if r.data_classes is None:
                return None
            out |= set(r.data_classes)
        return out

    def _protects(self, label: str) -> bool:
        i = self.labels.get(label)
        return i is not None and self.policy.labels[i].action != "none"

    # ------------------------------------------------------------------------------------------ state

    def fresh_state(self):
        """The chain's initial state for one row (leading axis 1)."""
        return jax.tree.map(jnp.asarray, _row(self.compiled.gate.init(self.compiled.arrays, 1), 0))

    def restore(self, principal: str, session_id: str) -> tuple[SessionRecord, tuple[str, ...]]:
        """The session's state as the next turn would start from it (applying the policy-change rule, and writing
        its audit note when the state is rebuilt), and the notes. Nothing is saved."""
        row = self._restore(Request(principal, session_id, ""))
        if row.rebuilt_from is not None and self.audit is not None:
            self._audit_note(row)
        return row.record, tuple(row.notes)

    def _restore(self, req: Request) -> _Row:
        if req.principal not in self.principals:
            raise SessionError(f"unknown principal {req.principal!r} (the policy defines "
                               f"{', '.join(self.principals) or 'none'})")
        rec = self.store.load(req.principal, req.session_id)
        if rec is None:
            rec = SessionRecord(req.principal, req.session_id, self.compiled.policy_hash, 0, self.fresh_state(),
                                fresh_facts())
            return _Row(req, rec, rec.facts, [])
        if rec.policy_hash == self.compiled.policy_hash:
            return _Row(req, rec, rec.facts, [], rec.turn)
        if callable(self.on_policy_change):
            new = self.on_policy_change(rec, self.compiled)
            return _Row(req, new, new.facts, [f"state migrated from policy {rec.policy_hash[:12]}..."], rec.turn, rec)
        if self.on_policy_change == "refuse":
            raise PolicyChanged(f"session ({req.principal!r}, {req.session_id!r}) was saved under policy "
                                f"{rec.policy_hash[:12]}..., the current one is {self.compiled.policy_hash[:12]}...")
        return self._rebuild(req, rec)

    def _rebuild(self, req: Request, rec: SessionRecord) -> _Row:
        """The documented rule: rebuild the gate state from the facts under the current policy."""
        facts = {**fresh_facts(), **rec.facts}
        notes = [f"state rebuilt from the session's facts: saved under policy {rec.policy_hash[:12]}..., "
                 f"now {self.compiled.policy_hash[:12]}..."]
        fallback = next((lb.name for lb in self.policy.labels if lb.action != "none"), None)
        protected = []
        for label, text in facts["protected"]:
            if label not in self.labels:
                if fallback is None:
                    notes.append(f"label {label!r} is gone and no label protects: span no longer protected")
                    continue
                notes.append(f"label {label!r} is gone: its span is protected as {fallback!r}")
                label = fallback
            protected.append([label, text])
        facts["protected"] = protected
        state = list(self.fresh_state())
        kinds = self.compiled.kinds
        if "authority" in kinds:
            k = kinds.index("authority")
            auth = jax.tree.map(jnp.asarray, state[k])
            for tool, amount in facts["ledger"]:
                if tool in self.tools:
                    auth = A.record_call(auth, 0, self.tools.index(tool), amount)
            state[k] = _row(auth, 0)
        if "escalation" in kinds:
            k = kinds.index("escalation")
            state[k] = _row(state[k].replace(counters=jnp.asarray([facts["counters"]], jnp.int32)), 0)
        new = SessionRecord(req.principal, req.session_id, self.compiled.policy_hash, rec.turn, tuple(state), facts)
        return _Row(req, new, facts, notes, rec.turn, rec)

    # ------------------------------------------------------------------------------------------ one batch

    def run(self, requests: Sequence[Request]) -> list[Reply]:
        """Serves one turn of each request (distinct sessions) in one compiled loop."""
        keys = [(r.principal, r.session_id) for r in requests]
        if len(set(keys)) != len(keys):
            raise SessionError("a session appears twice in one batch")
        rows = [self._restore(r) for r in requests]
        for row in rows:
            if row.rebuilt_from is not None and self.audit is not None:
                self._audit_note(row)
        prompts, turn_state = self._prepare(rows)
        before = turn_state
        max_new = [r.max_new_tokens for r in requests]
        _, final = self.gen.generate(prompts, self.sampling, max_new, gate=self.compiled.gate,
                                     policy=self.compiled.arrays, gate_state=turn_state, return_state=True)
        results = finish_turn(self.gen, self.tok, self.compiled, final, len(rows), [len(p) for p in prompts], before)
        pairs = enumerate(zip(rows, results, strict=True))
        return [self._finish(i, row, res, _row(before, i)) for i, (row, res) in pairs]

    def turn(self, request: Request) -> Reply:
        """One turn of one session."""
        return self.run([request])[0]

    # ------------------------------------------------------------------------------------------ preparing

    def _context(self, row: _Row) -> list[Document]:
        readable = self.readable(row.req.principal)
        keep = []
        for doc in row.req.documents:
            if self.labels and doc.label not in self.labels:
                raise SessionError(f"document label {doc.label!r} is not defined by the policy "
                                   f"({', '.join(self.labels)})")
            if readable is not None and doc.label not in readable:
                row.notes.append(f"withheld a {doc.kind} labeled {doc.label!r}: not readable by {row.req.principal!r}")
                continue
            keep.append(doc)
            if self._protects(doc.label):
                for span in (doc.spans if doc.spans is not None else D.default_spans(doc.text)):
                    if len(self.policy.normalization.normalize(span)) < D.MIN_SPAN_CHARS:
                        raise SessionError(f"protected span {span!r} is shorter than {D.MIN_SPAN_CHARS} characters "
                                           "once normalized: it would match ordinary text")
                    if [doc.label, span] not in row.facts["protected"]:
                        row.facts["protected"].append([doc.label, span])
        return keep

    def _prompt(self, row: _Row, docs: list[Document]) -> list[int]:
        req = row.req
        system, extra = self.system, {}
        if req.tool_choice != "none" and self.tools:
            only = req.tool_choice if req.tool_choice not in ("auto", "required") else None
            if "tools" in (getattr(self.tok, "chat_template", None) or ""):
                # the model's own convention: its template renders the (granted) tools
                extra["tools"] = A.tool_specs(self.policy, req.principal, only=only)
            else:  # the documented fallback (SmolLM2's template has no tools)
                system += "\n\n" + A.tool_prompt(self.policy, req.principal, only=only)
        content = req.message
        if docs:
            blocks = [f"[{d.kind} {i + 1} ({d.label})]\n{d.text}" for i, d in enumerate(docs)]
            content = "\n\n".join(blocks) + "\n\n" + req.message
        messages = [{"role": "system", "content": system}, *row.facts["history"],
                    {"role": "user", "content": content}]
        return self.tok.encode(self.tok.apply_chat_template(messages, add_generation_prompt=True, **extra))

    def _mode(self, req: Request) -> tuple[int, int]:
        choice = req.tool_choice
        if choice == "none" or not self.tools:
            return A.NONE, -1
        if choice == "auto":
            return A.AUTO, -1
        if choice == "required":
            return A.REQUIRED, -1
        if choice not in self.tools:
            raise SessionError(f"tool_choice {choice!r}: no such tool (the policy defines {', '.join(self.tools)})")
        return A.REQUIRED, self.tools.index(choice)

    def _prepare(self, rows: list[_Row]):
        kinds = self.compiled.kinds
        arrays = dict(zip(kinds, self.compiled.arrays, strict=True))
        init = self.compiled.gate.init(self.compiled.arrays, len(rows))
        # what carries over between turns (phrase automaton, quotas, counters); the rest is rebuilt per turn
        state = [_stack([r.record.gate_state[k] for r in rows]) if kind in ("phrases", "authority", "escalation")
                 else init[k] for k, kind in enumerate(kinds)]
        prompts, spans, tries, budgets, modes, named, forbid, topics, counters = [], [], [], [], [], [], [], [], []
        for row in rows:
            req = row.req
            docs = self._context(row)
            row.documents = docs
            prompts.append(self._prompt(row, docs))
            cleared = self.clearances(req.principal)
            protected = [(self.labels[lb], text, self._protects(lb) and lb not in cleared)
                         for lb, text in row.facts["protected"]]
            spans.append(protected)
            scale, forbidden, topic_bits = X.effects(self.policy, row.facts["counters"]) if self.policy.escalation \
                else (1.0, (), 0)
            mode, tool = self._mode(req)
            modes.append(mode)
            named.append(tool)
            forbid.append(sum(1 << self.tools.index(t) for t in forbidden))
            topics.append(topic_bits)
            counters.append(row.facts["counters"])
            if "grounding" in kinds:
                hidden = [text for _, text, active in protected if active]
                texts = [d.text for d in docs] + [m["content"] for m in row.facts["history"]] + [req.message]
                for h in hidden:  # an uncleared principal cannot even start a protected figure
                    texts = [t.replace(h, " ") for t in texts]
                free = self.policy.grounding.free_integers_below
                tries.append(G.build_trie(texts, free_below=free))
            if "evidence" in kinds:
                if mode == A.REQUIRED:
                    budgets.append(None)
                else:
                    n_ev = sum(len(self.tok.encode(d.text, parse_special=False)) for d in docs)
                    role_budget = max([r.evidence_budget for r in self._roles_of(req.principal)], default=0.0)
                    budgets.append(EV.turn_budget(self.policy.evidence, n_ev, role_budget, scale))
        for k, kind in enumerate(kinds):
            if kind == "structure":
                state[k] = init[k]
            elif kind == "authority":
                state[k] = A.begin_turn(arrays["authority"], state[k], principal=[self.principals[r.req.principal]
                                                                                  for r in rows],
                                        mode=modes, named=named, forbidden=forbid)
            elif kind == "escalation":
                state[k] = X.begin_turn(state[k], counters, topics)
            elif kind == "disclosure":
                match = [lb.match_chars for lb in self.policy.labels]
                state[k] = D.begin_turn(spans, self.policy.normalization, match_chars=match)
            elif kind == "grounding":
                state[k] = G.begin_turn(state[k], tries)
            elif kind == "evidence":
                state[k] = EV.begin_turn(budgets)
        return prompts, tuple(state)

    # ------------------------------------------------------------------------------------------ finishing

    def _finish(self, i: int, row: _Row, res, before) -> Reply:
        req, facts = row.req, row.facts
        kinds = self.compiled.kinds
        state = list(jax.tree.map(jnp.asarray, res.gate_state))
        text, verdict, finish, events = res.text, res.verdict, res.finish_reason, list(res.events)
        call, reason = None, None
        mode, tool = self._mode(req)
        if "authority" in kinds and mode != A.NONE:
            k = kinds.index("authority")
            auth = state[k]
            began = int(auth.phase[0]) >= 0 or bool(auth.boundary[0])
            if verdict != "REFUSE" and (began or mode == A.REQUIRED):
                ledger = facts["ledger"]
                calls_used, total_used = {}, {}
                for t, amount in ledger:
                    calls_used[t] = calls_used.get(t, 0) + 1
                    total_used[t] = total_used.get(t, 0) + amount
                _, forbidden, _ = X.effects(self.policy, facts["counters"]) if self.policy.escalation else (1, (), 0)
                proposal = A.parse_call(text) if bool(auth.boundary[0]) else None
                reason = A.check_call(self.policy, req.principal, proposal, calls_used=calls_used,
                                      total_used=total_used, forbidden=forbidden,
                                      named=self.tools[tool] if tool >= 0 else None)
                if reason is None:
                    call = proposal
                    spec = self.policy.tools[self.tools.index(call.name)]
                    amount = int(call.arguments[spec.quota_argument]) if spec.quota_argument else 0
                    state[k] = A.record_call(auth, 0, self.tools.index(call.name), amount)
                    ledger.append([call.name, amount])
                    finish = "tool_call"
                else:
                    events.append(self._boundary_event(len(res.tokens), reason))
                    text, verdict, finish = self.policy.messages["refusal"], "REFUSE", "refused"
        # escalation counters
        acted = [self.compiled.rules[e["rule"]] for e in events if e["rule"] in self.compiled.rules]
        refused = verdict == "REFUSE"
        blocked = any(r.kind in _ACTION_KINDS for r in acted) or reason is not None
        # a content rule that had to act visibly (substitute or refuse); masks alone (suppress) are not counted
        violated = any(r.kind in _CONTENT_KINDS and r.action in ("substitute", "refuse") for r in acted)
        facts["counters"] = list(X.record_turn(facts["counters"], refused=refused, blocked=blocked, violated=violated))
        if "escalation" in kinds:
            k = kinds.index("escalation")
            state[k] = state[k].replace(counters=jnp.asarray([facts["counters"]], jnp.int32))
        facts["history"] += [{"role": "user", "content": req.message}, {"role": "assistant", "content": text}]
        facts["notes"] += row.notes
        state = _row(tuple(state), 0)
        confidence = res.confidence
        audit = None
        if self.audit is not None:
            audit = self.audit.append({
                "policy_hash": self.compiled.policy_hash, "state_hash_before": state_hash(before),
                "state_hash_after": state_hash(state), "principal": req.principal, "session": req.session_id,
                "events": events, "final_verdict": verdict, "confidence": confidence, "finish_reason": finish})
        record = SessionRecord(req.principal, req.session_id, self.compiled.policy_hash, row.record.turn + 1, state,
                               facts)
        record = self.store.save(record, expect_turn=row.restored_turn)
        return Reply(text=text, verdict=verdict, finish_reason=finish, confidence=float(confidence), tool_call=call,
                     refusal_reason=reason, events=tuple(events), notes=tuple(row.notes), record=record, audit=audit)

    def _boundary_event(self, step: int, reason: str) -> dict:
        rule = next((r.id for r in self.compiled.rules.values() if r.kind == "tool_call"), -1)
        return {"step": step, "token": -1, "token_text": "", "action": "REFUSE", "rule": rule,
                "rule_text": f"action boundary: {reason}", "verdict": "REFUSE", "entropy": 0.0,
                "admissible_mass": 0.0}

    def _audit_note(self, row: _Row) -> None:
        self.audit.append({
            "policy_hash": self.compiled.policy_hash, "state_hash_before": state_hash(row.rebuilt_from.gate_state),
            "state_hash_after": state_hash(row.record.gate_state),
            "principal": row.req.principal, "session": row.req.session_id,
            "events": [{"step": -1, "token": -1, "token_text": "", "action": None, "rule": -1,
                        "rule_text": "; ".join(row.notes), "verdict": "ADMIT", "entropy": 0.0,
                        "admissible_mass": 0.0}],
            "final_verdict": "ADMIT", "confidence": 1.0, "finish_reason": "state_rebuilt"})


def describe(reply: Reply) -> dict[str, Any]:
    """A compact dict of a reply (for notebooks and logs)."""
    return {"text": reply.text, "verdict": reply.verdict, "finish": reply.finish_reason,
            "confidence": round(reply.confidence, 3), "tool_call": reply.tool_call, "refusal": reply.refusal_reason,
            "notes": reply.notes, "turn": reply.record.turn}
