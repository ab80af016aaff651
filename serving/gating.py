"""Per-slot policies: every slot of the server's running batch is gated by its own compiled policy.

`gate.policy.compile_policy` turns one policy into a `Gate` whose functions take a single policy shared by all
rows. A server batch mixes requests whose effective policies differ (deployment ∧ principal ∧ session ∧
request), so the engine runs one fixed chain over `SLOT_KINDS`, in the compiler's chain order: the phrase gate,
the structure gate, the authority gate over tool calls, the escalation gate, disclosure control, grounding of
figures and the evidence budget (every gate `gate.policy.compile_policy` makes). Each kind is wrapped by
`per_row`: the wrapped gate's policy is `(enabled, arrays)` with a leading slot axis on both
(one copy of the compiled arrays per slot, and a flag saying whether that slot's policy has this kind of rule at
all), and its four functions are `vmap`ped over the slots. A disabled slot admits every token and keeps its state.

The phrase, structure and authority gates are always in the chain (`BASE_KINDS`). The others join it the first
time a policy needs them (the envelope below names them; until then their table and state entries are `()` and
they cost nothing), so a server whose policies never use them compiles the same program as before they existed.

Shapes: every slot's arrays are padded to one `Envelope` (per kind and array field, the largest bucketed shape
seen so far), so the table has static shapes and slots change policy without recompiling. The engine grows the
envelope (one recompile) only when a policy exceeds it or needs a kind the chain lacks; compiled shapes are
power-of-two buckets, so that is rare. Padding keeps the gates' semantics: padded automaton states are
unreachable, padded rules never fire, padded structure states are dead (no admissible token, no transition),
padded character columns are -1 (no character). The authority gate's tables pad the same way: its call automaton
like a structure, padded principals and tools are granted nothing, padded automaton states reach no tool and lie
in no integer field, padded rule ids are NO_RULE. Its tool axis is always `TOOL_SLOTS` wide (the compiler's
limit), so a slot's `AuthorityState` (calls and quota spent per tool) has one shape whatever the policy.

Per-turn state: what a gate needs from the session and the request is its state at the start of the turn, built
on the host (`gate.<kind>.begin_turn`, see serving/context.py) with a shape that does not depend on the policy,
and installed with the request (`TURN_KINDS`): the authority state (`authority_row`: principal, tool mode, quotas
spent), the escalation state (the session's counters and the topic rules they activated), the disclosure state
(the spans protected from the principal, as a Shift-And matcher of `StateSizes.spans` spans), the grounding state
(the digit trie of the request's evidence, padded to `StateSizes.nodes` nodes) and the evidence budget (nats this
turn may spend). The sizes are the engine's (`EngineConfig.protected_spans`, `protected_chars`,
`evidence_nodes`), fixed for its lifetime: the host refuses a request that needs more (serving/context.py), so a
per-request trie or span set never changes a compiled shape.

`SlotPolicy.from_compiled` still raises `UnsupportedPolicy` for a gate kind the slot table does not carry (none
today: it is the guard that keeps a gate added to the compiler later from being dropped silently).
"""


from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gate import authority as A
from gate import disclosure as D
from gate import escalation as X
from gate import evidence as EV
from gate import grounding as G
from gate.core import NO_RULE, Action, Decision, Gate, Outcome, Verdict, chain, keep_rows
from gate.normalize import Normalization
from gate.phrases import CompiledPhrases, PhraseState, phrase_gate
from gate.policy import CompiledPolicy
from gate.structure import CompiledStructure, structure_gate

__all__ = [
    "BASE_KINDS", "SLOT_KINDS", "TOOL_SLOTS", "TURN_KINDS", "Envelope", "SlotPolicy", "StateSizes",
    "UnsupportedPolicy", "authority_row", "authority_state_of", "complete", "empty_table", "grow_state", "grow_table",
    "host", "initial_authority_state", "initial_disclosure_state", "initial_escalation_state",
    "initial_evidence_state", "initial_grounding_state", "initial_phrase_state", "initial_state", "per_row",
    "phrase_state_of", "reserve", "row_policy", "slot_gate", "state_of",
]

_I32_MAX = np.iinfo(np.int32).max

# Fill values for padded entries (see the module docstring for why each keeps the gate's meaning).
_PHRASE_FILL = {
    "goto": 0, "out_rule": -1, "out_suppress": -1, "mask_row": 0, "suppress_bits": 0, "tok_chars": -1,
    "rule_id": NO_RULE, "rule_action": int(Action.SUPPRESS), "messages": -1, "message_len": 0,
}
_STRUCTURE_FILL = {
    "allowed": 0, "offsets": "edge", "tokens": _I32_MAX, "next_state": "dead", "accepting": False,
    "initial": None, "rule": None,
}


# Authority tables (flat field names; the call automaton's fields are "automaton.<field>"). The tool axis is
# padded to TOOL_SLOTS at once (`SlotPolicy.from_compiled`), so it never grows.
_AUTHORITY_FILL = {
    "initial": 0, "granted": False, "max_calls": 0, "max_total": 0, "quota_min": 0, "reach": 0, "branch_row": -1,
    "branch_bits": 0, "field": -1, "field_tool": 0, "field_quota": False, "field_min": 0, "field_max": 0,
    "lead_len": 0, "lead_val": 0, "ends": False, "tool_rule": NO_RULE, "quota_rule": NO_RULE, "call_rule": None,
    "refusal": -1, "refusal_len": None,
}
TOOL_SLOTS = 32  # the authority gate's tool axis (gate.authority compiles at most 31 tools)
# per field, the axes that are the tool axis
_TOOL_AXES = {"granted": (1,), "max_calls": (1,), "max_total": (1,), "quota_min": (1,), "branch_bits": (1,),
              "tool_rule": (0,), "quota_rule": (0,)}


_ESCALATION_FILL = {"counter": 0, "at": _I32_MAX, "rule_id": NO_RULE, "goto": 0, "tok_chars": -1, "out_bits": 0,
                    "refusal": -1, "refusal_len": None}
_EVIDENCE_FILL = {"thresholds": None, "rule": None, "messages": -1, "message_len": None}
_DISCLOSURE_FILL = {"tok_chars": -1, "tok_len": None, "label_rule": NO_RULE, "label_action": int(Action.SUPPRESS),
                    "messages": -1, "message_len": 0}
# digit tokens pad by repeating the last one (its mask entry is written twice, alike); character columns with -1
_GROUNDING_FILL = {"digit_tokens": "edge", "digit_chars": ("edge", -1), "digit_index": None, "head": None,
                   "kills": None, "lone_sep": None, "rule": None}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    if isinstance(tree, A.CompiledAuthority):
        out = {f"automaton.{k}": v for k, v in _shapes(tree.automaton).items()}
        out.update({f.name: tuple(np.shape(getattr(tree, f.name))) for f in dataclasses.fields(tree)
                    if f.name != "automaton"})
        return out
    return {f.name: tuple(np.shape(getattr(tree, f.name))) for f in dataclasses.fields(tree)}


def _max_shapes(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a if b is None else b
    return {k: tuple(max(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a}


# The gate kinds of the slot table, in chain order (gate.policy's), and those always in the engine's chain.
SLOT_KINDS = ("phrases", "structure", "authority", "escalation", "disclosure", "grounding", "evidence")
BASE_KINDS = ("phrases", "structure", "authority")
# the kinds whose state the host builds per turn and the engine installs with the request (EngineRequest.<kind>_state)
TURN_KINDS = SLOT_KINDS[2:]


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The padded shape of every array field of the slot table, per gate kind (None: no policy had it yet).

    Attributes (one per kind of SLOT_KINDS): field name -> shape of one slot's compiled field (the authority's
    call automaton fields are "automaton.<field>").
    """

    phrases: dict | None = None
    structure: dict | None = None
    authority: dict | None = None
    escalation: dict | None = None
    disclosure: dict | None = None
    grounding: dict | None = None
    evidence: dict | None = None

    def union(self, other: Envelope) -> Envelope:
        return Envelope(**{k: _max_shapes(getattr(self, k), getattr(other, k)) for k in SLOT_KINDS})

    def covers(self, other: Envelope) -> bool:
        return self.union(other) == self

    def key(self) -> tuple:
        def freeze(d):
            return None if d is None else tuple(sorted(d.items()))

        return tuple(freeze(getattr(self, k)) for k in SLOT_KINDS)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds in the engine's chain: the base kinds and every kind some policy needed."""
        return tuple(k for k in SLOT_KINDS if k in BASE_KINDS or getattr(self, k) is not None)


def _minimal_phrases(vocab_size: int) -> CompiledPhrases:
    """The smallest phrase table (no rules), used as the envelope when no policy has phrases."""
    w = -(-vocab_size // 32)
    z = np.zeros
    return CompiledPhrases(goto=z((1, 1), np.int32), out_rule=z((1,), np.int32), out_suppress=z((1,), np.int32),
                           mask_row=z((1,), np.int32), suppress_bits=z((1, w), np.uint32),
                           tok_chars=np.full((vocab_size, 1), -1, np.int32), rule_id=z((1,), np.int32),
                           rule_action=z((1,), np.int32), messages=z((1, 1), np.int32), message_len=z((1,), np.int32))


def _minimal_structure(vocab_size: int) -> CompiledStructure:
    w = -(-vocab_size // 32)
    return CompiledStructure(allowed=np.zeros((2, w), np.uint32), offsets=np.zeros((3,), np.int32),
                             tokens=np.full((2,), _I32_MAX, np.int32), next_state=np.ones((2,), np.int32),
                             accepting=np.zeros((2,), bool), initial=np.zeros((), np.int32),
                             rule=np.zeros((), np.int32))


def _minimal_authority(vocab_size: int) -> A.CompiledAuthority:
    """The smallest authority table: no principal is granted anything (the envelope when no policy has tools)."""
    z = np.zeros
    K = TOOL_SLOTS
    return A.CompiledAuthority(
        automaton=_minimal_structure(vocab_size), initial=z((1,), np.int32), granted=z((1, K), bool),
        max_calls=z((1, K), np.int32), max_total=z((1, K), np.int32), quota_min=z((1, K), np.int32),
        reach=z((2,), np.int32), branch_row=np.full((2,), -1, np.int32), branch_bits=z((1, K, -(-vocab_size // 32)),
                                                                                           np.uint32),
        field=np.full((2,), -1, np.int32), field_tool=z((1,), np.int32), field_quota=z((1,), bool),
        field_min=z((1, 1), np.int32), field_max=z((1, 1), np.int32), lead_len=z((vocab_size,), np.int32),
        lead_val=z((vocab_size,), np.int32), ends=z((vocab_size,), bool), tool_rule=np.full((K,), NO_RULE, np.int32),
        quota_rule=np.full((K,), NO_RULE, np.int32), call_rule=np.asarray(NO_RULE, np.int32),
        refusal=np.full((8,), -1, np.int32), refusal_len=np.asarray(0, np.int32))


def _minimal_escalation(vocab_size: int) -> X.CompiledEscalation:
    """An escalation table with no rule (the entry of a slot whose policy has none)."""
    i32 = functools.partial(np.full, dtype=np.int32)
    return X.CompiledEscalation(counter=i32((1,), 0), at=i32((1,), _I32_MAX), rule_id=i32((1,), NO_RULE),
                                goto=i32((1, 1), 0), tok_chars=i32((vocab_size, 1), -1), out_bits=i32((1,), 0),
                                refusal=i32((1,), -1), refusal_len=np.asarray(0, np.int32))


def _minimal_disclosure(vocab_size: int) -> D.CompiledDisclosure:
    """A disclosure table with no protecting label."""
    return D.CompiledDisclosure(tok_chars=np.full((vocab_size, 1), -1, np.int32),
                                tok_len=np.zeros((vocab_size,), np.int32), label_rule=np.full((1,), NO_RULE, np.int32),
                                label_action=np.full((1,), int(Action.SUPPRESS), np.int32),
                                messages=np.full((1, 1), -1, np.int32), message_len=np.zeros((1,), np.int32))


def _minimal_grounding(vocab_size: int) -> G.CompiledGrounding:
    """A grounding table that reads no token as a digit."""
    return G.CompiledGrounding(digit_tokens=np.zeros((1,), np.int32), digit_chars=np.full((1, 1), -1, np.int32),
                               digit_index=np.full((vocab_size,), -1, np.int32),
                               head=np.full((vocab_size, 2), -1, np.int32), kills=np.zeros((vocab_size,), bool),
                               lone_sep=np.zeros((vocab_size,), bool), rule=np.asarray(NO_RULE, np.int32))


def _minimal_evidence(vocab_size: int) -> EV.CompiledEvidence:
    del vocab_size
    return EV.CompiledEvidence(thresholds=np.ones((3,), np.float32), rule=np.full((4,), NO_RULE, np.int32),
                               messages=np.full((4, 1), -1, np.int32), message_len=np.zeros((4,), np.int32))


def _widen_tools(a: A.CompiledAuthority) -> A.CompiledAuthority:
    """The tool axis padded to TOOL_SLOTS (numpy), with the fill values that keep the gate's meaning."""
    out = {}
    for k, axes in _TOOL_AXES.items():
        x = np.asarray(getattr(a, k))
        widths = [(0, TOOL_SLOTS - x.shape[i]) if i in axes else (0, 0) for i in range(x.ndim)]
        out[k] = np.pad(x, widths, constant_values=_AUTHORITY_FILL[k])
    return a.replace(**out)


class UnsupportedPolicy(ValueError):
    """A compiled policy with a gate kind the slot table does not carry."""


@dataclasses.dataclass(frozen=True, eq=False)
class SlotPolicy:
    """One request's compiled policy, split by gate kind and copied to the host.

    Attributes:
      compiled: the `CompiledPolicy` (its rules table names the rule ids the gates report).
      phrases: its phrase tables (numpy), or None when the policy has no phrase rule.
      structure: its structure automaton (numpy), or None when the policy sets no structure.
      authority: its authority tables (numpy, tool axis TOOL_SLOTS wide), or None when it defines no tools.
      escalation: its escalation rules and topic automaton (numpy), or None.
      disclosure: its labels' rules and messages and the vocabulary's normalized characters (numpy), or None when
        no label protects anything.
      grounding: the vocabulary read as digit classes (numpy), or None when figures need no grounding.
      evidence: its evidence-budget thresholds and messages (numpy), or None.
    """

    compiled: CompiledPolicy
    phrases: CompiledPhrases | None
    structure: CompiledStructure | None
    authority: A.CompiledAuthority | None = None
    escalation: X.CompiledEscalation | None = None
    disclosure: D.CompiledDisclosure | None = None
    grounding: G.CompiledGrounding | None = None
    evidence: EV.CompiledEvidence | None = None

    @classmethod
    def from_compiled(cls, compiled: CompiledPolicy) -> SlotPolicy:
        """Raises UnsupportedPolicy when the policy needs a gate the slot table does not carry (fail closed:
        a rule the server cannot enforce must not be silently dropped)."""
        missing = [k for k in compiled.kinds if k not in SLOT_KINDS]
        if missing:
            raise UnsupportedPolicy(f"policy {compiled.policy.name!r} needs the {', '.join(missing)} gate(s), which "
                                    f"the server's per-slot gate does not carry (it has {', '.join(SLOT_KINDS)})")
        parts = dict(zip(compiled.kinds, compiled.arrays, strict=True))
        tables = {k: None if parts.get(k) is None else host(parts[k]) for k in SLOT_KINDS}
        if tables["authority"] is not None:
            tables["authority"] = _widen_tools(tables["authority"])
        return cls(compiled, **tables)

    @property
    def policy_hash(self) -> str:
        return self.compiled.policy_hash

    def table(self, kind: str):
        """The compiled tables of one kind (numpy), or None when the policy has no rule of it."""
        return getattr(self, kind)

    def envelope(self) -> Envelope:
        return Envelope(**{k: None if self.table(k) is None else _shapes(self.table(k)) for k in SLOT_KINDS})


def _absent(entry) -> bool:
    """An entry of a kind not in the chain (the table's and the state's placeholder)."""
    return isinstance(entry, tuple) and not entry


def _pad(a: Any, shape: tuple[int, ...], fill, xp, lead: int = 0):
    """Pads `a` (with `lead` leading slot axes left alone) up to `shape` on the trailing axes.

    `fill`: a constant, "edge" (repeat the last entry), or a tuple with one of those per trailing axis."""
    widths = [(0, 0)] * lead + [(0, t - s) for s, t in zip(a.shape[lead:], shape, strict=True)]
    if all(w == (0, 0) for w in widths):
        return a
    if isinstance(fill, tuple):
        for axis, f in enumerate(fill):
            one = [(0, 0)] * a.ndim
            one[lead + axis] = widths[lead + axis]
            if one[lead + axis] != (0, 0):
                a = xp.pad(a, one, mode="edge") if f == "edge" else xp.pad(a, one, constant_values=f)
        return a
    if fill == "edge":
        return xp.pad(a, widths, mode="edge")
    return xp.pad(a, widths, constant_values=fill)


def _pad_fields(tree, env: dict, fills: dict, xp=np, lead: int = 0):
    """A flat compiled dataclass padded field by field (fill None: the field's shape never changes)."""
    return type(tree)(**{k: getattr(tree, k) if fills[k] is None else _pad(getattr(tree, k), shape, fills[k], xp, lead)
                         for k, shape in env.items()})


def _pad_phrases(p: CompiledPhrases, env: dict, xp=np, lead: int = 0) -> CompiledPhrases:
    return CompiledPhrases(**{k: _pad(getattr(p, k), env[k], _PHRASE_FILL[k], xp, lead) for k in env})


def _pad_structure(s: CompiledStructure, env: dict, xp=np, lead: int = 0) -> CompiledStructure:
    dead = env["allowed"][0] - 1  # the last padded row: all zero, no transitions (see gate.structure)
    out = {}
    for k, shape in env.items():
        fill = _STRUCTURE_FILL[k]
        if fill is None:
            out[k] = getattr(s, k)
        else:
            out[k] = _pad(getattr(s, k), shape, dead if fill == "dead" else fill, xp, lead)
    return CompiledStructure(**out)


def _pad_authority(a: A.CompiledAuthority, env: dict, xp=np, lead: int = 0) -> A.CompiledAuthority:
    auto = {k.split(".", 1)[1]: v for k, v in env.items() if k.startswith("automaton.")}
    out = {}
    for k, shape in env.items():
        if k.startswith("automaton."):
            continue
        fill = _AUTHORITY_FILL[k]
        out[k] = getattr(a, k) if fill is None else _pad(getattr(a, k), shape, fill, xp, lead)
    return A.CompiledAuthority(automaton=_pad_structure(a.automaton, auto, xp, lead), **out)


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one gate kind sits in the slot table: its smallest table and how a table is padded to the envelope."""

    minimal: Callable[[int], Any]  # vocab_size -> the table of a slot whose policy lacks the kind (numpy)
    pad: Callable[..., Any]  # (table, env fields, xp, lead) -> the table padded to the envelope


_KINDS = {
    "phrases": _Kind(_minimal_phrases, _pad_phrases),
    "structure": _Kind(_minimal_structure, _pad_structure),
    "authority": _Kind(_minimal_authority, _pad_authority),
    "escalation": _Kind(_minimal_escalation, functools.partial(_pad_fields, fills=_ESCALATION_FILL)),
    "disclosure": _Kind(_minimal_disclosure, functools.partial(_pad_fields, fills=_DISCLOSURE_FILL)),
    "grounding": _Kind(_minimal_grounding, functools.partial(_pad_fields, fills=_GROUNDING_FILL)),
    "evidence": _Kind(_minimal_evidence, functools.partial(_pad_fields, fills=_EVIDENCE_FILL)),
}


def _complete(env: Envelope, vocab_size: int) -> Envelope:
    """The envelope with the minimal tables filled in for the base kinds no policy used yet."""
    return env.union(Envelope(**{k: _shapes(_KINDS[k].minimal(vocab_size)) for k in BASE_KINDS}))


def _entry(kind: str, policy: SlotPolicy | None, env: Envelope, vocab_size: int):
    """One slot's (enabled Bool[1], tables with leading axis 1) for one kind, padded to `env` (numpy)."""
    spec = _KINDS[kind]
    table = None if policy is None else policy.table(kind)
    padded = spec.pad(table if table is not None else spec.minimal(vocab_size), getattr(env, kind), xp=np, lead=0)
    return np.asarray([table is not None]), jax.tree.map(lambda x: np.asarray(x)[None], padded)


def row_policy(policy: SlotPolicy | None, env: Envelope, vocab_size: int):
    """One slot's entry of the table (leading axis 1, numpy), padded to `env` (complete it first): a tuple over
    SLOT_KINDS, `()` for a kind not in the chain.

    A None policy (or a missing gate kind) gives a disabled entry of minimal tables.
    """
    env = _complete(env, vocab_size)
    if policy is not None:
        lacking = [k for k in SLOT_KINDS if policy.table(k) is not None and k not in env.kinds]
        if lacking:
            raise ValueError(f"the envelope has no room for the {', '.join(lacking)} gate(s): fit the policy first")
    return tuple(_entry(k, policy, env, vocab_size) if k in env.kinds else () for k in SLOT_KINDS)


def empty_table(env: Envelope, vocab_size: int, slots: int):
    """A table of `slots` disabled entries (numpy)."""
    row = row_policy(None, env, vocab_size)
    return jax.tree.map(lambda x: np.repeat(x, slots, axis=0), row)


def grow_table(table, env: Envelope, vocab_size: int):
    """The device table padded to a larger envelope (entries keep their meaning); a kind new to the chain gets a
    disabled entry for every slot."""
    env = _complete(env, vocab_size)
    slots = table[0][0].shape[0]
    out = []
    for k, entry in zip(SLOT_KINDS, table, strict=True):
        if k not in env.kinds:
            out.append(())
        elif _absent(entry):
            enabled, arrays = _entry(k, None, env, vocab_size)
            out.append(jax.tree.map(lambda x: jnp.asarray(np.repeat(x, slots, axis=0)), (enabled, arrays)))
        else:
            enabled, arrays = entry
            out.append((enabled, _KINDS[k].pad(arrays, getattr(env, k), xp=jnp, lead=1)))
    return tuple(out)


def reserve(env: Envelope, vocab_size: int, *, phrase_factor: int = 2, structure_states: int = 0,
            structure_edges: int = 0, message_tokens: int = 0) -> Envelope:
    """`env` grown ahead of time: phrase rule and automaton axes times `phrase_factor`, room for phrase messages of
    `message_tokens` tokens (a request's substitute or refuse phrase), and room for a structure automaton of the
    given states and edges (the vocabulary axes never change)."""
    env = _complete(env, vocab_size)
    f = max(1, int(phrase_factor))
    p = dict(env.phrases)
    for k in ("goto", "out_rule", "out_suppress", "mask_row", "suppress_bits", "rule_id", "rule_action", "messages",
              "message_len"):
        p[k] = (p[k][0] * f,) + p[k][1:]
    if message_tokens > 0:  # the phrase compiler's bucket: a power of two
        p["messages"] = (p["messages"][0], max(p["messages"][1], 1 << (int(message_tokens) - 1).bit_length()))
    s = dict(env.structure)
    n_states = max(s["allowed"][0], int(structure_states))
    n_edges = max(s["tokens"][0], int(structure_edges))
    s.update(allowed=(n_states,) + s["allowed"][1:], offsets=(n_states + 1,), accepting=(n_states,),
             tokens=(n_edges,), next_state=(n_edges,))
    return dataclasses.replace(env, phrases=p, structure=s)


def complete(env: Envelope, vocab_size: int) -> Envelope:
    """`env` with minimal shapes for the base gates that no policy has used yet (what the table actually holds)."""
    return _complete(env, vocab_size)


# --------------------------------------------------------------------------------------------------------------
# The per-slot gate.


def _unsqueeze(tree):
    return jax.tree.map(lambda x: x[None], tree)


def _squeeze(tree):
    return jax.tree.map(lambda x: x[0], tree)


def per_row(inner: Gate) -> Gate:
    """`inner` with a policy per row: policy = (enabled Bool[B], arrays with leading axis B).

    Each function runs `inner` on one row at a time under `vmap`; rows whose `enabled` is False admit every
    token, never rewrite or stop, and keep their state. When no row is enabled, `inner` is skipped entirely
    (a `lax.cond`), so a gate kind that no running request uses costs nothing.
    """

    def init(policy, batch):
        _, arrays = policy
        del batch  # the table's leading axis is the batch
        return jax.vmap(lambda a: _squeeze(inner.init(a, 1)))(arrays)

    def evaluate(policy, state, logits):
        enabled, arrays = policy
        B, V = logits.shape

        def run(_):
            d = jax.vmap(lambda a, s, x: _squeeze(inner.evaluate(a, _unsqueeze(s), x[None])))(arrays, state, logits)
            return Decision(
                mask=d.mask | ~enabled[:, None],
                verdict=jnp.where(enabled, d.verdict, Verdict.ADMIT).astype(jnp.int32),
                rule=jnp.where(enabled, d.rule, NO_RULE).astype(jnp.int32),
                confidence=jnp.where(enabled, d.confidence, 1.0).astype(jnp.float32),
                forced=jnp.where(enabled, d.forced, -1).astype(jnp.int32),
                stop=d.stop & enabled,
                block_rule=(None if d.block_rule is None
                            else jnp.where(enabled, d.block_rule, NO_RULE).astype(jnp.int32)),
                # a gate that folds what it observed into its state (Decision.state): disabled rows keep theirs
                **({} if getattr(d, "state", None) is None else {"state": keep_rows(enabled, d.state, state)}),
            )

        shape = jax.eval_shape(run, None)

        def off(_):
            d = Decision.admit_all(B, V)
            d = d.replace(block_rule=None if shape.block_rule is None else jnp.full((B,), NO_RULE, jnp.int32))
            return d if getattr(shape, "state", None) is None else d.replace(state=state)

        return jax.lax.cond(jnp.any(enabled), run, off, None)

    def check(policy, state, token):
        enabled, arrays = policy

        def run(_):
            o = jax.vmap(lambda a, s, t: _squeeze(inner.check(a, _unsqueeze(s), t[None])))(arrays, state, token)
            return Outcome(
                token=jnp.where(enabled, o.token, token).astype(jnp.int32),
                verdict=jnp.where(enabled, o.verdict, Verdict.ADMIT).astype(jnp.int32),
                rule=jnp.where(enabled, o.rule, NO_RULE).astype(jnp.int32),
                stop=o.stop & enabled,
            )

        return jax.lax.cond(jnp.any(enabled), run, lambda _: Outcome.unchanged(token.astype(jnp.int32)), None)

    def advance(policy, state, token, emitted, seen=None):
        enabled, arrays = policy
        seen = token if seen is None else seen

        def run(_):
            new = jax.vmap(lambda a, s, t, e, x: _squeeze(inner.advance(a, _unsqueeze(s), t[None], e[None], x[None])))(
                arrays, state, token, emitted, seen)
            return keep_rows(enabled, new, state)

        return jax.lax.cond(jnp.any(enabled), run, lambda _: state, None)

    return Gate(init, evaluate, check, advance)


def _over_slot_kinds(inner: Gate, present: tuple[int, ...]) -> Gate:
    """`inner` (a chain over the kinds at positions `present` of SLOT_KINDS) taking and returning full tuples over
    SLOT_KINDS, with `()` for the kinds not in the chain (so a kind's entry sits at the same index in every
    engine)."""

    def pick(t):
        return tuple(t[i] for i in present)

    def put(sub):
        out = [()] * len(SLOT_KINDS)
        for i, s in zip(present, sub, strict=True):
            out[i] = s
        return tuple(out)

    def init(policy, batch):
        return put(inner.init(pick(policy), batch))

    def evaluate(policy, state, logits):
        d = inner.evaluate(pick(policy), pick(state), logits)
        return d if d.state is None else d.replace(state=put(d.state))

    def check(policy, state, token):
        return inner.check(pick(policy), pick(state), token)

    def advance(policy, state, token, emitted, seen=None):
        return put(inner.advance(pick(policy), pick(state), token, emitted, seen))

    return Gate(init, evaluate, check, advance)


def _inner_gate(kind: str, vocab_size: int, eos_id: int, sizes: StateSizes) -> Gate:
    def fixed(init):  # a per-slot state of the engine's shape, whatever the policy (built now, outside any trace)
        one = init(1, sizes)
        return lambda policy, batch: jax.tree.map(lambda x: jnp.asarray(np.repeat(x, batch, axis=0)), one)

    if kind == "phrases":
        return phrase_gate(vocab_size)
    if kind == "structure":
        return structure_gate(vocab_size, eos_id)
    if kind == "authority":
        return A.authority_gate(vocab_size)
    if kind == "escalation":
        return X.escalation_gate(vocab_size)
    if kind == "disclosure":
        return D.disclosure_gate(vocab_size)._replace(init=fixed(initial_disclosure_state))
    if kind == "grounding":
        return G.grounding_gate(vocab_size)._replace(init=fixed(initial_grounding_state))
    return EV.evidence_gate(vocab_size)


@dataclasses.dataclass(frozen=True)
class StateSizes:
    """The fixed sizes of the per-slot states that hold per-request data (see `EngineConfig`).

    Attributes:
      spans: protected spans per slot (the disclosure matcher's N).
      chars: distinct non-ASCII characters over those spans (its K).
      nodes: nodes of a slot's evidence trie (the grounding gate's N).
    """

    spans: int = 64
    chars: int = 16
    nodes: int = 2048


@functools.cache
def slot_gate(vocab_size: int, eos_id: int, kinds: tuple[str, ...] = BASE_KINDS,
              sizes: StateSizes = StateSizes()) -> Gate:
    """The engine's gate: per-row gates of `kinds` (a subset of SLOT_KINDS holding BASE_KINDS), chained in
    SLOT_KINDS order (cached: one object per vocabulary, kinds and state sizes).

    Its policy is the slot table, a tuple over SLOT_KINDS of `(enabled, compiled tables)` with a leading slot axis
    (`()` for a kind not in `kinds`); its state is a tuple over SLOT_KINDS of the kinds' states with a leading
    slot axis (`()` likewise).
    """
    unknown = set(kinds) - set(SLOT_KINDS)
    if unknown or not set(BASE_KINDS) <= set(kinds):
        raise ValueError(f"kinds {kinds}: expected a subset of {SLOT_KINDS} holding {BASE_KINDS}")
    present = tuple(i for i, k in enumerate(SLOT_KINDS) if k in kinds)
    inner = chain(*(per_row(_inner_gate(SLOT_KINDS[i], vocab_size, eos_id, sizes)) for i in present))
    return _over_slot_kinds(inner, present)


# --------------------------------------------------------------------------------------------------------------
# Per-slot state (numpy, leading axis = rows).


def state_of(gate_state, kind: str):
    """One kind's part of a slot-gate state (`()` when the kind is not in the engine's chain)."""
    return gate_state[SLOT_KINDS.index(kind)]


def phrase_state_of(gate_state) -> PhraseState:
    """The phrase-gate part of a slot-gate state (what a session carries from one turn to the next)."""
    return state_of(gate_state, "phrases")


def initial_phrase_state(rows: int = 1) -> PhraseState:
    """A phrase state at the start of a text (numpy): the automaton's root, no message queued."""
    return PhraseState(ac=np.zeros((rows,), np.int32), forced_rule=np.full((rows,), -1, np.int32),
                       forced_pos=np.zeros((rows,), np.int32))


def authority_state_of(gate_state) -> A.AuthorityState:
    """The authority part of a slot-gate state (whether the turn ended on a complete call, and where)."""
    return state_of(gate_state, "authority")


def initial_authority_state(rows: int = 1) -> A.AuthorityState:
    """An authority state that never calls (numpy): mode NONE, nothing spent (a slot without tools)."""
    z = np.zeros((rows,), np.int32)
    return A.AuthorityState(principal=z, mode=z + A.NONE, named=z - 1, forbidden=z.copy(),
                            calls=np.zeros((rows, TOOL_SLOTS), np.int32), spent=np.zeros((rows, TOOL_SLOTS), np.int32),
                            phase=z + A.FREE, num=z.copy(), msg_pos=z - 1, boundary=np.zeros((rows,), bool))


def host(tree):
    """A state pytree copied to numpy (what `EngineRequest` takes)."""
    return jax.tree.map(np.asarray, tree)


def initial_escalation_state(rows: int = 1) -> X.EscalationState:
    """An escalation state with zero counters and no topic rule active (numpy)."""
    return host(X.begin_turn(None, np.zeros((rows, len(X.COUNTERS)), np.int32), np.zeros((rows,), np.int32)))


def initial_evidence_state(rows: int = 1) -> EV.EvidenceState:
    """An evidence state with the budget off (numpy)."""
    return host(EV.begin_turn([None] * rows))


def initial_disclosure_state(rows: int = 1, sizes: StateSizes = StateSizes()) -> D.DisclosureState:
    """A disclosure state protecting nothing, with room for `sizes.spans` spans (numpy)."""
    return host(D.begin_turn([[]] * rows, Normalization(), min_spans=sizes.spans, min_other=sizes.chars))


def initial_grounding_state(rows: int = 1, sizes: StateSizes = StateSizes()) -> G.GroundingState:
    """A grounding state with the gate off and an empty trie of `sizes.nodes` nodes (numpy)."""
    children, terminal = G.build_trie((), min_nodes=sizes.nodes)
    return G.GroundingState(children=np.repeat(children[None], rows, axis=0),
                            terminal=np.repeat(terminal[None], rows, axis=0), node=np.full((rows,), -1, np.int32),
                            sep=np.zeros((rows,), np.int32), enabled=np.zeros((rows,), bool))


def initial_state(kind: str, rows: int = 1, sizes: StateSizes = StateSizes()):
    """A kind's neutral state for `rows` slots (numpy): what a slot starts from when its request brings none."""
    if kind == "phrases":
        return initial_phrase_state(rows)
    if kind == "authority":
        return initial_authority_state(rows)
    if kind == "escalation":
        return initial_escalation_state(rows)
    if kind == "disclosure":
        return initial_disclosure_state(rows, sizes)
    if kind == "grounding":
        return initial_grounding_state(rows, sizes)
    if kind == "evidence":
        return initial_evidence_state(rows)
    raise ValueError(f"no per-turn state for the {kind} gate")


def grow_state(gate_state, kinds: tuple[str, ...], rows: int, sizes: StateSizes = StateSizes()):
    """A device slot-gate state with the kinds new to the chain added in their neutral state (the slots running
    now have no policy of those kinds)."""
    return tuple(jax.tree.map(jnp.asarray, initial_state(k, rows, sizes)) if k in kinds and _absent(s) else s
                 for k, s in zip(SLOT_KINDS, gate_state, strict=True))


def authority_row(policy: SlotPolicy, *, principal: int, mode: int, named: int = -1, forbidden: int = 0,
                  calls=(), spent=()) -> A.AuthorityState:
    """A turn's authority state for one slot (numpy, leading axis 1), as `gate.authority.begin_turn` makes it.

    Args:
      policy: the slot's policy (it must define tools).
      principal: the row's principal (index into the policy's principals).
      mode: NONE, AUTO or REQUIRED; named: the tool a REQUIRED turn must call (-1: any).
      forbidden: bitmask of tools (policy order) this turn may not call.
      calls / spent: per tool (policy order), calls made and the quota argument's total so far this session.
    """
    a = policy.authority
    if a is None:
        raise ValueError("the policy defines no tools")
    st = initial_authority_state(1)
    c, t = np.zeros((1, TOOL_SLOTS), np.int32), np.zeros((1, TOOL_SLOTS), np.int32)
    c[0, : len(calls)] = calls
    t[0, : len(spent)] = spent
    phase = int(a.initial[principal]) if mode == A.REQUIRED else (A.PENDING if mode == A.AUTO else A.FREE)
    return st.replace(principal=np.asarray([principal], np.int32), mode=np.asarray([mode], np.int32),
                      named=np.asarray([named], np.int32), forbidden=np.asarray([forbidden], np.int32), calls=c,
                      spent=t, phase=np.asarray([phase], np.int32))
