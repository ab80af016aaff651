"""Server configuration: the shipped TOML file, command-line overrides, keys, policy fragments, the chunked
stop-string scanner and the JSON-object regex (no model needed)."""

import os
import re

import pytest

from serving.api import json_object_regex
from serving.config import ConfigError, load_config
from serving.governance import KeyRing, Principal, hash_key
from serving.main import build_parser, config_from_args
from serving.service import StopScanner

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "server.toml")


def test_the_shipped_config_loads_with_its_example_keys():
    cfg = load_config(SHIPPED)
    assert cfg.policy.endswith("policies/default.yaml") and cfg.governed
    alice = cfg.keys.authenticate("aq-example-key")
    assert alice is not None and alice.name == "example" and alice.policy
    assert cfg.keys.authenticate("aq-example-auditor").can_audit
    assert cfg.keys.authenticate("wrong") is None and cfg.keys.authenticate("") is None


def test_flags_override_the_file():
    args = build_parser().parse_args(["--config", SHIPPED, "--slots", "4", "--max-len", "512",
                                      "--no-gate", "--port", "9001", "--model", "mock"])
    cfg = config_from_args(args)
    assert (cfg.engine.slots, cfg.engine.max_len, cfg.governed, cfg.port, cfg.model) == (4, 512, False, 9001, "mock")
    assert cfg.engine.chunk_steps == load_config(SHIPPED).engine.chunk_steps


def test_compile_cache_from_the_file_and_the_flags(tmp_path):
    assert load_config(SHIPPED).compile_cache == "auto"
    conf = tmp_path / "c.toml"
    conf.write_text('[server]\ncompile_cache = "xla-here"\n')
    assert load_config(conf).compile_cache == str(tmp_path / "xla-here")  # relative to the file
    conf.write_text('[server]\ncompile_cache = ""\n')
    assert load_config(conf).compile_cache == ""
    off = config_from_args(build_parser().parse_args(["--config", SHIPPED, "--no-compile-cache"]))
    assert off.compile_cache == ""
    there = config_from_args(build_parser().parse_args(["--config", SHIPPED, "--compile-cache", str(tmp_path)]))
    assert there.compile_cache == str(tmp_path)
    with pytest.raises(ConfigError, match="exclude"):
        config_from_args(build_parser().parse_args(["--compile-cache", "x", "--no-compile-cache"]))


def test_layer_layout_is_an_engine_setting(tmp_path):
    from serving.engine import Engine, EngineConfig
    from serving.mock import load_mock

    assert load_config(SHIPPED).engine.unroll_layers is None  # the server's default: by device (EngineConfig)
    shipped = load_config(SHIPPED).engine  # and prompt lookup while one stream runs (README)
    assert (shipped.speculative, shipped.speculative_rows) == ("lookup", 1)
    conf_spec = tmp_path / "s.toml"
    conf_spec.write_text('[engine]\nspeculative = "self"\n')
    with pytest.raises(ConfigError, match="speculative must be one of"):
        load_config(conf_spec)
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\nunroll_layers = true\n")
    assert load_config(conf).engine.unroll_layers is True
    conf.write_text('[engine]\nunroll_layers = "yes"\n')
    with pytest.raises(ConfigError, match="unroll_layers must be true or false"):
        load_config(conf)
    m = load_mock()
    for unroll in (False, True):
        engine = Engine(m.cfg, m.params, EngineConfig(slots=2, max_len=64, unroll_layers=unroll))
        assert isinstance(engine.params["layers"], list) == unroll


def test_bad_config_files_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(bad)
    bad.write_text('[[keys]]\nsha256 = "abc"\nprincipal = "x"\n')
    with pytest.raises(ConfigError, match="SHA-256"):
        load_config(bad)
    bad.write_text("[engine]\nprefill_chunk = 100\n")
    with pytest.raises(ConfigError, match="power of two"):
        load_config(bad)
    ok = tmp_path / "ok.toml"
    (tmp_path / "frag.yaml").write_text("phrases:\n  - {phrase: zebra, action: refuse}\n")
    ok.write_text(f'[[keys]]\nsha256 = "{hash_key("k")}"\nprincipal = "p"\nroles = ["admin"]\n'
                  '[principals.p]\npolicy_file = "frag.yaml"\n')
    p = load_config(ok).keys.authenticate("k")
    assert p.policy == {"phrases": [{"phrase": "zebra", "action": "refuse"}]} and p.can_audit


def test_keys_are_kept_hashed():
    ring = KeyRing({hash_key("secret"): Principal("a")})
    assert "secret" not in repr(ring.__dict__) and ring.authenticate("secret").name == "a"


def test_stop_scanner_holds_back_what_could_become_a_stop_string():
    s = StopScanner(["END", "xyz"])
    assert s.push("abc E") == ("abc ", False)  # "E" may start "END"
    assert s.push("N") == ("", False)
    assert s.push("Dmore") == ("", True)  # "END" found: nothing after it
    s = StopScanner(["END"])
    assert s.push("EN") == ("", False) and s.push("x") == ("ENx", False) and s.flush() == ""


def test_json_object_regex():
    rx = re.compile(json_object_regex())
    for ok in ['{}', '{"a": 1}', '{"a": [1, "x", null], "b": {"c": true}}', '{ "a" : -1.5e3 }']:
        assert rx.fullmatch(ok), ok
    for bad in ['[]', '{"a": }', '{"a": {"b": {"c": 1}}}', '{a: 1}', '"x"']:
        assert not rx.fullmatch(bad), bad


def test_a_starting_server_answers_503_with_retry_after():
    from fastapi.testclient import TestClient

    from serving.api import create_app
    from serving.config import ServerConfig
    from serving.service import Service

    keys = KeyRing({hash_key("k"): Principal("p")})
    app = create_app(Service(ServerConfig(model="mock", keys=keys)), load_in_background=False)
    c = TestClient(app)  # no lifespan: the service never finishes starting
    h = {"Authorization": "Bearer k"}
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "starting" and r.headers["Retry-After"]
    r = c.post("/v1/chat/completions", headers=h, json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_starting" and r.headers["Retry-After"]
    assert c.get("/v1/models").status_code == 401  # authentication comes first
    assert c.get("/metrics").status_code == 200


def test_a_policy_with_a_gate_the_slots_do_not_carry_fails_closed():
    from types import SimpleNamespace

    from serving.gating import SlotPolicy, UnsupportedPolicy

    # every gate the policy compiler makes is carried; one it might add later must not be dropped silently
    compiled = SimpleNamespace(kinds=("phrases", "telepathy"), arrays=((), ()), policy=SimpleNamespace(name="bank"))
    with pytest.raises(UnsupportedPolicy, match="telepathy"):
        SlotPolicy.from_compiled(compiled)
