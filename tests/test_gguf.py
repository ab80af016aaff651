"""GGUF reader: dequantizers against gguf-py's reference, Q/K un-permutation, the real model, corrupt files."""

import dataclasses
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import SMOLLM2_135M, LlamaConfig
from models.errors import ModelFileError
from models.gguf import load_gguf, open_gguf, read_gguf_metadata
from models.params import check_params

QUANT_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.BF16, QT.F32]


def _encode(x: np.ndarray, qtype: QT) -> np.ndarray:
    """x as gguf-py stores it: raw bytes for block types, the float array itself for F16/F32."""
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def _write_gguf(path, tensors: dict, metadata: dict | None = None, arch: str = "llama") -> pathlib.Path:
    """Writes a GGUF with gguf-py. tensors: name -> (encoded array, qtype); metadata: key -> python value."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


# ------------------------------------------------------------------------------------------------ dequantizers


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_reference(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    shapes = {"matrix": (48, 256), "vector": (96,), "cube": (3, 5, 64)}
    tensors = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0)
        x.reshape(-1)[:7] = [0.0, -0.0, 1e-8, -65000.0, 3.5, -3.5, 1e4]  # zeros, tiny and large values
        tensors[name] = (_encode(x, qtype), qtype)
    path = _write_gguf(tmp_path / "q.gguf", tensors)
    with open_gguf(path) as f:
        for name, shape in shapes.items():
            info = f.tensors[name]
            assert info.shape == shape and info.qtype == int(qtype)
            ours = f.tensor(name)
            ref = gguf.quants.dequantize(tensors[name][0], qtype)
            assert ours.dtype == np.float32 and ours.shape == shape
            np.testing.assert_array_equal(ours, ref.reshape(shape))


@settings(max_examples=30, deadline=None)
@given(
    qtype=st.sampled_from([QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.BF16]),
    rows=st.integers(1, 9),
    blocks=st.integers(1, 5),
    scale=st.floats(1e-4, 1e3),
    seed=st.integers(0, 2**31),
)
def test_dequantize_property(qtype, rows, blocks, scale, seed):
    from models.gguf import dequantize

    x = np.random.default_rng(seed).standard_normal((rows, 32 * blocks)).astype(np.float32) * scale
    raw = _encode(x, qtype)
    np.testing.assert_array_equal(dequantize(raw, int(qtype), x.shape), gguf.quants.dequantize(raw, qtype))


def test_unsupported_type_is_named(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    path = _write_gguf(tmp_path / "q5.gguf", {"t": (_encode(x, QT.Q5_0), QT.Q5_0)})
    with open_gguf(path) as f, pytest.raises(ModelFileError, match=r"Q5_0.*supported: .*Q4_1"):
        f.tensor("t")


def test_non_finite_values_are_reported_by_name(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q8 = _encode(x, QT.Q8_0).copy()
    q8[2, 34:36] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)  # the scale of row 2's second block
    bad_f32 = x.copy()
    bad_f32[1, 5] = np.nan
    path = _write_gguf(tmp_path / "nan.gguf", {"q8": (q8, QT.Q8_0), "f32": (bad_f32, QT.F32), "ok": (x, QT.F32)})
    with open_gguf(path) as f:
        for name in ("q8", "f32"):
            with pytest.raises(ModelFileError, match=f"tensor '{name}' contains NaN or infinite"):
                f.tensor(name)
        np.testing.assert_array_equal(f.tensor("ok"), x)


# ------------------------------------------------------------------------------------------------ metadata


def test_metadata_types_roundtrip(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_uint8("u8", 200)
    w.add_int8("i8", -5)
    w.add_uint16("u16", 65000)
    w.add_int16("i16", -30000)
    w.add_uint32("u32", 4_000_000_000)
    w.add_int32("i32", -2_000_000_000)
    w.add_uint64("u64", 2**63 + 5)
    w.add_int64("i64", -(2**62))
    w.add_float32("f32", 1e-5)
    w.add_float64("f64", 0.1)
    w.add_bool("b", True)
    w.add_string("s", "héllo ✓")
    w.add_array("strs", ["a", "Ġb", "", "日本"])
    w.add_array("ints", [1, -2, 3])
    w.add_array("floats", [0.5, 1e-5])
    w.add_array("bools", [True, False])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_gguf_metadata(tmp_path / "m.gguf")
    assert meta == {
        "general.architecture": "llama",
        "u8": 200,
        "i8": -5,
        "u16": 65000,
        "i16": -30000,
        "u32": 4_000_000_000,
        "i32": -2_000_000_000,
        "u64": 2**63 + 5,
        "i64": -(2**62),
        "f32": 1e-5,
        "f64": 0.1,
        "b": True,
        "s": "héllo ✓",
        "strs": ["a", "Ġb", "", "日本"],
        "ints": [1, -2, 3],
        "floats": [0.5, 1e-5],
        "bools": [True, False],
    }


# ------------------------------------------------------------------------------------------------ tiny llama


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's HF->GGUF Q/K row order, written independently: within each head, HF row s*H/2 + i moves to
    row 2*i + s (pairs interleaved), for s in {0, 1} and i < H/2."""
    head_dim = w.shape[0] // n_heads
    half = head_dim // 2
    src_rows = [h * head_dim + s * half + i for h in range(n_heads) for i in range(half) for s in range(2)]
    return w[np.array(src_rows)]


def _tiny_hf_weights(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in HF (torch) layout, by HF name."""
    rng = np.random.default_rng(seed)
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    w = {"model.embed_tokens.weight": rng.standard_normal((V, D)), "model.norm.weight": 1 + rng.standard_normal(D)}
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = rng.standard_normal((V, D))
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.standard_normal(D)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.standard_normal(D)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((N * H, D))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((K * H, D))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((K * H, D))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((D, N * H))
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((F, D))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((F, D))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((D, F))
    return {k: v.astype(np.float32) for k, v in w.items()}


def _llama_metadata(cfg: LlamaConfig) -> dict:
    return {
        "general.name": "tiny",
        "llama.block_count": cfg.n_layers,
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.d_model,
        "llama.feed_forward_length": cfg.d_ff,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.freq_base": cfg.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": cfg.norm_eps,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def _gguf_tensors(cfg: LlamaConfig, hf: dict[str, np.ndarray], qtype=QT.F32) -> dict:
    """HF weights renamed (and Q/K permuted) the way llama.cpp's converter writes them; norms stay F32."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.n_layers):
        for hf_name, g_name in names.items():
            w = hf[f"model.layers.{i}.{hf_name}.weight"]
            if g_name == "attn_q":
                w = _permute_like_llama_cpp(w, cfg.n_heads)
            elif g_name == "attn_k":
                w = _permute_like_llama_cpp(w, cfg.n_kv_heads)
            out[f"blk.{i}.{g_name}.weight"] = w
    return {k: (v, QT.F32) if v.ndim == 1 else (_encode(v, qtype), qtype) for k, v in out.items()}


def _expected_params(cfg: LlamaConfig, hf: dict[str, np.ndarray]) -> dict:
    """Our layout built straight from the HF weights (no GGUF involved)."""
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def stack(name, fn):
        return np.stack([fn(hf[f"model.layers.{i}.{name}.weight"]) for i in range(cfg.n_layers)])

    params = {
        "embed": hf["model.embed_tokens.weight"],
        "final_norm": hf["model.norm.weight"],
        "layers": {
            "attn_norm": stack("input_layernorm", lambda w: w),
            "mlp_norm": stack("post_attention_layernorm", lambda w: w),
            "wq": stack("self_attn.q_proj", lambda w: w.T.reshape(D, N, H)),
            "wk": stack("self_attn.k_proj", lambda w: w.T.reshape(D, K, H)),
            "wv": stack("self_attn.v_proj", lambda w: w.T.reshape(D, K, H)),
            "wo": stack("self_attn.o_proj", lambda w: w.T.reshape(N, H, D)),
            "w_gate": stack("mlp.gate_proj", lambda w: w.T),
            "w_up": stack("mlp.up_proj", lambda w: w.T),
            "w_down": stack("mlp.down_proj", lambda w: w.T),
        },
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = hf["lm_head.weight"].T
    return params


TINY_CONFIGS = {
    "gqa_untied": LlamaConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=96,
        rope_theta=10000.0,
        max_seq_len=128,
        tie_embeddings=False,
        bos_id=1,
        eos_id=2,
        name="tiny",
    ),
    "mqa_tied": LlamaConfig(
        vocab_size=64,
        d_model=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=1,
        head_dim=8,
        d_ff=64,
        rope_theta=500000.0,
        max_seq_len=64,
        tie_embeddings=True,
        bos_id=1,
        eos_id=2,
        name="tiny",
    ),
    "mha": LlamaConfig(
        vocab_size=32,
        d_model=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=2,
        head_dim=16,
        d_ff=64,
        max_seq_len=32,
        tie_embeddings=False,
        bos_id=1,
        eos_id=2,
        name="tiny",
    ),
}


def _tiny_gguf(path, cfg, seed=0, qtype=QT.F32):
    hf = _tiny_hf_weights(cfg, seed)
    return _write_gguf(path, _gguf_tensors(cfg, hf, qtype), _llama_metadata(cfg)), hf


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_qk_unpermutation_recovers_hf_layout(tmp_path, name):
    cfg = TINY_CONFIGS[name]
    path, hf = _tiny_gguf(tmp_path / "tiny.gguf", cfg)
    got_cfg, params = load_gguf(path)
    assert got_cfg == cfg
    expected = _expected_params(cfg, hf)
    check_params(params, cfg)
    for key in ("embed", "final_norm") + (() if cfg.tie_embeddings else ("lm_head",)):
        np.testing.assert_array_equal(np.asarray(params[key]), expected[key], err_msg=key)
    for key, value in expected["layers"].items():
        np.testing.assert_array_equal(np.asarray(params["layers"][key]), value, err_msg=key)
    assert ("lm_head" in params) == (not cfg.tie_embeddings)


def test_quantized_tiny_llama_matches_reference_dequantization(tmp_path):
    """Quantized weights go through the same un-permutation: compare with gguf-py's dequantization."""
    cfg = TINY_CONFIGS["gqa_untied"]
    path, _ = _tiny_gguf(tmp_path / "q.gguf", cfg, qtype=QT.Q4_1)
    _, params = load_gguf(path)
    reader = gguf.GGUFReader(str(path))
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    D, N, H = cfg.d_model, cfg.n_heads, cfg.head_dim
    # Inverse of the interleaving, by explicit indices: our rotate-half row s*H/2 + i is GGUF row 2*i + s.
    rows = [h * H + 2 * i + s for h in range(N) for s in range(2) for i in range(H // 2)]
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["wq"][1]), ref["blk.1.attn_q.weight"][rows].T.reshape(D, N, H)
    )
    np.testing.assert_array_equal(np.asarray(params["layers"]["w_down"][0]), ref["blk.0.ffn_down.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), ref["output.weight"].T)


def test_load_gguf_dtype(tmp_path):
    cfg = TINY_CONFIGS["mha"]
    path, hf = _tiny_gguf(tmp_path / "t.gguf", cfg)
    _, params = load_gguf(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(params["embed"]), hf["model.embed_tokens.weight"].astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="floating"):
        load_gguf(path, dtype=jnp.int32)


# ------------------------------------------------------------------------------------------------ bad files


@pytest.fixture
def tiny_file(tmp_path) -> pathlib.Path:
    return _tiny_gguf(tmp_path / "tiny.gguf", TINY_CONFIGS["gqa_untied"], qtype=QT.Q8_0)[0]


def _assert_names_file(exc_info, path):
    assert exc_info.type is ModelFileError
    assert str(path) in str(exc_info.value)
    assert exc_info.value.path == str(path)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError, match="not found") as e:
        load_gguf(missing)
    _assert_names_file(e, missing)
    with pytest.raises(ModelFileError, match="directory"):
        read_gguf_metadata(tmp_path)


def test_flipped_magic(tiny_file):
    data = bytearray(tiny_file.read_bytes())
    data[0] ^= 0xFF
    tiny_file.write_bytes(bytes(data))
    for fn in (load_gguf, read_gguf_metadata):
        with pytest.raises(ModelFileError, match="magic") as e:
            fn(tiny_file)
        _assert_names_file(e, tiny_file)


def test_garbage(tmp_path):
    for size in (0, 5, 100, 10_000):
        path = tmp_path / f"garbage{size}.gguf"
        path.write_bytes(np.random.default_rng(size).bytes(size))
        with pytest.raises(ModelFileError) as e:
            load_gguf(path)
        _assert_names_file(e, path)


def test_gguf_header_with_garbage_body(tmp_path):
    path = tmp_path / "g.gguf"
    path.write_bytes(b"GGUF" + np.uint32(3).tobytes() + np.random.default_rng(1).bytes(5000))
    with pytest.raises(ModelFileError) as e:
        load_gguf(path)
    _assert_names_file(e, path)


def test_truncated_at_several_sizes(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    with open_gguf(tiny_file) as f:
        data_start = min(t.offset for t in f.tensors.values())
    cuts = sorted(
        {
            0,
            3,
            4,
            8,
            23,
            24,
            40,
            data_start // 2,
            data_start - 1,
            data_start,
            data_start + 100,
            len(data) - 1,
            len(data) - 32,
        }
    )
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as e:
            load_gguf(path)
        _assert_names_file(e, path)
        msg = str(e.value)
        assert "truncated" in msg or "too short" in msg, msg


@settings(max_examples=60, deadline=None)
@given(frac=st.floats(0.0, 0.9999))
def test_any_truncation_is_a_model_file_error(tmp_path_factory, frac):
    src = _cached_tiny(tmp_path_factory)
    data = src.read_bytes()
    path = tmp_path_factory.mktemp("cut") / "cut.gguf"
    path.write_bytes(data[: int(frac * len(data))])
    with pytest.raises(ModelFileError) as e:
        load_gguf(path)
    assert str(path) in str(e.value)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_header_byte_corruption_never_leaks_other_errors(tmp_path_factory, data):
    """Corrupting any header byte either still loads or fails with ModelFileError (never IndexError etc.)."""
    src = _cached_tiny(tmp_path_factory)
    blob = bytearray(src.read_bytes())
    with open_gguf(src) as f:
        header_end = min(t.offset for t in f.tensors.values())
    pos = data.draw(st.integers(0, header_end - 1))
    blob[pos] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("corrupt") / "c.gguf"
    path.write_bytes(bytes(blob))
    try:
        load_gguf(path)
    except ModelFileError as e:
        assert str(path) in str(e)


_TINY_CACHE: dict = {}


def _cached_tiny(tmp_path_factory) -> pathlib.Path:
    if "path" not in _TINY_CACHE:
        path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
        _TINY_CACHE["path"] = _tiny_gguf(path, TINY_CONFIGS["mqa_tied"], qtype=QT.Q4_0)[0]
    return _TINY_CACHE["path"]


def test_wrong_shape_missing_and_extra_tensors(tmp_path):
    cfg = TINY_CONFIGS["gqa_untied"]
    hf = _tiny_hf_weights(cfg)
    good = _gguf_tensors(cfg, hf)
    meta = _llama_metadata(cfg)

    bad = dict(good)
    bad["blk.1.attn_v.weight"] = (np.zeros((cfg.d_model, cfg.d_model), np.float32), QT.F32)
    path = _write_gguf(tmp_path / "shape.gguf", bad, meta)
    with pytest.raises(ModelFileError, match=r"blk\.1\.attn_v\.weight.*shape") as e:
        load_gguf(path)
    _assert_names_file(e, path)

    missing = {k: v for k, v in good.items() if k != "blk.0.ffn_up.weight"}
    path = _write_gguf(tmp_path / "missing.gguf", missing, meta)
    with pytest.raises(ModelFileError, match=r"missing tensors \['blk\.0\.ffn_up\.weight'\]"):
        load_gguf(path)

    extra = {**good, "rope_freqs.weight": (np.ones(8, np.float32), QT.F32)}
    path = _write_gguf(tmp_path / "extra.gguf", extra, meta)
    with pytest.raises(ModelFileError, match="unexpected tensors.*rope_freqs"):
        load_gguf(path)


def test_bad_metadata(tmp_path):
    cfg = TINY_CONFIGS["mha"]
    tensors = _gguf_tensors(cfg, _tiny_hf_weights(cfg))
    path = _write_gguf(tmp_path / "arch.gguf", tensors, _llama_metadata(cfg), arch="gpt2")
    with pytest.raises(ModelFileError, match="architecture") as e:
        load_gguf(path)
    _assert_names_file(e, path)
    meta = {k: v for k, v in _llama_metadata(cfg).items() if k != "llama.block_count"}
    path = _write_gguf(tmp_path / "nolayers.gguf", tensors, meta)
    with pytest.raises(ModelFileError, match="block_count"):
        load_gguf(path)
    for key, value, pattern in [
        ("llama.block_count", 2**31, "block_count is 2147483648"),  # no huge allocations
        ("llama.attention.head_count", 0, "head_count|n_heads|division"),
        ("llama.embedding_length", "wide", "metadata"),
    ]:
        path = _write_gguf(tmp_path / "bad.gguf", tensors, {**_llama_metadata(cfg), key: value})
        with pytest.raises(ModelFileError, match=pattern) as e:
            load_gguf(path)
        _assert_names_file(e, path)
    meta = {**_llama_metadata(cfg), "llama.rope.scaling.type": "yarn"}
    path = _write_gguf(tmp_path / "yarn.gguf", tensors, meta)
    with pytest.raises(ModelFileError, match="RoPE scaling"):
        load_gguf(path)


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_model_config_and_params(smollm2_gguf):
    cfg, params = load_gguf(smollm2_gguf)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.d_ff, cfg.rope_theta, cfg.tie_embeddings) == (49152, 1536, 1e5, True)
    assert dataclasses.replace(cfg, name=SMOLLM2_135M.name) == SMOLLM2_135M
    check_params(params, cfg)
    assert params["embed"].dtype == jnp.float32

    with open_gguf(smollm2_gguf) as f:
        kinds = {f.tensors[n].qtype for n in f.tensors}
        assert kinds == {0, 3, 8}  # F32 norms, Q4_1 matrices, Q8_0 embedding

        def ref(name):
            info = f.tensors[name]
            qt = QT(info.qtype)
            raw = f.raw(name).reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, qt))
            return gguf.quants.dequantize(raw, qt)

        np.testing.assert_array_equal(np.asarray(params["embed"]), ref("token_embd.weight"))
        np.testing.assert_array_equal(
            np.asarray(params["layers"]["wv"][7]), ref("blk.7.attn_v.weight").T.reshape(576, 3, 64)
        )
        np.testing.assert_array_equal(np.asarray(params["layers"]["w_down"][29]), ref("blk.29.ffn_down.weight").T)
        wk = ref("blk.3.attn_k.weight")  # GGUF rows interleaved: row 2i+s of head h is our s*32 + i
        rows = [h * 64 + 2 * i + s for h in range(3) for s in range(2) for i in range(32)]
        np.testing.assert_array_equal(np.asarray(params["layers"]["wk"][3]), wk[rows].T.reshape(576, 3, 64))
        np.testing.assert_array_equal(np.asarray(params["layers"]["attn_norm"][0]), ref("blk.0.attn_norm.weight"))


@pytest.mark.slow
def test_real_metadata_matches_gguf_py_reader(smollm2_gguf):
    ours = read_gguf_metadata(smollm2_gguf)
    reader = gguf.GGUFReader(str(smollm2_gguf))
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float):  # we report the shortest decimal for the same float32
            assert np.float32(ours[key]) == np.float32(value), key
        else:
            assert ours[key] == value, key
    assert ours["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert len(ours["tokenizer.ggml.tokens"]) == 49152
    with open_gguf(smollm2_gguf) as f:
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes, int(t.tensor_type))
            assert info.shape == tuple(reversed(t.shape.tolist()))
