"""The jit-compiled decode loop: prefill, then decode steps that never talk to the host.

`start` prefills a batch of ragged prompts and samples each row's first token; `decode_chunk` runs a fixed
number of steps with `lax.scan` (one compiled call per chunk, so callers can stream); `decode_until_done`
runs a `lax.while_loop` until every row has stopped. Everything the loop needs is in `DecodeState`: the KV
cache, the last tokens, the per-row sampling parameters and keys, done flags, the output buffer, the gate's
per-row state, the turn's verdict and confidence so far, and an event log for the audit.

The admissibility gate (`gate.core.Gate`, a static argument; its compiled policy is a traced argument) is
consulted at every step: `evaluate` masks the logits (or forces a token, or stops the row) before sampling,
`check` may rewrite the sampled token (substitution, refusal message) before it is written, and `advance`
moves the gate's state with the token actually emitted. Nothing inadmissible reaches the output buffer.

A row stops when it samples one of its stop ids (not written to the output), when it has produced its
`max_new` tokens, when its cache is full, or when the gate ends it. Stopped rows keep riding along in the
batch (shapes are static), but their cache lengths, outputs and gate state no longer change.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from aqjax import ops
from aqjax.cache import KVCache
from aqjax.sampling import SamplingParams, sample
from gate.core import NO_RULE, NO_TOKEN, Gate, Verdict
from models.config import LlamaConfig
from models.llama import forward, logits_from_hidden
from models.params import Params

# finish reasons (per row)
RUNNING, FINISH_STOP, FINISH_LENGTH, FINISH_GATE = 0, 1, 2, 3

# audit event kinds
EVENT_BLOCK, EVENT_FORCE, EVENT_REWRITE, EVENT_STOP, EVENT_VERDICT = 0, 1, 2, 3, 4


@struct.dataclass
class EventLog:
    """Per-row record of every step where the gate acted (capacity: one event per step of the output).

    Attributes (all [B, E] unless noted; entries at or beyond `n` are unused):
      step: index of the output token the event concerns (the row's count of emitted tokens at that step).
      kind: EVENT_BLOCK (the model's top token was masked), EVENT_FORCE (a forced token was emitted),
        EVENT_REWRITE (the sampled token was replaced), EVENT_STOP (the gate ended the row),
        EVENT_VERDICT (a verdict was raised without any of the above).
      token: the token concerned: the blocked top token, or the sampled token that was replaced.
      emitted: the token actually emitted (-1 when none).
      rule: the rule that acted (NO_RULE when the gate does not attribute it).
      verdict: the verdict raised at this step.
      entropy: entropy (nats) of the model's unmasked next-token distribution.
      mass: probability mass of the admissible tokens under that distribution.
      n: Int[B] number of events recorded.
    """

    step: Int[Array, "B E"]
    kind: Int[Array, "B E"]
    token: Int[Array, "B E"]
    emitted: Int[Array, "B E"]
    rule: Int[Array, "B E"]
    verdict: Int[Array, "B E"]
    entropy: Float[Array, "B E"]
    mass: Float[Array, "B E"]
    n: Int[Array, " B"]

    @classmethod
    def empty(cls, batch: int, capacity: int) -> EventLog:
        # a distinct buffer per field: the state is donated, and one buffer must not be donated twice
        def i():
            return jnp.full((batch, capacity), -1, jnp.int32)

        def f():
            return jnp.zeros((batch, capacity), jnp.float32)

        return cls(step=i(), kind=i(), token=i(), emitted=i(), rule=i(), verdict=i(), entropy=f(), mass=f(),
                   n=jnp.zeros((batch,), jnp.int32))


# OpenAI's floor for a token that has no probability (a token the gate forced or rewrote outside its mask)
LOGPROB_FLOOR = -9999.0


@struct.dataclass
class LogprobLog:
    """Per-row log-probabilities of the emitted tokens, written at the same column as `DecodeState.out`.

    Governed semantics: the distribution is the model's raw logits renormalised over the tokens the gate admitted
    at that step (log_softmax of the masked logits; no temperature or top-p), so a blocked token never appears
    among the alternatives, and a token the gate forced or rewrote outside its mask gets LOGPROB_FLOOR. Nor does a
    token the gate's check would rewrite or stop on, and a step whose token the gate forced has no alternatives.

    Attributes:
      token: Float[B, M] log-probability of the emitted token (0 where not written).
      top_ids: Int[B, M, K] the K most likely admissible tokens, most likely first (-1: fewer than K admissible).
      top: Float[B, M, K] their log-probabilities (LOGPROB_FLOOR where top_ids is -1).
      want: Bool[B] rows whose log-probabilities are recorded (the others cost nothing while no running row
        wants them).
    """

    token: Float[Array, "B M"]
    top_ids: Int[Array, "B M K"]
    top: Float[Array, "B M K"]
    want: Bool[Array, " B"]

    @classmethod
    def empty(cls, batch: int, out_len: int, k: int, want: Any = None) -> LogprobLog:
        return cls(token=jnp.zeros((batch, out_len), jnp.float32),
                   top_ids=jnp.full((batch, out_len, k), -1, jnp.int32),
                   top=jnp.full((batch, out_len, k), LOGPROB_FLOOR, jnp.float32),
                   want=jnp.zeros((batch,), bool) if want is None else jnp.asarray(want, bool))


def _logprobs_of(raw: Float[Array, "B V"], mask: Bool[Array, "B V"] | None, token: Int[Array, " B"], k: int):
    """(Float[B] logprob of `token`, Int[B, K] top ids, Float[B, K] top logprobs) over the admitted tokens."""
    x = raw.astype(jnp.float32)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    logp = jax.nn.log_softmax(x, axis=-1)  # a row with nothing admitted is NaN everywhere: floored below
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    chosen = jnp.where(jnp.isfinite(chosen), chosen, LOGPROB_FLOOR)
    top, ids = lax.top_k(logp, k)
    ok = jnp.isfinite(top)  # masked tokens (-inf) never appear among the alternatives
    return chosen, jnp.where(ok, ids, -1).astype(jnp.int32), jnp.where(ok, top, LOGPROB_FLOOR)


def _record_logprobs(lp: LogprobLog, running, emitted, n_out, token, raw, mask, keep=None) -> LogprobLog:
    """Writes the emitted tokens' log-probabilities for the rows that want them; computed (with the `keep`
    filter) only if some running row wants them, so a batch where nobody asked pays nothing but the cond. (Its
    operands are read-only: XLA:CPU copies a conditional's operands only when a branch updates them in place.)
    `keep` (Int[B, K] ids -> Bool[B, K]) drops alternatives the gate would not emit as themselves."""
    B, M, K = lp.top_ids.shape

    def compute(raw, mask, token):
        chosen, ids, top = _logprobs_of(raw, mask, token, K)
        if keep is not None and K > 0:
            ok = keep(jnp.maximum(ids, 0)) & (ids >= 0)
            ids, top = jnp.where(ok, ids, -1), jnp.where(ok, top, LOGPROB_FLOOR)
        return chosen, ids, top

    def skip(raw, mask, token):
        return (jnp.zeros((B,), jnp.float32), jnp.full((B, K), -1, jnp.int32),
                jnp.full((B, K), LOGPROB_FLOOR, jnp.float32))

    chosen, ids, top = lax.cond(jnp.any(lp.want & running), compute, skip, raw, mask, token)
    rows = jnp.arange(B)
    col = jnp.where(emitted & lp.want, n_out, M)  # M = out of range: dropped
    return lp.replace(token=lp.token.at[rows, col].set(chosen, mode="drop"),
                      top_ids=lp.top_ids.at[rows, col].set(ids, mode="drop"),
                      top=lp.top.at[rows, col].set(top, mode="drop"))


def _gated_logprobs(lp: LogprobLog | None, gate, policy, gate_state, has_forced, running, emitted, n_out, token,
                    raw, mask) -> LogprobLog | None:
    """`_record_logprobs` for one emitted position, with the gate's filter on the alternatives (shared by the plain
    step `_emit` and the speculative commit, so both record the same log-probabilities)."""
    if lp is None:
        return None
    keep = None
    if gate is not None:
        # An admitted token that `check` would rewrite (a substitution or refusal starting) or that would end the
        # row is no alternative either: offering it would reveal what the policy hides. Nor is anything at a step
        # whose token the gate forced (a message under way: the model may still want the hidden phrase there).
        # check is pure (table lookups); the K candidates are checked only when someone asked.
        def keep(ids):
            o = jax.vmap(lambda t: gate.check(policy, gate_state, t), in_axes=1, out_axes=1)(ids)
            return (o.token == ids) & ~o.stop & ~has_forced[:, None]

    return _record_logprobs(lp, running, emitted, n_out, token, raw, mask, keep)


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries.

    Attributes:
      cache: the KV cache (lengths count the tokens whose keys are cached).
      last: Int[B] the most recent token of each row (the next step's input).
      done: Bool[B] rows that have stopped.
      finish: Int[B] why a row stopped (RUNNING, FINISH_STOP, FINISH_LENGTH, FINISH_GATE).
      out: Int[B, M] generated tokens, -1 beyond n_out.
      n_out: Int[B] tokens written to `out` per row.
      max_new: Int[B] per-row limit on generated tokens (<= M).
      stop_ids: Int[B, NS] per-row stop tokens, padded with -1.
      sampling: per-row sampling parameters and keys.
      step: Int[] decode steps taken by the batch.
      gate_state: the gate's per-row state (a pytree with leading axis B), or None without a gate.
      verdict: Int[B] highest verdict raised in the turn so far.
      rule: Int[B] the rule behind `verdict` (NO_RULE when none).
      confidence: Float[B] the turn's confidence so far (minimum over steps).
      events: the audit event log (None without a gate).
      logprobs: the emitted tokens' log-probabilities (`LogprobLog`), or None when not asked for.
      last_h: Float[B, D] the target's final (normed) hidden state at the position that produced `last`, or None
        when not asked for (`start(keep_hidden=True)`; the feature drafter starts from it).
    """

    cache: KVCache
    last: Int[Array, " B"]
    done: Bool[Array, " B"]
    finish: Int[Array, " B"]
    out: Int[Array, "B M"]
    n_out: Int[Array, " B"]
    max_new: Int[Array, " B"]
    stop_ids: Int[Array, "B NS"]
    sampling: SamplingParams
    step: Int[Array, ""]
    verdict: Int[Array, " B"]
    rule: Int[Array, " B"]
    confidence: Float[Array, " B"]
    gate_state: Any = None
    events: EventLog | None = None
    logprobs: LogprobLog | None = None
    last_h: Float[Array, "B D"] | None = None


def _entropy_and_mass(raw: Float[Array, "B V"], mask: Bool[Array, "B V"], peak: Float[Array, " B"]):
    # the entropy as gate.evidence.entropy writes it (what the evidence budget charges); mass = sum_admissible e / s.
    # `peak` is each row's maximum logit (the logit at the argmax the loop took), which saves a pass over V.
    z = raw.astype(jnp.float32)
    z = z - peak.astype(jnp.float32)[:, None]
    e = jnp.exp(z)
    s = jnp.sum(e, axis=-1, keepdims=True)
    entropy = -jnp.sum(jnp.where(e > 0, e * (z - jnp.log(s)), 0.0), axis=-1) / s[..., 0]
    return entropy, jnp.sum(jnp.where(mask, e, 0.0), axis=-1) / s[..., 0]


def _record(events: EventLog, acted, step_idx, kind, token, emitted, rule, verdict, raw, mask, top) -> EventLog:
    """Appends one event for every row where `acted`; entropy/mass are computed only if some row acted. `top` is the
    argmax of `raw`."""
    B, E = events.step.shape
    peak = jnp.take_along_axis(raw, top[:, None], axis=-1)[:, 0]
    entropy, mass = lax.cond(
        jnp.any(acted), _entropy_and_mass, lambda r, m, p: (jnp.zeros(B), jnp.zeros(B)), raw, mask, peak)
    rows = jnp.arange(B)
    col = jnp.where(acted, events.n, E)  # E = out of range: dropped

    def put(buf, val):
        return buf.at[rows, col].set(val.astype(buf.dtype), mode="drop")

    return EventLog(
        step=put(events.step, step_idx), kind=put(events.kind, kind), token=put(events.token, token),
        emitted=put(events.emitted, emitted), rule=put(events.rule, rule), verdict=put(events.verdict, verdict),
        entropy=put(events.entropy, entropy), mass=put(events.mass, mass),
        n=jnp.minimum(events.n + acted, E),
    )


def _verdicts_and_events(state, d, raw, *, running, has_forced, top, top_admissible, pre_stop, post_stop, rewritten,
                         emitted, token, seen, verdict_now, rule_now):
    """The step's bookkeeping after the gate decided (shared by `_emit` and the speculative commit): the turn's
    verdict and rule raised to this step's, and one audit event for every running row where the gate acted
    (stopped it, rewrote or forced its token, blocked the model's top token `top` = ops.argmax(raw), or raised a
    verdict).
    `seen` is the token before `check` rewrote it. Returns (verdict, rule, events)."""
    raise_v = running & (verdict_now > state.verdict)
    verdict = jnp.where(raise_v, verdict_now, state.verdict)
    rule = jnp.where(raise_v, rule_now, state.rule)
    blocked = running & ~has_forced & ~top_admissible
    forced_now = running & has_forced & ~pre_stop
    kind = jnp.where(pre_stop, EVENT_STOP, jnp.where(
        rewritten, EVENT_REWRITE, jnp.where(forced_now, EVENT_FORCE, jnp.where(
            blocked, EVENT_BLOCK, EVENT_VERDICT))))
    acted = running & (blocked | forced_now | rewritten | pre_stop | (emitted & post_stop)
                       | (verdict_now > Verdict.ADMIT))
    ev_token = jnp.where(rewritten, seen, jnp.where(blocked, top, token))
    ev_rule = rule_now if d.block_rule is None else jnp.where(
        (rule_now == NO_RULE) & blocked, d.block_rule, rule_now)
    events = _record(state.events, acted, state.n_out, kind, ev_token, jnp.where(emitted, token, -1), ev_rule,
                     verdict_now, raw, d.mask, top)
    return verdict, rule, events


def _emit(state: DecodeState, logits: Float[Array, "B V"], gate: Gate | None, policy: Any) -> DecodeState:
    """Gates, samples and records one token per running row, and updates the stop flags."""
    B, M = state.out.shape
    running = ~state.done
    raw = logits
    gate_state = state.gate_state
    rows = jnp.arange(B)

    def gated_sample(mask, has_forced):
        masked = logits if mask is None else jnp.where(mask, logits, -jnp.inf)
        # If the gate leaves no admissible token, the row ends with a refusal instead of sampling from garbage.
        empty = ~jnp.any(jnp.isfinite(masked), axis=-1) & ~has_forced
        return sample(jnp.where(empty[:, None], 0.0, masked), state.sampling, state.n_out), empty

    if gate is not None:
        d = gate.evaluate(policy, gate_state, logits)
        # a gate may fold what it observed at this step (e.g. the entropy it charges) into its state
        gate_state = gate_state if d.state is None else d.state
        forced = d.forced
        has_forced = forced != NO_TOKEN
        # Fast path: when every running row is greedy and the model's own top token is admissible, that token is
        # the argmax of the masked logits too (the first maximal index overall is the first admissible one), so
        # the masked copy of the logits, its emptiness test and a second argmax over the vocabulary are skipped.
        top = ops.argmax(raw)
        top_admissible = d.mask[rows, top]
        top_ok = top_admissible & jnp.isfinite(raw[rows, top])
        fast = jnp.all(~running | (top_ok & (state.sampling.temperature <= 0)))
        sampled, empty = lax.cond(fast, lambda: (top, jnp.zeros((B,), bool)),
                                  lambda: gated_sample(d.mask, has_forced))
    else:
        forced = jnp.full((B,), NO_TOKEN, jnp.int32)
        has_forced = forced != NO_TOKEN
        sampled, empty = gated_sample(None, has_forced)
    token = jnp.where(has_forced, forced, sampled)

    pre_stop = empty
    verdict_now = jnp.where(empty, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32)
    rule_now = jnp.full((B,), NO_RULE, jnp.int32)
    post_stop = jnp.zeros((B,), bool)
    confidence = state.confidence
    if gate is not None:
        pre_stop = pre_stop | d.stop
        verdict_now = jnp.maximum(verdict_now, d.verdict)
        rule_now = d.rule
        o = gate.check(policy, gate_state, token)
        rewritten = running & ~pre_stop & (o.token != token)
        sampled_before_rewrite = token
        token = o.token
        take = o.verdict > verdict_now
        rule_now = jnp.where(take | (rule_now == NO_RULE), jnp.where(o.rule != NO_RULE, o.rule, rule_now), rule_now)
        verdict_now = jnp.where(pre_stop, verdict_now, jnp.maximum(verdict_now, o.verdict))
        post_stop = o.stop
        confidence = jnp.where(running, jnp.minimum(confidence, d.confidence), confidence)

    is_stop = running & ~pre_stop & jnp.any(token[:, None] == state.stop_ids, axis=-1)
    emitted = running & ~pre_stop & ~is_stop
    out = state.out.at[rows, jnp.where(emitted, state.n_out, M)].set(token, mode="drop")
    n_out = state.n_out + emitted
    # The emitted token is fed next step at position `lengths`, which must exist.
    cache_full = state.cache.lengths >= state.cache.max_len
    gate_stop = running & (pre_stop | (emitted & post_stop))
    at_limit = emitted & ~gate_stop & ((n_out >= state.max_new) | cache_full)
    finish = jnp.where(gate_stop, FINISH_GATE, state.finish)
    finish = jnp.where(is_stop, FINISH_STOP, finish)
    finish = jnp.where(at_limit, FINISH_LENGTH, finish)

    logprobs = _gated_logprobs(state.logprobs, gate, policy, gate_state, has_forced, running, emitted, state.n_out,
                               token, raw, None if gate is None else d.mask)
    events = state.events
    verdict, rule = state.verdict, state.rule
    if gate is not None:
        # a chain's check records what each of its gates saw (Outcome.seen): its advance then replays no check
        seen = sampled_before_rewrite if o.seen is None else o.seen
        gate_state = gate.advance(policy, gate_state, token, emitted, seen)
        verdict, rule, events = _verdicts_and_events(
            state, d, raw, running=running, has_forced=has_forced, top=top, top_admissible=top_admissible,
            pre_stop=pre_stop, post_stop=post_stop, rewritten=rewritten, emitted=emitted, token=token,
            seen=sampled_before_rewrite, verdict_now=verdict_now, rule_now=rule_now)
    return state.replace(
        last=jnp.where(emitted, token, state.last),
        done=state.done | gate_stop | is_stop | at_limit,
        finish=finish,
        out=out,
        n_out=n_out,
        step=state.step + 1,
        gate_state=gate_state,
        verdict=verdict,
        rule=rule,
        confidence=confidence,
        events=events,
        logprobs=logprobs,
    )


def start(
    params: Params,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    cache: KVCache,
    sampling: SamplingParams,
    max_new: Int[Array, " B"],
    stop_ids: Int[Array, "B NS"],
    out_len: int,
    gate_state: Any = None,
    policy: Any = None,
    want_logprobs: Bool[Array, " B"] | None = None,
    *,
    cfg: LlamaConfig,
    gate: Gate | None = None,
    top_logprobs: int | None = None,
    keep_hidden: bool = False,
) -> DecodeState:
    """Prefills ragged prompts (right-padded to T) and samples each row's first token.

    Rows with length 0 are inactive (already done). `cache` is donated when called through `jit_start`.
    With a gate, `gate_state` is the rows' gate state at the start of the turn (None: `gate.init`).
    `top_logprobs` (static; None: no log) allocates a `LogprobLog` with that many alternatives per token, for
    the rows in `want_logprobs` (None: every active row). `keep_hidden` (static) carries `last_h`.
    """
    B = tokens.shape[0]
    h, cache = forward(params, tokens, cache, cfg=cfg, n_new=lengths)
    last_h = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = logits_from_hidden(params, last_h, cfg=cfg)
    active = lengths > 0
    state = DecodeState(
        cache=cache,
        last=jnp.zeros((B,), jnp.int32),
        done=~active,
        finish=jnp.full((B,), RUNNING, jnp.int32),
        out=jnp.full((B, out_len), -1, jnp.int32),
        n_out=jnp.zeros((B,), jnp.int32),
        max_new=jnp.minimum(max_new, out_len).astype(jnp.int32),
        stop_ids=stop_ids.astype(jnp.int32),
        sampling=sampling,
        step=jnp.zeros((), jnp.int32),
        verdict=jnp.full((B,), Verdict.ADMIT, jnp.int32),
        rule=jnp.full((B,), NO_RULE, jnp.int32),
        confidence=jnp.ones((B,), jnp.float32),
        gate_state=(gate.init(policy, B) if gate_state is None else gate_state) if gate is not None else None,
        events=EventLog.empty(B, out_len) if gate is not None else None,
        logprobs=None if top_logprobs is None else LogprobLog.empty(
            B, out_len, top_logprobs, active if want_logprobs is None else want_logprobs & active),
        last_h=last_h.astype(jnp.float32) if keep_hidden else None,
    )
    # max_new == 0 ends a row before it samples anything.
    state = state.replace(done=state.done | (state.max_new <= 0),
                          finish=jnp.where(active & (state.max_new <= 0), FINISH_LENGTH, state.finish))
    return _emit(state, logits, gate, policy)


def decode_step(
    params: Params, state: DecodeState, policy: Any = None, *, cfg: LlamaConfig, gate: Gate | None = None
) -> DecodeState:
    """One decode step for every row: feed the last token, sample the next (stopped rows stay put)."""
    running = ~state.done
    h, cache = forward(params, state.last[:, None], state.cache, cfg=cfg, n_new=running.astype(jnp.int32))
    logits = logits_from_hidden(params, h[:, 0], cfg=cfg)
    if state.last_h is not None:
        state = state.replace(last_h=jnp.where(running[:, None], h[:, 0].astype(jnp.float32), state.last_h))
    return _emit(state.replace(cache=cache), logits, gate, policy)


def decode_chunk(
    params: Params, state: DecodeState, policy: Any = None, *, cfg: LlamaConfig, n_steps: int,
    gate: Gate | None = None,
) -> DecodeState:
    """Runs `n_steps` decode steps (a streaming chunk), fewer when every row has stopped before.

    A `lax.while_loop`, not a `lax.scan` over a `lax.cond`: XLA:CPU copies the operands of a conditional, so a
    cond around the step copied the whole KV cache twice per step (at 32 slots x 512 positions: 154 ms a step
    against 63 ms; the copies grow with the cache's capacity, not with what the rows use).
    """

    def cond(carry):
        i, s = carry
        return (i < n_steps) & ~jnp.all(s.done)

    def body(carry):
        i, s = carry
        return i + 1, decode_step(params, s, policy, cfg=cfg, gate=gate)

    return lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))[1]


def decode_until_done(
    params: Params, state: DecodeState, policy: Any = None, *, cfg: LlamaConfig, gate: Gate | None = None
) -> DecodeState:
    """Decodes until every row has stopped."""
    return lax.while_loop(
        lambda s: ~jnp.all(s.done), lambda s: decode_step(params, s, policy, cfg=cfg, gate=gate), state
    )


# Compiled entry points. The cache / state is donated so XLA reuses its buffers in place.
jit_start = jax.jit(start, static_argnames=("out_len", "cfg", "gate", "top_logprobs", "keep_hidden"),
                    donate_argnames=("cache",))
jit_decode_chunk = jax.jit(decode_chunk, static_argnames=("cfg", "n_steps", "gate"), donate_argnames=("state",))
jit_decode_until_done = jax.jit(decode_until_done, static_argnames=("cfg", "gate"), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def score(params: Params, tokens: Int[Array, "B T"], *, cfg: LlamaConfig) -> Float[Array, "B T V"]:
    """Teacher-forced logits of whole sequences (a fresh cache of length T)."""
    B, T = tokens.shape
    cache = KVCache.init(cfg, B, T, params["embed"].dtype)
    h, _ = forward(params, tokens, cache, cfg=cfg)
    return logits_from_hidden(params, h, cfg=cfg)
