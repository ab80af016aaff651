"""Reads GGUF files (llama.cpp's model format) into the aqjax parameter layout (see `models/params.py`).

The header parser is our own rather than `gguf.GGUFReader`: the reference reader spends ~2 s building a
numpy view per tokenizer string, and it reports truncation as an opaque numpy reshape error. Ours checks every
read against the file size, so a short or corrupt file fails with a `ModelFileError` before any tensor is touched.

Dequantizers are vectorized numpy over the raw block bytes (ggml's block layouts, see `_BLOCKS`): the 135M
default model dequantizes in ~0.1 s on one core, and a whole `load_gguf` takes ~0.5 s, most of it memory traffic
(page faults on the 540 MB of float32 leaves, and the transposes into the x @ W layout).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import mmap
import os
import pathlib
import re
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ConfigError, LlamaConfig
from models.errors import ModelFileError
from models.params import Params, check_params, param_shapes

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml tensor type ids we can dequantize: id -> (name, elements per block, bytes per block).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_BLOCKS = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    Q4_0: ("Q4_0", 32, 18),  # f16 scale d, 16 bytes of 4-bit q: x = (q - 8) * d
    Q4_1: ("Q4_1", 32, 20),  # f16 scale d, f16 min m, 16 bytes of 4-bit q: x = q * d + m
    Q8_0: ("Q8_0", 32, 34),  # f16 scale d, 32 int8 q: x = q * d
    BF16: ("BF16", 1, 2),
}

# GGUF metadata value types.
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32, _T_BOOL = range(8)
_T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = range(8, 13)
_SCALAR_DTYPES = {
    _T_UINT8: np.dtype("<u1"),
    _T_INT8: np.dtype("<i1"),
    _T_UINT16: np.dtype("<u2"),
    _T_INT16: np.dtype("<i2"),
    _T_UINT32: np.dtype("<u4"),
    _T_INT32: np.dtype("<i4"),
    _T_FLOAT32: np.dtype("<f4"),
    _T_BOOL: np.dtype("<u1"),
    _T_UINT64: np.dtype("<u8"),
    _T_INT64: np.dtype("<i8"),
    _T_FLOAT64: np.dtype("<f8"),
}
_SCALAR_FORMATS = {  # struct's standard sizes (numpy's dtype.char would give native C sizes)
    _T_UINT8: "<B",
    _T_INT8: "<b",
    _T_UINT16: "<H",
    _T_INT16: "<h",
    _T_UINT32: "<I",
    _T_INT32: "<i",
    _T_FLOAT32: "<f",
    _T_BOOL: "<B",
    _T_UINT64: "<Q",
    _T_INT64: "<q",
    _T_FLOAT64: "<d",
}

# Blocks per numpy pass: small enough that the temporaries stay in cache, big enough to amortize call overhead.
_CHUNK_BLOCKS = 8192


class GGUFTensorInfo(NamedTuple):
    """Where one tensor lives in a GGUF file.

    Attributes:
      name: the GGUF tensor name, e.g. "blk.0.attn_q.weight".
      qtype: the ggml type id (0 = F32, 2 = Q4_0, ...).
      shape: numpy (row-major) shape: ggml's dims reversed, so the last axis is ggml's ne0.
      offset: absolute byte offset of the data in the file.
      nbytes: size of the data in bytes.
    """

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def qtype_name(qtype: int) -> str:
    """The ggml name of a tensor type id ("Q4_1"), or "type <id>" if unknown."""
    if qtype in _BLOCKS:
        return _BLOCKS[qtype][0]
    try:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return f"type {qtype}"


def _block_size(qtype: int) -> tuple[int, int] | None:
    """(elements, bytes) per block for any ggml type id, or None if the id is unknown."""
    if qtype in _BLOCKS:
        return _BLOCKS[qtype][1:]
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ImportError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Dequantization


def _f16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian f16 at byte `start` of every block, as float32 [nb, 1, 1]."""
    return blocks[:, start : start + 2].view("<f2").astype(np.float32)[:, :, None]


def _deq_q4(blocks: np.ndarray, out: np.ndarray, with_min: bool) -> None:
    # Low nibbles hold elements 0..15 of the block and high nibbles 16..31 (not interleaved).
    qs_at = 4 if with_min else 2
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b, o = blocks[s : s + _CHUNK_BLOCKS], out[s : s + _CHUNK_BLOCKS].reshape(-1, 2, 16)
        qs = b[:, qs_at:]
        np.bitwise_and(qs, 0x0F, out=o[:, 0], casting="unsafe")
        np.right_shift(qs, 4, out=o[:, 1], casting="unsafe")
        if with_min:
            o *= _f16_column(b, 0)
            o += _f16_column(b, 2)
        else:
            o -= 8.0  # exact in float32, so this matches ggml's integer (q - 8) * d bit for bit
            o *= _f16_column(b, 0)


def _deq_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b, o = blocks[s : s + _CHUNK_BLOCKS], out[s : s + _CHUNK_BLOCKS]
        np.copyto(o, b[:, 2:].view(np.int8), casting="unsafe")
        o *= _f16_column(b, 0)[:, 0]


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Dequantizes the raw bytes of one ggml tensor to float32.

    Args:
      raw: the tensor's bytes (uint8, any shape; only the byte count matters).
      qtype: ggml type id; one of F32, F16, BF16, Q4_0, Q4_1, Q8_0.
      shape: numpy shape of the result (last axis = ggml's ne0, a multiple of the block size).
      out: optional C-contiguous float32 array of `shape` to write into.

    Returns:
      The float32 array (`out` if given).
    """
    if qtype not in _BLOCKS:
        supported = ", ".join(name for name, _, _ in _BLOCKS.values())
        raise ValueError(f"cannot dequantize ggml type {qtype_name(qtype)}; supported: {supported}")
    _, block_elems, block_bytes = _BLOCKS[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    if (len(shape) and shape[-1] % block_elems) or raw.nbytes != n // block_elems * block_bytes:
        raise ValueError(f"{raw.nbytes} bytes of {qtype_name(qtype)} do not hold a tensor of shape {tuple(shape)}")
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {tuple(shape)}")
    raw = raw.reshape(-1).view(np.uint8)
    flat = out.reshape(-1)
    if qtype == F32:
        np.copyto(flat, raw.view("<f4"))
    elif qtype == F16:
        np.copyto(flat, raw.view("<f2"))
    elif qtype == BF16:
        # bfloat16 is the top half of a float32, so shifting the bits up 16 places is an exact conversion.
        bits = flat.view(np.uint32)
        np.copyto(bits, raw.view("<u2"))
        bits <<= 16
    else:
        blocks, out_blocks = raw.reshape(-1, block_bytes), flat.reshape(-1, block_elems)
        if qtype == Q8_0:
            _deq_q8_0(blocks, out_blocks)
        else:
            _deq_q4(blocks, out_blocks, with_min=qtype == Q4_1)
    return out


def _all_finite(raw: np.ndarray, qtype: int, values: np.ndarray) -> bool:
    """Whether a dequantized tensor is free of NaN/inf, checking only the f16 scales for block types.

    Block values are small integers times a finite f16 scale (plus a finite min), which cannot overflow float32,
    so the scales (1/16 of the bytes) decide it.
    """
    if qtype in (Q4_0, Q4_1, Q8_0):
        blocks = raw.reshape(-1, _BLOCKS[qtype][2])
        scales = blocks[:, : 4 if qtype == Q4_1 else 2].view("<f2")
        return bool(np.isfinite(scales).all())
    return bool(np.isfinite(values).all())


# ----------------------------------------------------------------------------------------------------------------
# File parsing


def _short_float(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (1e-05 rather than 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every overrun becomes a ModelFileError."""

    def __init__(self, buf, size: int, path: pathlib.Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError(
                self.path,
                f"truncated or corrupt GGUF header: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes",
            )

    def scalar(self, vtype: int, what: str):
        fmt = _SCALAR_FORMATS[vtype]
        self.need(struct.calcsize(fmt), what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        if vtype == _T_FLOAT32:
            return _short_float(value)
        return bool(value) if vtype == _T_BOOL else value

    def u32(self, what: str) -> int:
        return self.scalar(_T_UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_T_UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelFileError(self.path, f"{what} at offset {self.pos - n} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, what: str):
        if vtype in _SCALAR_FORMATS:
            return self.scalar(vtype, what)
        if vtype == _T_STRING:
            return self.string(what)
        if vtype == _T_ARRAY:
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if etype in _SCALAR_DTYPES:
                dt = _SCALAR_DTYPES[etype]
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dt, count, self.pos)
                self.pos += count * dt.itemsize
                if etype == _T_FLOAT32:
                    return [_short_float(v) for v in arr.tolist()]
                return (arr != 0).tolist() if etype == _T_BOOL else arr.tolist()
            if etype in (_T_STRING, _T_ARRAY):
                self.need(count * 8, what)  # every element starts with an 8-byte length: reject absurd counts early
                return [self.value(etype, f"{what}[{i}]") for i in range(count)]
            raise ModelFileError(self.path, f"{what} has unknown array element type {etype}")
        raise ModelFileError(self.path, f"{what} has unknown value type {vtype} (at offset {self.pos - 4})")


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file: its metadata and a table of its tensors, with data read lazily from a memory map.

    Attributes:
      path: the file.
      version: GGUF format version (2 or 3).
      metadata: key -> decoded Python value (str, int, float, bool, or lists of those).
      tensors: name -> GGUFTensorInfo, in file order.
    """

    path: pathlib.Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    _buf: Any = dataclasses.field(repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The undecoded bytes of tensor `name` (a read-only uint8 view of the file)."""
        t = self._info(name)
        return np.frombuffer(self._buf, np.uint8, t.nbytes, t.offset)

    def tensor(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name` dequantized to float32 in numpy (row-major) shape; written into `out` if given."""
        t = self._info(name)
        if t.qtype not in _BLOCKS:
            supported = ", ".join(name for name, _, _ in _BLOCKS.values())
            raise ModelFileError(
                self.path,
                f"tensor {name!r} has type {qtype_name(t.qtype)}, which aqjax cannot dequantize "
                f"(supported: {supported})",
            )
        raw = self.raw(name)
        with np.errstate(invalid="ignore", over="ignore"):  # reported below, by name, instead of as a warning
            out = dequantize(raw, t.qtype, t.shape, out)
        if not _all_finite(raw, t.qtype, out):
            raise ModelFileError(self.path, f"tensor {name!r} contains NaN or infinite values (corrupt file?)")
        return out

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise ModelFileError(self.path, f"no tensor named {name!r}")
        return self.tensors[name]

    def close(self) -> None:
        try:
            self._buf.close()
        except BufferError:
            pass  # numpy views of the map are still alive; the map closes when they are collected

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses the header of a GGUF file and checks that every tensor's data lies inside the file.

    Raises:
      ModelFileError: the file is missing, not GGUF, an unsupported version, corrupt or truncated.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:  # magic, version, tensor count, kv count
                raise ModelFileError(path, f"file is {size} bytes, too short to be a GGUF file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except IsADirectoryError:
        raise ModelFileError(path, "is a directory, expected a .gguf file") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read file: {e.strerror or e}") from None

    cur = _Cursor(buf, size, path)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file: magic bytes are {magic!r}, expected {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        raise ModelFileError(path, "big-endian GGUF files are not supported")
    if version not in _SUPPORTED_VERSIONS:
        raise ModelFileError(path, f"GGUF version {version} is not supported (only {_SUPPORTED_VERSIONS})")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of metadata {key!r}")
        if key in metadata:
            raise ModelFileError(path, f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"rank of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelFileError(path, f"tensor {name!r} claims {n_dims} dimensions (ggml allows 1..{_MAX_DIMS})")
        dims = [cur.u64(f"dims of tensor {name!r}") for _ in range(n_dims)]
        qtype = cur.u32(f"type of tensor {name!r}")
        rel = cur.u64(f"offset of tensor {name!r}")
        infos.append((name, dims, qtype, rel))

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(path, f"general.alignment must be a power of two, got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, qtype, rel in infos:
        if name in tensors:
            raise ModelFileError(path, f"tensor {name!r} appears twice")
        bs = _block_size(qtype)
        if bs is None:
            raise ModelFileError(path, f"tensor {name!r} has unknown ggml type id {qtype}")
        n = int(np.prod(dims, dtype=object))
        if dims[0] % bs[0]:
            raise ModelFileError(
                path,
                f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype_name(qtype)} block "
                f"size {bs[0]}",
            )
        nbytes = n // bs[0] * bs[1]
        start = data_start + rel
        if start + nbytes > size:
            raise ModelFileError(
                path,
                f"file is truncated: tensor {name!r} needs bytes {start}..{start + nbytes} but the file has "
                f"only {size} bytes",
            )
        tensors[name] = GGUFTensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start, nbytes)
    return GGUFFile(path, version, metadata, tensors, buf)


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value metadata of a GGUF file, decoded to Python values (str, int, float, bool, lists).

    Raises:
      ModelFileError: the file is missing, not GGUF, corrupt or truncated.
    """
    with open_gguf(path) as f:
        return f.metadata


# ----------------------------------------------------------------------------------------------------------------
# GGUF tensors -> params


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation; returns an [in, heads, head_dim] view in rotate-half order.

    llama.cpp's converter reorders each head's output rows from rotate-half order (row s*H/2 + i, s in {0, 1})
    to interleaved pairs (row 2*i + s), since ggml's RoPE rotates adjacent pairs. `w` is [heads*H, in].
    """
    rows, d_in = w.shape
    half = rows // n_heads // 2
    # [heads, i, s, in] -> [in, heads, s, i]; flattening (s, i) gives the rotate-half index s*H/2 + i.
    return w.reshape(n_heads, half, 2, d_in).transpose(3, 0, 2, 1)


# params key (under "layers") -> GGUF name suffix in "blk.N.<suffix>.weight".
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "mlp_norm": "ffn_norm",
    "w_gate": "ffn_gate",
    "w_up": "ffn_up",
    "w_down": "ffn_down",
}


def _plan(cfg: LlamaConfig) -> list[tuple[str, tuple, tuple[int, ...], Callable[[np.ndarray], np.ndarray] | None]]:
    """(GGUF name, params path, expected GGUF numpy shape, transform) for every tensor.

    A transform maps the dequantized GGUF array (torch's [out, in]) to a view whose elements, in order, are our
    leaf's (x @ W, i.e. [in, out] split into heads); None means the GGUF array already is the leaf.
    """
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    transpose = np.transpose
    layer = {
        "attn_norm": ((D,), None),
        "wq": ((N * H, D), lambda w: _unpermute_qk(w, N)),
        "wk": ((K * H, D), lambda w: _unpermute_qk(w, K)),  # K is permuted per kv head
        "wv": ((K * H, D), transpose),
        "wo": ((D, N * H), transpose),
        "mlp_norm": ((D,), None),
        "w_gate": ((F, D), transpose),
        "w_up": ((F, D), transpose),
        "w_down": ((D, F), transpose),
    }
    plan = [("token_embd.weight", ("embed",), (V, D), None), ("output_norm.weight", ("final_norm",), (D,), None)]
    if not cfg.tie_embeddings:
        plan.append(("output.weight", ("lm_head",), (V, D), transpose))
    for i in range(cfg.n_layers):
        for key, suffix in _LAYER_NAMES.items():
            shape, fn = layer[key]
            plan.append((f"blk.{i}.{suffix}.weight", ("layers", key, i), shape, fn))
    return plan


def _config_from_metadata(f: GGUFFile) -> LlamaConfig:
    meta = f.metadata
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none") and not (scaling == "linear" and meta.get("llama.rope.scaling.factor") == 1.0):
        raise ModelFileError(f.path, f"RoPE scaling {scaling!r} is not supported")
    try:
        cfg = LlamaConfig.from_gguf_metadata(
            {**meta, "_aqjax.tie_embeddings": "output.weight" not in f.tensors}, where="metadata"
        )
    except ConfigError as e:
        raise ModelFileError(f.path, str(e)) from None
    except (TypeError, ValueError, ArithmeticError) as e:  # e.g. a string where a count belongs, or 0 heads
        raise ModelFileError(f.path, f"metadata does not describe a valid model: {type(e).__name__}: {e}") from None
    rope_dims = meta.get("llama.rope.dimension_count", cfg.head_dim)
    if rope_dims != cfg.head_dim:
        raise ModelFileError(f.path, f"partial RoPE ({rope_dims} of {cfg.head_dim} dims) is not supported")
    return cfg


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {dt}")
    return dt


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, Params]:
    """Loads a Llama-architecture GGUF file as (config, params) with params in `dtype` (jax arrays).

    Q/K rows are un-permuted back to the HF rotate-half RoPE convention; `tie_embeddings` is set from whether
    the file has an `output.weight` tensor.

    Raises:
      ModelFileError: the file is missing, corrupt, truncated, not a Llama model, or holds a tensor of the
        wrong shape or an unsupported type.
    """
    dt = _check_dtype(dtype)
    with open_gguf(path) as f:
        return load_gguf_file(f, dt)


def load_gguf_file(f: GGUFFile, dtype=jnp.float32) -> tuple[LlamaConfig, Params]:
    """`load_gguf` for an already opened file (so callers that also want its metadata parse it once)."""
    dt = _check_dtype(dtype)
    cfg = _config_from_metadata(f)
    # Checked before building the per-layer plan, which a corrupt block count could make enormous.
    blocks = {int(m[1]) for name in f.tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    if len(blocks) != cfg.n_layers or max(blocks, default=-1) != cfg.n_layers - 1:  # i.e. blocks == {0..L-1}
        raise ModelFileError(
            f.path,
            f"llama.block_count is {cfg.n_layers} but the file has tensors for {len(blocks)} blocks "
            f"(numbered {min(blocks, default=None)}..{max(blocks, default=None)})",
        )
    plan = _plan(cfg)
    expected = {name for name, *_ in plan}
    missing = sorted(expected - set(f.tensors))
    if missing:
        raise ModelFileError(f.path, f"missing tensors {missing[:8]} ({len(missing)} in all)")
    extra = sorted(set(f.tensors) - expected)
    if extra:
        raise ModelFileError(f.path, f"unexpected tensors {extra[:8]} ({len(extra)} in all)")
    for name, _, shape, _ in plan:
        got = f.tensors[name].shape
        if got != shape:
            raise ModelFileError(f.path, f"tensor {name!r} has shape {got}, expected {shape}")
        if f.tensors[name].qtype not in _BLOCKS:
            f.tensor(name)  # raises the unsupported-type error before any work is done

    # Dequantize into preallocated float32 leaves; numpy releases the GIL, so a thread pool overlaps tensors.
    # Tensors that need a transpose go through a per-thread scratch buffer: fresh temporaries would cost a
    # page fault per 4 KiB, which takes longer than the dequantization itself.
    leaves = jax.tree.map(lambda s: np.empty(s, np.float32), param_shapes(cfg), is_leaf=_is_shape)
    scratch_size = max((math.prod(shape) for _, _, shape, fn in plan if fn is not None), default=0)
    local = threading.local()

    def fill(item):
        name, where, shape, fn = item
        dest = leaves
        for k in where:
            dest = dest[k]
        if fn is None:
            f.tensor(name, out=dest)
            return
        if not hasattr(local, "scratch"):
            local.scratch = np.empty(scratch_size, np.float32)
        src = fn(f.tensor(name, out=local.scratch[: math.prod(shape)].reshape(shape)))
        np.copyto(dest.reshape(src.shape), src)  # dest is a contiguous slice, so reshape is a view

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, plan))
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dt), leaves)
    check_params(params, cfg, where=str(f.path))
    return cfg, params
