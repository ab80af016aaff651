"""Host-side driver of the compiled decode loop: bucketing, streaming and results.

The host turns requests into arrays once, pads them into shape buckets (powers of two for the batch, the
prompt length and the output length), and then only calls compiled functions: one `start`, and either
one `decode_until_done` or one `decode_chunk` per streamed chunk. A second request of a known bucket never
recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aqjax import decode as _decode
from aqjax.cache import KVCache
from aqjax.sampling import SamplingConfig, SamplingParams
from models.config import LlamaConfig
from models.params import Params, compute_params

FINISH_NAMES = {
    _decode.RUNNING: None,
    _decode.FINISH_STOP: "stop",
    _decode.FINISH_LENGTH: "length",
    _decode.FINISH_GATE: "gate",
}


class RequestError(ValueError):
    """A generation request that cannot be served (empty prompt, too long for the context, ...)."""


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class GateEvent:
    """One step where the gate acted (see aqjax.decode.EventLog)."""

    step: int
    kind: str
    token: int
    emitted: int
    rule: int
    verdict: int
    entropy: float
    mass: float


EVENT_NAMES = {_decode.EVENT_BLOCK: "block", _decode.EVENT_FORCE: "force", _decode.EVENT_REWRITE: "rewrite",
               _decode.EVENT_STOP: "stop", _decode.EVENT_VERDICT: "verdict"}


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]
    finish_reason: str | None
    prompt_tokens: int
    verdict: int = 0
    rule: int = -1
    confidence: float = 1.0
    events: tuple[GateEvent, ...] = ()
    # per token (with `top_logprobs`): (logprob, ((id, logprob), ...) most likely first), under the gate's mask
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None


def logprob_entries(token, top_ids, top, n: int):
    """One row's first `n` entries of a `LogprobLog` (numpy) as (logprob, ((id, logprob), ...)) per token."""
    return tuple((float(token[j]), tuple((int(t), float(v)) for t, v in zip(top_ids[j], top[j], strict=True) if t >= 0))
                 for j in range(n))


class Generator:
    """Runs batched generation for one model.

    Args:
      cfg: the model config.
      params: params in either layout (models/params.py); canonical ones are packed into the compute layout
        once.
      stop_ids: default stop tokens (e.g. the tokenizer's eos and end-of-turn ids); None means the config's
        eos id, an empty sequence means none.
      chunk_size: decode steps per compiled call when streaming.
      min_prompt_bucket: smallest prompt-length bucket (avoids many tiny buckets).
      unroll_layers: run the layers unrolled over per-layer weight buffers (`models.params.compute_params`);
        None: on CPU only, where it makes a batch-1 decode step ~30% faster and each compile ~2 s longer.
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        params: Params,
        *,
        stop_ids: Sequence[int] | None = None,
        chunk_size: int = 16,
        min_prompt_bucket: int = 16,
        packed: bool | None = None,
        unroll_layers: bool | None = None,
    ):
        self.cfg = cfg
        self.params = compute_params(params, cfg, packed=packed, unroll=unroll_layers)
        self.dtype = self.params["embed"].dtype
        if stop_ids is None:
            stop_ids = (cfg.eos_id,) if cfg.eos_id >= 0 else ()
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.chunk_size = int(chunk_size)
        self.min_prompt_bucket = int(min_prompt_bucket)

    # -- request preparation -------------------------------------------------------------------------------

    def _prepare(self, prompts, sampling, max_new_tokens, stop_ids, gate_state):
        if not prompts:
            raise RequestError("no prompts given")
        n = len(prompts)
        lengths = [len(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise RequestError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise RequestError(f"prompt {i} holds token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
        max_new = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        if len(max_new) != n or any((not isinstance(m, int)) or m < 0 for m in max_new):
            raise RequestError(f"max_new_tokens must be one non-negative int or one per prompt, got {max_new_tokens!r}")
        for i, (ln, m) in enumerate(zip(lengths, max_new)):
            if ln + m > self.cfg.max_seq_len:
                raise RequestError(
                    f"prompt {i}: {ln} prompt tokens + {m} new tokens exceed the context of {self.cfg.max_seq_len}"
                )
        configs = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or SamplingConfig()] * n
        if len(configs) != n:
            raise RequestError(f"{len(configs)} sampling configs for {n} prompts")

        B = bucket(n)
        T = bucket(max(lengths), self.min_prompt_bucket)
        M = bucket(max(max_new), 16)
        tokens = np.zeros((B, T), np.int32)
        lens = np.zeros((B,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lens[i] = len(p)
        stops = list(self.stop_ids if stop_ids is None else stop_ids)
        stop_arr = np.full((B, max(1, len(stops))), -1, np.int32)
        stop_arr[:, : len(stops)] = stops
        max_arr = np.zeros((B,), np.int32)
        max_arr[:n] = max_new
        configs = configs + [SamplingConfig()] * (B - n)
        if gate_state is not None and B > n:
            # padding rows are inactive; give them a copy of row 0's state so shapes match
            gate_state = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], B - n, axis=0)]), gate_state)
        cache = KVCache.init(self.cfg, B, T + M, self.dtype)
        return n, (jnp.asarray(tokens), jnp.asarray(lens), cache, SamplingParams.from_configs(configs),
                   jnp.asarray(max_arr), jnp.asarray(stop_arr), M, gate_state)

    def start(self, prompts, sampling=None, max_new_tokens=128, stop_ids=None, *, gate=None, policy=None,
              gate_state: Any = None, top_logprobs: int | None = None, keep_hidden: bool = False):
        """Prefills and samples the first token; returns (n_real_rows, DecodeState).

        With a gate (`gate.core.Gate`) and its compiled `policy` arrays, every token is gated; `gate_state`
        (leading axis = number of prompts) restores the rows' state from an earlier turn. `top_logprobs` (None:
        off) records every emitted token's log-probability and that many alternatives (see `decode.LogprobLog`).
        `keep_hidden` carries the target's last hidden state (`DecodeState.last_h`, for the feature drafter).
        """
        if top_logprobs is not None and (not isinstance(top_logprobs, int) or top_logprobs < 0):
            raise RequestError(f"top_logprobs must be None or a non-negative int, got {top_logprobs!r}")
        if top_logprobs is not None and top_logprobs > self.cfg.vocab_size:
            raise RequestError(f"top_logprobs={top_logprobs} exceeds the vocabulary of {self.cfg.vocab_size}")
        n, (tokens, lens, cache, sp, max_arr, stop_arr, M, gate_state) = self._prepare(
            prompts, sampling, max_new_tokens, stop_ids, gate_state
        )
        state = _decode.jit_start(self.params, tokens, lens, cache, sp, max_arr, stop_arr, M, gate_state, policy,
                                  cfg=self.cfg, gate=gate, top_logprobs=top_logprobs,
                                  keep_hidden=keep_hidden)
        return n, state

    # -- running -------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
        max_new_tokens: int | Sequence[int] = 128,
        stop_ids: Sequence[int] | None = None,
        *,
        gate=None,
        policy: Any = None,
        gate_state: Any = None,
        return_state: bool = False,
        top_logprobs: int | None = None,
    ):
        """Generates to completion with one compiled while-loop after the prefill.

        Returns the results, or (results, final DecodeState) with return_state (for the gate state/audit).
        With `top_logprobs` (None: off), each result's `logprobs` holds every token's log-probability under the
        gate's mask and its `top_logprobs` most likely admissible alternatives.
        """
        n, state = self.start(prompts, sampling, max_new_tokens, stop_ids, gate=gate, policy=policy,
                              gate_state=gate_state, top_logprobs=top_logprobs)
        state = _decode.jit_decode_until_done(self.params, state, policy, cfg=self.cfg, gate=gate)
        results = self.results(state, n, [len(p) for p in prompts])
        return (results, state) if return_state else results

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
        max_new_tokens: int | Sequence[int] = 128,
        stop_ids: Sequence[int] | None = None,
        *,
        gate=None,
        policy: Any = None,
        gate_state: Any = None,
        chunk_size: int | None = None,
        top_logprobs: int | None = None,
    ) -> Iterator[tuple[list[list[int]], Any]]:
        """Yields (new tokens per row, state) after the prefill and after every compiled chunk of steps.

        With `top_logprobs`, the new tokens' log-probabilities are in `state.logprobs` (or `results(state, ...)`).
        """
        n, state = self.start(prompts, sampling, max_new_tokens, stop_ids, gate=gate, policy=policy,
                              gate_state=gate_state, top_logprobs=top_logprobs)
        chunk = chunk_size or self.chunk_size
        seen = [0] * n
        while True:
            out, n_out, done = jax.device_get((state.out, state.n_out, state.done))
            new = []
            for i in range(n):
                new.append([int(t) for t in out[i, seen[i]: n_out[i]]])
                seen[i] = int(n_out[i])
            yield new, state
            if bool(np.all(done)):
                return
            state = _decode.jit_decode_chunk(self.params, state, policy, cfg=self.cfg, n_steps=chunk, gate=gate)

    def results(self, state, n: int, prompt_lengths: Sequence[int]) -> list[GenerationResult]:
        out, n_out, finish, verdict, rule, conf, ev, lp = jax.device_get(
            (state.out, state.n_out, state.finish, state.verdict, state.rule, state.confidence, state.events,
             state.logprobs))
        results = []
        for i in range(n):
            events = ()
            if ev is not None:
                events = tuple(
                    GateEvent(step=int(ev.step[i, j]), kind=EVENT_NAMES[int(ev.kind[i, j])], token=int(ev.token[i, j]),
                              emitted=int(ev.emitted[i, j]), rule=int(ev.rule[i, j]), verdict=int(ev.verdict[i, j]),
                              entropy=float(ev.entropy[i, j]), mass=float(ev.mass[i, j]))
                    for j in range(int(ev.n[i])))
            results.append(GenerationResult(
                tokens=[int(t) for t in out[i, : n_out[i]]], finish_reason=FINISH_NAMES[int(finish[i])],
                prompt_tokens=int(prompt_lengths[i]), verdict=int(verdict[i]), rule=int(rule[i]),
                confidence=float(conf[i]), events=events,
                logprobs=None if lp is None else logprob_entries(lp.token[i], lp.top_ids[i], lp.top[i], int(n_out[i]))))
        return results
