"""The admissibility gate interface: pure functions over a compiled policy and a carried per-row state.

A gate is shaped like an optax transformation: a factory returns a `Gate`, a NamedTuple of pure functions,
and gates compose with `chain`. Every function takes the compiled **policy** first (immutable arrays passed
into the compiled loop as arguments, never baked in as constants, so a new policy of the same shape bucket
does not recompile), then the per-row **state** (a pytree whose leaves have a leading batch axis B):

  init(policy, batch) -> state
      the state at the start of a turn (a session's saved state may be restored instead).
  evaluate(policy, state, logits) -> Decision
      before sampling: which tokens are admissible (mask), and whether the row must emit a forced token
      (the continuation of a substitution or a refusal message) or stop now (DEFER, or a message done).
      A gate that needs what it observed here later in the step (the evidence budget's entropy charge) returns
      its state with that folded in as `Decision.state`; check and advance then receive that state.
  check(policy, state, token) -> Outcome
      after sampling, before anything is emitted: the token actually emitted (a SUBSTITUTE or REFUSE rule
      may replace it with the first token of its message), the verdict, the rule, and whether the row
      stops after this token. Pure: it does not change the state.
  advance(policy, state, token, emitted, seen) -> state
      the state after the row emitted `token`; rows with emitted False keep their state unchanged. `seen` is
      the token this gate's `check` was given (it differs from `token` when a check rewrote it), so a gate
      can tell that its own rule fired; gates that never rewrite ignore it. When that check's Outcome has a
      `seen` (a gate's `Checked` record of what check computed, or a chain's per-gate record), the loop passes
      that instead; advance takes either.

Verdicts form a lattice ADMIT < DOWNGRADE < CLARIFY < DEFER < REFUSE: composed gates take the maximum.
Masks intersect. Token ids, verdicts and rule ids are int32 arrays; nothing here branches in Python on a
traced value, so every function runs under jit, vmap and inside `lax.scan` / `lax.while_loop`.

Rule ids are global within a compiled policy (the policy compiler numbers every rule of every gate and
level), so the audit can name the rule that fired. -1 means no rule.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int


class Verdict(enum.IntEnum):
    ADMIT = 0
    DOWNGRADE = 1
    CLARIFY = 2
    DEFER = 3
    REFUSE = 4


class Action(enum.IntEnum):
    """What a rule does when it fires."""

    SUPPRESS = 0  # mask the tokens and sample from what remains
    SUBSTITUTE = 1  # emit the rule's message (e.g. a redaction marker) instead of the token, then go on
    REFUSE = 2  # emit the policy's refusal message and end the turn (verdict REFUSE)
    CLARIFY = 3  # emit the clarification message and end the turn (verdict CLARIFY)
    DEFER = 4  # stop now and mark the response for human review (verdict DEFER)
    DOWNGRADE = 5  # go on, lower the reported confidence (verdict DOWNGRADE)


# The verdict each action leaves on the turn.
ACTION_VERDICT = {
    Action.SUPPRESS: Verdict.ADMIT,
    Action.SUBSTITUTE: Verdict.ADMIT,
    Action.REFUSE: Verdict.REFUSE,
    Action.CLARIFY: Verdict.CLARIFY,
    Action.DEFER: Verdict.DEFER,
    Action.DOWNGRADE: Verdict.DOWNGRADE,
}

NO_RULE = -1
NO_TOKEN = -1


@struct.dataclass
class Decision:
    """A gate's pre-sampling decision for every row.

    Attributes:
      mask: Bool[B, V] admissible tokens.
      verdict: Int[B] verdict raised before sampling (ADMIT when none).
      rule: Int[B] rule responsible for the verdict / forced token / stop (NO_RULE when none).
      confidence: Float[B] in [0, 1]; the turn's reported confidence is the minimum over its steps.
      forced: Int[B] token the row must emit now instead of sampling (NO_TOKEN when none).
      stop: Bool[B] end the row now, before sampling (wins over a forced token).
      block_rule: Int[B] or None: the rule that made the model's own top token inadmissible, for the audit
        (NO_RULE when the top token is admissible or the gate does not attribute its masks; None = never).
      state: None, or the gate's state with what `evaluate` observed at this step folded in (e.g. the entropy
        an evidence budget charges); the loop then gives it to `check` and `advance` instead of the state it
        gave `evaluate`. `evaluate` runs for every row, so `advance` must keep rows that emit nothing as they were.
    """

    mask: Bool[Array, "B V"]
    verdict: Int[Array, "B"]
    rule: Int[Array, "B"]
    confidence: Float[Array, "B"]
    forced: Int[Array, "B"]
    stop: Bool[Array, "B"]
    block_rule: Int[Array, "B"] | None = None
    state: Any = None

    @classmethod
    def admit_all(cls, batch: int, vocab: int) -> "Decision":
        return cls(
            mask=jnp.ones((batch, vocab), bool),
            verdict=jnp.full((batch,), Verdict.ADMIT, jnp.int32),
            rule=jnp.full((batch,), NO_RULE, jnp.int32),
            confidence=jnp.ones((batch,), jnp.float32),
            forced=jnp.full((batch,), NO_TOKEN, jnp.int32),
            stop=jnp.zeros((batch,), bool),
        )


@struct.dataclass
class Outcome:
    """A gate's post-sampling check of the chosen token.

    Attributes:
      token: Int[B] the token to emit (the sampled one, or the first token of a substitution / refusal).
      verdict: Int[B] verdict raised by this token (ADMIT when none).
      rule: Int[B] rule that fired (NO_RULE when none).
      stop: Bool[B] end the row after emitting `token`.
      seen: None, or what `advance` should be given as `seen` instead of the token `check` was given: a gate's
        `Checked` record (that token and what check computed from it, e.g. a walk over its characters, so that
        advance need not compute it again), or a chain's tuple of such per-gate values (so that its advance need
        not replay the checks). XLA does not merge a loop in advance with the same loop in check, so without the
        record a walk would run twice, and a chain's replay would run every rewriting gate's check again.
    """

    token: Int[Array, "B"]
    verdict: Int[Array, "B"]
    rule: Int[Array, "B"]
    stop: Bool[Array, "B"]
    seen: Any = None

    @classmethod
    def unchanged(cls, token: Int[Array, "B"]) -> "Outcome":
        B = token.shape[0]
        return cls(token=token, verdict=jnp.full((B,), Verdict.ADMIT, jnp.int32),
                   rule=jnp.full((B,), NO_RULE, jnp.int32), stop=jnp.zeros((B,), bool))


@struct.dataclass
class Checked:
    """A gate's record of its `check` (`Outcome.seen`), which the loop hands to `advance` as `seen`.

    Attributes:
      token: Int[B] the token check was given.
      found: what check computed from it that advance needs too (a gate-defined pytree, leading axis B).
    """

    token: Int[Array, "B"]
    found: Any


class Gate(NamedTuple):
    """A gate: four pure functions (see the module docstring). Hashable, so it is a static jit argument."""

    init: Callable[[Any, int], Any]
    evaluate: Callable[[Any, Any, Float[Array, "B V"]], Decision]
    check: Callable[[Any, Any, Int[Array, "B"]], Outcome]
    advance: Callable[[Any, Any, Int[Array, "B"], Bool[Array, "B"], Int[Array, "B"]], Any]


def _pick_rule(verdict_a, rule_a, verdict_b, rule_b):
    # The rule of the higher verdict wins; on a tie the earlier (outer, higher-level) gate keeps its rule.
    take_b = (verdict_b > verdict_a) | ((rule_a == NO_RULE) & (rule_b != NO_RULE) & (verdict_b == verdict_a))
    return jnp.maximum(verdict_a, verdict_b), jnp.where(take_b, rule_b, rule_a)


def merge_decisions(a: Decision, b: Decision) -> Decision:
    """Composes two decisions: masks intersect, the higher verdict wins, the first forced token wins."""
    verdict, rule = _pick_rule(a.verdict, a.rule, b.verdict, b.rule)
    a_forces = a.forced != NO_TOKEN
    rule = jnp.where(a_forces & (a.verdict >= b.verdict), a.rule, rule)
    if a.block_rule is None or b.block_rule is None:
        block_rule = b.block_rule if a.block_rule is None else a.block_rule
    else:
        block_rule = jnp.where(a.block_rule != NO_RULE, a.block_rule, b.block_rule)
    return Decision(
        mask=a.mask & b.mask,
        verdict=verdict,
        rule=rule,
        confidence=jnp.minimum(a.confidence, b.confidence),
        forced=jnp.where(a_forces, a.forced, b.forced),
        stop=a.stop | b.stop,
        block_rule=block_rule,
    )


def chain(*gates: Gate) -> Gate:
    """Composes gates in order (outermost level first). Policy and state are tuples, one entry per gate.

    evaluate: masks intersect, verdicts take the maximum, the first gate that forces a token wins.
    check: each gate sees the token as rewritten by the gates before it; verdicts take the maximum; any stop
    ends the row; `Outcome.seen` records what each gate saw. advance: every gate advances with the token finally
    emitted, and learns what its check saw (from that record, or by replaying the checks when given a token).
    """
    gates = tuple(gates)

    def init(policy, batch):
        return tuple(g.init(p, batch) for g, p in zip(gates, policy))

    def evaluate(policy, state, logits):
        decision, observed = None, []
        for g, p, s in zip(gates, policy, state):
            d = g.evaluate(p, s, logits)
            observed.append(d.state)
            decision = d if decision is None else merge_decisions(decision, d)
        # the chain's state as the gates observed it (None when no gate folded anything in)
        folded = None if all(o is None for o in observed) else tuple(
            s if o is None else o for s, o in zip(state, observed))
        return decision.replace(state=folded)

    def check(policy, state, token):
        out, seen = Outcome.unchanged(token), []
        for g, p, s in zip(gates, policy, state):
            o = g.check(p, s, out.token)
            seen.append(out.token if o.seen is None else o.seen)
            verdict, rule = _pick_rule(out.verdict, out.rule, o.verdict, o.rule)
            out = Outcome(token=o.token, verdict=verdict, rule=rule, stop=out.stop | o.stop)
        return out.replace(seen=tuple(seen))

    def advance(policy, state, token, emitted, seen=None):
        if type(seen) is tuple:  # the chain's check recorded what each gate's check saw (Outcome.seen)
            return tuple(g.advance(p, s, token, emitted, x) for g, p, s, x in zip(gates, policy, state, seen))
        seen = token if seen is None else seen
        # Replay the checks (pure) to know which token each gate's check saw.
        out = []
        for g, p, s in zip(gates, policy, state):
            out.append(g.advance(p, s, token, emitted, seen))
            seen = g.check(p, s, seen).token
        return tuple(out)

    return Gate(init, evaluate, check, advance)


def keep_rows(emitted: Bool[Array, "B"], new: Any, old: Any) -> Any:
    """Per-row select between two state pytrees (leading axis B): new where emitted, else old."""

    def sel(n, o):
        m = emitted.reshape(emitted.shape + (1,) * (n.ndim - 1))
        return jnp.where(m, n, o)

    return jax.tree.map(sel, new, old)


def unpack_bits(words: Int[Array, "... W"], vocab: int) -> Bool[Array, "... V"]:
    """Unpacks uint32 bitmask words (bit j of word w is token 32 * w + j) into a boolean mask of length V."""
    bits = (words[..., :, None] >> jnp.arange(32, dtype=words.dtype)) & 1
    return bits.reshape(words.shape[:-1] + (words.shape[-1] * 32,))[..., :vocab].astype(bool)


def pack_bits(mask) -> "np.ndarray":  # noqa: F821
    """Packs a boolean mask [..., V] into uint32 words [..., ceil(V / 32)] (host side, numpy)."""
    import numpy as np

    mask = np.asarray(mask, bool)
    V = mask.shape[-1]
    W = -(-V // 32)
    padded = np.zeros(mask.shape[:-1] + (W * 32,), bool)
    padded[..., :V] = mask
    # little bit order within bytes + little-endian words = bit j of word w is element 32 * w + j
    return np.packbits(padded, axis=-1, bitorder="little").view("<u4").astype(np.uint32)
