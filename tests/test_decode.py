"""The compiled decode loop on a tiny random model: invariants, stopping, streaming, the hook slot, retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqjax import decode
from aqjax.engine import Generator, RequestError, bucket
from aqjax.sampling import SamplingConfig
from models.config import tiny_config
from models.params import init_params

CFG = tiny_config(max_seq_len=256)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 40))]


@pytest.fixture(scope="module")
def gen():
    return Generator(CFG, init_params(CFG, jax.random.key(0)), stop_ids=[])


def test_greedy_generation_equals_teacher_forced_argmax(gen):
    res = gen.generate(PROMPTS, max_new_tokens=12)
    for prompt, r in zip(PROMPTS, res):
        assert len(r.tokens) == 12 and r.finish_reason == "length"
        logits = decode.score(gen.params, jnp.asarray([prompt + r.tokens]), cfg=CFG)
        tf = np.asarray(logits[0].argmax(-1))[len(prompt) - 1:-1]
        np.testing.assert_array_equal(tf, r.tokens)


def test_prompt_alone_equals_prompt_in_ragged_batch(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        assert gen.generate([p], max_new_tokens=10)[0].tokens == batch[i].tokens
    # sampled rows too: a row's draws depend only on its seed
    cfgs = [SamplingConfig(temperature=1.0, seed=s) for s in (1, 2, 3)]
    sampled = gen.generate(PROMPTS, cfgs, max_new_tokens=10)
    assert gen.generate([PROMPTS[1]], cfgs[1], max_new_tokens=10)[0].tokens == sampled[1].tokens


def test_streaming_chunks_equal_one_shot_generation(gen):
    cfgs = [SamplingConfig(temperature=0.8, top_p=0.9, seed=s) for s in range(3)]
    one_shot = gen.generate(PROMPTS, cfgs, max_new_tokens=[7, 12, 3])
    streamed = [[] for _ in PROMPTS]
    for new, _ in gen.stream(PROMPTS, cfgs, max_new_tokens=[7, 12, 3], chunk_size=5):
        for i, toks in enumerate(new):
            streamed[i] += toks
    assert streamed == [r.tokens for r in one_shot]
    assert [len(r.tokens) for r in one_shot] == [7, 12, 3]


def test_stop_tokens_end_rows_and_are_not_emitted(gen):
    free = gen.generate(PROMPTS, max_new_tokens=12)
    stop = free[0].tokens[4]
    first = free[0].tokens.index(stop)
    res = gen.generate(PROMPTS, max_new_tokens=12, stop_ids=[stop])
    assert res[0].tokens == free[0].tokens[:first] and res[0].finish_reason == "stop"
    for f, r in zip(free[1:], res[1:]):
        cut = f.tokens.index(stop) if stop in f.tokens else len(f.tokens)
        assert r.tokens == f.tokens[:cut]


def test_zero_max_tokens_and_request_errors(gen):
    r = gen.generate([PROMPTS[0]], max_new_tokens=0)[0]
    assert r.tokens == [] and r.finish_reason == "length"
    with pytest.raises(RequestError, match="prompt 1 is empty"):
        gen.generate([[1, 2], []])
    with pytest.raises(RequestError, match="exceed the context of 256"):
        gen.generate([[1] * 200], max_new_tokens=100)
    with pytest.raises(RequestError, match="outside"):
        gen.generate([[1, CFG.vocab_size]])


def _ban_hook(banned: int):
    def process(extra, logits, step):
        return logits.at[:, banned].set(-jnp.inf), jnp.zeros(logits.shape[0], bool)

    def advance(extra, token, emitted):
        # the extra slot counts emitted tokens per row, to show it is carried and frozen once a row stops
        return extra + emitted.astype(extra.dtype)

    return decode.StepHook(process, advance)


def test_hook_masks_tokens_and_carries_per_row_state(gen):
    free = gen.generate(PROMPTS, max_new_tokens=12)
    banned = free[0].tokens[0]
    hook = _ban_hook(banned)
    n, state = gen.start(PROMPTS, max_new_tokens=12, extra=jnp.zeros(3, jnp.int32), hook=hook)
    state = decode.jit_decode_until_done(gen.params, state, cfg=CFG, hook=hook)
    res = gen.results(state, n, [len(p) for p in PROMPTS])
    assert all(banned not in r.tokens for r in res)
    assert res[0].tokens[0] != banned
    # extra was padded to the batch bucket (4 rows); each real row counted exactly its emitted tokens
    np.testing.assert_array_equal(np.asarray(state.extra)[:3], [len(r.tokens) for r in res])


def test_empty_admissible_set_stops_cleanly(gen):
    def process(extra, logits, step):
        # everything inadmissible from the 3rd step on
        return jnp.where(step >= 2, -jnp.inf, logits), jnp.zeros(logits.shape[0], bool)

    hook = decode.StepHook(process, lambda e, t, m: e)
    res = gen.generate(PROMPTS, max_new_tokens=12, hook=hook)
    for r in res:
        assert len(r.tokens) == 2 and r.finish_reason == "gate"
        assert all(0 <= t < CFG.vocab_size for t in r.tokens)


def test_known_bucket_never_recompiles(gen):
    gen.generate([[1, 2, 3]], max_new_tokens=5)
    sizes = (decode.jit_start._cache_size(), decode.jit_decode_until_done._cache_size())
    # different lengths, contents and sampling settings within the same buckets
    gen.generate([[4, 5, 6, 7, 8, 9]], SamplingConfig(temperature=0.7, top_k=5, seed=3), max_new_tokens=9)
    assert (decode.jit_start._cache_size(), decode.jit_decode_until_done._cache_size()) == sizes
    assert bucket(3) == 4 and bucket(17, 16) == 32 and bucket(1, 16) == 16


def test_decode_step_traces_once():
    cfg = CFG
    g = Generator(cfg, init_params(cfg, jax.random.key(1)), stop_ids=[])
    step = jax.jit(chex.assert_max_traces(decode.decode_step, n=1), static_argnames=("cfg", "hook"))
    for prompt in ([1, 2, 3], [9, 8, 7, 6]):
        _, state = g.start([prompt], max_new_tokens=4)
        for _ in range(3):
            state = step(g.params, state, cfg=cfg)
    chex.clear_trace_counter()
