"""Server configuration: one TOML file, overridden by command-line flags.

    [server]
    host = "127.0.0.1"
    port = 8000
    model = ""                      # "" = the default model (SmolLM2-135M-Instruct), a GGUF / HF / orbax path,
                                    # or "mock" (the hand-computable test model of serving/mock.py)
    model_name = ""                 # the name clients pass as `model` ("" = from the model)
    policy = "../policies/default.yaml"   # the deployment policy ("" = no rules)
    state_dir = "~/.local/state/aqjax"    # sessions.sqlite3 and audit.jsonl
    governed = true                 # false: no gate at all (benchmark baseline; no audit, no sessions)
    warmup = true                   # compile every shape before answering (503 until then)
    compile_cache = "auto"          # compiled programs kept for the next start: "auto" = $AQJAX_CACHE/xla,
                                    # a folder, or "" (off); see aqjax/compile_cache.py
    default_max_tokens = 512
    drain_timeout = 60.0            # seconds SIGTERM waits for running requests
    reserve_phrase_factor = 2       # room in the per-slot policy tables for requests' extra rules, so that
    reserve_structure_states = 128  #   they do not recompile the decode step (a bigger policy grows the
    reserve_structure_edges = 262144 #  tables once, and recompiles once)

    [engine]                        # serving.engine.EngineConfig
    slots = 8
    max_len = 2048
    chunk_steps = 8
    prefill_chunk = 256
    prefill_budget = 512
    min_active_slots = 1
    max_queue = 32
    logprobs = true                 # per-slot log-probability buffers (allocated once)
    max_top_logprobs = 20           # the most alternatives per token a request may ask for
    protected_spans = 64            # per slot: the protected spans a request's disclosure gate matches,
    protected_chars = 16            #   their distinct non-ASCII characters,
    evidence_nodes = 2048           #   and the nodes of its evidence's digit trie (more: the request gets 400)
    unroll_layers = true            # the decoder's layers unrolled over per-layer weights (default: on CPU)
    speculative = "none"            # "lookup": prompt-lookup speculative decoding in chunks over few slots;
                                    #   "feature" / "hybrid": the feature draft head (/ after lookup)
    # feature_draft = "dir"         #   its folder (default: scripts/train_feature_drafter.py's cache folder)
    # draft_min_confidence = 0.2    #   a feature-head draft ends where its own confidence falls below this
    draft_k = 4                     #   draft tokens per step
    speculative_rows = 1            #   the most slots (a prefix bucket) a speculative chunk runs over
    max_ngram = 3                   #   longest suffix n-gram the lookup matches

    [[keys]]                        # one per API key; only its SHA-256 is stored
    sha256 = "<hex digest>"         # python -m serving.main --hash-key KEY
    principal = "alice"
    roles = ["user"]                # "admin" / "auditor": may read every audit record and the chain head

    [principals.alice]              # optional, per principal
    policy = { phrases = [{ phrase = "project falcon", action = "suppress" }] }   # agent-level fragment
    # or: policy_file = "alice.yaml" (a YAML fragment: phrases / structure / messages)
    # The tools a principal may call, the documents it may read and the labels it is cleared for come from the
    # deployment policy's `principals` and `roles` sections (the entry of the same name; see serving/tools.py and
    # serving/context.py), not from this file: a fragment cannot grant anything. configs/bank.toml is an example.

Relative paths are resolved against the directory of the file that names them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from typing import Any

import yaml

from serving.engine import EngineConfig
from serving.governance import KeyRing, Principal

__all__ = ["ConfigError", "ServerConfig", "load_config"]


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = ""
    model_name: str = ""
    policy: str = ""
    state_dir: str = "~/.local/state/aqjax"
    governed: bool = True
    warmup: bool = True
    compile_cache: str = "auto"
    default_max_tokens: int = 512
    drain_timeout: float = 60.0
    reserve_phrase_factor: int = 2
    reserve_structure_states: int = 128
    reserve_structure_edges: int = 262144
    engine: EngineConfig = EngineConfig()
    keys: KeyRing = dataclasses.field(default_factory=lambda: KeyRing({}))

    def replace(self, **changes) -> ServerConfig:
        engine_fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"governed"}  # ServerConfig's
        eng = {k: v for k, v in changes.items() if k in engine_fields and v is not None}
        top = {k: v for k, v in changes.items() if k not in engine_fields and v is not None}
        cfg = dataclasses.replace(self, **top)
        if eng:
            try:
                cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **eng))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return cfg


_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)} - {"engine", "keys"}
_ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)} - {"governed"}


def _resolve(path: str, base: str) -> str:
    if not path or path == "mock":
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _check_keys(section: Mapping, allowed, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (expected {', '.join(sorted(allowed))})")


def _principal_policy(name: str, spec: Mapping, base: str, where: str) -> Mapping | None:
    _check_keys(spec, ("policy", "policy_file"), where)
    if "policy" in spec and "policy_file" in spec:
        raise ConfigError(f"{where}: give policy or policy_file, not both")
    if "policy" in spec:
        if not isinstance(spec["policy"], Mapping):
            raise ConfigError(f"{where}.policy: expected a table (phrases / structure / messages)")
        return dict(spec["policy"])
    if "policy_file" in spec:
        path = _resolve(spec["policy_file"], base)
        try:
            with open(path, encoding="utf-8") as f:
                fragment = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{where}.policy_file: cannot read {path}: {e}") from None
        if fragment is not None and not isinstance(fragment, Mapping):
            raise ConfigError(f"{where}.policy_file: {path} is not a mapping")
        return fragment
    return None


def load_config(path: str | os.PathLike | None = None) -> ServerConfig:
    """Reads a TOML config file (None: the built-in defaults, no keys)."""
    if path is None:
        return ServerConfig()
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            doc: dict[str, Any] = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    _check_keys(doc, ("server", "engine", "keys", "principals"), path)

    server = dict(doc.get("server", {}))
    _check_keys(server, _SERVER_KEYS, f"{path} [server]")
    for key in ("model", "policy", "state_dir"):
        if key in server:
            server[key] = _resolve(str(server[key]), base)
    if server.get("compile_cache", "auto") not in ("auto", ""):
        server["compile_cache"] = _resolve(str(server["compile_cache"]), base)
    engine = dict(doc.get("engine", {}))
    _check_keys(engine, _ENGINE_KEYS, f"{path} [engine]")
    if engine.get("feature_draft"):
        engine["feature_draft"] = _resolve(str(engine["feature_draft"]), base)
    try:
        engine_cfg = EngineConfig(**engine, governed=bool(server.get("governed", True)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path} [engine]: {e}") from None

    principals_doc = doc.get("principals", {})
    policies = {name: _principal_policy(name, spec, base, f"{path} [principals.{name}]")
                for name, spec in principals_doc.items()}
    entries = {}
    for i, k in enumerate(doc.get("keys", [])):
        where = f"{path} [[keys]] #{i + 1}"
        _check_keys(k, ("sha256", "principal", "roles"), where)
        if "sha256" not in k or "principal" not in k:
            raise ConfigError(f"{where}: needs sha256 and principal")
        digest = str(k["sha256"]).lower()
        if digest in entries:
            raise ConfigError(f"{where}: the same key is listed twice")
        roles = tuple(k.get("roles", ("user",)))
        entries[digest] = Principal(name=str(k["principal"]), roles=roles, policy=policies.get(str(k["principal"])))
    try:
        keys = KeyRing(entries)
    except ValueError as e:
        raise ConfigError(f"{path} [[keys]]: {e}") from None
    try:
        return ServerConfig(**server, engine=engine_cfg, keys=keys)
    except TypeError as e:
        raise ConfigError(f"{path} [server]: {e}") from None
