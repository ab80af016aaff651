"""One entry point for loading a model and its tokenizer from any supported source.

`load_model(path)` dispatches on what `path` is:

    None                                  the default model (SmolLM2-135M-Instruct Q4_1), downloaded if needed
    a .gguf file (or any GGUF-magic file)  models.gguf.load_gguf, tokenizer from the GGUF metadata
    a dir with aqjax_model.json           models.convert.load_orbax, tokenizer from the manifest
    a dir with config.json                models.safetensors.load_hf_dir, tokenizer from the HF files (if any)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from models.config import LlamaConfig
from models.errors import ModelFileError
from models.params import Params, is_packed, pack_params


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to run.

    Attributes:
      cfg: the static model config.
      params: the params pytree (see models/params.py), jax arrays, in the compute layout when `packed`.
      tokenizer: a `models.tokenizer.Tokenizer`, or None when the source carries no tokenizer.
      source: the path it was loaded from.
    """

    cfg: LlamaConfig
    params: Params
    tokenizer: Any
    source: str
    packed: bool = False


def _is_gguf(path: pathlib.Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_model(path: str | os.PathLike | None = None, dtype=jnp.float32, *, packed: bool = False) -> LoadedModel:
    """Loads config, params (in `dtype`) and tokenizer from `path` (see the module docstring for the cases).

    With `packed`, params come in the compute layout (`models.params.pack_params`) that `aqjax.engine.Generator`
    runs on: an aqjax checkpoint stores that layout, so it is restored as is; other sources are packed here.

    Raises:
      ModelFileError: `path` is missing, of an unknown kind, or corrupt.
    """
    if path is None:
        from models.download import default_model_path

        path = default_model_path()
    p = pathlib.Path(path)
    if p.is_file() and _is_gguf(p):
        from models.gguf import load_gguf_file, open_gguf
        from models.tokenizer import Tokenizer

        with open_gguf(p) as f:
            cfg, params = load_gguf_file(f, dtype)
            tok = Tokenizer.from_gguf_metadata(f.metadata)
    elif p.is_dir() and (p / "aqjax_model.json").is_file():
        from models.convert import load_orbax, manifest_tokenizer, read_manifest

        cfg, params = load_orbax(p, dtype, packed=packed)
        tok = manifest_tokenizer(p, read_manifest(p))
    elif p.is_dir() and (p / "config.json").is_file():
        from models.convert import HF_TOKENIZER_FILES
        from models.safetensors import load_hf_dir
        from models.tokenizer import Tokenizer

        cfg, params = load_hf_dir(p, dtype)
        tok = Tokenizer.from_hf_dir(p) if any((p / n).is_file() for n in HF_TOKENIZER_FILES) else None
    elif not p.exists():
        raise ModelFileError(p, "not found")
    else:
        raise ModelFileError(
            p,
            "not a model: expected a .gguf file, an aqjax checkpoint dir (aqjax_model.json) or an HF checkpoint "
            "dir (config.json + *.safetensors)",
        )
    if packed and not is_packed(params):
        params = jax.tree.map(jnp.asarray, pack_params(params, cfg))
    return LoadedModel(cfg=cfg, params=params, tokenizer=tok, source=str(p), packed=packed)
