"""Converts a GGUF file or an HF checkpoint dir into an aqjax checkpoint dir (orbax params + a JSON manifest).

    python -m models.convert SRC DST [--dtype float32|bfloat16] [--force]

An aqjax checkpoint dir holds:

    DST/params/             the params pytree in the compute layout (`models.params.pack_params`: fused QKV
                            and gate/up, what the decoder runs on), saved with orbax
    DST/tokenizer.json      the tokenizer's HF-native JSON (parsed by the Rust library only: fast to load)
    DST/aqjax_model.json    {"format", "config": LlamaConfig dict, "dtype", "layout": "packed",
                             "source": {path, kind, sha256},
                             "tokenizer": the aqjax settings around it (Tokenizer.to_parts()[1]), or null
                             when the source has none}

The manifest is written last, so its presence marks a complete checkpoint (`models.loader` dispatches on it).
Loading it skips dequantization and, as the params are stored in the compute layout, packing too: with
`load_orbax(dir, packed=True)` (what the CLI and the server do) orbax restores straight into the device arrays
the engine runs on (see bench/load.py). `load_orbax(dir)` returns the canonical layout (unpacked, copies).
Format v1 checkpoints (canonical layout) still load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ConfigError, LlamaConfig
from models.download import sha256_file
from models.errors import ModelFileError
from models.params import Params, check_params, is_packed, pack_params, packed_shapes, param_shapes, unpack_params

MANIFEST = "aqjax_model.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "aqjax-orbax-v2"
READ_FORMATS = ("aqjax-orbax-v1", FORMAT)  # v1 stored the canonical layout
LAYOUTS = ("packed", "canonical")
CHUNK_BYTES = 16 << 20
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Files whose presence means an HF dir carries a tokenizer that Tokenizer.from_hf_dir can read.
HF_TOKENIZER_FILES = ("tokenizer.json",)


def read_source(src: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, Params, Any, dict]:
    """Loads a GGUF file or HF dir as (cfg, params, tokenizer or None, source description)."""
    from models.tokenizer import Tokenizer

    src = pathlib.Path(src)
    if src.is_dir():
        from models.safetensors import load_hf_dir

        cfg, params = load_hf_dir(src, dtype)
        tok = Tokenizer.from_hf_dir(src) if any((src / n).is_file() for n in HF_TOKENIZER_FILES) else None
        files = sorted(p for p in src.iterdir() if p.suffix in (".json", ".safetensors", ".model") and p.is_file())
        source = {"path": str(src.resolve()), "kind": "hf", "sha256": {p.name: sha256_file(p) for p in files}}
        return cfg, params, tok, source

    from models.gguf import load_gguf_file, open_gguf

    with open_gguf(src) as f:
        cfg, params = load_gguf_file(f, dtype)
        tok = Tokenizer.from_gguf_metadata(f.metadata)
    source = {"path": str(src.resolve()), "kind": "gguf", "sha256": sha256_file(src)}
    return cfg, params, tok, source


def save_orbax(
    dst: str | os.PathLike, cfg: LlamaConfig, params: Params, *, tokenizer=None, source=None, force: bool = False,
    layout: str = "packed",
) -> pathlib.Path:
    """Writes an aqjax checkpoint dir (see the module docstring) and returns its absolute path.

    `params` may be in either layout; they are stored in `layout` ("packed": the compute layout, the default;
    "canonical": the checkpoint layout of `models.params`).

    Raises:
      FileExistsError: `dst` exists and is not empty, and `force` is False.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if is_packed(params):
        check_params(params, cfg, packed=True)
        if layout == "canonical":
            params = unpack_params(params, cfg)
    else:
        check_params(params, cfg)
        if layout == "packed":
            params = pack_params(jax.tree.map(np.asarray, params), cfg)
    dst = pathlib.Path(dst).absolute()  # orbax requires absolute paths
    if dst.exists() and any(dst.iterdir()):
        if not force:
            raise FileExistsError(f"{dst} exists and is not empty (use --force to replace it)")
        foreign = sorted(p.name for p in dst.iterdir() if p.name not in (MANIFEST, PARAMS_DIR, TOKENIZER_FILE))
        if foreign:  # --force replaces an aqjax checkpoint, never an arbitrary directory
            raise FileExistsError(
                f"{dst} holds files that are not an aqjax checkpoint ({foreign[:5]}); not replacing it"
            )
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    dtypes = {str(np.dtype(x.dtype)) for x in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"params mix dtypes {sorted(dtypes)}")
    import orbax.checkpoint as ocp

    # Uncompressed: zstd shrinks float weights only ~35% but makes restoring about twice as slow. Chunks of at
    # most 16 MB let tensorstore read one array on several threads (0.28 s against 0.35 s for SmolLM2's 538 MB).
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(dst / PARAMS_DIR, args=ocp.args.PyTreeSave(params, save_args=save_args))
    tok_meta = None
    if tokenizer is not None:
        backend, tok_meta = tokenizer.to_parts()
        _write_atomic(dst / TOKENIZER_FILE, backend)
    manifest = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "dtype": dtypes.pop(),
        "layout": layout,
        "source": source,
        "tokenizer": tok_meta,
    }
    _write_atomic(dst / MANIFEST, json.dumps(manifest, ensure_ascii=False))
    return dst


def _write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        os.fchmod(f.fileno(), 0o644)
    os.replace(tmp, path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=jnp.float32, force: bool = False) -> pathlib.Path:
    """Converts a GGUF file or HF dir `src` into an aqjax checkpoint dir `dst`; returns `dst`."""
    cfg, params, tok, source = read_source(src, dtype)
    return save_orbax(dst, cfg, params, tokenizer=tok, source=source, force=force)


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed `aqjax_model.json` of an aqjax checkpoint dir.

    Raises:
      ModelFileError: the manifest is missing, not JSON, or not an aqjax manifest.
    """
    file = pathlib.Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelFileError(file, "file not found; not an aqjax checkpoint dir") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(file, f"cannot read manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READ_FORMATS:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFileError(file, f"format is {got!r}, expected one of {list(READ_FORMATS)}")
    layout = manifest.setdefault("layout", "canonical" if manifest["format"] == "aqjax-orbax-v1" else None)
    if layout not in LAYOUTS:
        raise ModelFileError(file, f"layout is {layout!r}, expected one of {list(LAYOUTS)}")
    return manifest


def manifest_tokenizer(path: str | os.PathLike, manifest: dict):
    """The Tokenizer stored in the checkpoint dir `path` (whose manifest is given), or None if it has none."""
    meta = manifest.get("tokenizer")
    if meta is None:
        return None
    from models.tokenizer import Tokenizer

    file = pathlib.Path(path) / TOKENIZER_FILE
    try:
        backend = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelFileError(file, f"cannot read the tokenizer: {e}") from None
    return Tokenizer.from_parts(backend, meta)


def load_orbax(path: str | os.PathLike, dtype=jnp.float32, *, packed: bool = False) -> tuple[LlamaConfig, Params]:
    """Loads an aqjax checkpoint dir as (config, params), params cast to `dtype` (jax arrays), in the compute
    layout when `packed` (what `aqjax.engine.Generator` runs on), else in the canonical layout.

    Raises:
      ModelFileError: the manifest or params are missing or corrupt, or the params do not match the config.
    """
    d = pathlib.Path(path).absolute()
    manifest = read_manifest(d)
    try:
        cfg = LlamaConfig.from_dict(manifest.get("config") or {}, where="config")
    except ConfigError as e:
        raise ModelFileError(d / MANIFEST, str(e)) from None
    dt = np.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {dt}")
    if not (d / PARAMS_DIR).is_dir():
        raise ModelFileError(d / PARAMS_DIR, "params directory not found")
    stored_packed = manifest["layout"] == "packed"
    shapes = packed_shapes(cfg) if stored_packed else param_shapes(cfg)
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        # Compare the stored shapes with the config first: a failed orbax restore leaves asyncio tasks behind and
        # reports the mismatch less clearly than check_params does.
        try:
            stored = ckptr.metadata(d / PARAMS_DIR)
            stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
        except Exception as e:  # orbax raises many types; all mean the same thing to the caller
            raise ModelFileError(d / PARAMS_DIR, f"cannot read params metadata: {type(e).__name__}: {e}") from e
        stored = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored, is_leaf=_is_array_meta)
        try:
            check_params(stored, cfg, where=str(d / PARAMS_DIR), packed=stored_packed)
        except ConfigError as e:
            raise ModelFileError(d, f"params do not match the manifest's config: {e}") from None
        # Orbax reads straight into device arrays of the requested dtype (measured on the 538 MB SmolLM2
        # checkpoint: 0.36 s, against 0.60 s for host numpy arrays handed to JAX afterwards, which copies them).
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(
            lambda shape: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, global_shape=shape,
                                               dtype=dt),
            shapes, is_leaf=lambda x: isinstance(x, tuple))
        try:
            params = ckptr.restore(d / PARAMS_DIR, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as e:
            raise ModelFileError(d / PARAMS_DIR, f"cannot restore params: {type(e).__name__}: {e}") from e
    if stored_packed and not packed:
        params = unpack_params(params, cfg)
    elif packed and not stored_packed:
        params = pack_params(params, cfg)
    check_params(params, cfg, where=str(d / PARAMS_DIR), packed=packed)
    return cfg, params


def _is_array_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.splitlines()[0])
    ap.add_argument("src", help="a .gguf file or an HF checkpoint dir (config.json + *.safetensors)")
    ap.add_argument("dst", help="output dir (must be empty or absent unless --force)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--force", action="store_true", help="replace dst if it exists")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.dst, dtype=DTYPES[args.dtype], force=args.force)
    except (ModelFileError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
