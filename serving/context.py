"""What a turn's session-aware gates start from: documents, the session's facts, the principal's roles.

The server's version of steps 2, 3 and 6 of `gate.session.Governor` (see its docstring), per request instead
of per batch, with the states shaped for the engine's slots (serving/gating.py):

* **Principal.** The server principal is looked up by name in the effective policy's `principals` (like its
  tools, serving/tools.py); a principal the policy does not list holds no role: it may read no labeled document,
  is cleared for no label and has no evidence budget of its own (fail closed).
* **Documents** (`screen`): a request's documents and tool results carry a classification label of the policy
  (an unknown label is a 400 naming it; without a label a document is "public", which the policy must then
  define, unless it has no classification at all). A document whose label none of the principal's roles may
  read (`data_classes`) is withheld: it never reaches the prompt, and `aq` says so. The others are rendered into
  the prompt as "[document 1 (label)]" blocks (`blocks`).
* **Disclosure.** The protected spans of a document with a protecting label (the caller's `spans`, or its
  figures of four or more digits, `gate.disclosure.default_spans`) join the session's protected set, kept with
  the session (serving/governance.py) so they stay protected in later turns without the document. A span is
  active when the principal lacks the clearance for its label; only active spans go into the slot's matcher
  (`gate.disclosure.begin_turn`, padded to the engine's `protected_spans`; more is a 400). A span whose label
  the policy no longer defines is protected under its first protecting label, as the Governor's rebuild does.
* **Grounding.** The turn's evidence is its documents, its tool results and the conversation's user and
  assistant messages (the prompt, for a completion), with the active spans blanked out so that an uncleared
  principal cannot even start a protected figure; its digit trie (`gate.grounding.build_trie`) is built here and
  padded to the engine's `evidence_nodes` (a larger one is a 400 saying so).
* **Escalation.** The session's counters (violations, refusals, blocked; `gate.escalation.COUNTERS`) are kept
  with the session (serving/governance.py) and decide which escalation rules are active this turn
  (`gate.escalation.effects`): their budget scale multiplies the evidence budget, their forbidden tools are
  unavailable to the authority gate and the action boundary, their topics end the turn with the refusal
  message (`gate.escalation.begin_turn`). After the turn, `next_counters` advances them exactly as the Governor
  does (`gate.escalation.record_turn`): refusals for a REFUSE verdict, blocked for an authority, quota or
  tool-call rule that acted (or a boundary refusal), violations for a content rule that substituted or refused.
* **Evidence budget.** base + per evidence token + the roles' limit, times the escalation scale
  (`gate.evidence.turn_budget`); evidence tokens are those of the documents the principal may read and of the
  tool results in the conversation. The budget is off for turns that must be a tool call (the authority gate
  governs them).

Every function here is host-side and pure; the service (serving/service.py) calls them on its asyncio thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gate import authority as A
from gate import disclosure as D
from gate import escalation as X
from gate import evidence as EV
from gate import grounding as G
from gate.core import Verdict
from gate.session import _ACTION_KINDS, _CONTENT_KINDS
from serving import gating, tools

__all__ = ["ContextError", "Document", "TurnContext", "Withheld", "audit_events", "blocks", "clearances",
           "next_counters", "prepare", "public", "readable", "roles_of", "screen"]

FRESH_COUNTERS = (0,) * len(X.COUNTERS)
DEFAULT_LABEL = "public"


class ContextError(ValueError):
    """A request whose context cannot be served (the API answers 400 with `param` and `code`)."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def roles_of(policy, principal: str) -> list:
    """The policy's roles (`RoleSpec`) of a server principal; none for a principal the policy does not list."""
    spec = {p.name: p for p in policy.principals}.get(principal)
    by_name = {r.name: r for r in policy.roles}
    return [] if spec is None else [by_name[r] for r in spec.roles]


def readable(policy, principal: str) -> set[str] | None:
    """Labels the principal may have in its context (None: every label; the policy has no classification, or a
    role's data_classes is unrestricted)."""
    if not policy.labels:
        return None
    out: set[str] = set()
    for r in roles_of(policy, principal):
        if r.data_classes is None:
            return None
        out |= set(r.data_classes)
    return out


def clearances(policy, principal: str) -> set[str]:
    """Labels whose protected spans may be repeated to the principal."""
    return {c for r in roles_of(policy, principal) for c in r.clearances}


def _protects(policy, label: str) -> bool:
    return any(lb.name == label and lb.action != "none" for lb in policy.labels)


@dataclasses.dataclass(frozen=True)
class Document:
    """A document or tool result the request puts in the context.

    Attributes:
      text: its text.
      label: its classification label (None: no classification).
      kind: "document" or "tool_result" (both are evidence).
      spans: the spans to protect when the label protects; None: its figures.
      index: its position in the request's `documents`.
    """

    text: str
    label: str | None = None
    kind: str = "document"
    spans: tuple[str, ...] | None = None
    index: int = 0


@dataclasses.dataclass(frozen=True)
class Withheld:
    """A document left out of the context: its position, label and kind, and why."""

    index: int
    label: str | None
    kind: str
    reason: str

    def public(self) -> dict:
        return {"index": self.index, "label": self.label, "kind": self.kind, "reason": self.reason}


def screen(policy, principal: str, documents) -> tuple[tuple[Document, ...], tuple[Withheld, ...]]:
    """The documents the principal may have in its context, and those withheld (see the module docstring).

    Args:
      policy: a policy whose classification and roles apply (document-level sections: the deployment's).
      principal: the server principal's name.
      documents: objects with text, label (or None), kind and spans (or None), e.g. the request's.

    Raises:
      ContextError: a label the policy does not define, or a protected span too short to protect.
    """
    labels = [lb.name for lb in policy.labels]
    may_read = readable(policy, principal)
    kept, withheld = [], []
    for i, d in enumerate(documents):
        label = d.label
        if label is None and labels:
            label = DEFAULT_LABEL
        if label is not None and label not in labels:
            defined = ", ".join(labels) if labels else "no labels"
            raise ContextError(f"documents[{i}].label {label!r} is not defined by the policy (it defines "
                               f"{defined})", f"documents.{i}.label", "unknown_label")
        spans = None if d.spans is None else tuple(d.spans)
        for j, span in enumerate(spans or ()):
            if len(policy.normalization.normalize(span)) < D.MIN_SPAN_CHARS:
                raise ContextError(f"documents[{i}].spans[{j}] is shorter than {D.MIN_SPAN_CHARS} letters or digits "
                                   "once normalized: it would match ordinary text", f"documents.{i}.spans.{j}")
        if may_read is not None and label not in may_read:
            withheld.append(Withheld(i, label, d.kind, f"label {label!r} is not readable by {principal!r}"))
            continue
        kept.append(Document(d.text, label, d.kind, spans, i))
    return tuple(kept), tuple(withheld)


def blocks(documents: Sequence[Document]) -> str:
    """The documents as the prompt shows them: "[document 1 (label)]" blocks, each followed by a blank line."""
    out = []
    for n, d in enumerate(documents, 1):
        out.append(f"[{d.kind} {n}{'' if d.label is None else f' ({d.label})'}]\n{d.text}\n\n")
    return "".join(out)


def _spans_of(policy, documents: Sequence[Document]) -> list[tuple[str, str]]:
    """(label, span) of every protected span the documents bring (labels that protect only)."""
    out = []
    for d in documents:
        if d.label is None or not _protects(policy, d.label):
            continue
        for span in d.spans if d.spans is not None else D.default_spans(d.text):
            if len(policy.normalization.normalize(span)) >= D.MIN_SPAN_CHARS:
                out.append((d.label, span))
    return out


def _relabel(policy, protected) -> list[tuple[str, str]]:
    """The session's spans under the current labels: an unknown label falls back to the first protecting one; with
    none, the span is no longer protected."""
    names = {lb.name for lb in policy.labels}
    fallback = next((lb.name for lb in policy.labels if lb.action != "none"), None)
    out = []
    for label, span in protected:
        if label not in names:
            if fallback is None:
                continue
            label = fallback
        out.append((label, span))
    return out


@dataclasses.dataclass(frozen=True)
class TurnContext:
    """A turn's gate states from the session and the request, and what the `aq` object reports of them.

    Attributes:
      documents: the documents in the context; withheld: those left out.
      protected: the session's protected spans, (label, span), with this turn's documents' added.
      new_spans: the spans this turn's documents added (what the session store appends).
      active: how many of `protected` are protected from this principal (the slot's matcher holds them).
      trie_nodes: nodes of the turn's evidence trie (0 without grounding).
      counters: the session's escalation counters before the turn (COUNTERS order).
      active: descriptions of the escalation rules active this turn.
      forbidden: tools the active escalation rules forbid.
      budget: the evidence budget in nats, or None (the policy has none, or the turn must be a tool call).
      evidence_tokens: tokens of evidence in the context.
      escalation_state / disclosure_state / grounding_state / evidence_state: the slot's states for the turn
        (numpy, leading axis 1), or None when the policy has no such rule.
    """

    documents: tuple[Document, ...] = ()
    withheld: tuple[Withheld, ...] = ()
    protected: tuple[tuple[str, str], ...] = ()
    new_spans: tuple[tuple[str, str], ...] = ()
    active_spans: int = 0
    trie_nodes: int = 0
    counters: tuple[int, ...] = FRESH_COUNTERS
    active: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    budget: float | None = None
    evidence_tokens: int = 0
    escalation_state: object = None
    disclosure_state: object = None
    grounding_state: object = None
    evidence_state: object = None


def prepare(slot_policy: gating.SlotPolicy, principal: str, *, documents: Sequence[Document] = (),
            withheld: Sequence[Withheld] = (), evidence: Sequence[str] = (), said: Sequence[str] = (),
            counters: Sequence[int] = FRESH_COUNTERS, protected: Sequence[Sequence[str]] = (), tokenizer=None,
            tool_mode: int = A.NONE, sizes: gating.StateSizes | None = None) -> TurnContext:
    """The turn's context (see the module docstring).

    Args:
      slot_policy: the effective policy, compiled.
      principal: the server principal's name.
      documents / withheld: the request's documents, screened (`screen`).
      evidence: other evidence texts in the context (tool results); `tokenizer` counts their tokens and the
        documents'.
      said: the conversation's texts that count as evidence for grounding (user and assistant messages).
      counters / protected: the session's escalation counters and protected spans (fresh for a request without
        a session).
      tool_mode: the turn's tool mode (gate.authority NONE, AUTO or REQUIRED).
      sizes: the engine's per-slot state sizes (None: the defaults).

    Raises:
      ContextError: more protected spans, or a larger evidence trie, than a slot holds.
    """
    policy = slot_policy.compiled.policy
    sizes = sizes or gating.StateSizes()
    counters = tuple(int(c) for c in counters)
    # disclosure: the session's spans, with what this turn's documents add
    protected = _relabel(policy, [(str(lb), str(s)) for lb, s in protected])
    new = [s for s in dict.fromkeys(_spans_of(policy, documents)) if s not in protected]
    protected += new
    cleared = clearances(policy, principal)
    hidden = [(lb, s) for lb, s in protected if _protects(policy, lb) and lb not in cleared]
    disclosure_state = None
    if slot_policy.disclosure is not None:
        index = {lb.name: i for i, lb in enumerate(policy.labels)}
        disclosure_state = D.begin_turn([[(index[lb], s, True) for lb, s in hidden]], policy.normalization,
                                        min_spans=sizes.spans, min_other=sizes.chars,
                                        match_chars=[lb.match_chars for lb in policy.labels])
        if disclosure_state.last.shape[1] > sizes.spans:
            raise ContextError(f"{len(hidden)} protected spans apply to {principal!r} in this session; this server "
                               f"holds at most {sizes.spans} per request (engine.protected_spans)", "documents",
                               "too_many_protected_spans")
        if disclosure_state.other_chars.shape[1] > sizes.chars:
            raise ContextError(f"the protected spans have more than {sizes.chars} distinct non-ASCII characters "
                               "(engine.protected_chars)", "documents", "too_many_protected_spans")
        disclosure_state = gating.host(disclosure_state)
    # grounding: the evidence's figures, without the spans this principal may not see
    grounding_state, nodes = None, 0
    if slot_policy.grounding is not None:
        texts = [d.text for d in documents] + list(evidence) + list(said)
        for _, span in hidden:
            texts = [t.replace(span, " ") for t in texts]
        children, terminal = G.build_trie(texts, free_below=policy.grounding.free_integers_below,
                                          min_nodes=sizes.nodes)
        nodes = 1 + int(np.sum(children >= 0))  # every node but the root has one parent edge
        if children.shape[0] > sizes.nodes:
            raise ContextError(f"the evidence holds too many distinct figures for the grounding gate: their digit trie "
                               f"needs {nodes} nodes, this server allows {sizes.nodes} per request "
                               "(engine.evidence_nodes)", "documents", "evidence_too_large")
        grounding_state = gating.host(G.begin_turn(gating.initial_grounding_state(1, sizes), [(children, terminal)]))
    scale, forbidden, topics = X.effects(policy, counters) if policy.escalation else (1.0, (), 0)
    active = tuple(e.describe() for e, on in zip(policy.escalation, X.active_rules(policy, counters), strict=True)
                   if on)
    escalation_state = None
    if slot_policy.escalation is not None:
        escalation_state = gating.host(X.begin_turn(None, [counters], [topics]))
    texts = [d.text for d in documents] + list(evidence)
    n_evidence = sum(len(tokenizer.encode(t, parse_special=False)) for t in texts) if texts else 0
    budget = evidence_state = None
    if slot_policy.evidence is not None:
        if tool_mode != A.REQUIRED:
            role_budget = max([r.evidence_budget for r in roles_of(policy, principal)], default=0.0)
            budget = float(EV.turn_budget(policy.evidence, n_evidence, role_budget, scale))
        evidence_state = gating.host(EV.begin_turn([budget]))
    return TurnContext(tuple(documents), tuple(withheld), tuple(protected), tuple(new), len(hidden), nodes, counters,
                       active, tuple(forbidden), budget, n_evidence, escalation_state, disclosure_state,
                       grounding_state, evidence_state)


def next_counters(compiled, counters: Sequence[int], *, verdict: str, rules: Sequence[int],
                  boundary_refused: bool) -> tuple[int, ...]:
    """The session's counters after a turn (`gate.escalation.record_turn`, with the Governor's flags).

    Args:
      compiled: the turn's `CompiledPolicy` (its rules table says what kind each rule is).
      counters: the counters before the turn.
      verdict: the turn's final verdict name (REFUSE after a boundary refusal).
      rules: the ids of the rules that acted (its audit events').
      boundary_refused: the action boundary refused a proposed call.
    """
    acted = [compiled.rules[r] for r in rules if r in compiled.rules]
    blocked = any(r.kind in _ACTION_KINDS for r in acted) or boundary_refused
    # a content rule that had to act visibly (substitute or refuse); masks alone (suppress) are not counted
    violated = any(r.kind in _CONTENT_KINDS and r.action in ("substitute", "refuse") for r in acted)
    return tuple(X.record_turn(counters, refused=verdict == Verdict.REFUSE.name, blocked=blocked, violated=violated))


def public(ctx: TurnContext, slot_policy: gating.SlotPolicy, gate_state) -> dict:
    """The `aq` object's account of the context (only the parts the policy has)."""
    policy = slot_policy.compiled.policy
    out = {}
    if ctx.documents or ctx.withheld:
        out["documents"] = {"used": [{"index": d.index, "label": d.label, "kind": d.kind} for d in ctx.documents],
                            "withheld": [w.public() for w in ctx.withheld]}
    if slot_policy.disclosure is not None:
        out["disclosure"] = {"protected_spans": len(ctx.protected), "active": ctx.active_spans}
    if slot_policy.grounding is not None:
        out["grounding"] = {"evidence_nodes": ctx.trie_nodes}
    if policy.escalation:
        out["escalation"] = {"counters": dict(zip(X.COUNTERS, ctx.counters, strict=True)), "active": list(ctx.active),
                             "forbidden_tools": list(ctx.forbidden)}
    if slot_policy.evidence is not None:
        spent = None
        if ctx.budget is not None and gate_state is not None:
            spent = round(float(np.asarray(gating.state_of(gate_state, "evidence").spent)[0]), 6)
        out["evidence"] = {"budget": ctx.budget, "spent": spent, "evidence_tokens": ctx.evidence_tokens}
    return out


def audit_events(ctx: TurnContext, slot_policy: gating.SlotPolicy) -> list[dict]:
    """Audit notes (step -1) of what the host set up for the turn: active escalation rules, the evidence budget."""
    policy = slot_policy.compiled.policy
    out = []
    for w in ctx.withheld:
        out.append(tools._event(-1, -1, f"context: withheld {w.kind} {w.index} ({w.reason})", "ADMIT", None))
    if slot_policy.disclosure is not None:
        out.append(tools._event(-1, -1, f"disclosure: {len(ctx.protected)} protected spans in the session "
                                        f"({len(ctx.new_spans)} new), {ctx.active_spans} protected from this principal",
                                "ADMIT", None))
    if slot_policy.grounding is not None:
        out.append(tools._event(-1, -1, f"grounding: evidence trie of {ctx.trie_nodes} nodes", "ADMIT", None))
    if policy.escalation:
        counts = ", ".join(f"{n} {c}" for n, c in zip(X.COUNTERS, ctx.counters, strict=True))
        active = "; ".join(ctx.active) or "none"
        out.append(tools._event(-1, -1, f"escalation: counters {counts}; active {active}", "ADMIT", None))
    if slot_policy.evidence is not None:
        text = ("evidence budget: off (the turn must be a tool call)" if ctx.budget is None else
                f"evidence budget: {ctx.budget:g} nats for {ctx.evidence_tokens} evidence tokens")
        out.append(tools._event(-1, -1, text, "ADMIT", None))
    return out
