"""What a turn's session-aware gates start from: the session's counters, the principal's roles, the evidence.

The server's version of steps 2, 3 and 6 of `gate.session.Governor` (see its docstring), per request instead
of per batch, with the states shaped for the engine's slots (serving/gating.py):

* **Principal.** The server principal is looked up by name in the effective policy's `principals` (like its
  tools, serving/tools.py); a principal the policy does not list holds no role: no evidence budget of its own.
* **Escalation.** The session's counters (violations, refusals, blocked; `gate.escalation.COUNTERS`) are kept
  with the session (serving/governance.py) and decide which escalation rules are active this turn
  (`gate.escalation.effects`): their budget scale multiplies the evidence budget, their forbidden tools are
  unavailable to the authority gate and the action boundary, their topics end the turn with the refusal
  message (`gate.escalation.begin_turn`). After the turn, `next_counters` advances them exactly as the Governor
  does (`gate.escalation.record_turn`): refusals for a REFUSE verdict, blocked for an authority, quota or
  tool-call rule that acted (or a boundary refusal), violations for a content rule that substituted or refused.
* **Evidence budget.** base + per evidence token + the roles' limit, times the escalation scale
  (`gate.evidence.turn_budget`); evidence tokens are those of the tool results in the conversation. The budget
  is off for turns that must be a tool call (the authority gate governs them).

Every function here is host-side and pure; the service (serving/service.py) calls them on its asyncio thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gate import authority as A
from gate import escalation as X
from gate import evidence as EV
from gate.core import Verdict
from gate.session import _ACTION_KINDS, _CONTENT_KINDS
from serving import gating, tools

__all__ = ["TurnContext", "audit_events", "next_counters", "prepare", "public", "roles_of"]

FRESH_COUNTERS = (0,) * len(X.COUNTERS)


def roles_of(policy, principal: str) -> list:
    """The policy's roles (`RoleSpec`) of a server principal; none for a principal the policy does not list."""
    spec = {p.name: p for p in policy.principals}.get(principal)
    by_name = {r.name: r for r in policy.roles}
    return [] if spec is None else [by_name[r] for r in spec.roles]


@dataclasses.dataclass(frozen=True)
class TurnContext:
    """A turn's gate states from the session and the request, and what the `aq` object reports of them.

    Attributes:
      counters: the session's escalation counters before the turn (COUNTERS order).
      active: descriptions of the escalation rules active this turn.
      forbidden: tools the active escalation rules forbid.
      budget: the evidence budget in nats, or None (the policy has none, or the turn must be a tool call).
      evidence_tokens: tokens of evidence in the context.
      escalation_state / evidence_state: the slot's states for the turn (numpy, leading axis 1), or None when
        the policy has no such rule.
    """

    counters: tuple[int, ...] = FRESH_COUNTERS
    active: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    budget: float | None = None
    evidence_tokens: int = 0
    escalation_state: object = None
    evidence_state: object = None


def prepare(slot_policy: gating.SlotPolicy, principal: str, *, counters: Sequence[int] = FRESH_COUNTERS,
            evidence: Sequence[str] = (), tokenizer=None, tool_mode: int = A.NONE) -> TurnContext:
    """The turn's context (see the module docstring).

    Args:
      slot_policy: the effective policy, compiled.
      principal: the server principal's name.
      counters: the session's counters (fresh ones for a request without a session).
      evidence: the evidence texts in the context (tool results); `tokenizer` counts their tokens.
      tool_mode: the turn's tool mode (gate.authority NONE, AUTO or REQUIRED).
    """
    policy = slot_policy.compiled.policy
    counters = tuple(int(c) for c in counters)
    scale, forbidden, topics = X.effects(policy, counters) if policy.escalation else (1.0, (), 0)
    active = tuple(e.describe() for e, on in zip(policy.escalation, X.active_rules(policy, counters), strict=True)
                   if on)
    escalation_state = None
    if slot_policy.escalation is not None:
        escalation_state = gating.host(X.begin_turn(None, [counters], [topics]))
    n_evidence = sum(len(tokenizer.encode(t, parse_special=False)) for t in evidence) if evidence else 0
    budget = evidence_state = None
    if slot_policy.evidence is not None:
        if tool_mode != A.REQUIRED:
            role_budget = max([r.evidence_budget for r in roles_of(policy, principal)], default=0.0)
            budget = float(EV.turn_budget(policy.evidence, n_evidence, role_budget, scale))
        evidence_state = gating.host(EV.begin_turn([budget]))
    return TurnContext(counters, active, tuple(forbidden), budget, n_evidence, escalation_state, evidence_state)


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
    if policy.escalation:
        counts = ", ".join(f"{n} {c}" for n, c in zip(X.COUNTERS, ctx.counters, strict=True))
        active = "; ".join(ctx.active) or "none"
        out.append(tools._event(-1, -1, f"escalation: counters {counts}; active {active}", "ADMIT", None))
    if slot_policy.evidence is not None:
        text = ("evidence budget: off (the turn must be a tool call)" if ctx.budget is None else
                f"evidence budget: {ctx.budget:g} nats for {ctx.evidence_tokens} evidence tokens")
        out.append(tools._event(-1, -1, text, "ADMIT", None))
    return out
