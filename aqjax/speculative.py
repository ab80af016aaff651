"""Speculative decoding inside the compiled loop: gated, lossless, batched, with no host round trip.

One speculative step, for every row at once (`spec_step`):

  1. The drafter proposes k tokens (`aqjax.drafters`). Model drafters draw them from the gated draft
     distribution q' = normalize(q * mask_j): the gate is evaluated along the draft prefix (its state advanced
     by each draft token), and the row's sampling filters (temperature, top-k, top-p, min-p) apply to q too.
  2. ONE target `forward` scores [last, d_0, ..., d_{k-1}] (written at each row's cache length), giving the
     target logits p_j before every position. Its width is the narrowest of `verify_widths(k)` (1, 3, 5, 9,
     k + 1) that holds the longest draft of any running row, picked by a `lax.switch`: a step that drafted
     little does not pay for a full window, and one without drafts is a plain decode step.
  3. A copy of the gate state walks along the draft prefix in a `lax.scan`, evaluated at every position j with
     the target's logits there, so each position has its own mask and p'_j = normalize(filter(p_j) * mask_j)
     is exactly the distribution non-speculative gated sampling draws position j from. Draft j is accepted
     with probability min(1, p'_j(d_j) / q'_j(d_j)) (greedy rows: when it is p'_j's argmax). The accepted
     length a is the sum of the cumulative product of the acceptances over the fixed k. At position a the
     token is drawn from normalize(max(0, p'_a - q'_a)), or from p'_k when all k drafts were accepted (the
     bonus token); this makes every emitted token distributed as p'.
  4. The tokens of positions 0..a are committed one position at a time by a `lax.scan` that applies exactly
     the bookkeeping of the non-speculative `_emit` (forced tokens, check rewrites, stop ids, limits, verdicts,
     confidence, the audit event log, gate advance). Anything other than plain masking at a position (a forced
     token, a stop, a rewrite by `check`, a raised verdict) ends the window there: the later target logits
     and gate states assumed the draft token.
  5. Rollback: the cache's `lengths` become old + consumed positions (stale keys are never read), the gate
     state is the one the commit scan advanced along the emitted tokens, and the drafter is told how many of
     this step's tokens were kept (`Drafter.commit`).

Greedy rows therefore emit exactly the tokens of non-speculative greedy decoding (whatever the drafter), up
to floating-point differences between scoring k + 1 positions in one forward and one at a time (never seen
in the tests; an exact near-tie could flip).

Randomness: row b's draws in a step derive from fold_in(key_b, n_out_b), split into streams for the draft
draws, the acceptance uniforms and the residual draw, so a row's output depends only on its own seed.

Adaptive draft length (model drafters): each row keeps an average of its recent accepted lengths and drafts
round(avg) + 1 tokens (at most k); positions beyond are not proposed (the bonus/residual rule still holds),
and a draft forward that no running row needs is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from aqjax import decode as _decode
from aqjax import ops
from aqjax.decode import (
    FINISH_GATE,
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeState,
    _gated_logprobs,
    _verdicts_and_events,
)
from aqjax.drafters import (
    DRAFT_MIN_CONFIDENCE,
    Drafter,
    DraftModel,
    FeatureDraft,
    feature_drafter,
    hybrid_drafter,
    load_draft,
    load_feature_draft,
    lookup_drafter,
    model_drafter,
    self_draft,
)
from aqjax.engine import GenerationResult, Generator, RequestError, bucket
from aqjax.sampling import SamplingConfig, SamplingParams, filter_logits
from gate.core import NO_RULE, NO_TOKEN, Gate, Verdict, keep_rows
from models.config import LlamaConfig
from models.llama import forward, logits_from_hidden, write_kv
from models.params import Params, per_layer, stack_layers, unstack_layers

SPECULATIVE_KINDS = ("none", "lookup", "self", "draft", "feature", "hybrid")
MAX_DRAFT_K = 15

# key streams within a row's step key
_STREAM_DRAFT, _STREAM_ACCEPT, _STREAM_RESIDUAL = 0, 64, 128


@struct.dataclass
class SpecState:
    """What the speculative loop carries.

    Attributes:
      dec: the decode state (cache, output buffer, gate state, verdicts, events), as the plain loop's.
      draft: the drafter's per-row state.
      k_row: Int[B] per-row draft length (adaptive; k when not adaptive).
      accept_avg: Float[B] running average of accepted draft tokens per step.
      n_steps: Int[B] verification steps the row took part in.
      n_drafted: Int[B] draft tokens proposed to it.
      n_accepted: Int[B] draft tokens that entered its output.
    """

    dec: DecodeState
    draft: Any
    k_row: Int[Array, " B"]
    accept_avg: Float[Array, " B"]
    n_steps: Int[Array, " B"]
    n_drafted: Int[Array, " B"]
    n_accepted: Int[Array, " B"]


def _step_keys(sp: SamplingParams, n_out: Int[Array, " B"]) -> jax.Array:
    return jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), i))(
        sp.key, n_out)


def _fold(keys: jax.Array, i) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


def _make_choose(gate: Gate | None, policy, sp: SamplingParams, keys: jax.Array, vocab: int, sampled: bool):
    """The gated draft draw handed to model drafters (see `aqjax.drafters`): carry = the gate state."""
    sampled_any = jnp.any(sp.temperature > 0)

    def choose(gs, j, logits, ids):
        B = logits.shape[0]
        ok = jnp.ones((B,), bool)
        if gate is not None:
            # Draft-side decisions only shape q' (any q' keeps the output exact: the target-side walk re-evaluates
            # with the target's logits). The draft's logits may not span the vocabulary, so the gate sees zeros.
            d = gate.evaluate(policy, gs, jnp.zeros((B, vocab), jnp.float32))
            mask = d.mask if ids is None else d.mask[:, ids]
            logits = jnp.where(mask, logits, -jnp.inf)
            ok = (d.forced == NO_TOKEN) & ~d.stop
        finite = jnp.any(jnp.isfinite(logits), axis=-1)
        greedy = ops.argmax(logits)

        def draw(lg):
            f = filter_logits(lg, sp)
            col = jax.vmap(ops.categorical)(_fold(keys, _STREAM_DRAFT + j), f)
            logp = jnp.where(finite[:, None], jax.nn.log_softmax(f, axis=-1), -jnp.inf)
            return jnp.where(sp.temperature > 0, col, greedy), logp

        # q' is only needed for sampled rows: skip the filters (a sort of the support) for all-greedy batches.
        def no_draw(lg):
            return greedy, jnp.zeros(lg.shape, jnp.float32)

        col, q_logp = lax.cond(sampled_any, draw, no_draw, logits) if sampled else no_draw(logits)
        tok = col if ids is None else ids[col]
        if gate is not None:
            gs = gate.advance(policy, _observed(gs, d), tok, jnp.ones((B,), bool), tok)
        return gs, tok, col, q_logp, ok & finite

    return choose


@struct.dataclass
class _Committed:
    emitted: Bool[Array, " B"]
    token: Int[Array, " B"]
    plain: Bool[Array, " B"]


def _observed(gate_state, d):
    """The gate state as `evaluate` observed it (`Decision.state`, when the gate folds observations in)."""
    folded = getattr(d, "state", None)
    return gate_state if folded is None else folded


def _commit_token(state: DecodeState, raw, d, token, running, lengths_now, gate: Gate | None, policy):
    """Commits one position's token for the `running` rows with the bookkeeping of `aqjax.decode._emit`.

    `_emit` samples its own token; here the token was chosen by the speculative rule (distributed as the gated
    target distribution p'), so this is `_emit` from the sampling on, with `running` given and the cache length
    after feeding this position given as `lengths_now`. (Proposed upstream: split `_emit` into decide /
    sample / commit so both loops share this code.)
    """
    B, M = state.out.shape
    if gate is not None:
        logits = jnp.where(d.mask, raw, -jnp.inf)
        forced = d.forced
    else:
        logits = raw
        forced = jnp.full((B,), NO_TOKEN, jnp.int32)
    has_forced = forced != NO_TOKEN
    empty = ~jnp.any(jnp.isfinite(logits), axis=-1) & ~has_forced
    token = jnp.where(has_forced, forced, token)

    pre_stop = empty
    verdict_now = jnp.where(empty, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32)
    rule_now = jnp.full((B,), NO_RULE, jnp.int32)
    post_stop = jnp.zeros((B,), bool)
    rewritten = jnp.zeros((B,), bool)
    confidence = state.confidence
    seen = token
    gate_state = state.gate_state
    if gate is not None:
        gate_state = _observed(gate_state, d)
        pre_stop = pre_stop | d.stop
        verdict_now = jnp.maximum(verdict_now, d.verdict)
        rule_now = d.rule
        o = gate.check(policy, gate_state, token)
        rewritten = running & ~pre_stop & (o.token != token)
        token = o.token
        take = o.verdict > verdict_now
        rule_now = jnp.where(take | (rule_now == NO_RULE), jnp.where(o.rule != NO_RULE, o.rule, rule_now), rule_now)
        verdict_now = jnp.where(pre_stop, verdict_now, jnp.maximum(verdict_now, o.verdict))
        post_stop = o.stop
        confidence = jnp.where(running, jnp.minimum(confidence, d.confidence), confidence)

    is_stop = running & ~pre_stop & jnp.any(token[:, None] == state.stop_ids, axis=-1)
    emitted = running & ~pre_stop & ~is_stop
    rows = jnp.arange(B)
    out = state.out.at[rows, jnp.where(emitted, state.n_out, M)].set(token, mode="drop")
    n_out = state.n_out + emitted
    cache_full = lengths_now >= state.cache.max_len
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
        # rows outside the window keep their state exactly (this position does not exist for them)
        gate_state = keep_rows(running, gate.advance(policy, gate_state, token, emitted, seen), state.gate_state)
        top = ops.argmax(raw)
        verdict, rule, events = _verdicts_and_events(
            state, d, raw, running=running, has_forced=has_forced, top=top, top_admissible=d.mask[rows, top],
            pre_stop=pre_stop, post_stop=post_stop, rewritten=rewritten, emitted=emitted, token=token, seen=seen,
            verdict_now=verdict_now, rule_now=rule_now)
    done = state.done | gate_stop | is_stop | at_limit
    new = state.replace(last=jnp.where(emitted, token, state.last), done=done, finish=finish, out=out, n_out=n_out,
                        gate_state=gate_state, verdict=verdict, rule=rule, confidence=confidence, events=events,
                        logprobs=logprobs)
    plain = ~has_forced & ~pre_stop & ~rewritten & ~post_stop & (verdict_now == Verdict.ADMIT)
    return new, _Committed(emitted=emitted, token=token, plain=plain)


def _tile_rows(tree, n: int):
    # [B, ...] -> [n * B, ...], position-major (row j * B + b is row b at position j)
    return jax.tree.map(lambda x: jnp.tile(x, (n,) + (1,) * (x.ndim - 1)), tree)


def _acceptance_logits(raw, masked):
    """The logits p' derives from in the acceptance ratio and the residual: the gated ones. (A seam: the tests swap
    in the ungated `raw` to show that their statistical test rejects that wrong rule.)"""
    del raw
    return masked


def _verify(masked, drafts, valid, prop, sp: SamplingParams, keys, *, k: int, deterministic: bool):
    """Acceptance per draft position and the token at the first rejected (or bonus) position.

    Args:
      masked: Float[k+1, B, V] gated target logits (-inf outside the mask).
      drafts, valid: Int/Bool[k, B].

    Returns:
      (acc Bool[k, B], fallback Int[B]) for the sampled rows (greedy rows are handled by the caller).
    """
    K1, B, V = masked.shape
    f = filter_logits(masked.reshape(K1 * B, V), _tile_rows(sp, K1)).reshape(K1, B, V)
    logp = jax.nn.log_softmax(f, axis=-1)
    p_d = jnp.exp(jnp.take_along_axis(logp[:k], drafts[..., None], axis=-1)[..., 0])
    if deterministic:
        q_d = jnp.ones_like(p_d)
    else:
        q_logp = prop.q_logp.transpose(1, 0, 2)  # [k, B, Vq]
        q_d = jnp.exp(jnp.take_along_axis(q_logp, prop.q_col.T[..., None], axis=-1)[..., 0])
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold(keys, _STREAM_ACCEPT)).T  # [k, B]
    # accept with probability min(1, p'/q')
    acc = valid & (u * q_d < p_d)
    a = jnp.sum(jnp.cumprod(acc, axis=0), axis=0)
    rows = jnp.arange(B)
    logp_a = logp[a, rows]  # [B, V]
    valid_a = jnp.concatenate([valid, jnp.zeros((1, B), bool)])[a, rows]
    d_a = jnp.concatenate([drafts, jnp.zeros((1, B), drafts.dtype)])[a, rows]
    if deterministic:
        q_a = jax.nn.one_hot(d_a, V, dtype=jnp.float32)
    else:
        qa_cols = jnp.exp(q_logp[jnp.minimum(a, k - 1), rows])  # [B, Vq]
        ids = prop.q_ids
        q_a = qa_cols if ids is None else jnp.zeros((B, V), jnp.float32).at[:, ids].set(qa_cols)
    # rejection (or no draft here): draw from normalize(max(0, p' - q')); all k accepted: the bonus from p'_k
    resid = jnp.maximum(jnp.exp(logp_a) - jnp.where(valid_a[:, None], q_a, 0.0), 0.0)
    has_mass = jnp.sum(resid, axis=-1) > 0
    lg = jnp.where(has_mass[:, None], jnp.log(resid), logp_a)
    fallback = jax.vmap(ops.categorical)(_fold(keys, _STREAM_RESIDUAL), lg)
    return acc, fallback


def spec_step(
    params: Params, dparams: Any, st: SpecState, policy: Any = None, *, cfg: LlamaConfig, drafter: Drafter,
    gate: Gate | None, k: int, adaptive: bool, sampled: bool = True,
) -> SpecState:
    """One speculative step for every row (see the module docstring); stopped rows stay put.

    `sampled` False promises that every row is greedy: the sampling paths are then not even compiled.
    """
    dec = st.dec
    B = dec.out.shape[0]
    V = cfg.vocab_size
    running = ~dec.done
    tl = dec.cache.lengths
    sp = dec.sampling
    keys = _step_keys(sp, dec.n_out)
    # no drafts past the row's token budget (a step emits at most n_draft + 1 tokens)
    n_draft = jnp.where(running, jnp.clip(jnp.minimum(st.k_row, dec.max_new - dec.n_out - 1), 0, k), 0)

    # 1. draft
    choose = _make_choose(gate, policy, sp, keys, V, sampled)
    prop, _, dstate = drafter.propose(dparams, st.draft, dec.last, choose, dec.gate_state, n_draft, k=k)
    # only a row's leading valid drafts can be accepted: the rest are not proposed
    lead = jnp.cumprod(prop.valid & (jnp.arange(k)[None, :] < n_draft[:, None]), axis=1).astype(bool)  # [B, k]
    valid = lead.T  # [k, B]
    drafts = prop.tokens.T  # [k, B]

    # 2. verify: one forward over `last` and the drafts, as wide as the smallest verification width that holds
    # the longest draft of any running row (a step without drafts is a plain decode step)
    inp = jnp.concatenate([dec.last[:, None], prop.tokens], axis=1)
    widths = verify_widths(k)
    need = 1 + jnp.max(jnp.where(running, jnp.sum(lead, axis=1), 0))
    which = jnp.sum(jnp.asarray(widths[:-1]) < need)  # the smallest width >= need

    def verify_forward(T):
        def run(cache):
            # the cache is only read in a branch (written there, XLA:CPU copied all of it): the new keys and
            # values come out, padded like the hidden states and logits to k + 1 positions (never accepted or
            # committed past T), and are written after the switch
            h, kv = forward(params, inp[:, :T], cache, cfg=cfg, write_cache=False)
            raw = logits_from_hidden(params, h, cfg=cfg)
            pad = ((0, 0), (0, k + 1 - T), (0, 0))
            kv = tuple(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, k + 1 - T), (0, 0))) for x in kv)
            return jnp.pad(h, pad), jnp.pad(raw, pad), kv
        return run

    h, raw, (k_new, v_new) = lax.switch(which, [verify_forward(T) for T in widths], dec.cache)
    cache = write_kv(dec.cache, k_new, v_new, running.astype(jnp.int32) * (k + 1))
    raw = raw.transpose(1, 0, 2)  # [k+1, B, V]
    # From here on only the new cache exists: were the old one still carried (in the commit scan), XLA could not
    # update the cache in place and would copy all of it every step.
    dec = dec.replace(cache=cache)

    # 3. the gate at every position: a copy of its state walks along the draft prefix, evaluated with the
    # target's logits at each position (a gate may fold what it observes there into its state, as in `_emit`)
    drafts_pad = jnp.concatenate([drafts, jnp.zeros((1, B), drafts.dtype)])
    decisions = None
    masked = raw
    forced_any = jnp.zeros((k + 1, B), bool)
    if gate is not None:
        ones = jnp.ones((B,), bool)

        def walk(g, xs):
            raw_j, tok_j = xs
            d = gate.evaluate(policy, g, raw_j)
            g = _observed(g, d)
            return gate.advance(policy, g, tok_j, ones, tok_j), d

        _, decisions = lax.scan(walk, dec.gate_state, (raw, drafts_pad))
        masked = jnp.where(decisions.mask, raw, -jnp.inf)
        forced_any = decisions.forced != NO_TOKEN
    empty = ~jnp.any(jnp.isfinite(masked), axis=-1) & ~forced_any
    masked = jnp.where(empty[..., None], 0.0, masked)
    greedy = ops.argmax(masked)  # [k+1, B]: what non-speculative greedy decoding emits at each position

    sampled_row = sp.temperature > 0
    def no_sampled_rows():
        return jnp.zeros((k, B), bool), jnp.zeros((B,), jnp.int32)

    acc_s, fallback_s = lax.cond(
        jnp.any(sampled_row & running),
        lambda: _verify(_acceptance_logits(raw, masked), drafts, valid, prop, sp, keys, k=k,
                        deterministic=drafter.deterministic),
        no_sampled_rows,
    ) if sampled else no_sampled_rows()
    acc = jnp.where(sampled_row[None], acc_s, valid & (drafts == greedy[:k]))
    a = jnp.sum(jnp.cumprod(acc, axis=0), axis=0)  # accepted length per row
    fallback = jnp.where(sampled_row, fallback_s, greedy[a, jnp.arange(B)])
    pos = jnp.arange(k + 1)[:, None]
    cand = jnp.where(pos < a[None], drafts_pad, fallback[None])  # [k+1, B]

    # 4. commit positions 0..a one at a time; anything but plain masking ends the window
    def body(carry, xs):
        s, live, n_used = carry
        j, raw_j, d_j, tok_j = xs
        active = live & ~s.done
        s, c = _commit_token(s, raw_j, d_j, tok_j, active, tl + j + 1, gate, policy)
        cont = active & c.emitted & ~s.done & c.plain & (j < a)
        return (s, cont, n_used + active.astype(jnp.int32)), jnp.where(c.emitted, c.token, -1)

    (new_dec, _, n_used), emitted = lax.scan(
        body, (dec, running, jnp.zeros((B,), jnp.int32)), (jnp.arange(k + 1), raw, decisions, cand))

    # 5. roll back what was not kept: cache lengths, drafter state (the gate state followed the emitted tokens)
    new_dec = new_dec.replace(cache=new_dec.cache.replace(lengths=tl + n_used), step=dec.step + 1)
    dstate = drafter.commit(dparams, dstate, emitted.T, n_used, h)
    if new_dec.last_h is not None:  # the new `last` came from verified position n_used - 1
        h_last = jnp.take_along_axis(h, jnp.maximum(n_used - 1, 0)[:, None, None], axis=1)[:, 0]
        new_dec = new_dec.replace(last_h=jnp.where((n_used > 0)[:, None], h_last.astype(jnp.float32),
                                                   new_dec.last_h))

    accepted = jnp.maximum(n_used - 1, 0)
    k_row, avg = st.k_row, st.accept_avg
    if adaptive:
        avg = jnp.where(running, 0.5 * avg + 0.5 * accepted, avg)
        k_row = jnp.clip(jnp.round(avg).astype(jnp.int32) + 1, 1, k)
    return SpecState(
        dec=new_dec, draft=dstate, k_row=k_row, accept_avg=avg,
        n_steps=st.n_steps + running,
        n_drafted=st.n_drafted + jnp.where(running, jnp.sum(valid, axis=0), 0),
        n_accepted=st.n_accepted + jnp.where(running, accepted, 0),
    )


def verify_widths(k: int) -> tuple[int, ...]:
    """The verification widths (positions per row in the target forward) a step with k drafts picks from: 1, 3,
    5, 9 below k + 1, and k + 1; each is one compiled forward in the step (a `lax.switch`). On a 2-core CPU a
    forward over T positions costs, against T = 1, 1.18 (T = 2), 1.27 (3), 1.39 (5), 1.63 (9) for the default
    model, so verifying only what was drafted keeps a step that drafted little from paying for a full window: a
    lookup step without a match is a plain decode step."""
    return tuple(sorted({w for w in (1, 3, 5, 9) if w < k + 1} | {k + 1}))


def spec_init(dparams: Any, prompt: Int[Array, "B T"], lengths: Int[Array, " B"], dec: DecodeState, *,
              drafter: Drafter, k: int) -> SpecState:
    """Wraps a prefilled DecodeState (from `aqjax.decode.start`) and starts the drafter. `dec` is donated."""
    return spec_state(dec, drafter.init(dparams, prompt, lengths, dec.last, dec.cache, dec.last_h), k)


def spec_state(dec: DecodeState, draft: Any, k: int) -> SpecState:
    """A SpecState around a decode state and the drafter's state for its rows: draft length k, counters at zero."""
    B = dec.done.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    return SpecState(dec=dec, draft=draft, k_row=jnp.full((B,), k, jnp.int32),
                     accept_avg=jnp.full((B,), float(k), jnp.float32), n_steps=zeros, n_drafted=zeros,
                     n_accepted=zeros)


def spec_until_done(params, dparams, st: SpecState, policy=None, *, cfg, drafter, gate, k, adaptive,
                    sampled=True) -> SpecState:
    """Speculative steps until every row has stopped."""
    step = functools.partial(spec_step, cfg=cfg, drafter=drafter, gate=gate, k=k, adaptive=adaptive, sampled=sampled)
    return lax.while_loop(lambda s: ~jnp.all(s.dec.done), lambda s: step(params, dparams, s, policy), st)


def spec_chunk(params, dparams, st: SpecState, policy=None, *, cfg, drafter, gate, k, adaptive, n_steps,
               sampled=True) -> SpecState:
    """`n_steps` speculative steps (a streaming chunk), fewer when every row has stopped before (a while loop:
    a cond around the step would copy the KV cache, see `aqjax.decode.decode_chunk`)."""
    step = functools.partial(spec_step, cfg=cfg, drafter=drafter, gate=gate, k=k, adaptive=adaptive, sampled=sampled)

    def cond(carry):
        i, s = carry
        return (i < n_steps) & ~jnp.all(s.dec.done)

    def body(carry):
        i, s = carry
        return i + 1, step(params, dparams, s, policy)

    return lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), st))[1]


_STATIC = ("cfg", "drafter", "gate", "k", "adaptive", "sampled")
jit_spec_init = jax.jit(spec_init, static_argnames=("drafter", "k"), donate_argnames=("dec",))
jit_spec_until_done = jax.jit(spec_until_done, static_argnames=_STATIC, donate_argnames=("st",))
jit_spec_chunk = jax.jit(spec_chunk, static_argnames=_STATIC + ("n_steps",), donate_argnames=("st",))


# ------------------------------------------------------------------------------------------------ host side


@dataclasses.dataclass(frozen=True)
class SpecStats:
    """Per-row speculation statistics of one generate call.

    Attributes:
      tokens: tokens generated (including the prefill's first token).
      steps: verification steps (target forwards after the prefill).
      drafted / accepted: draft tokens proposed / accepted.
    """

    tokens: tuple[int, ...]
    steps: tuple[int, ...]
    drafted: tuple[int, ...]
    accepted: tuple[int, ...]

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per target forward after the prefill (1.0 = no gain): the mean accepted length."""
        steps = sum(self.steps)
        return (sum(self.tokens) - sum(1 for t in self.tokens if t > 0)) / steps if steps else float("nan")

    @property
    def acceptance(self) -> float:
        """Fraction of proposed draft tokens accepted."""
        d = sum(self.drafted)
        return sum(self.accepted) / d if d else float("nan")


def _stats(st: SpecState, n: int) -> SpecStats:
    n_out, steps, drafted, accepted = jax.device_get((st.dec.n_out, st.n_steps, st.n_drafted, st.n_accepted))
    return SpecStats(tokens=tuple(int(x) for x in n_out[:n]), steps=tuple(int(x) for x in steps[:n]),
                     drafted=tuple(int(x) for x in drafted[:n]), accepted=tuple(int(x) for x in accepted[:n]))


class SpeculativeGenerator:
    """`Generator`'s API (generate / stream / results) with speculative decoding.

    Args:
      gen: the target's Generator (its packed params, stop ids and buckets are reused).
      speculative: default drafter: "lookup", "self", "draft", "feature" or "hybrid" (lookup, then the feature
        head) ("none" is allowed: plain decoding).
      draft_k: default number of draft tokens per step (1..15).
      draft: for "draft": a DraftModel, or a path to one saved by scripts/train_draft.py (default: the
        standard location, `aqjax.drafters.default_draft_dir`).
      feature: for "feature" and "hybrid": a FeatureDraft, or a path to one saved by scripts/train_feature_drafter.py
        (default: `aqjax.drafters.default_feature_dir`).
      self_layers: layers of the early-exit drafter ("self").
      head_vocab: token ids [0, head_vocab) the "self" drafter's head predicts (None: all).
      max_ngram / min_ngram: longest / shortest suffix n-gram the "lookup" (and "hybrid") drafter matches.
      min_confidence: the "feature" and "hybrid" drafters end a row's draft where the product of the head's top
        probabilities along it falls below this (0: never; `aqjax.drafters.DRAFT_MIN_CONFIDENCE`).
      adaptive: per-row adaptive draft length (default: on for the model and feature drafters, whose draft
        positions cost a forward each; off for lookup, whose drafts cost nothing, and for hybrid, where a short
        length would cut lookup's long copies).

    The results and the final state (a DecodeState) are those of `Generator.generate`, so the governed-turn
    helpers of `gate.turn` accept a SpeculativeGenerator in place of a Generator.
    """

    def __init__(self, gen: Generator, speculative: str = "lookup", *, draft_k: int = 4,
                 draft: DraftModel | str | None = None, feature: FeatureDraft | str | None = None,
                 self_layers: int = 8, head_vocab: int | None = 8192, max_ngram: int = 3, min_ngram: int = 2,
                 adaptive: bool | None = None, min_confidence: float = DRAFT_MIN_CONFIDENCE):
        _check_kind(speculative)
        self.gen = gen
        self.cfg, self.params, self.stop_ids = gen.cfg, gen.params, gen.stop_ids
        self.chunk_size = gen.chunk_size
        self.speculative = speculative
        self.draft_k = _check_k(draft_k)
        self.self_layers = int(self_layers)
        self.head_vocab = head_vocab
        self.max_ngram = int(max_ngram)
        self.min_ngram = int(min_ngram)
        lookup_drafter(self.max_ngram, self.min_ngram)  # validates them
        self.min_confidence = float(min_confidence)
        feature_drafter(self.min_confidence)  # validates it
        self.adaptive = adaptive
        self._draft = draft
        self._feature = feature
        self._feature_dparams: Any = None
        self._models: dict[str, DraftModel] = {}
        self.last_stats: SpecStats | None = None

    def draft_model(self, kind: str) -> DraftModel:
        """The DraftModel behind "self" or "draft" (built or loaded once)."""
        if kind not in self._models:
            if kind == "self":
                self._models[kind] = self_draft(self.params, self.cfg, self.self_layers, self.head_vocab)
            else:
                d = self._draft
                if d is None:
                    from aqjax.drafters import default_draft_dir

                    d = default_draft_dir(self.cfg)
                dm = d if isinstance(d, DraftModel) else load_draft(d, self.cfg)
                # the draft's layers in the target's layout (per layer where the target is unrolled)
                same = unstack_layers if per_layer(self.params) else stack_layers
                self._models[kind] = dataclasses.replace(dm, params=same(dm.params))
        return self._models[kind]

    def feature_draft(self) -> FeatureDraft:
        """The FeatureDraft behind "feature" (loaded once)."""
        if not isinstance(self._feature, FeatureDraft):
            f = self._feature
            if f is None:
                from aqjax.drafters import default_feature_dir

                f = default_feature_dir(self.cfg)
            self._feature = load_feature_draft(f, self.cfg)
        return self._feature

    def drafter(self, kind: str) -> tuple[Drafter, Any]:
        """(Drafter, dparams) for a kind."""
        if kind == "lookup":
            return lookup_drafter(self.max_ngram, self.min_ngram), ()
        if kind in ("feature", "hybrid"):
            if self._feature_dparams is None:  # the restricted head is a copy: made once
                self._feature_dparams = self.feature_draft().dparams(self.params, self.cfg)
            drafter = (feature_drafter(self.min_confidence) if kind == "feature"
                       else hybrid_drafter(self.max_ngram, self.min_ngram, self.min_confidence))
            return drafter, self._feature_dparams
        dm = self.draft_model(kind)
        return model_drafter(dm.cfg, share_prefix=(kind == "self"), name=kind), dm.dparams(self.params)

    def start(self, prompts, sampling=None, max_new_tokens=128, stop_ids=None, *, gate=None, policy=None,
              gate_state: Any = None, speculative: str | None = None, draft_k: int | None = None):
        """Prefills (the target's `start`) and starts the drafter; returns (n, SpecState, run) where run holds
        the static settings and dparams for the loop."""
        kind = _check_kind(speculative or self.speculative)
        k = _check_k(self.draft_k if draft_k is None else draft_k)
        drafter, dparams = self.drafter(kind) if kind != "none" else (None, None)
        n, dec = self.gen.start(prompts, sampling, max_new_tokens, stop_ids, gate=gate, policy=policy,
                                gate_state=gate_state, keep_hidden=drafter is not None and drafter.needs_hidden)
        if kind == "none":
            return n, dec, None
        B = dec.out.shape[0]
        T = bucket(max(len(p) for p in prompts), self.gen.min_prompt_bucket)
        prompt = np.zeros((B, T), np.int32)
        lengths = np.zeros((B,), np.int32)
        for i, p in enumerate(prompts):
            prompt[i, :len(p)] = p
            lengths[i] = len(p)
        st = jit_spec_init(dparams, jnp.asarray(prompt), jnp.asarray(lengths), dec, drafter=drafter, k=k)
        adaptive = drafter.adaptive if self.adaptive is None else bool(self.adaptive)
        configs = sampling if isinstance(sampling, (list, tuple)) else [sampling or SamplingConfig()]
        sampled = any(c.temperature > 0 for c in configs)  # all greedy: the sampling paths are not compiled
        run = dict(dparams=dparams, cfg=self.cfg, drafter=drafter, gate=gate, k=k, adaptive=adaptive,
                   sampled=sampled)
        return n, st, run

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling=None,
        max_new_tokens: int | Sequence[int] = 128,
        stop_ids: Sequence[int] | None = None,
        *,
        gate=None,
        policy: Any = None,
        gate_state: Any = None,
        speculative: str | None = None,
        draft_k: int | None = None,
        return_state: bool = False,
        return_stats: bool = False,
    ):
        """Generates to completion, as `Generator.generate`, with speculative decoding.

        Returns the results; with return_state also the final DecodeState; with return_stats also SpecStats
        (also kept in `self.last_stats`).
        """
        n, st, run = self.start(prompts, sampling, max_new_tokens, stop_ids, gate=gate, policy=policy,
                                gate_state=gate_state, speculative=speculative, draft_k=draft_k)
        if run is None:
            dec = _decode.jit_decode_until_done(self.params, st, policy, cfg=self.cfg, gate=gate)
            none = (0,) * n
            stats = SpecStats(tokens=tuple(int(x) for x in jax.device_get(dec.n_out)[:n]), steps=none, drafted=none,
                              accepted=none)
        else:
            st = jit_spec_until_done(self.params, run.pop("dparams"), st, policy, **run)
            dec, stats = st.dec, _stats(st, n)
        self.last_stats = stats
        results = self.results(dec, n, [len(p) for p in prompts])
        out = (results,) + ((dec,) if return_state else ()) + ((stats,) if return_stats else ())
        return out if len(out) > 1 else results

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        sampling=None,
        max_new_tokens: int | Sequence[int] = 128,
        stop_ids: Sequence[int] | None = None,
        *,
        gate=None,
        policy: Any = None,
        gate_state: Any = None,
        chunk_size: int | None = None,
        speculative: str | None = None,
        draft_k: int | None = None,
    ) -> Iterator[tuple[list[list[int]], Any]]:
        """As `Generator.stream`: yields (new tokens per row, DecodeState) after the prefill and every chunk of
        `chunk_size` speculative steps."""
        if _check_kind(speculative or self.speculative) == "none":
            yield from self.gen.stream(prompts, sampling, max_new_tokens, stop_ids, gate=gate, policy=policy,
                                       gate_state=gate_state, chunk_size=chunk_size)
            return
        n, st, run = self.start(prompts, sampling, max_new_tokens, stop_ids, gate=gate, policy=policy,
                                gate_state=gate_state, speculative=speculative, draft_k=draft_k)
        dparams = run.pop("dparams")
        chunk = chunk_size or self.chunk_size
        seen = [0] * n
        while True:
            out, n_out, done = jax.device_get((st.dec.out, st.dec.n_out, st.dec.done))
            new = []
            for i in range(n):
                new.append([int(t) for t in out[i, seen[i]: n_out[i]]])
                seen[i] = int(n_out[i])
            yield new, st.dec
            if bool(np.all(done)):
                self.last_stats = _stats(st, n)
                return
            st = jit_spec_chunk(self.params, dparams, st, policy, n_steps=chunk, **run)

    def results(self, state, n: int, prompt_lengths: Sequence[int]) -> list[GenerationResult]:
        """As `Generator.results` (accepts a DecodeState or a SpecState)."""
        return self.gen.results(state.dec if isinstance(state, SpecState) else state, n, prompt_lengths)


def _check_kind(kind: str) -> str:
    if kind not in SPECULATIVE_KINDS:
        raise RequestError(f"speculative must be one of {SPECULATIVE_KINDS}, got {kind!r}")
    return kind


def _check_k(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_K:
        raise RequestError(f"draft_k must be an integer in [1, {MAX_DRAFT_K}], got {k!r}")
    return k


def speculative_generator(gen: Generator, speculative: str = "none", draft_k: int = 4, **kwargs):
    """The CLI's one-call entry point: `gen` itself for "none", else a SpeculativeGenerator around it.

    The result has Generator's `generate` / `stream` / `results`, so the CLI and `gate.turn.governed_stream`
    use it unchanged, e.g. `gen = speculative_generator(gen, args.speculative, args.draft_k)`.
    kwargs go to SpeculativeGenerator (draft=, self_layers=, head_vocab=, max_ngram=, min_ngram=,
    adaptive=).
    """
    _check_kind(speculative)
    if speculative == "none":
        return gen
    return SpeculativeGenerator(gen, speculative, draft_k=draft_k, **kwargs)
