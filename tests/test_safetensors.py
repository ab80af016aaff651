"""HF safetensors loader: the tiny HF checkpoints in tests/data, sharding, dtypes and bad checkpoints."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

from models.config import LlamaConfig
from models.errors import ModelFileError
from models.params import check_params
from models.safetensors import load_hf_dir, read_safetensors

DATA = pathlib.Path(__file__).parent / "data"
TINY = {name: DATA / f"tiny_llama_{name}" for name in ("mha", "gqa", "mqa")}


def _raw(d: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint dir as float32, read by the safetensors package (independently of us)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update({k: np.asarray(v, np.float32) for k, v in safetensors.flax.load_file(f).items()})
    return out


def _check_against_raw(cfg: LlamaConfig, params, raw: dict[str, np.ndarray]) -> None:
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    np.testing.assert_array_equal(np.asarray(params["embed"]), raw["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(params["final_norm"]), raw["model.norm.weight"])
    if cfg.tie_embeddings:
        assert "lm_head" not in params
    else:
        np.testing.assert_array_equal(np.asarray(params["lm_head"]), raw["lm_head.weight"].T)
    L = params["layers"]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(np.asarray(L["attn_norm"][i]), raw[p + "input_layernorm.weight"])
        np.testing.assert_array_equal(np.asarray(L["mlp_norm"][i]), raw[p + "post_attention_layernorm.weight"])
        # Head n of q_proj owns output rows n*H .. n*H+H-1, in HF's own (rotate-half) order.
        for n in range(N):
            np.testing.assert_array_equal(
                np.asarray(L["wq"][i, :, n, :]), raw[p + "self_attn.q_proj.weight"][n * H : (n + 1) * H].T
            )
        for k in range(K):
            np.testing.assert_array_equal(
                np.asarray(L["wk"][i, :, k, :]), raw[p + "self_attn.k_proj.weight"][k * H : (k + 1) * H].T
            )
            np.testing.assert_array_equal(
                np.asarray(L["wv"][i, :, k, :]), raw[p + "self_attn.v_proj.weight"][k * H : (k + 1) * H].T
            )
        np.testing.assert_array_equal(np.asarray(L["wo"][i]).reshape(N * H, D), raw[p + "self_attn.o_proj.weight"].T)
        np.testing.assert_array_equal(np.asarray(L["w_gate"][i]), raw[p + "mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(np.asarray(L["w_up"][i]), raw[p + "mlp.up_proj.weight"].T)
        np.testing.assert_array_equal(np.asarray(L["w_down"][i]), raw[p + "mlp.down_proj.weight"].T)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_checkpoints(name):
    d = TINY[name]
    cfg, params = load_hf_dir(d)
    hf = json.loads((d / "config.json").read_text())
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size) == (
        hf["num_hidden_layers"],
        hf["hidden_size"],
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
        hf["head_dim"],
        hf["intermediate_size"],
        hf["vocab_size"],
    )
    assert cfg.tie_embeddings == hf["tie_word_embeddings"]
    assert cfg.rope_theta == hf["rope_parameters"]["rope_theta"]
    check_params(params, cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    _check_against_raw(cfg, params, _raw(d))


def test_bfloat16_is_exact():
    cfg, params = load_hf_dir(TINY["gqa"], dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    raw = safetensors.flax.load_file(TINY["gqa"] / "model.safetensors")
    assert raw["model.embed_tokens.weight"].dtype == jnp.bfloat16  # the checkpoint itself is bf16
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(raw["model.embed_tokens.weight"]))


@pytest.fixture
def copy_of(tmp_path):
    def make(name: str) -> pathlib.Path:
        d = tmp_path / name
        shutil.copytree(TINY[name], d)
        return d

    return make


def test_sharded_checkpoint(copy_of):
    d = copy_of("mqa")
    raw = safetensors.flax.load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(raw)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        safetensors.flax.save_file({k: raw[k] for k in keys}, d / fname)
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg, params = load_hf_dir(d)
    _check_against_raw(cfg, params, _raw(d))

    # An index that points a tensor at the wrong shard is caught.
    wrong = dict(weight_map, **{"model.norm.weight": next(f for f in shards if f != weight_map["model.norm.weight"])})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(ModelFileError, match=r"model\.norm\.weight.*not"):
        load_hf_dir(d)


@pytest.mark.parametrize("np_dtype", [np.float16, np.float32])
def test_float16_and_float32_files(copy_of, np_dtype):
    d = copy_of("mha")
    raw = _raw(d)
    safetensors.numpy.save_file({k: v.astype(np_dtype) for k, v in raw.items()}, d / "model.safetensors")
    cfg, params = load_hf_dir(d)
    _check_against_raw(cfg, params, {k: v.astype(np_dtype).astype(np.float32) for k, v in raw.items()})


def test_tied_checkpoint_may_also_carry_lm_head(copy_of):
    d = copy_of("gqa")
    raw = safetensors.flax.load_file(d / "model.safetensors")
    raw["lm_head.weight"] = raw["model.embed_tokens.weight"]
    raw["model.layers.0.self_attn.rotary_emb.inv_freq"] = jnp.ones(8, jnp.float32)  # old checkpoints carry these
    safetensors.flax.save_file(raw, d / "model.safetensors")
    cfg, params = load_hf_dir(d)
    assert cfg.tie_embeddings and "lm_head" not in params


def _rewrite(d: pathlib.Path, edit) -> None:
    raw = dict(safetensors.flax.load_file(d / "model.safetensors"))
    edit(raw)
    safetensors.flax.save_file(raw, d / "model.safetensors")


def test_missing_tensor(copy_of):
    d = copy_of("mha")
    _rewrite(d, lambda raw: raw.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ModelFileError, match=r"missing tensors \['model\.layers\.2\.mlp\.up_proj\.weight'\]") as e:
        load_hf_dir(d)
    assert str(d) in str(e.value)


def test_missing_lm_head_when_untied(copy_of):
    d = copy_of("mqa")
    _rewrite(d, lambda raw: raw.pop("lm_head.weight"))
    with pytest.raises(ModelFileError, match=r"missing tensors \['lm_head\.weight'\]"):
        load_hf_dir(d)


def test_extra_tensor(copy_of):
    d = copy_of("mha")
    _rewrite(d, lambda raw: raw.update({"model.layers.0.self_attn.q_proj.bias": jnp.zeros(64, jnp.bfloat16)}))
    with pytest.raises(ModelFileError, match=r"unexpected tensors \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"):
        load_hf_dir(d)


def test_bad_shape(copy_of):
    d = copy_of("gqa")
    _rewrite(d, lambda raw: raw.update({"model.layers.1.self_attn.k_proj.weight": jnp.zeros((64, 64), jnp.bfloat16)}))
    with pytest.raises(ModelFileError, match=r"k_proj\.weight.*shape \(64, 64\), expected \(32, 64\)") as e:
        load_hf_dir(d)
    assert e.value.path.endswith("model.safetensors")


def test_layer_count_mismatch(copy_of):
    d = copy_of("mha")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2**40  # must fail fast, without building a plan for every claimed layer
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="num_hidden_layers"):
        load_hf_dir(d)


def test_bad_directories(tmp_path, copy_of):
    with pytest.raises(ModelFileError, match="not found"):
        load_hf_dir(tmp_path / "nope")
    d = copy_of("mha")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        load_hf_dir(d)
    (d / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"config\.json.*not found"):
        load_hf_dir(d)


def test_truncated_and_corrupt_files(copy_of):
    d = copy_of("mqa")
    f = d / "model.safetensors"
    data = f.read_bytes()
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        f.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as e:
            load_hf_dir(d)
        assert str(f) in str(e.value)
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ModelFileError, match="header"):
        read_safetensors(f)


def test_read_safetensors_dtypes(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    safetensors.numpy.save_file(tensors, tmp_path / "x.safetensors")
    safetensors.flax.save_file({"c": jnp.array([1.5, -2.0], jnp.bfloat16)}, tmp_path / "y.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["a"], tensors["a"])
    assert got["b"].dtype == np.float16
    got = read_safetensors(tmp_path / "y.safetensors")
    assert got["c"].dtype == ml_dtypes.bfloat16 and got["c"].astype(np.float32).tolist() == [1.5, -2.0]
    safetensors.numpy.save_file({"i": np.arange(3, dtype=np.int64)}, tmp_path / "z.safetensors")
    with pytest.raises(ModelFileError, match="dtype I64"):
        read_safetensors(tmp_path / "z.safetensors")
