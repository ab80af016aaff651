"""The authority gate: a principal's authority compiled into the tool-call grammar, with quotas in the state.

**Format.** The call is written as in the Hermes / Qwen / SmolLM2-1.7B convention; a chat template that knows
tools gets the principal's granted tools as specs (`tool_specs`), and SmolLM2-135M's template, which has no tool
convention, gets them described in the system prompt (`tool_prompt`, the documented fallback). The assistant's
whole reply is one call,

    <tool_call>{"name": "transfer", "arguments": {"to": "savings", "amount": 120}}</tool_call>

with every argument written, in the order of the tool's `required` list, and at most one space after `:` and
`,`. A call is recognized only at the start of a reply (mode AUTO: a reply whose first token can begin a
call is read as one; REQUIRED: the reply must be a call, optionally of one named tool; NONE: no call).

**Grammar.** For every distinct authority set (the tools a principal may call and the enum values its roles
allow), the compiler writes the call's regex and builds its token automaton with outlines-core (reusing
`gate.structure`); all of them are merged into one `CompiledStructure` with disjoint state ranges, and a row's
principal id selects its start state. So an unauthorized tool name or enum value cannot be generated.

**Quotas and ceilings in the state.** Per row the state holds the calls made and the quota argument's total
per tool. Two things shrink what is admissible as they are spent, inside the loop:

* at the states where the tool is chosen (the name), a token is admissible only if some tool it can still lead
  to is *available* (granted, not forbidden by escalation, calls left, enough total left, the named tool if
  any): each such "branch" state stores one packed token set per tool;
* inside an integer argument, a digit token is admissible only if the number stays within [minimum,
  ceiling], where the ceiling is the principal's maximum and, for the quota argument, what is left of its
  total: value' = value * 10^len + digits <= ceiling is checked without overflow as
  value <= (ceiling - digits) // 10^len. The minimum is checked when the number ends inside a token.

A REQUIRED turn with no available tool emits the policy's refusal message from the first step (verdict
REFUSE, the tool's rule). Once the call's last token is emitted the row stops: that is the action boundary,
where the host checks the complete proposal again (`check_call`, independent of these arrays: a JSON parse,
the policy's grants and schema, the session's ledger) and turns an inadmissible one into a refusal.
`record_call` then charges the quota in the carried state.

Limitations: string arguments without an enum admit any JSON string without escapes; a reply whose first
token could begin a call (e.g. "<") is read as a call in AUTO mode; one call per reply.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import deque
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int, UInt32

from aqjax import ops
from gate.core import NO_RULE, NO_TOKEN, Checked, Decision, Gate, Outcome, Verdict, keep_rows, pack_bits, unpack_bits
from gate.structure import WHITESPACE, CompiledStructure, _build_index, _search, _tables

__all__ = [
    "AUTO",
    "AuthorityError",
    "CALL_CLOSE",
    "CALL_OPEN",
    "NONE",
    "REQUIRED",
    "AuthorityState",
    "CompiledAuthority",
    "Grant",
    "ToolCall",
    "authority_gate",
    "begin_turn",
    "call_regex",
    "check_call",
    "compile_authority",
    "describe_state",
    "effective_authority",
    "parse_call",
    "record_call",
    "tool_prompt",
    "tool_specs",
]

NONE, AUTO, REQUIRED = 0, 1, 2  # tool modes
FREE, PENDING = -1, -2  # phases outside the automaton: free text; AUTO before its first token
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_I32_MAX = int(np.iinfo(np.int32).max)
_MAX_LEAD = 9  # digits of a token that the ceiling check handles (10^9 fits int32)


class AuthorityError(ValueError):
    """The authority cannot be compiled (e.g. tools the grammar cannot tell apart)."""


# --------------------------------------------------------------------------------------------------------------
# Effective authority (host side, from the parsed policy).


@dataclasses.dataclass(frozen=True)
class Grant:
    """A principal's effective grant of one tool (the union of its roles' grants: the looser limits win).

    Attributes:
      max_calls / max_total: per session, None = unlimited.
      limits: argument -> the narrowed schema (enum values; integer minimum and maximum), for every argument.
    """

    max_calls: int | None
    max_total: int | None
    limits: dict


def _looser(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def effective_authority(policy, principal: str) -> dict[str, Grant]:
    """tool name -> Grant for `principal` (union over its roles; a tool granted by two roles gets the looser limits).

    Raises:
      KeyError: unknown principal.
    """
    spec = {p.name: p for p in policy.principals}[principal]
    roles = {r.name: r for r in policy.roles}
    tools = {t.name: t for t in policy.tools}
    out: dict[str, Grant] = {}
    for rname in spec.roles:
        for g in roles[rname].tools:
            base = dict(tools[g.tool].arguments())
            limits = {}
            for arg, sch in base.items():
                lim = {k: v for k, v in sch.items() if k in ("enum", "minimum", "maximum")}
                lim.update(g.limits.get(arg, {}))
                limits[arg] = lim
            if g.tool in out:
                old = out[g.tool]
                merged = {}
                for arg, lim in limits.items():
                    o = old.limits[arg]
                    m = dict(lim)
                    if "enum" in lim:  # keep the schema's order
                        m["enum"] = [v for v in base[arg]["enum"] if v in lim["enum"] or v in o["enum"]]
                    if "minimum" in lim:
                        m["minimum"] = min(lim["minimum"], o["minimum"])
                        m["maximum"] = max(lim["maximum"], o["maximum"])
                    merged[arg] = m
                out[g.tool] = Grant(_looser(old.max_calls, g.max_calls), _looser(old.max_total, g.max_total), merged)
            else:
                out[g.tool] = Grant(g.max_calls, g.max_total, limits)
    return {t.name: out[t.name] for t in policy.tools if t.name in out}  # policy order


# --------------------------------------------------------------------------------------------------------------
# The call grammar.


def _rx(text: str) -> str:
    """A regex literal (Rust syntax: only meta characters are escaped)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$#&~-])", r"\\\1", text)


def _value_regex(spec: dict) -> str:
    kind = spec.get("type", "string")
    if kind == "string":
        if "enum" in spec:
            return '"(?:' + "|".join(_rx(v) for v in spec["enum"]) + ')"'
        return r'"[^"\\\x00-\x1f]*"'
    if kind == "integer":
        return "[1-9][0-9]*" if spec.get("minimum", 0) >= 1 else "(?:0|[1-9][0-9]*)"
    return "(?:true|false)"


def call_regex(tools: list[tuple[str, list[tuple[str, dict]]]]) -> str:
    """The regex of one call to any of `tools` = [(name, [(argument, narrowed schema), ...]), ...]."""
    if not tools:
        raise AuthorityError("no tools")
    ws = WHITESPACE
    branches = []
    for name, args in tools:
        body = f",{ws}".join(f'"{_rx(a)}":{ws}{_value_regex(s)}' for a, s in args)
        branches.append(rf'\{{"name":{ws}"{_rx(name)}",{ws}"arguments":{ws}\{{{body}\}}\}}')
    return _rx(CALL_OPEN) + "(?:" + "|".join(branches) + ")" + _rx(CALL_CLOSE)


def tool_specs(policy, principal: str, *, only: str | None = None) -> list[dict]:
    """The principal's granted tools as chat-template tool specs ({"type": "function", "function": {...}}), with
    each argument's schema narrowed to the principal's grant."""
    tools = {t.name: t for t in policy.tools}
    out = []
    for name, grant in effective_authority(policy, principal).items():
        if only is not None and name != only:
            continue
        params = tools[name].parameters
        props = {a: {**params["properties"][a], **grant.limits[a]} for a in params["required"]}
        out.append({"type": "function", "function": {"name": name, "description": tools[name].description,
                                                     "parameters": {**params, "properties": props}}})
    return out


def tool_prompt(policy, principal: str, *, only: str | None = None) -> str:
    """The system-prompt text that describes the principal's tools and the call format (fallback convention)."""
    tools = {t.name: t for t in policy.tools}
    lines = [f"To call a tool, reply with exactly one line: {CALL_OPEN}"
             '{"name": "<tool>", "arguments": {...}}' f"{CALL_CLOSE}", "Tools:"]
    for name, grant in effective_authority(policy, principal).items():
        if only is not None and name != only:
            continue
        args = []
        for a, lim in grant.limits.items():
            kind = dict(tools[name].arguments())[a]["type"]
            if "enum" in lim:
                args.append(f"{a}: one of {', '.join(lim['enum'])}")
            elif kind == "integer":
                args.append(f"{a}: integer {lim['minimum']}..{lim['maximum']}")
            else:
                args.append(f"{a}: {kind}")
        lines.append(f"- {name}({'; '.join(args)}): {tools[name].description}".rstrip(": "))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Compiled arrays and state.


@struct.dataclass
class CompiledAuthority:
    """The authority gate's policy (arrays; P principals, K tools, F integer fields, S states, V tokens).

    Attributes:
      automaton: every authority set's call automaton, merged (disjoint state ranges).
      initial: Int[P] the start state of each principal's grammar.
      granted: Bool[P, K] tools each principal may call.
      max_calls / max_total: Int[P, K] per-session limits (int32 max = unlimited).
      quota_min: Int[P, K] the smallest admissible value of the tool's quota argument (0 without one).
      reach: Int[S] bitmask of the tools a state can still lead to.
      branch_row: Int[S] row of `branch_bits` for states where tokens lead to different tools, else -1.
      branch_bits: UInt32[NB, K, W] per branch state and tool, the admissible tokens that can still lead to it.
      field: Int[S] the integer field a state is inside (its digits so far are `AuthorityState.num`), else -1.
      field_tool: Int[F] the tool of each field; field_quota: Bool[F] the field is its tool's quota argument.
      field_min / field_max: Int[P, F] each principal's bounds for each field.
      lead_len / lead_val: Int[V] each token's leading digits (after leading spaces): count (<= 9) and value;
        lead_len = 10 marks a token with more digits than the check handles.
      ends: Bool[V] the token holds something after those digits (it ends a number begun before it).
      tool_rule / quota_rule: Int[K] the global rule ids reported when a tool is not available because it is
        not granted (or forbidden) / because its quota is spent; call_rule: Int[] the action-boundary rule.
      refusal: Int[M] the refusal message's tokens (padded with -1); refusal_len: Int[].
    """

    automaton: CompiledStructure
    initial: Int[Array, " P"]
    granted: Bool[Array, "P K"]
    max_calls: Int[Array, "P K"]
    max_total: Int[Array, "P K"]
    quota_min: Int[Array, "P K"]
    reach: Int[Array, " S"]
    branch_row: Int[Array, " S"]
    branch_bits: UInt32[Array, "NB K W"]
    field: Int[Array, " S"]
    field_tool: Int[Array, " F"]
    field_quota: Bool[Array, " F"]
    field_min: Int[Array, "P F"]
    field_max: Int[Array, "P F"]
    lead_len: Int[Array, " V"]
    lead_val: Int[Array, " V"]
    ends: Bool[Array, " V"]
    tool_rule: Int[Array, " K"]
    quota_rule: Int[Array, " K"]
    call_rule: Int[Array, ""]
    refusal: Int[Array, " M"]
    refusal_len: Int[Array, ""]

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))


@struct.dataclass
class AuthorityState:
    """Per-row authority state (leading axis B).

    Attributes:
      principal: Int[B] the row's principal id (index into the policy's principals).
      mode: Int[B] NONE, AUTO or REQUIRED.
      named: Int[B] the one tool a REQUIRED turn must call (tool index), -1 for any.
      forbidden: Int[B] bitmask of tools escalation has forbidden.
      calls: Int[B, K] calls made this session; spent: Int[B, K] the quota argument's total this session.
      phase: Int[B] the automaton state inside a call, FREE, or PENDING (AUTO before its first token).
      num: Int[B] the value of the integer being written (0 outside one).
      msg_pos: Int[B] index of the next refusal-message token, -1 when no refusal is being emitted.
      boundary: Bool[B] the row emitted a complete call (the host checks it and charges the quota).
    """

    principal: Int[Array, " B"]
    mode: Int[Array, " B"]
    named: Int[Array, " B"]
    forbidden: Int[Array, " B"]
    calls: Int[Array, "B K"]
    spent: Int[Array, "B K"]
    phase: Int[Array, " B"]
    num: Int[Array, " B"]
    msg_pos: Int[Array, " B"]
    boundary: Bool[Array, " B"]


# --------------------------------------------------------------------------------------------------------------
# Host compiler.


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


class _Union:
    """Several outlines-core indexes presented as one (state ids offset per index), for `structure._tables`."""

    STRIDE = 1 << 33

    def __init__(self, indexes):
        self.parts = indexes

    def get_transitions(self):
        out = {}
        for g, idx in enumerate(self.parts):
            off = g * self.STRIDE
            for s, edges in idx.get_transitions().items():
                out[off + s] = {t: off + d for t, d in edges.items()}
        return out

    def get_initial_state(self):
        return self.parts[0].get_initial_state()

    def get_final_states(self):
        return [g * self.STRIDE + f for g, idx in enumerate(self.parts) for f in idx.get_final_states()]

    def initials(self) -> list[int]:
        return [g * self.STRIDE + idx.get_initial_state() for g, idx in enumerate(self.parts)]

    def all_ids(self) -> np.ndarray:
        ids = set(self.initials()) | set(self.get_final_states())
        for s, edges in self.get_transitions().items():
            ids.add(s)
            ids.update(edges.values())
        return np.array(sorted(ids), np.int64)


def _leading_digits(tb: list[bytes], special: set[int], V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lead_len = np.zeros(V, np.int32)
    lead_val = np.zeros(V, np.int32)
    ends = np.zeros(V, bool)
    for t, b in enumerate(tb):
        if t in special or not b:
            continue
        rest = b.lstrip(b" ")
        m = re.match(rb"[0-9]*", rest)
        digits = m.group(0)
        if len(digits) > _MAX_LEAD:
            lead_len[t] = _MAX_LEAD + 1  # never admissible inside a number
            continue
        lead_len[t] = len(digits)
        lead_val[t] = int(digits) if digits else 0
        ends[t] = len(rest) > len(digits)
    return lead_len, lead_val, ends


def _analyze(automaton: CompiledStructure, starts: list[int], tb: list[bytes], tool_names: list[str],
             int_fields: dict[tuple[int, str], int]):
    """Per state: a shortest text reaching it, the tools it can lead to, and the integer field it is inside."""
    offsets = np.asarray(automaton.offsets)
    tokens = np.asarray(automaton.tokens)
    nxt = np.asarray(automaton.next_state)
    S = offsets.shape[0] - 1
    n_edges = int(offsets[-1])
    src = np.repeat(np.arange(S), np.diff(offsets))[:n_edges]
    dst, tok = nxt[:n_edges], tokens[:n_edges]

    prefix: dict[int, bytes] = {}
    queue = deque()
    for s in starts:
        prefix[s] = b""
        queue.append(s)
    while queue:
        s = queue.popleft()
        for e in range(offsets[s], offsets[s + 1]):
            d = int(nxt[e])
            if d not in prefix:
                prefix[d] = prefix[s] + tb[int(tokens[e])]
                queue.append(d)

    index = {n: k for k, n in enumerate(tool_names)}
    name_rx = re.compile(r'"name":[ ]?"([^"]*)"')
    field_rx = re.compile(r'"([A-Za-z_][A-Za-z0-9_]*)":[ ]?([0-9]*)$')
    decided = np.zeros(S, np.int64)  # bitmask of tools, from the state's own text
    field_name: dict[int, str] = {}
    for s, p in prefix.items():
        text = p.decode("utf-8", "replace")
        m = name_rx.search(text)
        if m and m.group(1) in index:
            decided[s] = 1 << index[m.group(1)]
            f = field_rx.search(text[m.end():])
            if f:
                field_name[s] = f.group(1)
    # A state can be reached from several tools' calls only if the automaton merged their identical tails:
    # propagate the decided tools forward to see it.
    tools_of = decided.copy()
    while True:
        grown = tools_of.copy()
        np.bitwise_or.at(grown, dst, tools_of[src])
        if np.array_equal(grown, tools_of):
            break
        tools_of = grown
    # reach: the tools a state can still lead to (backward from the decided states).
    reach = tools_of.copy()
    while True:
        grown = reach.copy()
        np.bitwise_or.at(grown, src, reach[dst])
        grown = np.where(tools_of != 0, tools_of, grown)
        if np.array_equal(grown, reach):
            break
        reach = grown
    field = np.full(S, -1, np.int32)
    for s, name in field_name.items():
        ks = [k for k in range(len(tool_names)) if tools_of[s] >> k & 1]
        ids = {int_fields.get((k, name)) for k in ks}
        if ids == {None}:
            continue
        if len(ids) != 1:
            raise AuthorityError(f"tools {', '.join(tool_names[k] for k in ks)} have identical call tails; their "
                                 f"integer argument {name!r} cannot be told apart")
        field[s] = ids.pop()
    return reach, field, (src, dst, tok)


def compile_authority(
    policy, tokenizer, *, vocab_size: int | None = None, tool_rules, quota_rules, call_rule: int,
) -> CompiledAuthority:
    """Compiles the policy's tools, roles and principals for a tokenizer (host side).

    Args:
      policy: a parsed `gate.policy.Policy` with tools and principals.
      tokenizer: token_bytes(), eos_id, special_ids, encode(text, parse_special=...).
      vocab_size: the logits width (>= the tokenizer's vocabulary).
      tool_rules / quota_rules: global rule id per tool (policy order); call_rule: the action-boundary rule id.

    Raises:
      AuthorityError / StructureError: a grammar the vocabulary cannot spell, or tools it cannot tell apart.
    """
    tb = list(tokenizer.token_bytes())
    V = len(tb) if vocab_size is None else int(vocab_size)
    tb += [b""] * (V - len(tb))
    special = set(getattr(tokenizer, "special_ids", ())) | {int(tokenizer.eos_id)}
    tool_names = [t.name for t in policy.tools]
    if len(tool_names) > 31:
        raise AuthorityError(f"{len(tool_names)} tools: at most 31 are supported")
    K = _bucket(len(tool_names))
    principals = [p.name for p in policy.principals]
    P = len(principals)
    grants = [effective_authority(policy, p) for p in principals]

    # integer fields: one per (tool, integer argument)
    int_fields: dict[tuple[int, str], int] = {}
    for k, t in enumerate(policy.tools):
        for a, sch in t.arguments():
            if sch["type"] == "integer":
                int_fields[(k, a)] = len(int_fields)
    F = _bucket(len(int_fields))

    # one grammar per distinct authority set (tools and their enum narrowing; integer bounds live in arrays)
    keys, grammar_of = {}, []
    for g in grants:
        spec = tuple((name, tuple((a, json.dumps(lim.get("enum"))) for a, lim in gr.limits.items()))
                     for name, gr in g.items())
        grammar_of.append(keys.setdefault(spec, len(keys)))
    indexes = []
    tools_by_name = {t.name: t for t in policy.tools}
    for spec in keys:
        if not spec:  # a principal without tools: a grammar nothing can complete (REQUIRED refuses at once)
            spec_tools = [(tool_names[0], tools_by_name[tool_names[0]].arguments())] if tool_names else []
        else:
            spec_tools = []
            for name, args in spec:
                narrowed = []
                for (a, enum), (_, sch) in zip(args, tools_by_name[name].arguments(), strict=True):
                    s = dict(sch)
                    if enum != "null":
                        s["enum"] = json.loads(enum)
                    narrowed.append((a, s))
                spec_tools.append((name, narrowed))
        if not spec_tools:
            raise AuthorityError("the policy defines no tools")
        indexes.append(_build_index(call_regex(spec_tools), tokenizer))
    union = _Union(indexes)
    automaton = _tables(union, V, int(tokenizer.eos_id))
    ids = union.all_ids()
    initials = np.searchsorted(ids, np.array(union.initials(), np.int64)).astype(np.int32)
    empty_grammar = [not g for g in grants]

    reach, field, (src, dst, tok) = _analyze(automaton, [int(i) for i in initials], tb, tool_names, int_fields)
    S = automaton.allowed.shape[0]
    W = automaton.allowed.shape[1]
    # branch states: tokens from them lead to different tool sets
    branch_states = sorted({int(s) for s, d in zip(src, dst, strict=True) if reach[d] != reach[s]})
    branch_row = np.full(S, -1, np.int32)
    branch_bits = np.zeros((max(1, _bucket(len(branch_states))), K, W), np.uint32)
    for r, s in enumerate(branch_states):
        branch_row[s] = r
        sel = src == s
        for k in range(len(tool_names)):
            m = np.zeros(V, bool)
            m[tok[sel][(reach[dst[sel]] >> k) & 1 == 1]] = True
            branch_bits[r, k] = pack_bits(m)

    granted = np.zeros((P, K), bool)
    max_calls = np.full((P, K), _I32_MAX, np.int32)
    max_total = np.full((P, K), _I32_MAX, np.int32)
    quota_min = np.zeros((P, K), np.int32)
    field_tool = np.zeros(F, np.int32)
    field_quota = np.zeros(F, bool)
    field_min = np.zeros((P, F), np.int32)
    field_max = np.zeros((P, F), np.int32)
    for (k, a), f in int_fields.items():
        field_tool[f] = k
        field_quota[f] = policy.tools[k].quota_argument == a
    for p, g in enumerate(grants):
        for name, gr in g.items():
            k = tool_names.index(name)
            granted[p, k] = True
            if gr.max_calls is not None:
                max_calls[p, k] = gr.max_calls
            if gr.max_total is not None:
                max_total[p, k] = gr.max_total
            q = policy.tools[k].quota_argument
            if q is not None:
                quota_min[p, k] = gr.limits[q]["minimum"]
            for a, lim in gr.limits.items():
                f = int_fields.get((k, a))
                if f is not None:
                    field_min[p, f], field_max[p, f] = lim["minimum"], lim["maximum"]
    initial = np.array([initials[grammar_of[p]] for p in range(P)], np.int32)
    for p in range(P):
        if empty_grammar[p]:
            granted[p] = False

    lead_len, lead_val, ends = _leading_digits(tb, special, V)
    refusal = tokenizer.encode(policy.messages["refusal"], parse_special=False)
    ref = np.full(_bucket(len(refusal), 8), -1, np.int32)
    ref[: len(refusal)] = refusal

    def rules(ids_):
        out = np.full(K, NO_RULE, np.int32)
        out[: len(ids_)] = ids_
        return out

    return CompiledAuthority(
        automaton=automaton, initial=jnp.asarray(initial), granted=jnp.asarray(granted),
        max_calls=jnp.asarray(max_calls), max_total=jnp.asarray(max_total), quota_min=jnp.asarray(quota_min),
        reach=jnp.asarray(reach.astype(np.int32)), branch_row=jnp.asarray(branch_row),
        branch_bits=jnp.asarray(branch_bits), field=jnp.asarray(field), field_tool=jnp.asarray(field_tool),
        field_quota=jnp.asarray(field_quota), field_min=jnp.asarray(field_min), field_max=jnp.asarray(field_max),
        lead_len=jnp.asarray(lead_len), lead_val=jnp.asarray(lead_val), ends=jnp.asarray(ends),
        tool_rule=jnp.asarray(rules(tool_rules)), quota_rule=jnp.asarray(rules(quota_rules)),
        call_rule=jnp.asarray(call_rule, jnp.int32), refusal=jnp.asarray(ref),
        refusal_len=jnp.asarray(len(refusal), jnp.int32),
    )


# --------------------------------------------------------------------------------------------------------------
# The jitted side.

_POW10 = np.array([10**i for i in range(_MAX_LEAD + 1)] + [1], np.int32)


def _authorized(policy: CompiledAuthority, state: AuthorityState) -> Bool[Array, "B K"]:
    """Tools the row's authority still allows now (granted, not forbidden, within quota), whatever the turn names."""
    p = state.principal
    K = state.calls.shape[1]
    k = jnp.arange(K)
    left_total = policy.max_total[p] - state.spent  # >= 0: spent never exceeds max_total
    return (policy.granted[p] & (state.calls < policy.max_calls[p]) & (left_total >= policy.quota_min[p])
            & ((state.forbidden[:, None] >> k) & 1 == 0))


def _available(policy: CompiledAuthority, state: AuthorityState, authorized=None) -> Bool[Array, "B K"]:
    """Tools a row may still call now: authorized, and the turn's named tool if it names one."""
    authorized = _authorized(policy, state) if authorized is None else authorized
    k = jnp.arange(authorized.shape[1])
    return authorized & ((state.named[:, None] < 0) | (state.named[:, None] == k))


def _refusing(policy: CompiledAuthority, state: AuthorityState, avail) -> Bool[Array, " B"]:
    """Rows that emit the refusal message now: already in it, or a REQUIRED call with no available tool."""
    at_start = (state.mode == REQUIRED) & (state.phase == policy.initial[state.principal])
    return (state.msg_pos >= 0) | (at_start & ~jnp.any(avail, axis=-1))


def _refusal_rule(policy: CompiledAuthority, state: AuthorityState) -> Int[Array, " B"]:
    named = jnp.maximum(state.named, 0)
    granted = policy.granted[state.principal, named] & ((state.forbidden >> named) & 1 == 0)
    per_tool = jnp.where(granted, policy.quota_rule[named], policy.tool_rule[named])
    return jnp.where(state.named >= 0, per_tool, policy.call_rule)


def _cap(policy: CompiledAuthority, state: AuthorityState, s):
    """(field id or -1, lower bound, ceiling) of the integer field at automaton state s."""
    f = jnp.where(state.phase >= 0, policy.field[s], -1)
    fs = jnp.maximum(f, 0)
    p = state.principal
    k = policy.field_tool[fs]
    ceiling = policy.field_max[p, fs]
    left = policy.max_total[p, k] - jnp.take_along_axis(state.spent, k[:, None], axis=1)[:, 0]
    ceiling = jnp.where(policy.field_quota[fs], jnp.minimum(ceiling, left), ceiling)
    return f, policy.field_min[p, fs], ceiling


def _words_or(words: UInt32[Array, "B K W"]) -> UInt32[Array, "B W"]:
    return lax.reduce(words, np.uint32(0), lax.bitwise_or, (1,))


def _tool_mask(policy: CompiledAuthority, state: AuthorityState, avail, vocab: int):
    """(mask, branch words) inside a call: the automaton's tokens, narrowed to available tools and bounds."""
    s = jnp.maximum(state.phase, 0)
    words = policy.automaton.allowed[s]
    brow = policy.branch_row[s]
    bw = policy.branch_bits[jnp.maximum(brow, 0)]  # [B, K, W]
    via = _words_or(jnp.where(avail[:, :, None], bw, np.uint32(0)))
    bits = jnp.sum(jnp.where(avail, 1 << jnp.arange(avail.shape[1]), 0), axis=-1)
    words = jnp.where((brow >= 0)[:, None], words & via,
                      jnp.where(((policy.reach[s] & bits) != 0)[:, None], words, np.uint32(0)))
    mask = unpack_bits(words, vocab)
    # integer bounds: value' = num * 10^len + lead <= ceiling, without overflow
    f, lo, hi = _cap(policy, state, s)
    pw = jnp.asarray(_POW10)[policy.lead_len][None, :]
    lv = policy.lead_val[None, :]
    num = state.num[:, None]
    fits = (policy.lead_len[None, :] <= _MAX_LEAD) & (hi[:, None] >= lv) & (num <= (hi[:, None] - lv) // pw)
    value = num * pw + lv  # exact where `fits`
    ok = fits & (~policy.ends[None, :] | (value >= lo[:, None]))
    return mask & ((f < 0)[:, None] | ok), bw


def _init(policy: CompiledAuthority, batch: int) -> AuthorityState:
    K = policy.granted.shape[1]
    z = jnp.zeros((batch,), jnp.int32)
    return AuthorityState(principal=z, mode=z, named=z - 1, forbidden=z, calls=jnp.zeros((batch, K), jnp.int32),
                          spent=jnp.zeros((batch, K), jnp.int32), phase=z + FREE, num=z, msg_pos=z - 1,
                          boundary=jnp.zeros((batch,), bool))


def _evaluate(policy: CompiledAuthority, state: AuthorityState, logits: Float[Array, "B V"], *, vocab: int) -> Decision:
    B, n = logits.shape
    authorized = _authorized(policy, state)
    avail = _available(policy, state, authorized)
    refusing = _refusing(policy, state, avail)
    in_call = state.phase >= 0

    pending = state.phase == PENDING

    def inside(_):
        mask, bw = _tool_mask(policy, state, avail, vocab)
        # AUTO before its first token: anything, but a call only if some tool is available
        start = unpack_bits(policy.automaton.allowed[policy.initial[state.principal]], vocab)
        mask = jnp.where(pending[:, None], ~start | jnp.any(avail, -1)[:, None], mask)
        return mask | ~(in_call | pending)[:, None], bw

    def outside(_):
        return jnp.ones((B, vocab), bool), jnp.zeros((B,) + policy.branch_bits.shape[1:], jnp.uint32)

    # Most steps of most turns are free text: skip the [B, V] work when no row is inside (or starting) a call.
    mask, bw = lax.cond(jnp.any((in_call | pending) & ~refusing), inside, outside, None)
    if n > vocab:
        mask = jnp.pad(mask, ((0, 0), (0, n - vocab)), constant_values=True)
    pos = jnp.clip(state.msg_pos, 0, policy.refusal.shape[0] - 1)
    rule = jnp.where(refusing, _refusal_rule(policy, state), NO_RULE)
    # For the audit: which tool's unavailability masked the model's own top token. Only authority (grant,
    # escalation, quota) blocks: a tool masked because the turn named another one (tool_choice) is not an
    # attempt the session's "blocked" counter should hold against the principal.
    top = jnp.minimum(ops.argmax(logits), vocab - 1)
    top_bit = (bw[jnp.arange(B)[:, None], jnp.arange(bw.shape[1])[None, :], (top // 32)[:, None]]
               >> (top % 32)[:, None].astype(jnp.uint32)) & 1
    culprit = (top_bit == 1) & ~authorized
    kb = jnp.argmax(culprit, axis=-1)
    granted = policy.granted[state.principal, kb] & ((state.forbidden >> kb) & 1 == 0)
    block = jnp.where(jnp.any(culprit, -1) & in_call, jnp.where(granted, policy.quota_rule[kb], policy.tool_rule[kb]),
                      NO_RULE)
    return Decision(
        mask=mask | refusing[:, None],
        verdict=jnp.where(refusing, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
        rule=rule,
        confidence=jnp.ones((B,), jnp.float32),
        forced=jnp.where(refusing, policy.refusal[pos], NO_TOKEN),
        stop=jnp.zeros((B,), bool),
        block_rule=block,
    )


def _step(policy: CompiledAuthority, state: AuthorityState, token: Int[Array, " B"]):
    """(next automaton state, found) of `token` from the row's state (a pending call starts at the principal's)."""
    src = jnp.where(state.phase == PENDING, policy.initial[state.principal], jnp.maximum(state.phase, 0))
    return _search(policy.automaton, src, token)


def _check(policy: CompiledAuthority, state: AuthorityState, token: Int[Array, " B"]) -> Outcome:
    avail = _available(policy, state)
    refusing = _refusing(policy, state, avail)
    pos = jnp.maximum(state.msg_pos, 0)
    nxt, found = _step(policy, state, token)
    offsets = policy.automaton.offsets
    closed = (state.phase >= 0) & found & policy.automaton.accepting[nxt] & (offsets[nxt + 1] == offsets[nxt])
    B = token.shape[0]
    # the message ends the row only if its last token is really emitted (another gate's forced token may win)
    mine = token == policy.refusal[jnp.minimum(pos, policy.refusal.shape[0] - 1)]
    return Outcome(
        token=token,
        verdict=jnp.where(refusing, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
        rule=jnp.where(refusing, _refusal_rule(policy, state), NO_RULE),
        stop=jnp.where(refusing, mine & (pos + 1 >= policy.refusal_len), closed) | jnp.zeros((B,), bool),
        seen=Checked(token=token, found=(nxt, found)),  # advance reuses the search
    )


def _advance(policy: CompiledAuthority, state: AuthorityState, token: Int[Array, " B"], emitted: Bool[Array, " B"],
             seen: Int[Array, " B"] | Checked | None = None) -> AuthorityState:
    avail = _available(policy, state)
    refusing = _refusing(policy, state, avail)
    s = jnp.maximum(state.phase, 0)
    # this gate never rewrites a token: check's search (its Checked record) is for the emitted one unless a later
    # gate rewrote it
    if isinstance(seen, Checked):
        nxt, found = lax.cond(jnp.any(seen.token != token), lambda: _step(policy, state, token), lambda: seen.found)
    else:
        nxt, found = _step(policy, state, token)
    offsets = policy.automaton.offsets
    in_call = state.phase >= 0
    closed = in_call & found & policy.automaton.accepting[nxt] & (offsets[nxt + 1] == offsets[nxt])
    dead = policy.automaton.dead
    # the refusal moves on only when its token was emitted (another gate's forced token may have won the step)
    pos = jnp.maximum(state.msg_pos, 0)
    msg_pos = pos + (token == policy.refusal[jnp.minimum(pos, policy.refusal.shape[0] - 1)])
    phase = jnp.where(state.phase == PENDING, jnp.where(found, nxt, FREE),
                      jnp.where(in_call, jnp.where(found, nxt, dead), state.phase))
    # the integer being written: its digits so far, reset when a token ends it
    f = jnp.where(in_call, policy.field[s], -1)
    lead = jnp.minimum(policy.lead_len[token], _MAX_LEAD)
    value = state.num * jnp.asarray(_POW10)[lead] + policy.lead_val[token]
    num = jnp.where((f >= 0) & ~policy.ends[token], value, 0)
    new = AuthorityState(
        principal=state.principal, mode=state.mode, named=state.named, forbidden=state.forbidden, calls=state.calls,
        spent=state.spent, phase=jnp.where(refusing, FREE, phase).astype(jnp.int32), num=num.astype(jnp.int32),
        msg_pos=jnp.where(refusing, msg_pos, -1).astype(jnp.int32),
        boundary=state.boundary | (closed & ~refusing),
    )
    # a finished refusal message leaves the queue empty, so a carried state starts the next turn clean
    new = new.replace(msg_pos=jnp.where(new.msg_pos >= policy.refusal_len, -1, new.msg_pos))
    return keep_rows(emitted, new, state)


@functools.cache
def authority_gate(vocab_size: int) -> Gate:
    """The authority gate for logits of width >= `vocab_size` (cached). Policy: `CompiledAuthority`;
    state: `AuthorityState` (set each row's principal, mode and quotas with `begin_turn`)."""
    return Gate(init=_init, evaluate=functools.partial(_evaluate, vocab=vocab_size), check=_check,
                advance=_advance)


# --------------------------------------------------------------------------------------------------------------
# Host side: turn set-up, the action-boundary check, charging quotas.


def begin_turn(policy: CompiledAuthority, state: AuthorityState, *, principal, mode, named=None,
               forbidden=None) -> AuthorityState:
    """The state at the start of a turn: per row the principal id, the tool mode, the named tool (-1 any) and
    the forbidden-tools bitmask; the quotas carry over, everything else resets.

    Args are per-row sequences (or scalars for every row).
    """
    B = state.principal.shape[0]

    def col(v, fill):
        return jnp.broadcast_to(jnp.asarray(fill if v is None else v, jnp.int32), (B,))

    principal = col(principal, 0)
    mode = col(mode, NONE)
    phase = jnp.where(mode == REQUIRED, policy.initial[principal], jnp.where(mode == AUTO, PENDING, FREE))
    return state.replace(principal=principal, mode=mode, named=col(named, -1), forbidden=col(forbidden, 0),
                         phase=phase.astype(jnp.int32), num=jnp.zeros((B,), jnp.int32),
                         msg_pos=jnp.full((B,), -1, jnp.int32), boundary=jnp.zeros((B,), bool))


def record_call(state: AuthorityState, row: int, tool: int, amount: int) -> AuthorityState:
    """Charges one admitted call of tool index `tool` (its quota argument = `amount`) to row `row`."""
    calls, spent, boundary = (jnp.asarray(x) for x in (state.calls, state.spent, state.boundary))
    return state.replace(calls=calls.at[row, tool].add(1), spent=spent.at[row, tool].add(int(amount)),
                         boundary=boundary.at[row].set(False))


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool call the host may execute."""

    name: str
    arguments: dict


_CALL_TEXT = re.compile(re.escape(CALL_OPEN) + r"(.*)" + re.escape(CALL_CLOSE), re.S)


def parse_call(text: str) -> ToolCall | None:
    """Parses a reply that is exactly one call (surrounding whitespace aside); None otherwise."""
    m = _CALL_TEXT.fullmatch(text.strip())
    if m is None:
        return None
    try:
        obj = json.loads(m.group(1))
    except ValueError:
        return None
    if not isinstance(obj, dict) or set(obj) != {"name", "arguments"} or not isinstance(obj["name"], str) \
            or not isinstance(obj["arguments"], dict):
        return None
    return ToolCall(obj["name"], obj["arguments"])


def check_call(policy, principal: str, call: ToolCall | None, *, calls_used: dict[str, int] | None = None,
               total_used: dict[str, int] | None = None, forbidden=(), named: str | None = None) -> str | None:
    """The action-boundary check: None when the call is admissible, else why not.

    Independent of the compiled arrays (defence in depth): the policy's grants and schema, the session's ledger
    (`calls_used`, `total_used` by tool name) and the tools escalation forbids.
    """
    if call is None:
        return "the reply is not one well-formed tool call"
    grants = effective_authority(policy, principal)
    tools = {t.name: t for t in policy.tools}
    if call.name not in tools:
        return f"unknown tool {call.name!r}"
    if call.name not in grants:
        return f"tool {call.name!r} is not granted to {principal!r}"
    if call.name in forbidden:
        return f"tool {call.name!r} is forbidden in this session (escalation)"
    if named is not None and call.name != named:
        return f"the turn required a call of {named!r}"
    grant, tool = grants[call.name], tools[call.name]
    if set(call.arguments) != {a for a, _ in tool.arguments()}:
        return f"arguments {sorted(call.arguments)} do not match {[a for a, _ in tool.arguments()]}"
    for a, sch in tool.arguments():
        v, lim = call.arguments[a], grant.limits[a]
        if sch["type"] == "integer":
            if isinstance(v, bool) or not isinstance(v, int) or not lim["minimum"] <= v <= lim["maximum"]:
                return f"{a}={v!r} is outside [{lim['minimum']}, {lim['maximum']}]"
        elif sch["type"] == "boolean":
            if not isinstance(v, bool):
                return f"{a}={v!r} is not a boolean"
        elif not isinstance(v, str) or ("enum" in lim and v not in lim["enum"]):
            return f"{a}={v!r} is not one of {lim.get('enum')}"
    used = (calls_used or {}).get(call.name, 0)
    if grant.max_calls is not None and used + 1 > grant.max_calls:
        return f"quota: {call.name!r} already called {used} of {grant.max_calls} times this session"
    if tool.quota_argument is not None and grant.max_total is not None:
        total = (total_used or {}).get(call.name, 0) + call.arguments[tool.quota_argument]
        if total > grant.max_total:
            return f"quota: {call.name!r} {tool.quota_argument} would total {total} > {grant.max_total} this session"
    return None


def describe_state(state: AuthorityState, row: int = 0) -> dict[str, Any]:
    """A readable summary of one row (for notebooks and error messages)."""
    return {k: np.asarray(getattr(state, k))[row].tolist() for k in AuthorityState.__dataclass_fields__}
