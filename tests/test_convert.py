"""GGUF / HF -> orbax conversion, load_orbax, and the load_model dispatcher."""

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqjax.engine import Generator
from models import convert, download
from models.convert import MANIFEST, load_orbax, read_manifest
from models.errors import ModelFileError
from models.gguf import load_gguf
from models.loader import LoadedModel, load_model
from models.params import check_params, is_packed, pack_params, unpack_params
from models.safetensors import load_hf_dir

DATA = pathlib.Path(__file__).parent / "data"
TINY_GQA = DATA / "tiny_llama_gqa"


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def smollm2_orbax(smollm2_gguf, tmp_path_factory) -> pathlib.Path:
    dst = tmp_path_factory.mktemp("orbax") / "smollm2"
    assert convert.main([str(smollm2_gguf), str(dst)]) == 0
    return dst


@pytest.mark.slow
def test_gguf_to_orbax_roundtrip(smollm2_gguf, smollm2_orbax):
    t0 = time.perf_counter()
    cfg_g, params_g = load_gguf(smollm2_gguf)
    jax.block_until_ready(params_g)
    t1 = time.perf_counter()
    cfg_o, params_o = load_orbax(smollm2_orbax)
    jax.block_until_ready(params_o)
    t2 = time.perf_counter()
    print(f"\nload_gguf (dequantize) {t1 - t0:.2f} s, load_orbax {t2 - t1:.2f} s")
    assert cfg_o == cfg_g
    _assert_trees_equal(params_o, params_g)

    manifest = read_manifest(smollm2_orbax)
    assert manifest["dtype"] == "float32"
    assert manifest["config"] == cfg_g.to_dict()
    assert manifest["source"]["kind"] == "gguf"
    assert manifest["source"]["sha256"] == download.GGUF_SHA256
    assert manifest["source"]["path"] == str(pathlib.Path(smollm2_gguf).resolve())
    assert manifest["tokenizer"]["format"] == "aqjax-tokenizer"
    assert manifest["layout"] == "packed" and manifest["format"] == convert.FORMAT


@pytest.mark.slow
def test_packed_load_is_the_engines_layout(smollm2_gguf, smollm2_orbax):
    cfg, params_g = load_gguf(smollm2_gguf)
    ready = load_model(smollm2_orbax, packed=True)
    assert ready.packed and is_packed(ready.params)
    _assert_trees_equal(ready.params, pack_params(params_g, cfg))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(ready.params))
    # the engine takes either layout and runs the same model
    gen_ready, gen_canon = Generator(cfg, ready.params), Generator(cfg, params_g)
    prompt = ready.tokenizer.encode("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert ([r.tokens for r in gen_ready.generate([prompt], max_new_tokens=6)]
            == [r.tokens for r in gen_canon.generate([prompt], max_new_tokens=6)])


@pytest.mark.slow
def test_load_orbax_casts_dtype(smollm2_orbax):
    cfg, params = load_orbax(smollm2_orbax, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_load_model_dispatch_real(smollm2_gguf, smollm2_orbax):
    from_gguf = load_model(smollm2_gguf)
    from_orbax = load_model(smollm2_orbax)
    assert isinstance(from_gguf, LoadedModel)
    assert from_gguf.source == str(smollm2_gguf) and from_orbax.source == str(smollm2_orbax)
    assert from_gguf.cfg == from_orbax.cfg
    text = "<|im_start|>user\nHello, world!<|im_end|>\n"
    assert from_gguf.tokenizer.encode(text) == from_orbax.tokenizer.encode(text)
    assert from_orbax.tokenizer.decode(from_orbax.tokenizer.encode(text)) == text
    _assert_trees_equal(from_gguf.params, from_orbax.params)


@pytest.mark.slow
def test_load_model_default_uses_download(monkeypatch, smollm2_gguf):
    calls = []
    monkeypatch.setattr(download, "default_model_path", lambda **k: calls.append(k) or smollm2_gguf)
    model = load_model()
    assert calls == [{}] and model.source == str(smollm2_gguf)
    assert model.cfg.n_layers == 30


def test_hf_dir_to_orbax_bfloat16_via_cli(tmp_path, capsys):
    dst = tmp_path / "ck"
    assert convert.main([str(TINY_GQA), str(dst), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["tokenizer"] is None
    assert manifest["source"]["kind"] == "hf"
    assert set(manifest["source"]["sha256"]) >= {"config.json", "model.safetensors"}

    cfg_h, params_h = load_hf_dir(TINY_GQA, dtype=jnp.bfloat16)
    cfg_o, params_o = load_orbax(dst, dtype=jnp.bfloat16)
    assert cfg_o == cfg_h
    _assert_trees_equal(params_o, params_h)
    # The tiny checkpoint's weights are bf16 already, so a float32 load of the bf16 checkpoint is exact too.
    _, params_f = load_orbax(dst)
    _assert_trees_equal(params_f, load_hf_dir(TINY_GQA)[1])

    model = load_model(dst)
    assert model.tokenizer is None and model.cfg == cfg_h
    model = load_model(TINY_GQA)
    assert model.tokenizer is None and model.cfg == cfg_h


def test_pack_unpack_roundtrip_and_v1_checkpoints_still_load(tmp_path):
    cfg, params = load_hf_dir(TINY_GQA)
    packed = pack_params(params, cfg)
    check_params(packed, cfg, packed=True)
    assert is_packed(packed) and not is_packed(params)
    _assert_trees_equal(unpack_params(packed, cfg), params)

    v1 = tmp_path / "v1"
    convert.save_orbax(v1, cfg, params, layout="canonical")
    manifest = json.loads((v1 / MANIFEST).read_text())
    assert manifest["layout"] == "canonical"
    del manifest["layout"]  # what aqjax-orbax-v1 manifests look like
    (v1 / MANIFEST).write_text(json.dumps({**manifest, "format": "aqjax-orbax-v1"}))
    _assert_trees_equal(load_orbax(v1)[1], params)
    _assert_trees_equal(load_orbax(v1, packed=True)[1], packed)
    _assert_trees_equal(load_model(TINY_GQA, packed=True).params, packed)

    (v1 / MANIFEST).write_text(json.dumps({**manifest, "format": convert.FORMAT, "layout": "sideways"}))
    with pytest.raises(ModelFileError, match="layout is 'sideways'"):
        load_orbax(v1)
    with pytest.raises(ValueError, match="layout must be one of"):
        convert.save_orbax(tmp_path / "bad", cfg, params, layout="sideways")


def test_destination_rules(tmp_path, capsys):
    dst = tmp_path / "ck"
    assert convert.main([str(TINY_GQA), str(dst)]) == 0
    assert convert.main([str(TINY_GQA), str(dst)]) == 1  # exists: refuse without --force
    assert "--force" in capsys.readouterr().err
    assert convert.main([str(TINY_GQA), str(dst), "--force", "--dtype", "bfloat16"]) == 0
    assert read_manifest(dst)["dtype"] == "bfloat16"

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert convert.main([str(TINY_GQA), str(foreign), "--force"]) == 1  # --force never wipes a foreign dir
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_sources_and_checkpoints(tmp_path):
    assert convert.main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="not a model"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelFileError, match="not an aqjax checkpoint"):
        load_orbax(tmp_path / "empty")

    dst = tmp_path / "ck"
    convert.convert(TINY_GQA, dst)
    manifest = (dst / MANIFEST).read_text()
    (dst / MANIFEST).write_text("{broken")
    with pytest.raises(ModelFileError, match="cannot read manifest") as e:
        load_orbax(dst)
    assert MANIFEST in str(e.value)
    (dst / MANIFEST).write_text(json.dumps({**json.loads(manifest), "format": "something-else"}))
    with pytest.raises(ModelFileError, match="format"):
        load_orbax(dst)
    bad_cfg = json.loads(manifest)
    bad_cfg["config"]["d_model"] = 32  # params on disk no longer match the config
    (dst / MANIFEST).write_text(json.dumps(bad_cfg))
    with pytest.raises(ModelFileError, match=r"params do not match.*expected \(128, 32\)"):
        load_orbax(dst)
    (dst / MANIFEST).write_text(manifest)
    shutil.rmtree(dst / "params")
    with pytest.raises(ModelFileError, match="params"):
        load_orbax(dst)


@pytest.mark.slow
def test_gguf_magic_without_suffix_is_dispatched(tmp_path, smollm2_gguf):
    link = tmp_path / "model.bin"
    link.symlink_to(smollm2_gguf)
    assert load_model(link).cfg.n_layers == 30
