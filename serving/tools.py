"""Tool calls through the server: which tools a request may call, how the prompt offers them, the action boundary.

OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, governed by the authority gate (gate/authority.py):

* **What can be called.** The tools a reply can call are the request's `tools` (by function name) ∩ the tools
  the effective policy grants the caller: the policy's `principals` entry named like the server principal (a
  principal the policy does not list is granted nothing). A requested tool outside that set is *unavailable*:
  it is not described to the model, the gate's grammar cannot produce it (its bit is set in the row's
  `forbidden` mask), the action boundary refuses it, and `aq.tools.unavailable` names it with the reason.
  Listing a tool is not an error: a client may offer every tool it knows. The policy, not the request,
  defines each tool's parameters: the model sees the policy's schema narrowed to the principal's grant, and a
  request's `parameters` are not used.
* **tool_choice** maps to `gate.authority.begin_turn`'s modes: "none" -> NONE (no call); "auto" (the default
  when tools are given) -> AUTO, the reply may be one call (NONE when no requested tool is available);
  "required" -> REQUIRED, the reply must be a call of an available tool; {"type": "function", "function":
  {"name": N}} -> REQUIRED with N as the named tool (N must be among `tools`, else 400). A required call that
  no available tool can satisfy (nothing requested is granted, or N is not) is refused before generation:
  403 `tool_not_permitted`, audited like a policy loosening. A quota spent earlier in the session is checked
  in the loop instead: the gate refuses in-band as the turn starts (verdict REFUSE, the tool's quota rule).
* **parallel_tool_calls**: one call per reply; false or absent is accepted, true is a 400.
* **The action boundary.** A reply that began a call is parsed and checked again on the host
  (`gate.authority.check_call`: the policy's grants and schema, the session's ledger, the tools offered, the
  named tool). An admissible call comes back as `message.tool_calls` (finish_reason "tool_calls", content
  null) and is charged to the session's ledger; an inadmissible one (e.g. cut off by max_tokens) becomes the
  policy's refusal message (verdict REFUSE, finish_reason "content_filter"), never a call.
* **Streaming**: text that may begin a call (a prefix of "<tool_call>") is held back (`CallHold`); a call goes
  out in one `tool_calls` delta at the end, after the boundary admitted it, so nothing unadmitted reaches the
  client. Text that is no call streams as usual.
* **Quotas** are per session: the ledger of admitted calls (tool, quota amount) is saved with the session
  (`session_id`, serving.governance.SessionStore) and rebuilds the quota state of every later turn under the
  current policy. A request without a session_id is a session of one turn.
* **History**: assistant messages carrying `tool_calls` are rendered as the text the model writes for a call
  (`<tool_call>{...}</tool_call>`); `tool` messages become `<tool_response>` blocks of a user turn (the
  Hermes / Qwen convention) when the chat template knows no tools (SmolLM2), else the template's `tool` role.
  Tools are described by the template itself when it knows tools (`gate.authority.tool_specs`), else in the
  system prompt (`gate.authority.tool_prompt`, the documented fallback).

Every function here is host-side and pure; the service (serving/service.py) calls them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from gate import authority as A
from gate.core import Verdict
from serving import gating

__all__ = [
    "CallHold", "ToolNotPermitted", "ToolOutcome", "ToolPlan", "ToolRequest", "ToolRequestError", "audit_events",
    "conversation", "decide", "forbid", "ledger_usage", "openai_call", "parse_request", "plan", "turn_state",
]

_MODE_NAMES = {A.NONE: "none", A.AUTO: "auto", A.REQUIRED: "required"}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolRequestError(ValueError):
    """A malformed `tools` / `tool_choice` / `parallel_tool_calls` / tool message (the API answers 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ToolNotPermitted(Exception):
    """A required call that no tool available to the principal can satisfy (the API answers 403, audited)."""


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """A request's tools, validated.

    Attributes:
      names: the function names of `tools`, in the request's order.
      choice: "none", "auto" or "required" (a named tool_choice is "required" with `named` set).
      named: the tool a named tool_choice asks for, or None.
    """

    names: tuple[str, ...]
    choice: str
    named: str | None = None


def parse_request(tools: Sequence[Any] | None, tool_choice: Any,
                  parallel_tool_calls: bool | None) -> ToolRequest | None:
    """Validates OpenAI's tool fields (tools already shape-checked by the schema). None: no tools asked for.

    Raises:
      ToolRequestError: what OpenAI would answer 400 to, and parallel calls.
    """
    if parallel_tool_calls:
        raise ToolRequestError("parallel_tool_calls is not supported: a reply makes at most one tool call "
                               "(send false or leave it out)", "parallel_tool_calls")
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolRequestError("tool_choice is only allowed when tools are specified", "tool_choice")
        return None
    names = tuple(t.function.name for t in tools)
    for i, n in enumerate(names):
        if not _NAME.fullmatch(n):
            raise ToolRequestError(f"tools[{i}].function.name {n!r} must be 1-64 letters, digits, '_' or '-'",
                                   f"tools.{i}.function.name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ToolRequestError(f"duplicate tool name(s): {', '.join(dup)}", "tools")
    if tool_choice is None:
        return ToolRequest(names, "auto")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolRequestError(f"tool_choice {tool_choice!r}: expected 'none', 'auto', 'required' or "
                                   "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        return ToolRequest(names, tool_choice)
    if (not isinstance(tool_choice, dict) or set(tool_choice) != {"type", "function"}
            or tool_choice["type"] != "function" or not isinstance(tool_choice["function"], dict)
            or set(tool_choice["function"]) != {"name"} or not isinstance(tool_choice["function"]["name"], str)):
        raise ToolRequestError("tool_choice: expected 'none', 'auto', 'required' or "
                               "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    named = tool_choice["function"]["name"]
    if named not in names:
        raise ToolRequestError(f"tool_choice names {named!r}, which is not among tools", "tool_choice")
    return ToolRequest(names, "required", named)


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What a turn may call (from the request and the policy).

    Attributes:
      request: the validated request.
      principal: the server principal's name (also its name in the policy's principals).
      mode: gate.authority's NONE, AUTO or REQUIRED.
      offered: the available tools (requested and granted), in the request's order.
      unavailable: (name, reason) of the requested tools that are not.
      named: the tool a REQUIRED turn must call, or None.
    """

    request: ToolRequest
    principal: str
    mode: int
    offered: tuple[str, ...]
    unavailable: tuple[tuple[str, str], ...]
    named: str | None = None

    @property
    def active(self) -> bool:
        """The reply may (or must) be a call."""
        return self.mode != A.NONE

    def public(self) -> dict:
        return {"mode": _MODE_NAMES[self.mode], "offered": list(self.offered),
                "unavailable": [{"name": n, "reason": r} for n, r in self.unavailable]}


def plan(policy, principal: str, req: ToolRequest) -> ToolPlan:
    """The tools a turn of `principal` may call under `policy` (the tools / roles / principals sections, which
    policy levels never change, so the deployment policy answers for every effective policy).

    Raises:
      ToolNotPermitted: a required (or named) call, and no requested (or the named) tool is granted.
    """
    defined = {t.name for t in policy.tools}
    listed = {p.name for p in policy.principals}
    grants = A.effective_authority(policy, principal) if principal in listed and policy.tools else {}
    offered, unavailable = [], []
    for n in req.names:
        if n not in defined:
            unavailable.append((n, "not defined by the policy"))
        elif n not in grants:
            unavailable.append((n, f"not granted to {principal!r}"))
        else:
            offered.append(n)
    why = dict(unavailable)
    if req.choice == "none":
        mode = A.NONE
    elif req.choice == "auto":
        mode = A.AUTO if offered else A.NONE
    elif req.named is not None and req.named not in offered:
        raise ToolNotPermitted(f"tool_choice requires {req.named!r}, which is {why[req.named]}")
    elif not offered:
        raise ToolNotPermitted(f"tool_choice 'required', but none of the requested tools is available to "
                               f"{principal!r} ({'; '.join(f'{n}: {r}' for n, r in unavailable)})")
    else:
        mode = A.REQUIRED
    return ToolPlan(req, principal, mode, tuple(offered), tuple(unavailable), req.named if mode == A.REQUIRED else None)


def forbid(tp: ToolPlan, names, reason: str) -> ToolPlan:
    """`tp` with the tools `names` no longer offered (e.g. forbidden by an active escalation rule): unavailable
    with `reason`, forbidden to the gate's grammar and refused at the action boundary. An "auto" turn left with
    nothing to call is a plain answer; a required one stays required, so the gate refuses it in-band."""
    gone = [n for n in tp.offered if n in set(names)]
    if not gone:
        return tp
    offered = tuple(n for n in tp.offered if n not in gone)
    mode = A.NONE if tp.mode == A.AUTO and not offered else tp.mode
    return dataclasses.replace(tp, offered=offered, unavailable=tp.unavailable + tuple((n, reason) for n in gone),
                               mode=mode)


# --------------------------------------------------------------------------------------------------------------
# The prompt.


def _call_text(name: str, arguments: dict) -> str:
    return A.CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + A.CALL_CLOSE


def _tool_lines(policy, tp: ToolPlan) -> str:
    """gate.authority.tool_prompt, restricted to the offered tools (its lines "- name(...): ...")."""
    lines = A.tool_prompt(policy, tp.principal, only=tp.named).split("\n")
    keep = [ln for ln in lines[2:] if ln.startswith("- ") and ln[2:].split("(", 1)[0] in tp.offered]
    return "\n".join(lines[:2] + keep)


def conversation(messages: Sequence[Any], tp: ToolPlan | None, policy, *, knows_tools: bool
                 ) -> tuple[list[dict], list[dict] | None]:
    """The chat-template messages (role, content) of a request, and the tool specs for a template that knows
    tools (None otherwise): tool calls and results in the history rendered, the offered tools described.

    Args:
      messages: the request's `serving.schemas.ChatMessage`s.
      tp: the turn's plan (None: the request has no tools).
      policy: the policy whose tools are offered.
      knows_tools: the chat template renders tools itself (a `tool` role, a `tools` variable).

    Raises:
      ToolRequestError: a tool call in the history whose arguments are not a JSON object.
    """
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if role == "assistant" and m.tool_calls:
            calls = []
            for j, tc in enumerate(m.tool_calls):
                try:
                    args = json.loads(tc.function.arguments)
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    raise ToolRequestError("the arguments of a tool call must be a JSON object",
                                           f"messages.{i}.tool_calls.{j}.function.arguments")
                calls.append(_call_text(tc.function.name, args))
            content = "\n".join(([content] if content else []) + calls)
        elif role == "tool" and not knows_tools:
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    specs = None
    if tp is not None and tp.active:
        if knows_tools:
            specs = [s for s in A.tool_specs(policy, tp.principal, only=tp.named)
                     if s["function"]["name"] in tp.offered]
        else:
            text = _tool_lines(policy, tp)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
            else:
                out.insert(0, {"role": "system", "content": text})
    return out, specs


# --------------------------------------------------------------------------------------------------------------
# The turn's authority state, from the session's ledger.


def ledger_usage(ledger: Sequence[Sequence]) -> tuple[dict[str, int], dict[str, int]]:
    """(calls, quota total) per tool name from a ledger of (tool, amount) entries."""
    calls: dict[str, int] = {}
    total: dict[str, int] = {}
    for tool, amount in ledger:
        calls[tool] = calls.get(tool, 0) + 1
        total[tool] = total.get(tool, 0) + int(amount)
    return calls, total


def turn_state(slot_policy: gating.SlotPolicy, tp: ToolPlan, ledger: Sequence[Sequence]):
    """The slot's authority state for the turn (numpy, leading axis 1): principal, mode, named tool, the tools not
    offered as forbidden, and the quotas the session's ledger has spent."""
    policy = slot_policy.compiled.policy
    names = [t.name for t in policy.tools]
    principal = [p.name for p in policy.principals].index(tp.principal)
    calls, total = ledger_usage(ledger)
    forbidden = sum(1 << k for k, n in enumerate(names) if n not in tp.offered)
    return gating.authority_row(slot_policy, principal=principal, mode=tp.mode,
                                named=-1 if tp.named is None else names.index(tp.named), forbidden=forbidden,
                                calls=[calls.get(n, 0) for n in names],
                                spent=[min(total.get(n, 0), int(np.iinfo(np.int32).max)) for n in names])


# --------------------------------------------------------------------------------------------------------------
# The action boundary.


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """What the action boundary made of a reply.

    Attributes:
      call: the admitted call, or None.
      amount: its quota argument (0 without one): what the ledger is charged.
      reason: why a proposed call was refused, or None (admitted, or no call was proposed).
      began: the reply began a call (its text is held back from a stream).
    """

    call: A.ToolCall | None = None
    amount: int = 0
    reason: str | None = None
    began: bool = False


def decide(policy, tp: ToolPlan | None, text: str, authority_state, verdict: int, ledger: Sequence[Sequence]
           ) -> ToolOutcome:
    """Checks a finished reply at the action boundary (see the module docstring).

    Args:
      policy: the effective policy; tp: the plan (None or inactive: nothing to decide).
      text: the reply; authority_state: the slot's final `AuthorityState` (leading axis 1), or None.
      verdict: the turn's verdict; ledger: the session's (tool, amount) entries before this turn.
    """
    if tp is None or not tp.active or authority_state is None:
        return ToolOutcome()
    boundary = bool(np.asarray(authority_state.boundary)[0])
    began = int(np.asarray(authority_state.phase)[0]) >= 0 or boundary
    if verdict == Verdict.REFUSE or not (began or tp.mode == A.REQUIRED):
        return ToolOutcome(began=began)
    proposal = A.parse_call(text) if boundary else None
    calls, total = ledger_usage(ledger)
    forbidden = [t.name for t in policy.tools if t.name not in tp.offered]
    reason = A.check_call(policy, tp.principal, proposal, calls_used=calls, total_used=total, forbidden=forbidden,
                          named=tp.named)
    if reason is not None:
        return ToolOutcome(reason=reason, began=began)
    spec = {t.name: t for t in policy.tools}[proposal.name]
    amount = int(proposal.arguments[spec.quota_argument]) if spec.quota_argument else 0
    return ToolOutcome(call=proposal, amount=amount, began=began)


def openai_call(call: A.ToolCall) -> dict:
    """The call in OpenAI's shape (`message.tool_calls[i]`; arguments as a JSON string)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def audit_events(compiled, tp: ToolPlan | None, outcome: ToolOutcome, step: int) -> list[dict]:
    """Audit events of the tool decision: what was offered (step -1), and the action boundary's verdict."""
    if tp is None:
        return []
    offered = ", ".join(tp.offered) or "none"
    missing = "; ".join(f"{n} ({r})" for n, r in tp.unavailable)
    note = f"tools: mode {_MODE_NAMES[tp.mode]}, offered {offered}" + (f", unavailable {missing}" if missing else "")
    events = [_event(-1, -1, note, "ADMIT", None)]
    rule = next((r.id for r in compiled.rules.values() if r.kind == "tool_call"), -1)
    if outcome.call is not None:
        args = json.dumps(outcome.call.arguments, ensure_ascii=False, sort_keys=True)
        events.append(_event(step, -1, f"action boundary: admitted {outcome.call.name} {args}", "ADMIT", None))
    elif outcome.reason is not None:
        events.append(_event(step, rule, f"action boundary: {outcome.reason}", "REFUSE", "REFUSE"))
    return events


def _event(step: int, rule: int, text: str, verdict: str, action: str | None) -> dict:
    return {"step": step, "token": -1, "token_text": "", "action": action, "rule": rule, "rule_text": text[:500],
            "verdict": verdict, "entropy": 0.0, "admissible_mass": 0.0}


class CallHold:
    """Holds back streamed text while it may still be the start of a tool call (a prefix of "<tool_call>")."""

    def __init__(self):
        self._buf = ""
        self._holding = True

    def push(self, text: str) -> str:
        """The text that may go out now (all of it, once the reply is clearly no call)."""
        if not self._holding:
            return text
        self._buf += text
        if A.CALL_OPEN.startswith(self._buf) or self._buf.startswith(A.CALL_OPEN):
            return ""
        self._holding = False
        out, self._buf = self._buf, ""
        return out

    @property
    def held(self) -> bool:
        """Text is held back (the reply is, or may be, a call)."""
        return self._holding and bool(self._buf)
