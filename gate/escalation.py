"""Escalation on session history: counters in the carried state, policy rules that tighten once they reach a count.

The state counts, per session (`COUNTERS`, updated by `record_turn` at the end of every turn):

* refusals   +1 for a turn whose verdict is REFUSE (a refusal message, an action-boundary refusal, ...);
* blocked    +1 for a turn in which an action was blocked: a tool the model reached for was masked (authority or
             quota rule; not a tool that only the turn's tool_choice ruled out), or a tool call was refused in the
             loop or at the action boundary;
* violations +1 for a turn in which a content rule acted visibly: a phrase substitution or refusal, a disclosure
             substitution or refusal, a refused topic (masks alone, such as a blocked figure, do not count).

An escalation rule (`escalation:` in the policy) is active from the turn after its counter reaches `at`, for
the rest of the session: exactly when counter >= at (`active_rules`). Its effects (`effects`): `budget_scale`
multiplies the evidence budget, `forbid_tools` makes tools unavailable to the authority gate (and the
action-boundary check), `refuse_topics` ends a turn with the refusal message as soon as the output reaches one
of the topic phrases. The session driver applies the first two to the other gates' states when a turn begins;
the topics are this gate's own rule: the phrases are compiled by the phrase gate's compiler (`gate.phrases`),
and since different rows have different rules active, each automaton state also stores the bitmask of rules
whose phrase it completes, intersected with the row's active rules as the sampled token is walked.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from gate.core import NO_RULE, NO_TOKEN, Action, Checked, Decision, Gate, Outcome, Verdict, keep_rows
from gate.phrases import PhraseRule, _compile_host, _feed_chars

__all__ = [
    "COUNTERS",
    "CompiledEscalation",
    "EscalationState",
    "active_rules",
    "begin_turn",
    "compile_escalation",
    "effects",
    "escalation_gate",
    "record_turn",
]

COUNTERS = ("violations", "refusals", "blocked")
_PLACEHOLDER = "escalation placeholder"  # an automaton needs a phrase; this one belongs to no rule


@struct.dataclass
class CompiledEscalation:
    """The escalation gate's policy (R rules; the topic automaton from the phrase compiler).

    Attributes:
      counter: Int[R] which counter each rule watches (index into COUNTERS); at: Int[R] its threshold.
      rule_id: Int[R] global rule ids.
      goto: Int[S, C] topic automaton transitions; tok_chars: Int[V, L] tokens as its character classes.
      out_bits: Int[S] bitmask of the rules whose topic phrase ends at each state (failure chain included).
      refusal: Int[M] the refusal message tokens (padded with -1); refusal_len: Int[].
    """

    counter: Int[Array, " R"]
    at: Int[Array, " R"]
    rule_id: Int[Array, " R"]
    goto: Int[Array, "S C"]
    tok_chars: Int[Array, "V L"]
    out_bits: Int[Array, " S"]
    refusal: Int[Array, " M"]
    refusal_len: Int[Array, ""]


@struct.dataclass
class EscalationState:
    """Per-row escalation state (leading axis B).

    Attributes:
      counters: Int[B, 3] the session's counts, in COUNTERS order.
      topics: Int[B] bitmask of the rules whose topics are refused this turn (set by `begin_turn`).
      ac: Int[B] topic automaton state.
      msg_rule: Int[B] the rule whose refusal is being emitted, -1 when none; msg_pos: Int[B] its next token.
    """

    counters: Int[Array, "B 3"]
    topics: Int[Array, " B"]
    ac: Int[Array, " B"]
    msg_rule: Int[Array, " B"]
    msg_pos: Int[Array, " B"]


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def compile_escalation(policy, tokenizer, *, vocab_size: int | None = None, rules: Sequence[int]) -> CompiledEscalation:
    """Compiles the policy's escalation rules (rules: their global ids, in policy order)."""
    esc = policy.escalation
    if len(esc) > 31:
        raise ValueError(f"{len(esc)} escalation rules: at most 31 are supported")
    norm = policy.normalization
    refusal = policy.messages["refusal"]
    owners, phrase_rules = [], []
    for r, e in enumerate(esc):
        for t in e.refuse_topics:
            owners.append(r)
            phrase_rules.append(PhraseRule(t, Action.REFUSE, int(rules[r]), refusal))
    if not phrase_rules:
        owners.append(-1)
        phrase_rules.append(PhraseRule(_PLACEHOLDER, Action.REFUSE, NO_RULE, refusal))
    V = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    host = _compile_host(phrase_rules, tokenizer.token_bytes(), frozenset(tokenizer.special_ids), norm, V,
                         lambda s: tokenizer.encode(s, parse_special=False))
    # the phrase compiler orders rules by priority (stable: all are REFUSE), so local i is phrase_rules[i]
    keys = [norm.normalize(r.phrase) for r in host.rules]
    S = host.tables["goto"].shape[0]
    out_bits = np.zeros(S, np.int32)
    for s, text in enumerate(host.state_text):
        for i, k in enumerate(keys):
            if owners[i] >= 0 and text.endswith(k):
                out_bits[s] |= 1 << owners[i]
    R = _bucket(len(esc))
    counter = np.zeros(R, np.int32)
    at = np.full(R, np.iinfo(np.int32).max, np.int32)
    rid = np.full(R, NO_RULE, np.int32)
    for r, e in enumerate(esc):
        counter[r], at[r], rid[r] = COUNTERS.index(e.counter), e.at, rules[r]
    ref = tokenizer.encode(refusal, parse_special=False)
    msg = np.full(_bucket(len(ref), 8), -1, np.int32)
    msg[: len(ref)] = ref
    return CompiledEscalation(counter=jnp.asarray(counter), at=jnp.asarray(at), rule_id=jnp.asarray(rid),
                              goto=jnp.asarray(host.tables["goto"]), tok_chars=jnp.asarray(host.tables["tok_chars"]),
                              out_bits=jnp.asarray(out_bits), refusal=jnp.asarray(msg),
                              refusal_len=jnp.asarray(len(ref), jnp.int32))


def _walk(policy: CompiledEscalation, state: EscalationState, token: Int[Array, " B"]):
    """Feeds each row's token through the topic automaton; returns (state, bitmask of active rules hit).

    A row's state does not move while it has no active topic: topics are fixed for a turn and the automaton restarts
    with each turn, so its state only matters in turns with a topic rule on (and the walk's loop over long tokens
    runs only as far as the longest token of a row with one)."""
    chars = policy.tok_chars[jnp.clip(token, 0, policy.tok_chars.shape[0] - 1)]
    C = policy.goto.shape[1]
    flat = policy.goto.reshape(-1)
    on = state.topics != 0

    def step(carry, c):
        s, hit = carry
        valid = c >= 0
        s = jnp.where(valid, flat[s * C + jnp.maximum(c, 0)], s)
        return s, hit | jnp.where(valid, policy.out_bits[s], 0)

    s, hit = _feed_chars(step, (state.ac, jnp.zeros_like(state.ac)), jnp.where(on[:, None], chars, -1))
    return s, hit & state.topics


def _lowest_bit(x: Int[Array, " B"]) -> Int[Array, " B"]:
    """Index of the lowest set bit, -1 when x == 0."""
    bits = (x[:, None] >> jnp.arange(31)) & 1
    return jnp.where(x != 0, jnp.argmax(bits, axis=-1), -1).astype(jnp.int32)


def _fired(policy, state, token):
    ac, hit = _walk(policy, state, token)
    return ac, jnp.where(state.msg_rule >= 0, -1, _lowest_bit(hit))


def _init(policy: CompiledEscalation, batch: int) -> EscalationState:
    del policy
    z = jnp.zeros((batch,), jnp.int32)
    return EscalationState(counters=jnp.zeros((batch, len(COUNTERS)), jnp.int32), topics=z, ac=z, msg_rule=z - 1,
                           msg_pos=z)


def _evaluate(policy: CompiledEscalation, state: EscalationState, logits: Float[Array, "B V"]) -> Decision:
    B = logits.shape[0]
    in_msg = state.msg_rule >= 0
    pos = jnp.minimum(state.msg_pos, policy.refusal.shape[0] - 1)
    return Decision(
        mask=jnp.ones(logits.shape, bool),
        verdict=jnp.where(in_msg, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
        rule=jnp.where(in_msg, policy.rule_id[jnp.maximum(state.msg_rule, 0)], NO_RULE),
        confidence=jnp.ones((B,), jnp.float32),
        forced=jnp.where(in_msg, policy.refusal[pos], NO_TOKEN),
        stop=jnp.zeros((B,), bool))


def _check(policy: CompiledEscalation, state: EscalationState, token: Int[Array, " B"]) -> Outcome:
    ac, fired = _fired(policy, state, token)
    in_msg = state.msg_rule >= 0
    r = jnp.where(in_msg, state.msg_rule, jnp.maximum(fired, 0))
    pos = jnp.where(in_msg, state.msg_pos, 0)
    acts = in_msg | (fired >= 0)
    out = jnp.where(fired >= 0, policy.refusal[0], token)
    mine = out == policy.refusal[jnp.minimum(pos, policy.refusal.shape[0] - 1)]
    return Outcome(token=out, verdict=jnp.where(acts, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
                   rule=jnp.where(acts, policy.rule_id[r], NO_RULE),
                   stop=acts & mine & (pos + 1 >= policy.refusal_len),
                   seen=Checked(token=token, found=(ac, fired)))  # advance reuses the walk


def _advance(policy: CompiledEscalation, state: EscalationState, token: Int[Array, " B"], emitted: Bool[Array, " B"],
             seen: Int[Array, " B"] | Checked | None = None) -> EscalationState:
    # The walk over the token check saw is check's (its Checked record), or walked here when given a token; the
    # emitted token is walked again only when a later gate rewrote it.
    if isinstance(seen, Checked):
        seen, (ac, fired) = seen.token, seen.found
    else:
        seen = token if seen is None else seen
        ac, fired = _fired(policy, state, seen)
    ac = lax.cond(jnp.any(seen != token), lambda: _fired(policy, state, token)[0], lambda: ac)
    in_msg = state.msg_rule >= 0
    r = jnp.where(in_msg, state.msg_rule, fired)
    pos = jnp.where(in_msg, state.msg_pos, 0)
    # the message moves on only when its token was emitted (another gate's forced token may have won the step)
    pos = pos + (token == policy.refusal[jnp.minimum(pos, policy.refusal.shape[0] - 1)])
    going = (r >= 0) & (pos < policy.refusal_len)
    new = state.replace(ac=ac, msg_rule=jnp.where(going, r, -1), msg_pos=jnp.where(going, pos, 0))
    return keep_rows(emitted, new, state)


@functools.cache
def escalation_gate(vocab_size: int) -> Gate:
    """The escalation gate (cached). Policy: `CompiledEscalation`; state: `EscalationState` (`begin_turn`)."""
    del vocab_size  # the gate never masks
    return Gate(init=_init, evaluate=_evaluate, check=_check, advance=_advance)


# --------------------------------------------------------------------------------------------------------------
# Host side.


def active_rules(policy, counters: Sequence[int]) -> list[bool]:
    """Which of the policy's escalation rules are active for a session with these counters (counter >= at)."""
    return [counters[COUNTERS.index(e.counter)] >= e.at for e in policy.escalation]


def effects(policy, counters: Sequence[int]) -> tuple[float, tuple[str, ...], int]:
    """(budget scale, forbidden tool names, topic-rule bitmask) for a session with these counters."""
    scale, forbid, topics = 1.0, [], 0
    for r, (e, on) in enumerate(zip(policy.escalation, active_rules(policy, counters), strict=True)):
        if not on:
            continue
        if e.budget_scale is not None:
            scale *= e.budget_scale
        forbid += [t for t in e.forbid_tools if t not in forbid]
        if e.refuse_topics:
            topics |= 1 << r
    return scale, tuple(forbid), topics


def record_turn(counters: Sequence[int], *, refused: bool, blocked: bool, violated: bool) -> tuple[int, int, int]:
    """The counters after one turn (see the module docstring for what each flag means)."""
    v, r, b = (int(c) for c in counters)
    return v + int(violated), r + int(refused), b + int(blocked)


def begin_turn(state: EscalationState, counters, topics) -> EscalationState:
    """The state at the start of a turn: per row its counters [B, 3] and topic bitmask [B]; the automaton resets."""
    counters = jnp.asarray(np.asarray(counters, np.int32).reshape(-1, len(COUNTERS)))
    B = counters.shape[0]
    z = jnp.zeros((B,), jnp.int32)
    del state
    return EscalationState(counters=counters, topics=jnp.asarray(np.asarray(topics, np.int32).reshape(B)), ac=z,
                           msg_rule=z - 1, msg_pos=z)
