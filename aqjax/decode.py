"""The jit-compiled decode loop: prefill, then decode steps that never talk to the host.

`start` prefills a batch of ragged prompts and samples each row's first token; `decode_chunk` runs a fixed
number of steps with `lax.scan` (one compiled call per chunk, so callers can stream); `decode_until_done`
runs a `lax.while_loop` until every row has stopped. Everything the loop needs is in `DecodeState`: the KV
cache, the last tokens, the per-row sampling parameters and keys, done flags, the output buffer, and a
per-row `extra` slot whose contents a `StepHook` (the admissibility gate) owns.

A row stops when it samples one of its stop ids (not written to the output), when it has produced its
`max_new` tokens, or when its cache is full. Stopped rows keep riding along in the batch (shapes are
static), but their cache lengths and outputs no longer change.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from aqjax.cache import KVCache
from aqjax.sampling import SamplingParams, sample
from models.config import LlamaConfig
from models.llama import forward, logits_from_hidden
from models.params import Params

# finish reasons (per row)
RUNNING, FINISH_STOP, FINISH_LENGTH, FINISH_HOOK = 0, 1, 2, 3


class StepHook(NamedTuple):
    """The loop's extension point, where the admissibility gate plugs in.

    Both functions are pure and see one row at a time plus a leading batch axis on every array:
      process(extra, logits, step) -> (logits, stop): the logits to sample from (-inf = inadmissible) and a
        Bool[B] that ends the row *before* this step's token is sampled;
      advance(extra, token, emitted) -> extra: the state after the row emitted `token` (`emitted` False
        means the row had already stopped and its state must not change).
    """

    process: Callable[[Any, Float[Array, "B V"], Int[Array, ""]], tuple[Float[Array, "B V"], Bool[Array, "B"]]]
    advance: Callable[[Any, Int[Array, "B"], Bool[Array, "B"]], Any]


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries.

    Attributes:
      cache: the KV cache (lengths count the tokens whose keys are cached).
      last: Int[B] the most recent token of each row (the next step's input).
      done: Bool[B] rows that have stopped.
      finish: Int[B] why a row stopped (RUNNING, FINISH_STOP, FINISH_LENGTH, FINISH_HOOK).
      out: Int[B, M] generated tokens, -1 beyond n_out.
      n_out: Int[B] tokens written to `out` per row.
      max_new: Int[B] per-row limit on generated tokens (<= M).
      stop_ids: Int[B, NS] per-row stop tokens, padded with -1.
      sampling: per-row sampling parameters and keys.
      step: Int[] decode steps taken by the batch.
      extra: per-row state owned by the step hook (a pytree with leading axis B, or None).
    """

    cache: KVCache
    last: Int[Array, "B"]
    done: Bool[Array, "B"]
    finish: Int[Array, "B"]
    out: Int[Array, "B M"]
    n_out: Int[Array, "B"]
    max_new: Int[Array, "B"]
    stop_ids: Int[Array, "B NS"]
    sampling: SamplingParams
    step: Int[Array, ""]
    extra: Any = None


def _emit(state: DecodeState, logits: Float[Array, "B V"], hook: StepHook | None) -> DecodeState:
    """Samples a token per running row from `logits`, records it and updates the stop flags."""
    B, M = state.out.shape
    stop_by_hook = jnp.zeros((B,), bool)
    extra = state.extra
    if hook is not None:
        logits, stop_by_hook = hook.process(extra, logits, state.step)
    # A row whose admissible set is empty must not sample from garbage: the hook stops it instead.
    stop_by_hook = stop_by_hook | ~jnp.any(jnp.isfinite(logits), axis=-1)
    logits = jnp.where(jnp.isfinite(logits).any(-1, keepdims=True), logits, 0.0)
    token = sample(logits, state.sampling, state.n_out)
    running = ~state.done
    hook_stop = running & stop_by_hook
    is_stop = running & ~hook_stop & jnp.any(token[:, None] == state.stop_ids, axis=-1)
    emitted = running & ~hook_stop & ~is_stop
    rows = jnp.arange(B)
    out = state.out.at[rows, jnp.where(emitted, state.n_out, M)].set(token, mode="drop")
    n_out = state.n_out + emitted
    # The emitted token is fed next step at position `lengths`, which must exist.
    cache_full = state.cache.lengths >= state.cache.max_len
    at_limit = emitted & ((n_out >= state.max_new) | cache_full)
    finish = jnp.where(hook_stop, FINISH_HOOK, state.finish)
    finish = jnp.where(is_stop, FINISH_STOP, finish)
    finish = jnp.where(at_limit, FINISH_LENGTH, finish)
    if hook is not None:
        extra = hook.advance(extra, token, emitted)
    return state.replace(
        last=jnp.where(emitted, token, state.last),
        done=state.done | hook_stop | is_stop | at_limit,
        finish=finish,
        out=out,
        n_out=n_out,
        step=state.step + 1,
        extra=extra,
    )


def start(
    params: Params,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, "B"],
    cache: KVCache,
    sampling: SamplingParams,
    max_new: Int[Array, "B"],
    stop_ids: Int[Array, "B NS"],
    out_len: int,
    extra: Any = None,
    *,
    cfg: LlamaConfig,
    hook: StepHook | None = None,
) -> DecodeState:
    """Prefills ragged prompts (right-padded to T) and samples each row's first token.

    Rows with length 0 are inactive (already done). `cache` is donated when called through `jit_start`.
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
        extra=extra,
    )
    # max_new == 0 ends a row before it samples anything.
    state = state.replace(done=state.done | (state.max_new <= 0),
                          finish=jnp.where(active & (state.max_new <= 0), FINISH_LENGTH, state.finish))
    return _emit(state, logits, hook)


def decode_step(params: Params, state: DecodeState, *, cfg: LlamaConfig, hook: StepHook | None = None) -> DecodeState:
    """One decode step for every row: feed the last token, sample the next (stopped rows stay put)."""
    running = ~state.done
    h, cache = forward(params, state.last[:, None], state.cache, cfg=cfg, n_new=running.astype(jnp.int32))
    logits = logits_from_hidden(params, h[:, 0], cfg=cfg)
    return _emit(state.replace(cache=cache), logits, hook)


def decode_chunk(
    params: Params, state: DecodeState, *, cfg: LlamaConfig, n_steps: int, hook: StepHook | None = None
) -> DecodeState:
    """Runs exactly `n_steps` decode steps (a streaming chunk); steps after every row stopped are no-ops."""

    def body(s, _):
        s = lax.cond(jnp.all(s.done), lambda s: s, lambda s: decode_step(params, s, cfg=cfg, hook=hook), s)
        return s, None

    state, _ = lax.scan(body, state, None, length=n_steps)
    return state


def decode_until_done(
    params: Params, state: DecodeState, *, cfg: LlamaConfig, hook: StepHook | None = None
) -> DecodeState:
    """Decodes until every row has stopped."""
    return lax.while_loop(
        lambda s: ~jnp.all(s.done), lambda s: decode_step(params, s, cfg=cfg, hook=hook), state
    )


# Compiled entry points. The cache / state is donated so XLA reuses its buffers in place.
jit_start = jax.jit(start, static_argnames=("out_len", "cfg", "hook"), donate_argnames=("cache",))
jit_decode_chunk = jax.jit(decode_chunk, static_argnames=("cfg", "n_steps", "hook"), donate_argnames=("state",))
jit_decode_until_done = jax.jit(decode_until_done, static_argnames=("cfg", "hook"), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def score(params: Params, tokens: Int[Array, "B T"], *, cfg: LlamaConfig) -> Float[Array, "B T V"]:
    """Teacher-forced logits of whole sequences (a fresh cache of length T)."""
    B, T = tokens.shape
    cache = KVCache.init(cfg, B, T, params["embed"].dtype)
    h, _ = forward(params, tokens, cache, cfg=cfg)
    return logits_from_hidden(params, h, cfg=cfg)
