"""Continuous batching: a fixed number of slots, one device state, one thread that owns it.

The engine keeps one `aqjax.decode.DecodeState` of B slots (KV cache rows, sampling parameters, gate state,
output buffers) and, when governed, a table of B per-slot compiled policies (`serving.gating`). Requests join
and leave that batch between compiled calls; no call ever changes a shape, so nothing recompiles (after
`Engine.warmup`, which compiles every shape each piece below can take; `Engine.compile_counts` counts them):

* `_insert` (jitted once per pair of row bucket R and prompt bucket T) prefills the last pieces of up to R
  requests together: it gathers their slots' cache rows, runs `aqjax.decode.start` on an R-row state (ragged
  prompts right-padded to T), and scatters each row (cache, first token, sampling parameters, gate state, event
  log) and each request's policy into its slot. R is a power of two up to `insert_rows`; when fewer requests are
  ready, padding rows point at slot B, past the last one, so every scatter drops their writes (and, with length 0,
  they sample nothing). With 32 requests arriving at once, four inserts of 8 instead of 32 of 1 cut the time to
  their first tokens.
* `_prefill_piece` (jitted once) appends a fixed-size piece of a long prompt to its slot's cache row without
  sampling. A prompt longer than `prefill_chunk` is fed piece by piece, with a decode chunk for the running
  slots between iterations: a long prompt never stalls the streams already running for more than
  `prefill_budget` prompt tokens per iteration.
* `_chunk` (jitted once) runs `aqjax.decode.decode_chunk` over all slots (finished and free slots ride along
  as done rows) and packs what the host needs into one small array: each slot's new tokens and its flags, and
  (with `EngineConfig.logprobs`) their log-probabilities, floats bitcast to int32; a slot's `want` flag, set at
  insert, decides whether its row's are recorded, and no step computes them while no running slot wants them.
* `_spec_chunk` (jitted once per prefix bucket up to `speculative_rows`, with `speculative` "lookup", "feature"
  or "hybrid") is `_chunk` with speculative decoding (`aqjax.speculative.spec_chunk`): each of its steps drafts k
  tokens per slot (by prompt lookup, the feature draft head, or both), verifies them in one forward over at most
  k + 1 positions (`aqjax.speculative.verify_widths`), and commits the accepted ones through the gate, so a slot
  gets 1 to k + 1 tokens per step, exactly those (greedy) or distributed as (sampled) plain decoding gives. The
  drafter's state is rebuilt at the start of the chunk from what every chunk carries: each slot's prompt (kept in
  `History`, written by the prefill pieces and the insert) and output, and its last hidden state
  (`DecodeState.last_h`), so the engine picks a plain or a speculative chunk per iteration by how many slots are
  decoding.
* `_take_row` reads a finished slot's verdict, events and gate state; `_stop_rows` ends cancelled slots.

Threads and queues:

* Callers (the asyncio server thread) call `submit`, which appends the request to the bounded waiting queue
  (a deque under the engine's condition variable) or raises `QueueFull` (the server answers 429 with
  Retry-After) or `Draining` (503). `cancel` (a client went away) marks a request; the engine drops it from
  the queue or stops its slot at the next iteration, which frees the slot.
* The engine thread loops: apply cancellations, move waiting requests into free slots, spend at most
  `prefill_budget` prompt tokens on prefill (whole short prompts, pieces of long ones, oldest first; no limit
  while no slot is decoding, as nothing can stall then), run one decode chunk if any slot is decoding, and hand
  the results out. Within an iteration's prefill, last pieces that share a prompt bucket go into one insert
  (`insert_rows` at a time); earlier pieces of long prompts run one by one. It sleeps on the condition variable
  when idle.
* Results go back through each request's `sink`, a callable the engine calls from its own thread with
  `Tokens`, `Finished` or `Failed` events; the server's sink forwards them into an asyncio queue with
  `loop.call_soon_threadsafe`. The engine never blocks on a consumer.

`drain()` stops admission (new submissions raise `Draining`), lets queued and running requests finish, and
returns when the engine is idle; `stop()` then ends the thread.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Int

from aqjax import decode as _decode
from aqjax import speculative as _spec
from aqjax.cache import KVCache
from aqjax.drafters import (
    DRAFT_MIN_CONFIDENCE,
    FeatureState,
    HybridState,
    default_feature_dir,
    feature_drafter,
    hybrid_drafter,
    load_feature_draft,
    lookup_drafter,
    lookup_state,
)
from aqjax.engine import EVENT_NAMES, FINISH_NAMES, GateEvent, bucket, logprob_entries
from aqjax.sampling import SamplingConfig, SamplingParams
from gate.core import keep_rows
from models.config import LlamaConfig
from models.llama import forward
from models.params import Params, compute_params
from serving import gating

__all__ = ["Draining", "Engine", "EngineConfig", "EngineRequest", "Failed", "Finished", "QueueFull", "SlotResult",
           "Tokens"]

log = logging.getLogger("aqjax.serving.engine")

SPECULATIVE_KINDS = ("none", "lookup", "feature", "hybrid")
MAX_DRAFT_K = _spec.MAX_DRAFT_K


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after


class Draining(RuntimeError):
    """The engine is draining (shutting down) and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes of the batch.

    Attributes:
      slots: B, requests decoded together.
      max_len: cache positions per slot (prompt + generated tokens).
      chunk_steps: decode steps per compiled call (tokens reach clients in chunks of this size).
      prefill_chunk: the largest prompt piece prefilled in one call (a power of two); longer prompts are split
        into pieces of this size.
      prefill_budget: prompt tokens prefilled per engine iteration while streams are running (between two
        decode chunks); 0 means prefill_chunk.
      min_prompt_bucket: smallest prompt bucket (prompts are padded to powers of two up to prefill_chunk).
      insert_rows: the most requests prefilled together in one insert (a power of two). Requests whose last
        prompt pieces fall in the same prompt bucket are inserted together, in row buckets of powers of two up
        to this; 1 inserts one request per call. Each (row bucket, prompt bucket) pair is one compilation.
      max_queue: requests that may wait for a slot; beyond slots + max_queue, `submit` raises QueueFull.
      min_active_slots: a decode chunk runs over the smallest power-of-two prefix of the slots (at least this
        many) that holds every decoding slot, so a lightly loaded batch costs less; requests take the lowest
        free slot. Set it to `slots` to always decode the whole batch (one compiled chunk instead of several).
        Default 1: on a CPU a chunk's cost grows with its rows (one stream decoding in an 8-row prefix took
        twice as long per token as alone); on an accelerator, where a few more rows cost almost nothing, 8 or
        more saves compilations.
      max_stop_ids: per-request stop tokens (padded to this many).
      governed: run the per-slot gate (False: no gate at all, the baseline for benchmarks).
      logprobs: keep per-slot log-probability buffers, so requests may ask for log-probabilities (computed only
        at steps where some running slot wants them; allocated once, no request recompiles anything).
      max_top_logprobs: K, the most alternatives per token a request may ask for (OpenAI allows 20).
      protected_spans: the most protected spans a slot's disclosure gate matches (the session's spans protected
        from the request's principal); a request with more is refused. Every slot holds a [128, N] word table.
      protected_chars: the most distinct non-ASCII characters over those spans.
      evidence_nodes: the nodes of a slot's evidence trie for the grounding gate (a request whose evidence needs
        more is refused); every slot holds an [N, 11] table.
      speculative: "none", or "lookup": speculative decoding with the prompt-lookup drafter
        (`aqjax.drafters.lookup_drafter`, n-grams of up to `max_ngram` tokens, `draft_k` draft tokens per step)
        for decode chunks over at most `speculative_rows` slots (`min_active_slots` prefix buckets). Greedy
        requests get exactly the tokens they get without it; sampled ones the same distribution (but not the
        same draws for a seed: which chunks speculate depends on the load). A chunk runs `chunk_steps`
        verification steps, each emitting 1 to draft_k + 1 tokens per slot. Lookup needs no model: its state is
        the slot's tokens (prompt, then output), rebuilt on the device at the start of each speculative chunk,
        so the engine moves between plain and speculative chunks as the load changes. "feature" drafts with the
        feature draft head (`aqjax.drafters.feature_drafter`, trained by scripts/train_feature_drafter.py; its
        folder is `feature_draft`, default that script's cache folder), whose state is the slot's last hidden
        state, carried by every chunk (`DecodeState.last_h`); "hybrid" with lookup where it matches, the feature
        head elsewhere. The model drafters with their own KV cache ("self", "draft") are not served.
      feature_draft: the feature draft's folder for "feature" / "hybrid" (None: the training script's default).
      draft_min_confidence: a feature-head draft ends where the product of the head's top probabilities along it
        falls below this (0: never; see `aqjax.drafters.DRAFT_MIN_CONFIDENCE`).
      speculative_rows: the largest prefix bucket decoded speculatively (beyond it, a verification forward over
        k + 1 positions per slot costs more than its accepted tokens save; see bench/serve.py).
      speculative_min_tokens: speculate only while the decoding slots' recent tokens per verification step (an
        average per slot, over its speculative chunks) reach this on average: below it, a step over k + 1
        positions costs more than the tokens it yields (on the 2-core CPU a 5-position forward costs ~1.5 plain
        steps), as in open chat, where lookup finds few drafts. A slot without a speculative chunk yet is
        judged by the engine's recent yield over all slots (so, under a chat load, new requests start plainly),
        and counts as promising when there is none.
      speculative_probe: after this many plain chunks chosen for low yield, one speculative chunk measures again.
      unroll_layers: run the decoder's layers unrolled over per-layer weights (`models.params.compute_params`)
        instead of a scan (which makes XLA:CPU copy each layer's weights out of the stack at every step). Default
        None: `models.params.unroll_by_default()` (unrolled on CPU unless AQJAX_UNROLL_LAYERS=0; the scan on
        accelerators). Measured in-process on the 2-core CPU, governed, chat prompts, 64 tokens per request,
        inserts included, 4 alternating rounds: unrolled 1.26x the scan's tokens/s for one request and 1.03x for
        32 arriving at once; the price is the warm-up's compile time (about twice as long; the compile cache keeps
        the programs for the next start).
    """

    slots: int = 8
    max_len: int = 1024
    chunk_steps: int = 8
    prefill_chunk: int = 256
    prefill_budget: int = 512
    min_prompt_bucket: int = 16
    insert_rows: int = 8
    max_queue: int = 32
    min_active_slots: int = 1
    max_stop_ids: int = 8
    governed: bool = True
    logprobs: bool = True
    max_top_logprobs: int = 20
    protected_spans: int = 64
    protected_chars: int = 16
    evidence_nodes: int = 2048
    unroll_layers: bool | None = None
    speculative: str = "none"
    draft_k: int = 4
    speculative_rows: int = 1
    max_ngram: int = 3
    feature_draft: str | None = None
    draft_min_confidence: float = DRAFT_MIN_CONFIDENCE
    speculative_min_tokens: float = 1.5
    speculative_probe: int = 8

    def __post_init__(self):
        for name in ("slots", "max_len", "chunk_steps", "prefill_chunk", "min_prompt_bucket", "max_stop_ids",
                     "min_active_slots", "insert_rows", "protected_spans", "protected_chars", "evidence_nodes"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive")
        if self.prefill_budget < 0:
            raise ValueError("EngineConfig.prefill_budget must be >= 0")
        if self.max_queue < 0:
            raise ValueError("EngineConfig.max_queue must be >= 0")
        if self.max_top_logprobs < 0:
            raise ValueError("EngineConfig.max_top_logprobs must be >= 0")
        if self.prefill_chunk & (self.prefill_chunk - 1) or self.prefill_chunk < self.min_prompt_bucket:
            raise ValueError("EngineConfig.prefill_chunk must be a power of two >= min_prompt_bucket")
        if self.insert_rows & (self.insert_rows - 1):
            raise ValueError("EngineConfig.insert_rows must be a power of two")
        if self.speculative not in SPECULATIVE_KINDS:
            raise ValueError(f"EngineConfig.speculative must be one of {SPECULATIVE_KINDS}, got {self.speculative!r}")
        if not isinstance(self.draft_k, int) or not 1 <= self.draft_k <= MAX_DRAFT_K:
            raise ValueError(f"EngineConfig.draft_k must be an integer in [1, {MAX_DRAFT_K}], got {self.draft_k!r}")
        if not self.speculative_min_tokens >= 0 or int(self.speculative_probe) < 1:
            raise ValueError("EngineConfig.speculative_min_tokens must be >= 0 and speculative_probe >= 1")
        if int(self.speculative_rows) < 0:
            raise ValueError("EngineConfig.speculative_rows must be >= 0")
        if not 1 <= int(self.max_ngram) <= 8:
            raise ValueError(f"EngineConfig.max_ngram must be in [1, 8], got {self.max_ngram!r}")
        if not isinstance(self.draft_min_confidence, (int, float)) or not 0 <= self.draft_min_confidence < 1:
            raise ValueError(f"EngineConfig.draft_min_confidence must be in [0, 1), got {self.draft_min_confidence!r}")
        if self.unroll_layers is not None and not isinstance(self.unroll_layers, bool):
            raise ValueError(f"EngineConfig.unroll_layers must be true or false, got {self.unroll_layers!r}")


# --------------------------------------------------------------------------------------------------------------
# Events and requests.


@dataclasses.dataclass(frozen=True)
class Tokens:
    """New tokens of a request (in order; the concatenation of all Tokens events is the output).

    logprobs: for a request with `top_logprobs`, one (logprob, ((id, logprob), ...)) per token, under the gate's
    mask (see `aqjax.decode.LogprobLog`); None otherwise.
    """

    tokens: list[int]
    logprobs: tuple | None = None


@dataclasses.dataclass(frozen=True)
class SlotResult:
    """A finished request.

    Attributes:
      tokens: every generated token (what the Tokens events carried).
      finish_reason: "stop", "length", "gate" (the gate ended it; see verdict) or "cancelled".
      prompt_tokens: prompt length.
      verdict / rule / confidence: the turn's verdict (int), the rule behind it (-1: none), confidence.
      events: the gate's audit events (steps where it acted).
      gate_state: the slot's final gate state (numpy, leading axis 1), or None when ungoverned.
      gate_state_before: the state the turn started from (numpy, leading axis 1), or None.
      queued_s: seconds from submit to the slot; first_token_s: submit to first token; total_s: submit to end.
    """

    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    verdict: int = 0
    rule: int = -1
    confidence: float = 1.0
    events: tuple[GateEvent, ...] = ()
    gate_state: Any = None
    gate_state_before: Any = None
    queued_s: float = 0.0
    first_token_s: float | None = None
    total_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Finished:
    result: SlotResult


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = Tokens | Finished | Failed


@dataclasses.dataclass(eq=False)
class EngineRequest:
    """One generation request.

    Attributes:
      prompt: token ids (non-empty).
      max_new: generated-token limit (prompt + max_new <= max_len).
      sink: called from the engine thread with each Tokens / Finished / Failed event; must not block.
      sampling: the sampling settings.
      stop_ids: stop tokens (None: the engine's defaults).
      policy: the request's effective policy, or None for an ungated request (on a governed engine its slot's
        gates are then disabled; an ungoverned engine accepts no policy).
      phrase_state: the phrase-gate state to start from (numpy `PhraseState` with leading axis 1; a session's
        saved state), or None for a fresh one.
      authority_state: the turn's authority-gate state (numpy `AuthorityState` with leading axis 1, see
        `gating.authority_row`: principal, tool mode, tools offered, quotas spent), or None: no tool call.
      escalation_state: the turn's escalation state (numpy `EscalationState`, leading axis 1: the session's
        counters and the topic rules they activated, `gate.escalation.begin_turn`), or None: nothing active.
      disclosure_state: the turn's protected spans (numpy `DisclosureState`, leading axis 1, shaped by the
        engine's `sizes`: `gate.disclosure.begin_turn` with min_spans / min_other), or None: nothing protected.
      grounding_state: the turn's evidence trie (numpy `GroundingState`, leading axis 1, `evidence_nodes` nodes:
        `gate.grounding.begin_turn`), or None: figures are not checked.
      evidence_state: the turn's evidence budget (numpy `EvidenceState`, leading axis 1,
        `gate.evidence.begin_turn`), or None: no budget.
      top_logprobs: None (no log-probabilities), or the alternatives per token (<= config.max_top_logprobs) that
        its Tokens events carry with every token's log-probability.
    """

    prompt: Sequence[int]
    max_new: int
    sink: Callable[[Event], None]
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: Sequence[int] | None = None
    policy: gating.SlotPolicy | None = None
    phrase_state: Any = None
    authority_state: Any = None
    escalation_state: Any = None
    disclosure_state: Any = None
    grounding_state: Any = None
    evidence_state: Any = None
    top_logprobs: int | None = None
    # engine bookkeeping
    id: int = -1
    submitted: float = 0.0
    cancelled: bool = False


@dataclasses.dataclass(eq=False)
class _Slot:
    req: EngineRequest
    offset: int = 0  # prompt tokens already in the cache row
    decoding: bool = False
    seen: int = 0  # tokens delivered
    tokens: list = dataclasses.field(default_factory=list)
    started: float = 0.0
    first_token: float | None = None
    state_before: Any = None
    spec_yield: float | None = None  # tokens per verification step, averaged over its speculative chunks


# --------------------------------------------------------------------------------------------------------------
# Compiled pieces (module level, so every engine of the same shapes shares the compilations).


def _set_row(big, row, slot, axis: int = 0):
    start = [jnp.zeros((), jnp.int32)] * big.ndim
    start[axis] = slot
    return lax.dynamic_update_slice(big, row.astype(big.dtype), start)


def _put_rows(big, row, slot):
    return jax.tree.map(lambda b, r: _set_row(b, r, slot), big, row)


def _cache_row(cache: KVCache, slot, length) -> KVCache:
    return KVCache(k=lax.dynamic_slice_in_dim(cache.k, slot, 1, axis=1),
                   v=lax.dynamic_slice_in_dim(cache.v, slot, 1, axis=1),
                   lengths=jnp.reshape(length, (1,)).astype(jnp.int32))


def _put_cache_row(cache: KVCache, row: KVCache, slot) -> KVCache:
    return KVCache(k=_set_row(cache.k, row.k, slot, axis=1), v=_set_row(cache.v, row.v, slot, axis=1),
                   lengths=_set_row(cache.lengths, row.lengths, slot))


@struct.dataclass
class History:
    """The slots' prompts, kept for a drafter that looks back at them (prompt lookup).

    Attributes:
      tokens: Int[B, max_len] each slot's prompt tokens (positions beyond `length` are stale).
      length: Int[B] prompt tokens per slot (set when its last piece is inserted).
    """

    tokens: Int[Array, "B S"]
    length: Int[Array, " B"]

    @classmethod
    def empty(cls, slots: int, max_len: int) -> History:
        return cls(tokens=jnp.zeros((slots, max_len), jnp.int32), length=jnp.zeros((slots,), jnp.int32))


def _put_history(history: History | None, slots, tokens, offset, n=None) -> History | None:
    """Writes prompt pieces tokens [R, T] at `offset` [R] into the slots' rows (and, with n, their prompt lengths
    offset + n); a slot out of range (padding) writes nothing."""
    if history is None:
        return None
    R, T = tokens.shape
    S = history.tokens.shape[1]
    cols = offset[:, None] + jnp.arange(T)[None, :]
    rows = jnp.broadcast_to(slots[:, None], (R, T))
    upd = history.tokens.at[rows, jnp.where(cols < S, cols, S)].set(tokens.astype(jnp.int32), mode="drop")
    length = history.length if n is None else _scatter_rows(history.length, offset + n, slots)
    return History(tokens=upd, length=length)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state", "history"))
def _prefill_piece(params: Params, state: _decode.DecodeState, history: History | None, slot, tokens, offset, *,
                   cfg: LlamaConfig):
    """Appends tokens [1, T] to the slot's cache row, whose first `offset` positions are already filled (and, when
    the engine keeps prompt history, to the slot's history)."""
    row = _cache_row(state.cache, slot, offset)
    _, row = forward(params, tokens, row, cfg=cfg)
    history = _put_history(history, jnp.reshape(slot, (1,)), tokens, jnp.reshape(offset, (1,)))
    return state.replace(cache=_put_cache_row(state.cache, row, slot)), history


def _gather_rows(big, slots, axis: int = 0):
    # padding rows point past the last slot: "clip" reads a real row for them, whose copy is never written back
    return jnp.take(big, slots, axis=axis, mode="clip")


def _scatter_rows(big, rows, slots, axis: int = 0):
    """Writes rows (R along `axis`) into `big` at `slots`; a slot out of range (a padding row's) writes nothing."""
    index = (slice(None),) * axis + (slots,)
    return big.at[index].set(rows.astype(big.dtype), mode="drop")


@functools.partial(jax.jit, static_argnames=("cfg", "gate"), donate_argnames=("state", "table", "history"))
def _insert(params: Params, state: _decode.DecodeState, table, history: History | None, slots, tokens, n, offset,
            sampling: SamplingParams, max_new, stop_ids, restore, phrase_state, turn_state, row_tables, want, *,
            cfg: LlamaConfig, gate):
    """Prefills the last (or only) piece of R prompts together, samples their first tokens and installs the rows.

    One program per (R, T): R rows (a power of two <= EngineConfig.insert_rows) and T the prompt bucket.
    Padding rows (when fewer than R requests are inserted) have slot B (out of range: every scatter drops their
    writes), length 0 (`decode.start` leaves them done, so they sample nothing) and greedy sampling (so they never
    make the batch pay for a random draw); what they compute is thrown away.

    Args:
      state: the batch (donated); table: the per-slot policy table (donated), None when ungoverned; history: the
        slots' prompts (donated), None unless the engine speculates.
      slots: Int[R] the rows' slots (B for a padding row); tokens: Int[R, T] the pieces (right-padded);
      n: Int[R] their real lengths; offset: Int[R] prompt tokens of each request already in its slot's cache row
        (earlier pieces).
      sampling / max_new / stop_ids: the requests' rows (leading axis R).
      restore: Bool[R] start the phrase gate from `phrase_state` instead of its initial state.
      turn_state: the turn's states of the kinds after phrases and structure (`gating.TURN_KINDS`: authority,
        escalation, evidence, ...; leading axis R; `()` for a kind not in the chain).
      row_tables: a tuple of R policy entries (leading axis 1 each; cached per policy on the device, so the
        host never copies them), None when ungoverned.
      want: Bool[R] record the row's log-probabilities (ignored when the state keeps none).

    Returns:
      (state, table, history, Int[R, 4 (+ 1 + 2K)] per row: first token or -1, n_out, done, finish, then with
      log-probability buffers the first token's logprob, top ids and top logprobs (floats bitcast to int32),
      gate state before (leading axis R)).
    """
    R = tokens.shape[0]
    M = state.out.shape[1]
    c = state.cache
    rows_cache = KVCache(k=_gather_rows(c.k, slots, axis=1), v=_gather_rows(c.v, slots, axis=1),
                         lengths=offset.astype(jnp.int32))
    gate_state = row_table = None
    if gate is not None:
        row_table = jax.tree.map(lambda *xs: jnp.concatenate(xs), *row_tables)
        phrases, structure, *_ = gate.init(row_table, R)
        gate_state = (keep_rows(restore, phrase_state, phrases), structure, *turn_state)
    K = None if state.logprobs is None else state.logprobs.top_ids.shape[-1]
    rows = _decode.start(params, tokens, n, rows_cache, sampling, max_new, stop_ids, M, gate_state, row_table, want,
                         cfg=cfg, gate=gate, top_logprobs=K, keep_hidden=state.last_h is not None)
    fields = {f.name: jax.tree.map(lambda b, r: _scatter_rows(b, r, slots), getattr(state, f.name),
                                   getattr(rows, f.name))
              for f in dataclasses.fields(state) if f.name not in ("cache", "step")}
    cache = KVCache(k=_scatter_rows(c.k, rows.cache.k, slots, axis=1),
                    v=_scatter_rows(c.v, rows.cache.v, slots, axis=1),
                    lengths=_scatter_rows(c.lengths, rows.cache.lengths, slots))
    state = state.replace(cache=cache, **fields)
    if table is not None:
        table = jax.tree.map(lambda b, r: _scatter_rows(b, r, slots), table, row_table)
    history = _put_history(history, slots, tokens, offset, n)
    first = jnp.where(rows.n_out > 0, rows.out[:, 0], -1)
    packed = jnp.stack([first, rows.n_out, rows.done.astype(jnp.int32), rows.finish], axis=1)
    if rows.logprobs is not None:
        packed = jnp.concatenate([packed, _pack_logprobs(rows.logprobs, jnp.zeros((R, 1), jnp.int32))], axis=1)
    return state, table, history, packed, gate_state


def _pack_logprobs(lp: _decode.LogprobLog, idx) -> jax.Array:
    """Int[R, N * (1 + 2K)]: the logprobs, top ids and top logprobs at columns idx [R, N] (clipped), floats
    bitcast to int32 so that they travel in the same packed array as the tokens."""
    R, N = idx.shape
    M = lp.token.shape[1]
    idx = jnp.minimum(idx, M - 1)
    f2i = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.int32)
    token = jnp.take_along_axis(lp.token, idx, axis=1)
    ids = jnp.take_along_axis(lp.top_ids, idx[:, :, None], axis=1)
    top = jnp.take_along_axis(lp.top, idx[:, :, None], axis=1)
    return jnp.concatenate([f2i(token), ids.reshape(R, -1), f2i(top).reshape(R, -1)], axis=1)


def _unpack_logprobs(row: np.ndarray, n: int, k: int, keep: int) -> tuple:
    """The host side of `_pack_logprobs` for one row: n tuples (logprob, ((id, logprob), ...)), `keep` alternatives."""
    token = row[:n].view(np.float32)
    ids = row[n: n + n * k].reshape(n, k)
    top = row[n + n * k: n + 2 * n * k].view(np.float32).reshape(n, k)
    return tuple((float(token[j]), tuple((int(t), float(v)) for t, v in zip(ids[j, :keep], top[j, :keep], strict=True)
                                          if t >= 0)) for j in range(n))


COMPILER_THREAD_STACK = 256 << 20


def compiler_thread(target, name: str, args=()) -> threading.Thread:
    """A daemon thread with a stack large enough for XLA to compile in it (not started).

    XLA compiles a jitted function on the thread that first calls it, and its compiler recurses deeply on large
    programs (a decode step with every gate chained). A Python thread gets the platform's default stack (8 MB
    here, less elsewhere), and running out of it is a segmentation fault, not an exception: seen once in the
    test suite, compiling `_insert` on the engine thread. The stack is virtual memory, committed only as used.
    """
    old = threading.stack_size()
    threading.stack_size(COMPILER_THREAD_STACK)
    try:
        return threading.Thread(target=target, args=args, name=name, daemon=True)
    finally:
        threading.stack_size(old)


def _prefix(state: _decode.DecodeState, rows: int) -> _decode.DecodeState:
    """The first `rows` slots of the batch. The KV cache's buffers stay whole (the forward touches only the first
    `rows` rows of a larger cache, `models.llama.forward`): slicing them would copy that prefix of the cache out
    and back at every chunk (with 64 slots and 32 decoding, 0.75 GB each way at max_len 512)."""
    fields = {f.name: jax.tree.map(lambda x: x[:rows], getattr(state, f.name))
              for f in dataclasses.fields(state) if f.name not in ("cache", "step")}
    c = state.cache
    return state.replace(cache=KVCache(k=c.k, v=c.v, lengths=c.lengths[:rows]), **fields)


def _put_prefix(state: _decode.DecodeState, sub: _decode.DecodeState) -> _decode.DecodeState:
    zero = jnp.zeros((), jnp.int32)
    fields = {f.name: _put_rows(getattr(state, f.name), getattr(sub, f.name), zero)
              for f in dataclasses.fields(state) if f.name not in ("cache", "step")}
    c = sub.cache
    cache = KVCache(k=c.k, v=c.v, lengths=_set_row(state.cache.lengths, c.lengths, zero))
    return state.replace(cache=cache, step=sub.step, **fields)


@functools.partial(jax.jit, static_argnames=("cfg", "gate", "n_steps", "rows"), donate_argnames=("state",))
def _chunk(params: Params, state: _decode.DecodeState, table, *, cfg: LlamaConfig, gate, n_steps: int, rows: int):
    """`n_steps` decode steps over the first `rows` slots (every decoding slot is among them; the others are
    free or still prefilling); returns (state, Int[rows, n_steps + 3 (+ n_steps * (1 + 2K))]).

    Row b of the packed array: the tokens slot b emitted in this chunk (-1 padded), then n_out, done, finish, then
    with log-probability buffers the new tokens' log-probabilities (see `_pack_logprobs`).
    Decoding a prefix bucket instead of all B slots makes a lightly loaded batch cheap.
    """
    sub, sub_table = _sub_batch(state, table, rows)
    before = sub.n_out
    sub = _decode.decode_chunk(params, sub, sub_table, cfg=cfg, n_steps=n_steps, gate=gate)
    return _merge_sub_batch(state, sub), _pack_new(sub, before, n_steps)


def _sub_batch(state: _decode.DecodeState, table, rows: int):
    """(state, table) of the first `rows` slots (the whole batch when rows = B)."""
    if rows == state.done.shape[0]:
        return state, table
    return _prefix(state, rows), (None if table is None else jax.tree.map(lambda x: x[:rows], table))


def _merge_sub_batch(state: _decode.DecodeState, sub: _decode.DecodeState) -> _decode.DecodeState:
    return sub if sub.done.shape[0] == state.done.shape[0] else _put_prefix(state, sub)


def _pack_new(sub: _decode.DecodeState, before, W: int, extra=()) -> jax.Array:
    """Int[rows, W + 3 + len(extra) (+ W * (1 + 2K))]: each row's tokens since `before` (at most W, -1 padded), its
    n_out, done, finish, the `extra` columns, then with log-probability buffers the new tokens' logprobs, top ids
    and top logprobs (`_unpack_logprobs`)."""
    M = sub.out.shape[1]
    idx = before[:, None] + jnp.arange(W, dtype=jnp.int32)[None, :]
    new = jnp.take_along_axis(sub.out, jnp.minimum(idx, M - 1), axis=1)
    new = jnp.where(idx < sub.n_out[:, None], new, -1)
    parts = [new, sub.n_out[:, None], sub.done[:, None].astype(jnp.int32), sub.finish[:, None],
             *(e[:, None] for e in extra)]
    if sub.logprobs is not None:
        parts.append(_pack_logprobs(sub.logprobs, idx))
    return jnp.concatenate(parts, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "gate", "n_steps", "rows", "drafter", "k"),
                   donate_argnames=("state",))
def _spec_chunk(params: Params, dparams, state: _decode.DecodeState, table, history: History | None, *,
                cfg: LlamaConfig, gate, n_steps: int, rows: int, drafter, k: int):
    """`_chunk` with speculative decoding (`aqjax.speculative.spec_chunk`): `n_steps` verification steps over the
    first `rows` slots, each emitting 1 to k + 1 tokens per slot. The drafter's state is rebuilt from what every
    chunk carries: lookup's from the slots' prompts and outputs (`aqjax.drafters.lookup_state`), the feature
    head's from the slots' last hidden states (`DecodeState.last_h`); it is dropped after the chunk: nothing
    about speculation outlives it, so plain and speculative chunks interleave freely.

    Returns (state, Int[rows, W + 6 (+ W * (1 + 2K))]) with W = n_steps * (k + 1): as `_chunk`'s packed rows (W
    token columns, then n_out, done, finish), then the chunk's verification steps, drafted and accepted draft
    tokens per slot, then the log-probabilities.
    """
    sub, sub_table = _sub_batch(state, table, rows)
    before = sub.n_out
    look = (None if history is None else
            lookup_state(history.tokens[:rows], history.length[:rows], sub.out, sub.n_out))
    feat = None if sub.last_h is None else FeatureState(feat=sub.last_h)
    dstate = {"lookup": look, "feature": feat, "hybrid": HybridState(lookup=look, feature=feat)}[drafter.name]
    st = _spec.spec_state(sub, dstate, k)
    st = _spec.spec_chunk(params, dparams, st, sub_table, cfg=cfg, drafter=drafter, gate=gate, k=k, adaptive=False,
                          n_steps=n_steps)
    packed = _pack_new(st.dec, before, n_steps * (k + 1), (st.n_steps, st.n_drafted, st.n_accepted))
    return _merge_sub_batch(state, st.dec), packed


@jax.jit
def _take_row(state: _decode.DecodeState, slot):
    """A slot's results: (out, n_out, finish, verdict, rule, confidence, events, gate_state, logprobs), leading
    axis 1."""

    def row(x):
        return lax.dynamic_slice_in_dim(x, slot, 1, axis=0)

    pick = functools.partial(jax.tree.map, row)
    return (row(state.out), row(state.n_out), row(state.finish), row(state.verdict), row(state.rule),
            row(state.confidence), pick(state.events), pick(state.gate_state), pick(state.logprobs))


@functools.partial(jax.jit, donate_argnames=("state",))
def _stop_rows(state: _decode.DecodeState, rows):
    """Ends the rows where `rows` is true (a cancelled request): they stop advancing from the next step."""
    newly = rows & ~state.done
    return state.replace(done=state.done | rows, finish=jnp.where(newly, _decode.FINISH_STOP, state.finish))


# --------------------------------------------------------------------------------------------------------------
# The engine.


class Engine:
    """Continuous batching over `config.slots` slots for one model (see the module docstring).

    Args:
      cfg: the model config.
      params: params in either layout (canonical ones are packed here once).
      config: batch sizes.
      stop_ids: default stop tokens.
      eos_id: the tokenizer's end-of-sequence id (the structure gate admits it in accepting states).
      vocab_size: the gate's vocabulary (default: the model's).
    """

    def __init__(self, cfg: LlamaConfig, params: Params, config: EngineConfig = EngineConfig(), *,
                 stop_ids: Sequence[int] = (), eos_id: int | None = None, vocab_size: int | None = None,
                 packed: bool | None = None, unroll_layers: bool | None = None):
        if config.max_len > cfg.max_seq_len:
            raise ValueError(f"max_len {config.max_len} exceeds the model's context of {cfg.max_seq_len}")
        self.cfg = cfg
        self.config = config
        unroll = config.unroll_layers if unroll_layers is None else unroll_layers
        self.params = compute_params(params, cfg, packed=packed, unroll=unroll)
        self.dtype = self.params["embed"].dtype
        self.stop_ids = tuple(int(i) for i in stop_ids)
        if len(self.stop_ids) > config.max_stop_ids:
            raise ValueError(f"{len(self.stop_ids)} default stop ids exceed max_stop_ids={config.max_stop_ids}")
        self.vocab_size = int(vocab_size or cfg.vocab_size)
        self.eos_id = int(cfg.eos_id if eos_id is None else eos_id)
        B = config.slots
        self._env = gating.complete(gating.Envelope(), self.vocab_size)
        self._gate_kinds = self._env.kinds
        self.sizes = gating.StateSizes(config.protected_spans, config.protected_chars, config.evidence_nodes)
        self.gate = (gating.slot_gate(self.vocab_size, self.eos_id, self._gate_kinds, self.sizes) if config.governed
                     else None)
        self._table = (jax.tree.map(jnp.asarray, gating.empty_table(self._env, self.vocab_size, B))
                       if self.gate is not None else None)
        self._drafter, self._dparams = None, ()
        min_ngram = min(2, config.max_ngram)  # the drafters' default, unless max_ngram is 1
        if config.speculative == "lookup":
            self._drafter = lookup_drafter(config.max_ngram, min_ngram)
        elif config.speculative in ("feature", "hybrid"):
            fd = load_feature_draft(config.feature_draft or default_feature_dir(cfg), cfg)
            self._dparams = fd.dparams(self.params, cfg)
            conf = float(config.draft_min_confidence)
            self._drafter = (feature_drafter(conf) if config.speculative == "feature"
                             else hybrid_drafter(config.max_ngram, min_ngram, conf))
        self._state = self._empty_state()
        self._history = (History.empty(B, config.max_len) if config.speculative in ("lookup", "hybrid")
                         else None)
        self._row_tables: collections.OrderedDict = collections.OrderedDict()  # (hash, envelope) -> device row

        self._cv = threading.Condition()
        self._hold = threading.Lock()  # taken by the engine thread around each iteration (see `paused`)
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._slots: list[_Slot | None] = [None] * B
        self._cancels: set[int] = set()
        self._ids = itertools.count()
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # statistics (read by the metrics collector; ints and floats only, written by the engine thread)
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.completed = 0
        self.chunks = 0
        self.recompiles = 0
        self._plain_since_spec = 0  # plain chunks chosen for low speculative yield since the last speculative one
        self._recent_yield: float | None = None  # tokens per verification step over recent speculative chunks
        self.spec_chunks = 0  # speculative chunks, their slot-steps, drafted and accepted draft tokens
        self.spec_steps = 0
        self.spec_drafted = 0
        self.spec_accepted = 0
        self._rate = 0.0  # tokens/s, exponential moving average over chunks
        self._avg_latency = 1.0

    def _empty_state(self) -> _decode.DecodeState:
        """B free slots: every row done, default sampling parameters (so no row asks for a vocabulary sort)."""
        c, B = self.config, self.config.slots
        M = c.max_len
        i32 = functools.partial(jnp.zeros, (B,), jnp.int32)
        state = _decode.DecodeState(
            cache=KVCache.init(self.cfg, B, c.max_len, self.dtype),
            last=i32(), done=jnp.ones((B,), bool), finish=i32(), out=jnp.full((B, M), -1, jnp.int32), n_out=i32(),
            max_new=i32(), stop_ids=jnp.full((B, c.max_stop_ids), -1, jnp.int32),
            sampling=SamplingParams.from_configs([SamplingConfig()] * B), step=jnp.zeros((), jnp.int32),
            verdict=i32(), rule=jnp.full((B,), -1, jnp.int32), confidence=jnp.ones((B,), jnp.float32),
            gate_state=None if self.gate is None else self.gate.init(self._table, B),
            events=None if self.gate is None else _decode.EventLog.empty(B, M),
            logprobs=_decode.LogprobLog.empty(B, M, c.max_top_logprobs) if c.logprobs else None,
            last_h=(jnp.zeros((B, self.cfg.d_model), jnp.float32)
                    if self._drafter is not None and self._drafter.needs_hidden else None))
        # distinct buffers for every leaf (EventLog.empty shares one array between fields): the state is donated
        return jax.tree.map(jnp.copy, state)

    # ---------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = compiler_thread(self._run, "aqjax-engine")
            self._thread.start()
        return self

    def drain(self, timeout: float | None = None) -> bool:
        """Stops admission and waits until every queued and running request has finished; True when idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._draining = True
            self._cv.notify_all()
            while self._waiting or any(s is not None for s in self._slots):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=0.1 if left is None else min(left, 0.1))
        return True

    def stop(self) -> None:
        """Ends the engine thread; requests still queued or running get a Failed event."""
        with self._cv:
            self._stopping = True
            self._draining = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in [*self._waiting, *(s.req for s in self._slots if s is not None)]:
            _deliver(req, Failed("the server shut down before the request finished"))
        self._waiting.clear()
        self._slots = [None] * self.config.slots

    @property
    def draining(self) -> bool:
        return self._draining

    # ---------------------------------------------------------------------------------------------- callers

    def check(self, prompt_len: int, max_new: int) -> None:
        """Raises ValueError when a request of these sizes cannot fit in a slot."""
        if prompt_len <= 0:
            raise ValueError("the prompt is empty")
        if max_new < 0:
            raise ValueError("max_new must be >= 0")
        if prompt_len + max_new > self.config.max_len:
            raise ValueError(f"{prompt_len} prompt tokens + {max_new} new tokens exceed the context of "
                             f"{self.config.max_len} tokens")

    def submit(self, req: EngineRequest) -> EngineRequest:
        """Queues a request (thread-safe). Raises QueueFull, Draining, or ValueError for a request that cannot fit.

        Its events go to `req.sink`.
        """
        self.check(len(req.prompt), req.max_new)
        stops = self.stop_ids if req.stop_ids is None else tuple(req.stop_ids)
        if len(stops) > self.config.max_stop_ids:
            raise ValueError(f"at most {self.config.max_stop_ids} stop tokens")
        if req.policy is not None and self.gate is None:
            raise ValueError("this engine runs ungoverned; it cannot apply a policy")
        if req.top_logprobs is not None:
            if not self.config.logprobs:
                raise ValueError("this engine keeps no log-probabilities")
            if not 0 <= req.top_logprobs <= self.config.max_top_logprobs:
                raise ValueError(f"top_logprobs must be in [0, {self.config.max_top_logprobs}]")
        if req.authority_state is not None and (req.policy is None or req.policy.authority is None):
            raise ValueError("a tool turn needs a policy that defines tools")
        for kind in gating.TURN_KINDS:
            state = getattr(req, f"{kind}_state")
            if state is None:
                continue
            if req.policy is None or req.policy.table(kind) is None:
                raise ValueError(f"a {kind} state needs a policy with {kind} rules")
            want = gating.initial_state(kind, 1, self.sizes)
            if (jax.tree.structure(state) != jax.tree.structure(want)
                    or [np.shape(x) for x in jax.tree.leaves(state)] != [np.shape(x) for x in jax.tree.leaves(want)]):
                raise ValueError(f"the {kind} state does not have the engine's shapes (see gating.initial_state)")
        if any(not 0 <= int(t) < self.cfg.vocab_size for t in req.prompt):
            raise ValueError("the prompt holds token ids outside the vocabulary")
        with self._cv:
            if self._draining:
                raise Draining("the server is shutting down")
            if self._error is not None:
                raise RuntimeError(f"the engine failed: {self._error}")
            busy = len(self._waiting) + sum(s is not None for s in self._slots)
            if busy >= self.config.slots + self.config.max_queue:
                raise QueueFull(self._retry_after_locked())
            req.id = next(self._ids)
            req.submitted = time.monotonic()
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def cancel(self, req: EngineRequest) -> None:
        """Abandons a request (its client went away): it leaves the queue or its slot at the next iteration."""
        with self._cv:
            if req.cancelled:
                return
            req.cancelled = True
            self._cancels.add(req.id)
            self._cv.notify_all()

    def _retry_after_locked(self) -> int:
        ahead = len(self._waiting) + 1
        return max(1, math.ceil(self._avg_latency * ahead / self.config.slots))

    # ---------------------------------------------------------------------------------------------- statistics

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def tokens_per_second(self) -> float:
        return self._rate

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    @staticmethod
    def compile_counts() -> dict[str, int]:
        """How many programs each compiled piece holds (the same after a warm-up: nothing recompiles)."""
        return {name: fn._cache_size() for name, fn in
                (("insert", _insert), ("prefill_piece", _prefill_piece), ("chunk", _chunk),
                 ("spec_chunk", _spec_chunk), ("take_row", _take_row), ("stop_rows", _stop_rows))}

    def fit_policy(self, policy: gating.SlotPolicy) -> None:
        """Grows the policy envelope to hold `policy` now (before `warmup`), instead of at its first request."""
        self._fit_envelope(policy)

    def reserve(self, *, phrase_factor: int = 2, structure_states: int = 0, structure_edges: int = 0,
                message_tokens: int = 0) -> None:
        """Grows the policy envelope ahead of time (before `warmup`), so that requests adding a few phrases or a
        small structure to the deployment policy do not recompile: the phrase tables' rule and state axes are
        multiplied by `phrase_factor`, their messages get room for `message_tokens` tokens, the structure
        automaton gets room for the given states and edges."""
        if self.gate is None:
            return
        self._set_envelope(gating.reserve(self._env, self.vocab_size, phrase_factor=phrase_factor,
                                          structure_states=structure_states, structure_edges=structure_edges,
                                          message_tokens=message_tokens))

    def step(self) -> None:
        """Runs one engine iteration in the caller's thread (tests and embedders that run no engine thread)."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is running")
        self._iteration()

    @contextlib.contextmanager
    def paused(self):
        """Holds the engine thread between iterations while the block runs (tests, maintenance): requests can
        still be submitted (and queue up, or get QueueFull), none makes progress."""
        with self._hold:
            yield

    def warmup(self, prompt_lengths: Sequence[int] | None = None) -> None:
        """Compiles every piece for every prompt bucket by running throwaway requests (before `start`): the insert
        for every (row bucket, prompt bucket) pair, the piece function, the chunk for every prefix bucket."""
        if self._thread is not None:
            raise RuntimeError("warm up before start()")
        c = self.config
        if prompt_lengths is None:
            prompt_lengths, b = [], c.min_prompt_bucket
            while b <= c.prefill_chunk:
                prompt_lengths.append(b)
                b *= 2
            prompt_lengths.append(c.prefill_chunk + 1)  # a two-piece prompt: compiles the piece function
        warmed = set()  # prompt buckets whose insert is compiled for every row bucket
        for n in prompt_lengths:
            n = min(n, c.max_len - 1)
            T = self._prompt_bucket(n - (n - 1) // c.prefill_chunk * c.prefill_chunk)  # its last piece's bucket
            for rows in ([1] if T in warmed else self._insert_row_buckets()):
                for _ in range(min(rows, c.slots)):  # submitted together: nothing decodes, so one insert takes all
                    self.submit(EngineRequest(prompt=[0] * n, max_new=1, sink=lambda ev: None))
                while self._waiting or any(s is not None for s in self._slots):
                    self._iteration()
            warmed.add(T)
        # the chunk for every prefix bucket, and the cancellation (every slot is free now: they change nothing)
        for rows in self._row_buckets():
            self._state, _ = self._run_chunk(rows, speculate=False)
            if self._speculates(rows):
                self._state, _ = self._run_chunk(rows, speculate=True)
        self._state = _stop_rows(self._state, jnp.zeros((c.slots,), bool))
        jax.block_until_ready(self._state)
        self.generated_tokens = self.prompt_tokens = self.completed = self.chunks = 0
        self.spec_chunks = self.spec_steps = self.spec_drafted = self.spec_accepted = 0

    # ---------------------------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._waiting or self._cancels or any(s is not None for s in self._slots)):
                        if self._stopping:
                            return
                        self._cv.wait(timeout=0.5)
                    if self._stopping:
                        return
                with self._hold:
                    self._iteration()
                with self._cv:
                    self._cv.notify_all()  # wakes drain()
        except BaseException as e:  # the device state is unusable now: fail everything, refuse new work
            log.exception("engine thread failed")
            with self._cv:
                self._error = e
                self._draining = True
                pending = [*self._waiting, *(s.req for s in self._slots if s is not None)]
                self._waiting.clear()
                self._slots = [None] * self.config.slots
                self._cv.notify_all()
            for req in pending:
                _deliver(req, Failed(f"internal engine error: {type(e).__name__}: {e}"))

    def _iteration(self) -> None:
        self._apply_cancels()
        self._admit()
        self._prefill()
        if any(s is not None and s.decoding for s in self._slots):
            self._decode()

    def _apply_cancels(self) -> None:
        with self._cv:
            cancels, self._cancels = self._cancels, set()
            if not cancels:
                return
            dropped = [r for r in self._waiting if r.id in cancels]
            self._waiting = collections.deque(r for r in self._waiting if r.id not in cancels)
        for req in dropped:  # every submitted request gets exactly one final event
            now = time.monotonic()
            _deliver(req, Finished(SlotResult(tokens=[], finish_reason="cancelled", prompt_tokens=len(req.prompt),
                                              queued_s=now - req.submitted, total_s=now - req.submitted)))
        rows = np.zeros((self.config.slots,), bool)
        decoding = []
        for i, s in enumerate(self._slots):
            if s is not None and s.req.id in cancels:
                if s.decoding:  # its row has events and a gate state worth reporting: read them once stopped
                    rows[i] = True
                    decoding.append(i)
                else:
                    self._slots[i] = None
                    self._finish_cancelled(s)
        if rows.any():
            self._state = _stop_rows(self._state, jnp.asarray(rows))
            for i in decoding:
                self._finish(i, self._slots[i], reason="cancelled")

    def _finish_cancelled(self, s: _Slot) -> None:
        now = time.monotonic()
        _deliver(s.req, Finished(SlotResult(
            tokens=list(s.tokens), finish_reason="cancelled", prompt_tokens=len(s.req.prompt),
            gate_state_before=s.state_before, queued_s=s.started - s.req.submitted,
            first_token_s=None if s.first_token is None else s.first_token - s.req.submitted,
            total_s=now - s.req.submitted)))

    def _admit(self) -> None:
        with self._cv:
            for i in range(self.config.slots):
                if not self._waiting:
                    break
                if self._slots[i] is None:
                    req = self._waiting.popleft()
                    self._slots[i] = _Slot(req=req, started=time.monotonic())

    def _prefill(self) -> None:
        """Spends up to `prefill_budget` prompt tokens (no limit while nothing decodes) on whole short prompts and
        pieces of long ones, oldest first. The first operation always runs, so prefill never starves.

        Pieces before a prompt's last run at once (`_prefill_piece`). Last pieces are collected per prompt bucket
        and inserted together, `insert_rows` at a time, oldest group first: one call prefills them all, and a short
        prompt is never padded to a long one's bucket (that would cost more compute than the shared call saves).
        """
        c = self.config
        P = c.prefill_chunk
        budget = c.prefill_budget or P
        if not any(s is not None and s.decoding for s in self._slots):
            budget = 1 << 62  # nothing to stall
        waiting = sorted((i for i, s in enumerate(self._slots) if s is not None and not s.decoding),
                         key=lambda i: self._slots[i].started)
        groups: dict[int, list[tuple[int, _Slot]]] = {}  # prompt bucket -> last pieces, oldest first
        first = True
        for i in waiting:
            s = self._slots[i]
            left = len(s.req.prompt) - s.offset
            while left > P and (first or P <= budget):
                piece = np.asarray(s.req.prompt[s.offset: s.offset + P], np.int32)[None]
                self._state, self._history = _prefill_piece(self.params, self._state, self._history, jnp.int32(i),
                                                            jnp.asarray(piece), jnp.int32(s.offset), cfg=self.cfg)
                s.offset += P
                left -= P
                budget -= P
                first = False
            if left > P or (left > budget and not first):
                break
            first = False
            budget -= left
            T = self._prompt_bucket(left)
            groups.setdefault(T, []).append((i, s))
            if len(groups[T]) == c.insert_rows:
                self._insert(groups.pop(T))
            if budget <= 0:
                break
        for group in groups.values():
            self._insert(group)

    def _prompt_bucket(self, n: int) -> int:
        return min(bucket(n, self.config.min_prompt_bucket), self.config.prefill_chunk)

    def _row_table(self, policy: gating.SlotPolicy | None):
        key = (None if policy is None else policy.policy_hash, self._env.key())
        hit = self._row_tables.get(key)
        if hit is None:
            hit = jax.tree.map(jnp.asarray, gating.row_policy(policy, self._env, self.vocab_size))
            self._row_tables[key] = hit
            while len(self._row_tables) > 32:
                self._row_tables.popitem(last=False)
        else:
            self._row_tables.move_to_end(key)
        return hit

    def _fit_envelope(self, policy: gating.SlotPolicy | None) -> None:
        if policy is None or self.gate is None:
            return
        need = policy.envelope()
        if not self._env.covers(need):
            self._set_envelope(self._env.union(need))

    def _set_envelope(self, env: gating.Envelope) -> None:
        env = gating.complete(env, self.vocab_size)
        if env == self._env:
            return
        self._env = env
        self._table = gating.grow_table(self._table, self._env, self.vocab_size)
        if self.gate is not None and self._env.kinds != self._gate_kinds:  # a gate kind joins the chain
            self._gate_kinds = self._env.kinds
            self.gate = gating.slot_gate(self.vocab_size, self.eos_id, self._env.kinds, self.sizes)
            self._state = self._state.replace(gate_state=gating.grow_state(self._state.gate_state, self._env.kinds,
                                                                           self.config.slots, self.sizes))
        self._row_tables.clear()
        if self._thread is not None:  # serving already: this costs one compilation of every piece
            self.recompiles += 1
            log.info("policy tables grew to %s: the decode step recompiles once", self._env)
        else:
            log.debug("policy tables sized to %s", self._env)

    def _insert(self, group: list[tuple[int, _Slot]]) -> None:
        """Inserts the slots of `group` (their prompts' last pieces share one prompt bucket) in one call."""
        c, B = self.config, self.config.slots
        R = bucket(len(group))
        lefts = [len(s.req.prompt) - s.offset for _, s in group]
        T = self._prompt_bucket(max(lefts))
        # padding rows (see `_insert`): slot B, length 0, greedy, no logprobs
        slots = np.full((R,), B, np.int32)
        tokens = np.zeros((R, T), np.int32)
        n = np.zeros((R,), np.int32)
        offset = np.zeros((R,), np.int32)
        max_new = np.zeros((R,), np.int32)
        stop_arr = np.full((R, c.max_stop_ids), -1, np.int32)
        want = np.zeros((R,), bool)
        sampling = [SamplingConfig()] * R
        for r, ((i, s), left) in enumerate(zip(group, lefts, strict=True)):
            req = s.req
            slots[r], n[r], offset[r], max_new[r] = i, left, s.offset, req.max_new
            tokens[r, :left] = req.prompt[s.offset:]
            stops = self.stop_ids if req.stop_ids is None else tuple(req.stop_ids)
            stop_arr[r, : len(stops)] = stops
            want[r] = req.top_logprobs is not None
            sampling[r] = req.sampling
        row_tables = restore = phrase_state = turn_state = None
        if self.gate is not None:
            reqs = [s.req for _, s in group]
            for req in reqs:  # first: growing the envelope drops every cached row table
                self._fit_envelope(req.policy)
            row_tables = [self._row_table(req.policy) for req in reqs]
            row_tables = tuple(row_tables + row_tables[:1] * (R - len(group)))
            restore = np.zeros((R,), bool)
            restore[: len(group)] = [req.phrase_state is not None for req in reqs]
            phrase_state = _stack_rows([gating.initial_phrase_state(1) if req.phrase_state is None
                                        else req.phrase_state for req in reqs], R, gating.initial_phrase_state(1))
            turn_state = tuple(self._turn_rows(kind, reqs, R) for kind in gating.TURN_KINDS)
        self._state, self._table, self._history, packed, before = _insert(
            self.params, self._state, self._table, self._history, jnp.asarray(slots), jnp.asarray(tokens),
            jnp.asarray(n), jnp.asarray(offset), SamplingParams.from_configs(sampling), jnp.asarray(max_new),
            jnp.asarray(stop_arr), restore, phrase_state, turn_state, row_tables, jnp.asarray(want), cfg=self.cfg,
            gate=self.gate)
        packed, before = jax.device_get((packed, before))
        now = time.monotonic()
        for r, (i, s) in enumerate(group):
            req = s.req
            first, n_out, done, _ = (int(x) for x in packed[r, :4])
            s.state_before = None if before is None else jax.tree.map(lambda x, r=r: x[r: r + 1], before)
            s.offset = len(req.prompt)
            s.decoding = True
            self.prompt_tokens += len(req.prompt)
            if n_out:
                s.first_token = now
                self._emit(s, [first], self._logprobs(req, packed[r, 4:], 1))
            if done:
                self._finish(i, s)

    def _turn_rows(self, kind: str, reqs: list[EngineRequest], rows: int):
        """The requests' states of one turn kind stacked into `rows` rows (neutral states for requests that bring
        none, and for the padding rows); `()` when the kind is not in the chain."""
        if kind not in self._env.kinds:
            return ()
        pad = gating.initial_state(kind, 1, self.sizes)
        field = f"{kind}_state"
        return _stack_rows([pad if getattr(r, field) is None else getattr(r, field) for r in reqs], rows, pad)

    def _speculates(self, rows: int) -> bool:
        """Whether a decode chunk over `rows` slots can speculate (a compiled speculative chunk exists for it)."""
        return self._drafter is not None and rows <= self.config.speculative_rows

    def _worth_speculating(self, rows: int) -> bool:
        """Whether the next chunk over `rows` slots speculates: it can, and the decoding slots' recent yield (or
        a probe, every `speculative_probe` plain chunks) says it pays."""
        if not self._speculates(rows):
            return False
        c = self.config
        yields = [self._recent_yield if s.spec_yield is None else s.spec_yield
                  for s in self._slots[:rows] if s is not None and s.decoding]
        if any(y is None for y in yields) or sum(yields) >= c.speculative_min_tokens * len(yields):
            return True
        self._plain_since_spec += 1
        if self._plain_since_spec > c.speculative_probe:
            self._plain_since_spec = 0
            return True
        return False

    def _run_chunk(self, rows: int, *, speculate: bool):
        """One decode chunk over the first `rows` slots: (state, packed) from `_chunk` or `_spec_chunk`."""
        c = self.config
        if speculate:
            return _spec_chunk(self.params, self._dparams, self._state, self._table, self._history, cfg=self.cfg,
                               gate=self.gate, n_steps=c.chunk_steps, rows=rows, drafter=self._drafter, k=c.draft_k)
        return _chunk(self.params, self._state, self._table, cfg=self.cfg, gate=self.gate, n_steps=c.chunk_steps,
                      rows=rows)

    def _decode(self) -> None:
        t0 = time.monotonic()
        last = max(i for i, s in enumerate(self._slots) if s is not None and s.decoding)
        rows = self._rows_for(last + 1)
        speculate = self._worth_speculating(rows)
        self._state, packed = self._run_chunk(rows, speculate=speculate)
        packed = np.asarray(packed)
        # packed rows: W token columns, n_out, done, finish, (speculating: steps, drafted, accepted), logprobs
        W = self.config.chunk_steps * ((self.config.draft_k + 1) if speculate else 1)
        lp_col = W + (6 if speculate else 3)
        now = time.monotonic()
        produced = 0
        for i, s in enumerate(self._slots[: packed.shape[0]]):
            if s is None or not s.decoding:
                continue
            new = [int(t) for t in packed[i, :W] if t >= 0]
            produced += len(new)
            if speculate:
                steps = int(packed[i, W + 3])
                self.spec_steps += steps
                self.spec_drafted += int(packed[i, W + 4])
                self.spec_accepted += int(packed[i, W + 5])
                if steps:
                    y = len(new) / steps
                    s.spec_yield = y if s.spec_yield is None else 0.5 * s.spec_yield + 0.5 * y
                    r = self._recent_yield
                    self._recent_yield = y if r is None else 0.8 * r + 0.2 * y
            if new:
                if s.first_token is None:
                    s.first_token = now
                self._emit(s, new, self._logprobs(s.req, packed[i, lp_col:], W, len(new)))
            if packed[i, W + 1]:
                self._finish(i, s)
        self.chunks += 1
        self.spec_chunks += speculate
        dt = max(now - t0, 1e-6)
        self._rate = 0.8 * self._rate + 0.2 * (produced / dt) if self.chunks > 1 else produced / dt

    def _rows_for(self, n: int) -> int:
        """The prefix bucket that holds the first n slots: a power of two >= min_active_slots, at most B."""
        B = self.config.slots
        return min(B, bucket(n, min(self.config.min_active_slots, B)))

    def _insert_row_buckets(self) -> list[int]:
        """The inserts' row buckets: powers of two up to insert_rows, and no larger than a group of every slot."""
        most = min(self.config.insert_rows, bucket(self.config.slots))
        return [1 << k for k in range(most.bit_length())]

    def _row_buckets(self) -> list[int]:
        out, n = [], 1
        while True:
            r = self._rows_for(n)
            if not out or r != out[-1]:
                out.append(r)
            if r >= self.config.slots:
                return out
            n = r + 1

    def _logprobs(self, req: EngineRequest, row: np.ndarray, n: int, used: int | None = None) -> tuple | None:
        """A request's log-probabilities from a packed row (n steps packed, the first `used` of them real)."""
        if req.top_logprobs is None:
            return None
        return _unpack_logprobs(row, n, self.config.max_top_logprobs, req.top_logprobs)[:used]

    def _emit(self, s: _Slot, tokens: list[int], logprobs: tuple | None = None) -> None:
        s.tokens.extend(tokens)
        s.seen += len(tokens)
        self.generated_tokens += len(tokens)
        _deliver(s.req, Tokens(tokens, logprobs))

    def _finish(self, i: int, s: _Slot, reason: str | None = None) -> None:
        out, n_out, finish, verdict, rule, conf, ev, gate_state, lp = jax.device_get(
            _take_row(self._state, jnp.int32(i)))
        n = int(n_out[0])
        tokens = [int(t) for t in out[0, :n]]
        if tokens[: len(s.tokens)] != s.tokens:  # the streamed tokens are the row's output, always
            raise AssertionError(f"slot {i}: streamed tokens diverge from the output buffer")
        if len(tokens) > len(s.tokens):
            rest = None
            if lp is not None and s.req.top_logprobs is not None:
                rest = logprob_entries(lp.token[0], lp.top_ids[0, :, : s.req.top_logprobs],
                                       lp.top[0, :, : s.req.top_logprobs], n)[len(s.tokens):]
            self._emit(s, tokens[len(s.tokens):], rest)
        events = ()
        if ev is not None:
            events = tuple(
                GateEvent(step=int(ev.step[0, j]), kind=EVENT_NAMES[int(ev.kind[0, j])], token=int(ev.token[0, j]),
                          emitted=int(ev.emitted[0, j]), rule=int(ev.rule[0, j]), verdict=int(ev.verdict[0, j]),
                          entropy=float(ev.entropy[0, j]), mass=float(ev.mass[0, j]))
                for j in range(int(ev.n[0])))
        now = time.monotonic()
        total = now - s.req.submitted
        result = SlotResult(
            tokens=tokens, finish_reason=reason or FINISH_NAMES[int(finish[0])] or "length",
            prompt_tokens=len(s.req.prompt),
            verdict=int(verdict[0]), rule=int(rule[0]), confidence=float(conf[0]), events=events,
            gate_state=gate_state, gate_state_before=s.state_before, queued_s=s.started - s.req.submitted,
            first_token_s=None if s.first_token is None else s.first_token - s.req.submitted, total_s=total)
        self._slots[i] = None
        self.completed += 1
        self._avg_latency = 0.8 * self._avg_latency + 0.2 * total
        _deliver(s.req, Finished(result))


def _stack_rows(states: list, rows: int, pad) -> Any:
    """Concatenates per-request states (numpy pytrees, leading axis 1) into `rows` rows, padded with `pad`."""
    states = [*states, *[pad] * (rows - len(states))]
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *states)


def _deliver(req: EngineRequest, event: Event) -> None:
    try:
        req.sink(event)
    except Exception:  # a consumer that went away must not take the engine down
        log.exception("request %s: sink failed", req.id)
